#!/usr/bin/env python
"""Single float32 matrix products at the shapes of an encoder's train step, XLA (jax.jit) against
PyTorch: the rate each framework's matmul library reaches on this device, apart from everything else
in the step.

Why: on a CPU most of a train step is matmuls (results/profile/), so the step time one framework can
reach against another is bounded by how fast each multiplies matrices. The shapes come from a
config.json and the batch and sequence length:

    tokens x hidden @ hidden x hidden        (q, k, v, output projections, and their input gradients)
    tokens x hidden @ hidden x intermediate  (FFN in)
    tokens x intermediate @ intermediate x hidden  (FFN out)
    the same with the weight used transposed, as the backward pass uses it
    (batch x heads) x seq x head_dim @ head_dim x seq  (attention scores)

Each framework runs in its own subprocess; the clock stops after block_until_ready (JAX) or when
PyTorch's CPU matmul returns (it is synchronous; on GPU after cuda.synchronize). Median of --repeats.

    python benchmarks/bench_gemm.py                      # roberta-base shape, batch 16, seq 128
    python benchmarks/bench_gemm.py --out /tmp/g --name quick --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import common
from common import ROOT
DEFAULT_CONFIG = ROOT.parent / "shared" / "models" / "roberta-base-tokenizer"
FRAMEWORKS = ("jax", "torch")


def shapes(config: dict, batch: int, seq: int) -> list[dict]:
    """The step's products as {name, batch, m, k, n, transpose_b, per_layer}: C[batch, m, n] =
    A[batch, m, k] @ B, with B stored (n, k) where transpose_b (a weight used transposed, as in the
    backward pass); per_layer: how many such products one layer's forward (or backward input
    gradient) runs, which weights the dense rate (``dense_rate``)."""
    h, inter, heads = config["hidden_size"], config["intermediate_size"], config["num_attention_heads"]
    tokens = batch * seq
    return [
        {"name": "projection x W", "batch": 1, "m": tokens, "k": h, "n": h, "transpose_b": False, "per_layer": 4},
        {"name": "projection dY Wᵀ", "batch": 1, "m": tokens, "k": h, "n": h, "transpose_b": True, "per_layer": 4},
        {"name": "FFN in x W", "batch": 1, "m": tokens, "k": h, "n": inter, "transpose_b": False, "per_layer": 1},
        {"name": "FFN in dY Wᵀ", "batch": 1, "m": tokens, "k": inter, "n": h, "transpose_b": True, "per_layer": 1},
        {"name": "FFN out x W", "batch": 1, "m": tokens, "k": inter, "n": h, "transpose_b": False, "per_layer": 1},
        {"name": "FFN out dY Wᵀ", "batch": 1, "m": tokens, "k": h, "n": inter, "transpose_b": True, "per_layer": 1},
        {"name": "attention q kᵀ", "batch": batch * heads, "m": seq, "k": h // heads, "n": seq,
         "transpose_b": True, "per_layer": 2},
    ]


def flops(s: dict) -> int:
    return 2 * s["batch"] * s["m"] * s["k"] * s["n"]


def dense_rate(rows: list[dict]) -> float:
    """One framework's rate over a layer's 2-D products, each shape weighted by how many FLOPs of it a
    layer runs: total FLOPs / total seconds."""
    dense = [r for r in rows if r["batch"] == 1]
    return sum(r["per_layer"] * flops(r) for r in dense) / sum(r["per_layer"] * r["median_s"] for r in dense)


def batched_rate(rows: list[dict]) -> float:
    (att,) = [r for r in rows if r["batch"] > 1]
    return att["gflop_per_s"] * 1e9


def step_bounds(step_rows: list[dict], rates: dict[str, tuple[float, float]]) -> list[dict]:
    """For each row of a bench.py run that counted its matmul FLOPs: the seconds its matmuls alone take
    at each framework's (dense, batched) rate, as if nothing else in the step took any time."""
    out = []
    for r in step_rows:
        if not r.get("matmul_flops") or r.get("batched_matmul_flops") is None or "error" in r:
            continue
        dense, batched = r["matmul_flops"] - r["batched_matmul_flops"], r["batched_matmul_flops"]
        out.append({"framework": r["framework"], "method": r["method"], "variant": r["variant"],
                    "step_s": sorted(r["step_times_s"])[len(r["step_times_s"]) // 2],
                    "matmul_flops": r["matmul_flops"], "batched_matmul_flops": batched,
                    "matmul_s_at": {f: dense / d + batched / b for f, (d, b) in rates.items()}})
    return out


def operands(s: dict, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    a = rng.standard_normal((s["batch"], s["m"], s["k"]), dtype=np.float32)
    b_shape = (s["batch"], s["n"], s["k"]) if s["transpose_b"] else (s["batch"], s["k"], s["n"])
    b = rng.standard_normal(b_shape, dtype=np.float32)
    if s["batch"] == 1:  # a plain 2-D product, as a dense layer runs it
        a, b = a[0], b[0]
    return a, b


def time_jax(s: dict, warmup: int, repeats: int) -> list[float]:
    import jax
    import jax.numpy as jnp

    a, b = (jax.device_put(x) for x in operands(s))
    product = jax.jit(lambda a, b: jnp.matmul(a, jnp.swapaxes(b, -1, -2) if s["transpose_b"] else b))
    times = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        product(a, b).block_until_ready()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def time_torch(s: dict, warmup: int, repeats: int) -> list[float]:
    import torch

    cuda = torch.cuda.is_available()
    a, b = (torch.from_numpy(x).to("cuda" if cuda else "cpu") for x in operands(s))
    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            t0 = time.perf_counter()
            torch.matmul(a, b.transpose(-1, -2) if s["transpose_b"] else b)
            if cuda:
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return times


def run_framework(framework: str, todo: list[dict], warmup: int, repeats: int) -> dict:
    """In the subprocess: every shape's timings, the versions and the device."""
    from lora_jax import profiling

    timer = time_jax if framework == "jax" else time_torch
    rows = [{**s, "framework": framework, "times_s": timer(s, warmup, repeats)} for s in todo]
    if framework == "jax":
        versions, device = profiling.versions("jax", "jaxlib"), profiling.device_info()
    else:
        import torch

        cuda = torch.cuda.is_available()
        versions = {"torch": torch.__version__}
        device = {"platform": "gpu" if cuda else "cpu", "host": platform.node(),
                  "device_kind": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()}
    return {"rows": rows, "versions": versions, "device": device}


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        *common.header("Single float32 matmuls at the train step's shapes", date=meta["date"],
                       command=meta["command"])[:-1],
        f"Device: {meta['device']}; shapes: {meta['shape']}; median of {meta['repeats']} products after "
        f"{meta['warmup']} warm-up. Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        "",
        "Each row is one product C = A @ B, B a weight stored (in, out) as lora-jax stores it and used "
        "transposed where the name says Wᵀ (PyTorch stores its weights (out, in): the two layouts are "
        "the plain and Wᵀ rows); XLA: `jax.jit(jnp.matmul)`, PyTorch: `torch.matmul`, each framework in "
        "its own process with its default threads. GFLOP/s = 2 x m x k x n (x batch) / median seconds.",
        "",
        "| product | batch x m x k x n | GFLOP | " + " | ".join(f"{f} GFLOP/s" for f in meta["frameworks"])
        + (" | XLA / PyTorch time |" if len(meta["frameworks"]) == 2 else " |"),
        "|---|---|---:|" + "---:|" * len(meta["frameworks"]) + ("---:|" if len(meta["frameworks"]) == 2 else ""),
    ]
    by = {(r["framework"], r["name"]): r for r in rows}
    for s in meta["shapes"]:
        cells = [by.get((f, s["name"])) for f in meta["frameworks"]]
        rates = [f"{r['gflop_per_s']:,.0f}" if r else "unmeasured" for r in cells]
        line = (f"| {s['name']} | {s['batch']} x {s['m']} x {s['k']} x {s['n']} | {flops(s) / 1e9:.2f} | "
                + " | ".join(rates) + " |")
        xla, pt = by.get(("jax", s["name"])), by.get(("torch", s["name"]))
        if len(cells) == 2 and xla and pt:
            line += f" {xla['median_s'] / pt['median_s']:.2f}x |"
        lines.append(line)
    rates = meta.get("rates")
    if rates:
        lines += ["", "Rates over a layer's products (dense: the 2-D rows weighted by how many of each a layer runs; "
                  "batched: the attention row): " + "; ".join(
                      f"{f} {d / 1e9:,.0f} / {b / 1e9:,.0f} GFLOP/s" for f, (d, b) in rates.items())]
    bounds = meta.get("bounds")
    if bounds:
        fws = list(rates)
        ref = next((b for b in bounds if (b["framework"], b["method"], b["variant"]) == ("torch", "lora", "fp32")), None)
        lines += [
            "", f"## The step's matmuls alone at these rates (steps from `{meta['step_file']}`)", "",
            "Each row's matmul FLOPs (counted in that run: XLA's optimised program, PyTorch's FLOP counter) "
            "over the rates above: the step time if its matmuls ran as fast as alone and nothing else took "
            "any time: a floor no real step goes below. "
            + ("Ratios divide by the measured PyTorch + peft LoRA fp32 step of that run." if ref else ""), "",
            "| step | measured step (s) | matmul GFLOP (batched) | " + " | ".join(f"matmuls at {f}'s rates (s)" for f in fws)
            + (" | " + " | ".join(f"that / PyTorch LoRA step ({f})" for f in fws) if ref else "") + " |",
            "|---|---:|---:|" + "---:|" * len(fws) * (2 if ref else 1),
        ]
        for b in bounds:
            at = [b["matmul_s_at"][f] for f in fws]
            line = (f"| {b['framework']} {b['method']} {b['variant']} | {b['step_s']:.3f} | "
                    f"{b['matmul_flops'] / 1e9:,.1f} ({b['batched_matmul_flops'] / 1e9:,.1f}) | "
                    + " | ".join(f"{t:.3f}" for t in at))
            if ref:
                line += " | " + " | ".join(f"{t / ref['step_s']:.2f}x" for t in at)
            lines.append(line + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="directory with the encoder's config.json")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=20, help="timed products per shape (the median is reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--frameworks", default="jax,torch", help="comma-separated: jax, torch")
    p.add_argument("--out", default=str(ROOT / "results" / "profile"))
    p.add_argument("--name", help="output file stem (default: gemm-<model>-b<batch>-s<seq>-<platform>)")
    p.add_argument("--step", metavar="FILE", help="a benchmarks/bench.py JSON whose rows counted their matmul FLOPs: "
                   "adds what those matmuls alone take at the rates measured here")
    p.add_argument("--run", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.run:
        job = json.loads(args.run)
        print(json.dumps(run_framework(job["framework"], job["shapes"], job["warmup"], job["repeats"])))
        return 0
    config_path = Path(args.config) / "config.json"
    if not config_path.is_file():
        print(f"error: {args.config} has no config.json", file=sys.stderr)
        return 2
    if args.batch <= 0 or args.seq <= 0 or args.repeats <= 0 or args.warmup < 0:
        print("error: --batch, --seq and --repeats must be > 0 and --warmup >= 0", file=sys.stderr)
        return 2
    frameworks = common.names(args.frameworks, FRAMEWORKS, "--frameworks")
    step_rows = None
    if args.step:
        try:
            step_rows = json.loads(Path(args.step).read_text())["rows"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"error: --step {args.step} is not a bench.py JSON ({type(e).__name__}: {e})", file=sys.stderr)
            return 2
        if not any(r.get("batched_matmul_flops") is not None for r in step_rows):
            print(f"error: --step {args.step} has no row with matmul FLOPs (made before bench.py counted them?)",
                  file=sys.stderr)
            return 2
        # Rates of other shapes say nothing about that step's matmuls.
        other = {(Path(r["config"]).resolve(), r["batch"], r["seq"]) for r in step_rows if "config" in r}
        if other - {(Path(args.config).resolve(), args.batch, args.seq)}:
            config_, batch, seq = sorted(other, key=str)[0]
            print(f"error: --step {args.step} timed {config_} at batch {batch}, seq {seq}: pass the same --config, "
                  f"--batch and --seq", file=sys.stderr)
            return 2
    try:
        config = json.loads(config_path.read_text())
        todo = shapes(config, args.batch, args.seq)
    except (ValueError, KeyError) as e:
        print(f"error: {config_path} lacks what the shapes need ({type(e).__name__}: {e})", file=sys.stderr)
        return 2
    import datetime

    rows, versions, device = [], {}, {}
    env = {**os.environ}
    for framework in frameworks:
        print(f"[bench_gemm] {framework}: {len(todo)} shapes ...", file=sys.stderr, flush=True)
        job = {"framework": framework, "shapes": todo, "warmup": args.warmup, "repeats": args.repeats}
        proc = subprocess.run([sys.executable, __file__, "--run", json.dumps(job)], capture_output=True, text=True,
                              env=env)
        if proc.returncode != 0:
            tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
            print(f"error: the {framework} run failed: {tail}", file=sys.stderr)
            return 1
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        versions.update(result["versions"])
        device = device or result["device"]
        for r in result["rows"]:
            r["median_s"] = sorted(r["times_s"])[len(r["times_s"]) // 2]
            r["gflop_per_s"] = flops(r) / 1e9 / r["median_s"]
            rows.append(r)
    model_name = config.get("model_type", "model")
    meta = {
        "command": common.command(__file__),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"{device.get('platform')} ({device.get('device_kind', 'unknown kind')}, host {device.get('host')})",
        "shape": f"{model_name} config from {args.config}, batch {args.batch}, seq {args.seq}",
        "repeats": args.repeats, "warmup": args.warmup, "versions": versions, "frameworks": frameworks,
        "shapes": todo,
    }
    # Every framework ran every shape (a failed run returned above).
    meta["rates"] = {f: (dense_rate([r for r in rows if r["framework"] == f]),
                         batched_rate([r for r in rows if r["framework"] == f])) for f in frameworks}
    if step_rows is not None:
        meta["step_file"] = args.step
        meta["bounds"] = step_bounds(step_rows, meta["rates"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"gemm-{model_name}-b{args.batch}-s{args.seq}-{device.get('platform', 'unknown')}"
    text = markdown(rows, meta)
    from lora_jax.report import write_text

    write_text(out / f"{stem}.json", json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    write_text(out / f"{stem}.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
