#!/usr/bin/env python
"""Inference latency and throughput: base alone, merged adapter, unmerged (factored) adapter, and a
mixed batch over K adapters (each example its own LoRA factors and head; one row per --mixed-impls
strategy, see lora_jax.mixed.GatheredKernel), at batch 1 and 32.

Random weights of the shape in a config.json and random adapters (LoRA r = 8 on query/value with
non-zero B, random heads); sequence length fixed. Median over timed calls after warm-up, the clock
stopped by block_until_ready; the cells of one batch size are timed in rounds, one call each in turn. Also the memory of one base + N adapters against N merged models,
computed from parameter counts in float32 (not measured).

    python benchmarks/bench_inference.py --config ../shared/models/all-MiniLM-L6-v2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import common
from common import ROOT


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="directory with the config.json to benchmark")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batches", default="1,32")
    p.add_argument("--adapters", type=int, default=8, help="adapters in the mixed batch")
    p.add_argument("--mixed-impls", default="gather,masked,fused",
                   help="mixed-batch strategies to time, comma-separated (lora_jax.mixed.MIXED_IMPLS)")
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "results" / "inference"))
    p.add_argument("--name")
    args = p.parse_args()
    if not (Path(args.config) / "config.json").is_file():
        print(f"error: {args.config} has no config.json", file=sys.stderr)
        return 2
    try:
        batches = [int(b) for b in args.batches.split(",")]
        assert all(b > 0 for b in batches) and args.seq > 0 and args.calls > 1 and args.adapters > 0
    except (ValueError, AssertionError):
        print("error: --batches takes positive integers (1,32); --seq, --adapters must be > 0, --calls > 1",
              file=sys.stderr)
        return 2
    from lora_jax.mixed import MIXED_IMPLS

    impls = common.names(args.mixed_impls, MIXED_IMPLS, "--mixed-impls")

    import jax
    import jax.numpy as jnp
    import numpy as np

    from lora_jax import lora, profiling, weights
    from lora_jax.model import forward, init_params
    from lora_jax.report import write_text
    from lora_jax.mixed import mixed_forward, stack_adapters

    mcfg = weights.read_config(Path(args.config), num_labels=2)
    params = init_params(mcfg, jax.random.key(0))
    flat = lora.flatten(params)
    lcfg = lora.LoraConfig(rank=8, alpha=16)

    def random_adapter(seed):
        ad = lora.init(params, lcfg, jax.random.key(seed))
        trained = {}
        for i, (path, f) in enumerate(ad.items()):
            trained[f"lora/{path}/a"] = np.asarray(f["a"])
            trained[f"lora/{path}/b"] = 0.02 * np.asarray(jax.random.normal(jax.random.key(1000 * seed + i), f["b"].shape))
        for path, v in flat.items():
            if path.startswith("classifier/"):
                trained[f"params/{path}"] = np.asarray(v) + 0.01 * seed
        return trained

    adapters = [random_adapter(s + 1) for s in range(args.adapters)]
    tree = lora.combine({f"params/{k}": v for k, v in flat.items()}, adapters[0])
    merged = lora.merge(tree["params"], tree["lora"], lcfg)
    bank, c_max = stack_adapters(flat, [(a, lcfg) for a in adapters])
    frozen_no_head = {k: v for k, v in flat.items() if not k.startswith("classifier/")}
    # Every input on the device before the clock runs: a host (numpy) leaf would be copied over
    # in every call and timed as if it were the model's cost.
    tree, merged, bank = jax.device_put((tree, merged, bank))
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves((params, tree, merged, bank, frozen_no_head)))

    plain = jax.jit(lambda prm, b: forward(mcfg, prm, b, hidden=False)["logits"])
    factored = jax.jit(lambda prm, ad, b: forward(mcfg, lora.apply(prm, ad, lcfg), b, hidden=False)["logits"])
    mixed = {m: jax.jit(lambda bk, fr, b, i, m=m: mixed_forward(mcfg, bk, fr, b, i, m)) for m in impls}

    def timed_together(cells: dict[str, tuple]) -> dict[str, list[float]]:
        """Latencies of each ``(fn, *args)``, timed in rounds that call every cell once in turn: a
        drift of the device's clocks or of the host's load falls on all cells alike, not on
        whichever happened to run first."""
        for fn, *a in cells.values():
            for _ in range(args.warmup):
                jax.block_until_ready(fn(*a))
        times = {name: [] for name in cells}
        for _ in range(args.calls):
            for name, (fn, *a) in cells.items():
                t0 = time.perf_counter()
                jax.block_until_ready(fn(*a))
                times[name].append(time.perf_counter() - t0)
        return times

    rows = []
    rng = np.random.default_rng(0)
    for b in batches:
        batch = {"input_ids": jnp.asarray(rng.integers(3, mcfg.vocab_size, (b, args.seq)), jnp.int32),
                 "attention_mask": jnp.ones((b, args.seq), jnp.int32)}
        idx = jnp.asarray(np.arange(b) % args.adapters, jnp.int32)
        cells = {
            "base": (plain, params, batch),
            "merged adapter": (plain, merged, batch),
            "unmerged adapter": (factored, tree["params"], tree["lora"], batch),
        }
        for m, fn in mixed.items():
            cells[f"mixed batch, {args.adapters} adapters ({m})"] = (fn, bank, frozen_no_head, batch, idx)
        times = timed_together(cells)
        cells = {name: statistics.median(t) for name, t in times.items()}
        base_t = cells["base"]
        for name, t in cells.items():
            q1, _, q3 = statistics.quantiles(times[name], n=4)
            rows.append({"batch": b, "seq": args.seq, "what": name, "latency_s": t, "latency_q1_s": q1,
                         "latency_q3_s": q3, "examples_per_sec": b / t, "vs_base": t / base_t})
        print(f"[inference] batch {b}: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in cells.items()),
              file=sys.stderr)

    n_base = sum(int(np.prod(v.shape)) for v in flat.values())
    n_adapter = sum(int(np.prod(v.shape)) for v in adapters[0].values())
    memory = [{"adapters": n, "base_plus_adapters_bytes": 4 * (n_base + n * n_adapter),
               "merged_models_bytes": 4 * n * n_base} for n in (1, 8, 64)]
    dev = profiling.device_info()
    stem = args.name or f"{mcfg.model_type}-h{mcfg.hidden_size}-{dev['platform']}"
    meta = {"command": common.command(__file__),
            "date": profiling.now(), "device": dev, "versions": profiling.versions("jax", "jaxlib", "flax"),
            "config": args.config, "calls": args.calls, "warmup": args.warmup}
    mib = lambda n: f"{n / 2**20:,.1f}"
    md = [*common.header("Inference", date=meta["date"], command=meta["command"])[:-1],
          f"Device: {dev['platform']} ({dev['device_kind']}); {mcfg.model_type}, hidden {mcfg.hidden_size}, "
          f"{mcfg.num_hidden_layers} layers; LoRA r = 8 on query/value; median of {args.calls} calls after "
          f"{args.warmup} warm-up, the cells of a batch size timed in turn, one call each per round (the "
          "quartiles show the spread). Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
          "", "| batch | seq | what | latency (ms) | quartiles (ms) | examples/s | vs base |",
          "|---:|---:|---|---:|---:|---:|---:|"]
    md += [f"| {r['batch']} | {r['seq']} | {r['what']} | {r['latency_s'] * 1e3:.2f} | "
           f"{r['latency_q1_s'] * 1e3:.2f}-{r['latency_q3_s'] * 1e3:.2f} | {r['examples_per_sec']:.1f} | "
           f"{r['vs_base']:.3f}x |" for r in rows]
    md += ["", "Memory of the weights in float32, computed from parameter counts (not measured):", "",
           "| adapters N | one base + N adapters (MiB) | N merged models (MiB) |", "|---:|---:|---:|"]
    md += [f"| {m['adapters']} | {mib(m['base_plus_adapters_bytes'])} | {mib(m['merged_models_bytes'])} |"
           for m in memory]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps({"meta": meta, "rows": rows, "memory": memory}, indent=2) + "\n"),
                         (".md", "\n".join(md) + "\n")):
        write_text(out / f"{stem}{suffix}", text)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
