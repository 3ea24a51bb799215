#!/usr/bin/env python
"""Dropout on one array: ``jax.random.bernoulli`` + select (what ``flax.linen.Dropout`` does)
against ``lora_jax.dropout.dropout`` (four 16-bit draws per threefry hash).

Each is jitted alone on a float32 array of ones; median over timed calls after warm-up, the clock
stopped by block_until_ready, the two timed in turns. The default shapes are roberta-base's at
batch 16, sequence 128: the attention probabilities (B, heads, T, T) and a hidden state (B, T, H).
Writes ``OUT/dropout-<device>.json`` and ``.md``.

    python benchmarks/bench_dropout.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import common
from common import ROOT


def parse_shapes(text: str) -> list[tuple[int, ...]]:
    shapes = [tuple(int(n) for n in s.split("x")) for s in text.split(",") if s]
    if not shapes or any(not s or min(s) < 1 for s in shapes):
        raise ValueError
    return shapes


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="16x12x128x128,16x128x768", help="comma-separated, dims joined by x")
    p.add_argument("--rate", type=float, default=0.1)
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "results" / "dropout"))
    args = p.parse_args()
    try:
        shapes = parse_shapes(args.shapes)
    except ValueError:
        print(f"error: --shapes takes positive dims joined by x, comma-separated (16x128x768), got {args.shapes!r}",
              file=sys.stderr)
        return 2
    if not 0.0 < args.rate < 1.0 or args.calls < 1 or args.warmup < 0:
        print("error: --rate must be in (0, 1), --calls >= 1, --warmup >= 0", file=sys.stderr)
        return 2

    import jax
    import jax.numpy as jnp

    from lora_jax import dropout, profiling
    from lora_jax.report import write_text

    rate = args.rate

    def bernoulli(x, key):
        keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
        return jax.lax.select(keep, x / (1.0 - rate), jnp.zeros_like(x))

    impls = {"jax.random.bernoulli": bernoulli, "lora_jax.dropout": lambda x, key: dropout.dropout(x, rate, key)}
    rows = []
    for shape in shapes:
        x = jnp.ones(shape, jnp.float32)
        fns = {name: jax.jit(fn) for name, fn in impls.items()}
        times = {name: [] for name in fns}
        keep = {}
        for i in range(args.warmup + args.calls):
            for name, fn in fns.items():  # in turns, so drifts in the machine hit both alike
                key = jax.random.key(i)
                t0 = time.perf_counter()
                y = fn(x, key).block_until_ready()
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - t0)
                keep[name] = float((y != 0).mean())
        for name in fns:
            rows.append({"shape": list(shape), "impl": name, "median_ms": 1e3 * profiling.median(times[name]),
                         "kept": keep[name]})

    meta = {"command": common.command(__file__), "date": profiling.now(),
            "device": profiling.device_info(), "versions": profiling.versions("jax", "jaxlib", "flax"),
            "rate": rate, "calls": args.calls, "warmup": args.warmup}
    lines = [*common.header(f"Dropout mask + select, rate {rate}", date=meta["date"], command=meta["command"],
                            device=meta["device"], versions=meta["versions"]),
             f"Median of {args.calls} jitted calls after {args.warmup} warm-up, the two in turns; "
             "`kept`: the share of non-zero outputs in the last call.", "",
             "| shape | jax.random.bernoulli ms | lora_jax.dropout ms | ratio | kept (ours) |",
             "|---|---:|---:|---:|---:|"]
    for shape in shapes:
        theirs, ours = (next(r for r in rows if r["shape"] == list(shape) and r["impl"] == n) for n in impls)
        lines.append(f"| {'x'.join(map(str, shape))} | {theirs['median_ms']:.1f} | {ours['median_ms']:.1f} | "
                     f"{theirs['median_ms'] / ours['median_ms']:.1f}x | {ours['kept']:.4f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"dropout-{meta['device']['platform']}"
    write_text(out / f"{stem}.json", json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    write_text(out / f"{stem}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
