#!/usr/bin/env python
"""Where a train step's time goes: lora-jax (jax.profiler) next to PyTorch + peft (torch.profiler).

One LoRA train step (random weights of a config's shape, random tokens, AdamW), profiled
for a few steps after warm-up in each framework; every kernel's time is put into one of a
few classes (matmuls, attention softmax and masking, dropout, LayerNorm, GELU, layout copies,
optimizer, other) so the two frameworks can be read side by side. lora-jax ops are classed
by the HLO op's source (its `op_name` metadata, e.g. `.../attention/self/Dropout_0/...`),
PyTorch ops by their `aten::` name (self time). Profilers add overhead: compare shares and
the classes' ms between frameworks, not the totals with unprofiled step times.

    python benchmarks/profile_step.py --config ../shared/models/all-MiniLM-L6-v2 --seq 128
    # -> results/profile/<model>-b16-s128-<platform>.{json,md}
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import common
from common import ROOT

CLASSES = ("matmul", "attention softmax/mask/scale", "dropout", "LayerNorm", "GELU", "layout copies",
           "optimizer", "embeddings", "other")


def jax_class(name: str, op: str) -> str:
    if "dropout" in op.lower() or "threefry" in op or "bernoulli" in op or "_uniform" in op:
        return "dropout"
    if "dot_general" in op or name.startswith(("dot", "ynn_fusion", "xnn_fusion", "onednn")) and "reduce" not in op:
        return "matmul"
    if "LayerNorm" in op:
        return "LayerNorm"
    if "erf" in op or "intermediate/mul" in op or "intermediate/add" in op or "gelu" in op:
        return "GELU"
    if "attention/self" in op and any(k in op for k in ("reduce_max", "reduce_sum", "exp", "div", "add", "sub",
                                                         "softmax", "mul", "select")):
        return "attention softmax/mask/scale"
    if any(k in op for k in ("transpose", "reshape", "copy")) or name.startswith(("copy", "transpose")):
        return "layout copies"
    if "embeddings" in op:
        return "embeddings"
    if any(k in op for k in ("adam", "optax", "clip", "scale_by", "global_norm", "update")):
        return "optimizer"
    return "other"


def torch_class(name: str) -> str:
    n = name.removeprefix("aten::")
    if n in ("addmm", "mm", "bmm", "matmul", "linear", "baddbmm", "_addmm_activation"):
        return "matmul"
    if "scaled_dot_product" in n or "flash_attention" in n:
        return "attention softmax/mask/scale"  # fused attention: its matmuls are inside
    if "dropout" in n or "bernoulli" in n:
        return "dropout"
    if "layer_norm" in n:
        return "LayerNorm"
    if "gelu" in n:
        return "GELU"
    if "softmax" in n:
        return "attention softmax/mask/scale"
    if n in ("copy_", "contiguous", "clone", "transpose", "permute", "view", "reshape", "_to_copy", "t", "expand"):
        return "layout copies"
    if "foreach" in n or "adam" in n or "norm" in n and "layer" not in n or n in ("_fused_adamw_", "lerp_"):
        return "optimizer"
    if "embedding" in n:
        return "embeddings"
    return "other"


def profile_jax(args) -> dict:
    import jax
    import numpy as np

    from lora_jax import lora, weights
    from lora_jax.config import TrainConfig
    from lora_jax.model import init_params
    from lora_jax.optim import make_optimizer
    from lora_jax.prepare import split_for_training
    from lora_jax.train_step import make_train_step, new_state

    mcfg = weights.read_config(Path(args.config), num_labels=2)
    params = init_params(mcfg, jax.random.key(0))
    lcfg = lora.LoraConfig(rank=8, alpha=16, targets=lora.TARGET_PRESETS["qv"])
    trainable, frozen, label_of, _ = split_for_training(params, lcfg, jax.random.key(1))
    optimizer = make_optimizer(label_of, TrainConfig(lr=1e-4, warmup_ratio=0.0), 1000)
    state = new_state(trainable, optimizer, 0)
    step = make_train_step(mcfg, lcfg, optimizer, mode="factored", regression=False)
    rng = np.random.default_rng(0)
    b, t = args.batch, args.seq
    batch = jax.device_put({
        "input_ids": rng.integers(3, mcfg.vocab_size, (b, t)).astype(np.int32),
        "attention_mask": np.ones((b, t), np.int32), "token_type_ids": np.zeros((b, t), np.int32),
        "labels": rng.integers(0, 2, b).astype(np.int32)})
    frozen = jax.device_put(frozen)
    hlo = step.lower(state, frozen, batch).compile().as_text()
    for _ in range(args.warmup):
        state, m = step(state, frozen, batch)
        jax.block_until_ready(m)
    trace_dir = tempfile.mkdtemp(prefix="lora-jax-trace-")
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(args.steps):
            state, m = step(state, frozen, batch)
            jax.block_until_ready(m)
    op_names = {}
    for line in hlo.splitlines():
        found = re.match(r"\s*(?:ROOT )?%(\S+) = .*?op_name=\"([^\"]+)\"", line)
        if found:
            op_names.setdefault(found.group(1), found.group(2))
    trace = sorted(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True))[-1]
    events = json.load(gzip.open(trace))
    events = events["traceEvents"] if isinstance(events, dict) else events
    ms = collections.Counter()
    for e in events:
        # Kernel events carry the HLO op as their name; runtime bookkeeping does not match an op.
        if e.get("ph") == "X" and e.get("name") in op_names:
            ms[jax_class(e["name"], op_names[e["name"]])] += e.get("dur", 0) / 1e3 / args.steps
    return {"framework": "jax", "ms_per_step": dict(ms), "versions": {"jax": jax.__version__}}


def profile_torch(args) -> dict:
    import torch

    ms = collections.Counter()
    cell = {"framework": "torch", "method": "lora", "variant": "fp32", "config": args.config,
            "batch": args.batch, "seq": args.seq, "warmup": args.warmup, "steps": 0}
    step = common.torch_step(cell)  # the same model and peft setup as bench.py's torch cells
    for _ in range(args.warmup):
        step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    for ev in prof.key_averages():
        ms[torch_class(ev.key)] += ev.self_cpu_time_total / 1e3 / args.steps
    return {"framework": "torch", "ms_per_step": dict(ms), "versions": {"torch": torch.__version__}}


def markdown(record: dict) -> str:
    lines = [*common.header(f"Train-step profile: {record['shape']}", date=record["date"], command=record["command"],
                            device=record["device"], versions=record["versions"]),
             "ms per step by class, under the profiler (which slows both). lora-jax: XLA kernels classed by "
             "their HLO source; PyTorch: aten ops' self time.", "",
             "| class | lora-jax ms | share | PyTorch + peft ms | share | jax / torch |", "|---|---:|---:|---:|---:|---:|"]
    j, t = record["jax"]["ms_per_step"], record["torch"]["ms_per_step"]
    tj, tt = sum(j.values()), sum(t.values())
    for c in CLASSES:
        a, b = j.get(c, 0.0), t.get(c, 0.0)
        ratio = f"{a / b:.2f}x" if b > 0.05 else "n/a"
        lines.append(f"| {c} | {a:.1f} | {a / tj:.0%} | {b:.1f} | {b / tt:.0%} | {ratio} |")
    lines.append(f"| total | {tj:.1f} | | {tt:.1f} | | {tj / tt:.2f}x |")
    lines += ["", "PyTorch's attention runs `scaled_dot_product_attention` (its matmuls inside that class) when "
              "transformers picks SDPA; lora-jax's attention matmuls are in `matmul`."]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT.parent / "shared" / "models" / "roberta-base-tokenizer"))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "results" / "profile"))
    p.add_argument("--name")
    p.add_argument("--framework", choices=("jax", "torch"), help=argparse.SUPPRESS)  # internal: one side
    args = p.parse_args()
    if args.framework:  # a child: profile one framework, print JSON
        print(json.dumps(profile_jax(args) if args.framework == "jax" else profile_torch(args)))
        return 0
    if not (Path(args.config) / "config.json").is_file():
        print(f"error: no config.json in {args.config}", file=sys.stderr)
        return 2

    from lora_jax import profiling

    record = {}
    for fw in ("jax", "torch"):  # each in its own process, as in bench.py
        done = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--framework", fw],
                              capture_output=True, text=True)
        if done.returncode != 0:
            print(f"error: the {fw} profile failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}",
                  file=sys.stderr)
            return 1
        record[fw] = json.loads(done.stdout.strip().splitlines()[-1])
    model = json.loads((Path(args.config) / "config.json").read_text()).get("model_type", "model")
    dev = profiling.device_info()
    record.update({
        "command": common.command(__file__),
        "date": profiling.now(),
        "device": f"{dev['platform']} ({dev['device_kind']}, host {dev['host']})",
        "shape": f"{os.path.basename(os.path.normpath(args.config))} ({model}), LoRA r = 8 on q, v, "
                 f"batch {args.batch}, seq {args.seq}, fp32",
        "versions": {**record["jax"]["versions"], **record["torch"]["versions"]},
    })
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"{os.path.basename(os.path.normpath(args.config))}-b{args.batch}-s{args.seq}-{dev['platform']}"
    from lora_jax.report import write_text

    write_text(out / f"{stem}.json", json.dumps(record, indent=2) + "\n")
    write_text(out / f"{stem}.md", markdown(record))
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
