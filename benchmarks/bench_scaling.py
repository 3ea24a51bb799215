#!/usr/bin/env python
"""Data-parallel scaling: examples/s of the LoRA train step against the number of devices.

The global batch stays fixed (default 32) and is split over a (data, fsdp) mesh
of N devices, exactly as ``lora-jax train`` does it (lora_jax.parallel). Random
weights of the shape in a config.json (default: MiniLM from ../shared), random
tokens, one shape. Each device count runs in its own subprocess.

On a CPU, ``--force-cpu-devices`` splits the one host into N XLA devices
(``--xla_force_host_platform_device_count``): the cores are shared, so the
table shows the overhead of sharding and of the gradient all-reduce, not a
speed-up. On a multi-GPU machine leave it off and list device counts up to the
number of GPUs.

    python benchmarks/bench_scaling.py --force-cpu-devices --devices 1,2,4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import common
from common import ROOT
DEFAULT_CONFIG = ROOT.parent / "shared" / "models" / "all-MiniLM-L6-v2"


def run_cell(cell: dict) -> dict:
    import jax
    import numpy as np

    from lora_jax import lora, parallel, profiling, weights
    from lora_jax.config import TrainConfig
    from lora_jax.model import init_params
    from lora_jax.optim import make_optimizer
    from lora_jax.prepare import split_for_training
    from lora_jax.train_step import make_train_step, new_state

    n = cell["devices"]
    if jax.device_count() < n:
        raise SystemExit(f"error: {n} devices asked, {jax.device_count()} present")
    mesh = parallel.make_mesh(cell["fsdp"], jax.devices()[:n])
    mcfg = weights.read_config(Path(cell["config"]), num_labels=2)
    params = init_params(mcfg, jax.random.key(0))
    lcfg = lora.LoraConfig(rank=8, alpha=16)
    trainable, frozen, label_of, _ = split_for_training(params, lcfg, jax.random.key(1))
    optimizer = make_optimizer(label_of, TrainConfig(lr=1e-4, warmup_ratio=0.0), 1000)
    state = parallel.place(new_state(trainable, optimizer, 0), parallel.replicated(mesh))
    frozen = parallel.place(frozen, parallel.frozen_shardings(frozen, mesh))
    step = make_train_step(mcfg, lcfg, optimizer, mode="merged", regression=False, mesh=mesh)
    rng = np.random.default_rng(0)
    b, t = cell["batch"], cell["seq"]
    parallel.local_batch_size(b, mesh)  # one-line error if it does not divide
    batch = parallel.put_batch({
        "input_ids": rng.integers(3, mcfg.vocab_size, (b, t)).astype(np.int32),
        "attention_mask": np.ones((b, t), np.int32),
        "token_type_ids": np.zeros((b, t), np.int32),
        "labels": rng.integers(0, 2, b).astype(np.int32),
    }, mesh)
    compile_s, times, compiled = profiling.time_train_step(step, state, frozen, batch, warmup=cell["warmup"],
                                                           steps=cell["steps"])
    return {"step_times_s": times, "compile_s": compile_s, "parallel": parallel.describe(mesh),
            "versions": profiling.versions("jax", "jaxlib", "flax", "optax"), "device": profiling.device_info()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="directory with the model's config.json")
    p.add_argument("--devices", default="1,2,4", help="comma-separated device counts")
    p.add_argument("--fsdp", type=int, default=1, help="fsdp axis size in every cell")
    p.add_argument("--force-cpu-devices", action="store_true", help="split the CPU into N XLA devices per cell")
    p.add_argument("--batch", type=int, default=32, help="global batch")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--name", default="minilm-cpu", help="results/scaling/NAME.{json,md}")
    p.add_argument("--cell", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.cell:
        print("RESULT " + json.dumps(run_cell(json.loads(args.cell))))
        return 0
    if not (Path(args.config) / "config.json").is_file():
        print(f"error: no config.json in {args.config}", file=sys.stderr)
        return 2
    counts = common.int_list(args.devices, "--devices")
    from tqdm.auto import tqdm

    from lora_jax import profiling
    from lora_jax.report import write_text

    rows = []
    for n in tqdm(counts, desc="device counts"):
        cell = dict(devices=n, fsdp=args.fsdp, config=args.config, batch=args.batch, seq=args.seq,
                    steps=args.steps, warmup=args.warmup)
        env = dict(os.environ)
        if args.force_cpu_devices:
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}").strip()
            env["JAX_PLATFORMS"] = "cpu"
        done = subprocess.run([sys.executable, __file__, "--cell", json.dumps(cell)], capture_output=True,
                              text=True, env=env)
        lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
        if done.returncode or not lines:
            print(f"error: the {n}-device cell failed: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            return 1
        res = json.loads(lines[-1][len("RESULT "):])
        med = profiling.median(res["step_times_s"])
        rows.append({**cell, **res, "step_median_s": med, "examples_per_s": args.batch / med})
    base = rows[0]["examples_per_s"]
    for r in rows:
        r["relative_to_first"] = r["examples_per_s"] / base
    out = ROOT / "results" / "scaling"
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "command": common.command(__file__),
        "date": profiling.now(),
        "forced_cpu_devices": args.force_cpu_devices,
        "config": args.config,
        "rows": rows,
    }
    write_text(out / f"{args.name}.json", json.dumps(record, indent=2) + "\n")
    first = rows[0]
    lines = [
        *common.header(f"Data-parallel scaling: {Path(args.config).name}, LoRA r=8 q,v, global batch {args.batch}, "
                       f"seq {args.seq}", date=record["date"], command=record["command"], device=first["device"],
                       versions=first["versions"])[:-1],
        ("CPU split into N XLA devices sharing the same cores: this shows the cost of sharding and of the "
         "gradient all-reduce, not a speed-up." if args.force_cpu_devices else "One device per accelerator."),
        "",
        "| devices | mesh (data x fsdp) | per-device batch | step median (s) | examples/s | vs 1st row |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        mesh = r["parallel"]["mesh"]
        lines.append(f"| {r['devices']} | {mesh['data']} x {mesh['fsdp']} | {args.batch // r['devices']} | "
                     f"{r['step_median_s']:.3f} | {r['examples_per_s']:.1f} | {r['relative_to_first']:.2f}x |")
    write_text(out / f"{args.name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
