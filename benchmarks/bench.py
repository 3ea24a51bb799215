#!/usr/bin/env python
"""Train-step benchmark: LoRA vs full fine-tuning, lora-jax vs PyTorch transformers (+ peft).

Random weights of the shape in a config.json (default: roberta-base from ../shared),
random tokens, one fixed (batch, seq) shape. Each cell runs in its own subprocess
so that peak memory is its own. Per cell: median step time over timed steps after
warm-up (the clock stops after the loss is on the host / block_until_ready /
cuda.synchronize), examples/s, trainable parameters, peak memory (GPU: JAX
memory_stats peak / torch max_memory_allocated; CPU: XLA's compiled memory
analysis for JAX and the process's peak RSS for both).

    python benchmarks/bench.py                       # the default grid, writes results/bench/
    python benchmarks/bench.py --steps 3 --warmup 1  # quicker
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

# (framework, method, variant): variants are lora-jax memory/speed levers.
GRID = [
    ("jax", "full", "fp32"),
    ("jax", "lora", "fp32"),
    ("torch", "full", "fp32"),
    ("torch", "lora", "fp32"),
    ("jax", "lora", "merged"),
    ("jax", "lora", "remat-attention"),
    ("jax", "lora", "remat-cheap"),
    ("jax", "lora", "bf16-base"),
    ("jax", "lora", "bf16-base+remat"),
    ("jax", "lora", "bf16-base+cheap"),
    ("jax", "full", "remat"),
    ("jax", "lora", "bf16"),
    ("torch", "lora", "bf16"),
]
VARIANTS = {
    # name: (param dtype of the frozen base, compute dtype, remat policy, LoRA forward)
    "fp32": ("float32", "float32", "none", "factored"),
    "merged": ("float32", "float32", "none", "merged"),
    "remat-attention": ("float32", "float32", "attention", "factored"),
    "remat-cheap": ("float32", "float32", "cheap", "factored"),
    "remat-qkv": ("float32", "float32", "qkv", "factored"),
    "bf16-base": ("bfloat16", "float32", "none", "factored"),
    "bf16-base+remat": ("bfloat16", "float32", "full", "factored"),
    "bf16-base+cheap": ("bfloat16", "float32", "cheap", "factored"),
    "remat": ("float32", "float32", "full", "factored"),
    "bf16": ("bfloat16", "bfloat16", "none", "factored"),
    # The frozen kernels quantized with qwix (--param-dtype int8 / nf4; quant.py), the rest float32.
    "int8-base": ("int8", "float32", "none", "factored"),
    "int8-base+cheap": ("int8", "float32", "cheap", "factored"),
    "nf4-base": ("nf4", "float32", "none", "factored"),
    "nf4-base+cheap": ("nf4", "float32", "cheap", "factored"),
    "int8-base+remat": ("int8", "float32", "full", "factored"),
    "nf4-base+remat": ("nf4", "float32", "full", "factored"),
}
# Any lora-jax variant + this suffix: the train step compiled with XLA:CPU's memory-optimised scheduler
# (train.py --xla-scheduler memory; no effect on GPU).
MEMORY_SCHEDULER = "+memsched"


def split_variant(name: str) -> tuple[str, str]:
    """A lora-jax variant name -> (variant in VARIANTS, --xla-scheduler value)."""
    if name.endswith(MEMORY_SCHEDULER):
        return name.removesuffix(MEMORY_SCHEDULER), "memory"
    return name, "default"


# PyTorch cells: `fp32`, `bf16` (autocast) and `remat` (transformers' activation checkpointing per layer).
TORCH_VARIANTS = ("fp32", "bf16", "remat")


# lora-jax adapter methods: (rank, target preset). "adalora" is the initial shape; its allocator
# (importance EMAs, budget, masks) and orthogonality regulariser run in every step.
JAX_LORA = {"lora": (8, "qv"), "lora-all-r8": (8, "all"), "lora-all-r12": (12, "all"), "adalora": (12, "all")}

LEGEND = """Variants (lora-jax): `fp32` float32 everything, factored LoRA forward x@W + s(x@A)@B, every activation
kept (`--remat none`; train.py's default is `cheap`, the `remat-cheap` cell); `merged` the same with
W + sAB formed in the step; `remat-attention` / `remat-cheap` fp32 with the attention probabilities / those
and the FFN activation recomputed in the backward pass (`--remat attention` / `cheap`); `remat-qkv` each
layer recomputed from its input and its kept q, k, v (`--remat qkv`: one 4H-wide and one H-wide matmul per
layer recomputed); `bf16-base` the frozen base stored in bfloat16 (LoRA, head and optimizer state
float32, compute float32); `+remat` / `remat` per-layer activation rematerialisation (`jax.checkpoint`,
save nothing); `+cheap` the `remat-cheap` recomputation on a bfloat16 base; `bf16` bfloat16 base and
bfloat16 compute; `int8-base` / `nf4-base` the frozen matrix kernels quantized with qwix (`--param-dtype int8|nf4`:
int8 absmax per output channel, nf4 in blocks of 64 with one code per byte), dequantized inside a checkpoint
where used, the rest float32; `+memsched` the same step compiled with XLA:CPU's memory-optimised scheduler
(`--xla-scheduler memory`; CPU only). PyTorch `bf16` is `torch.autocast(bfloat16)` on float32 weights; PyTorch `remat` is
transformers' gradient checkpointing of every layer (non-reentrant; only each layer's input kept). All cells: AdamW,
batch and sequence as above, random weights and tokens; both frameworks build the weights on the host
and move them to the device once, so a device's peak is the training's own.
Methods (lora-jax): `lora` r = 8 on query and value; `lora-all-r8` / `lora-all-r12` r = 8 / 12 on every
encoder linear layer; `adalora` AdaLoRA starting at r = 12 on every linear layer, its allocator and
orthogonality regulariser in every step. PyTorch `lora` is peft r = 8 on query and value.
"""


def peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def matmul_counts(flops: dict | None) -> dict:
    """A row's matmul FLOPs: all of them and those of batched products (attention)."""
    flops = flops or {}
    return {"matmul_flops": flops.get("total"), "batched_matmul_flops": flops.get("batched")}


def torch_matmul_flops(counter) -> dict:
    """PyTorch's FLOP counter, split as profiling.matmul_flops splits XLA's: batched products (bmm,
    baddbmm and attention kernels) apart."""
    per_op = counter.get_flop_counts().get("Global", {})
    batched = sum(n for op, n in per_op.items() if "bmm" in str(op) or "attention" in str(op))
    return {"total": counter.get_total_flops(), "batched": batched}


def run_jax(cell: dict) -> dict:
    import jax
    import numpy as np

    from lora_jax import lora, profiling, quant, weights
    from lora_jax.cli import enable_compile_cache
    from lora_jax.config import TrainConfig
    from lora_jax.model import init_params
    from lora_jax.optim import make_optimizer
    from lora_jax.prepare import split_for_training
    from lora_jax.train_step import make_loss_fn, make_train_step, new_state

    enable_compile_cache(cell.get("compile_cache"))
    variant, scheduler = split_variant(cell["variant"])
    param_dtype, compute, remat, mode = VARIANTS[variant]
    mcfg = weights.read_config(Path(cell["config"]), num_labels=2, dtype=compute, remat=remat)
    method = cell["method"]
    if method == "full":
        lcfg = lora.full_finetuning()
    elif method in JAX_LORA:
        rank, targets = JAX_LORA[method]
        lcfg = lora.LoraConfig(rank=rank, alpha=16, targets=lora.TARGET_PRESETS[targets])
    else:
        raise SystemExit(f"unknown method {method!r}")
    svd = method == "adalora"
    # Initialised, cast and split on the host, then placed once, as a checkpoint is loaded
    # (weights.load_params) and as the PyTorch cells do: the device's peak is the training's.
    cpu = weights.host_device()
    with jax.default_device(cpu):
        params = init_params(mcfg, jax.device_put(jax.random.key(0), cpu))
        if param_dtype not in quant.QUANTIZED:
            params = jax.tree.map(lambda x: x.astype(param_dtype), params)
        trainable, frozen, label_of, counts = split_for_training(params, lcfg, jax.device_put(jax.random.key(1), cpu),
                                                                 svd=svd)
        del params
        if param_dtype in quant.QUANTIZED:  # as prepare does: only frozen leaves, once split
            frozen = quant.store(frozen, param_dtype)
    trainable, frozen = jax.device_put((trainable, frozen), jax.local_devices()[0])
    tcfg = TrainConfig(lr=1e-4, warmup_ratio=0.0)
    optimizer = make_optimizer(label_of, tcfg, 1000)
    state = new_state(trainable, optimizer, 0, adalora=svd)
    # AdaLoRA: a schedule whose pruning phase covers the timed steps (the allocator runs every step anyway).
    ada = TrainConfig(method="adalora", adalora_init_rank=12, adalora_target_rank=8,
                      adalora_warmup_steps=0, adalora_final_steps=0).adalora_config(1000) if svd else None
    step = make_train_step(mcfg, lcfg, optimizer, mode=mode, regression=False, ada=ada, xla_scheduler=scheduler)
    rng = np.random.default_rng(0)
    b, t = cell["batch"], cell["seq"]
    batch = {
        "input_ids": rng.integers(3, mcfg.vocab_size, (b, t)).astype(np.int32),
        "attention_mask": np.ones((b, t), np.int32),
        "token_type_ids": np.zeros((b, t), np.int32),
        "labels": rng.integers(0, 2, b).astype(np.int32),
    }
    batch = jax.device_put(batch)
    loss_fn = make_loss_fn(mcfg, lcfg, mode=mode, regression=False, ada=ada)
    try:
        saved = profiling.saved_for_backward_bytes(lambda t, f, b: loss_fn(t, f, b, jax.random.key(2))[0],
                                                   state.trainable, frozen, batch)
    except Exception as e:  # tracing internals move between JAX versions: the timing still counts
        print(f"saved for backward not measured: {type(e).__name__}: {e}", file=sys.stderr)
        saved = None
    # The allocator's peak is over the whole process: read it around compilation, where XLA's GPU
    # autotuner runs candidate kernels on scratch buffers, to tell its share from the steps'.
    before_compile = profiling.device_bytes("bytes_in_use")
    compiled, compile_s = profiling.compile_step(step, state, frozen, batch)
    compile_peak = profiling.peak_device_bytes()
    times = profiling.time_steps(compiled, state, frozen, batch, warmup=cell["warmup"], steps=cell["steps"])
    return {
        "trainable_params": counts["lora"] + counts["trainable"],
        "total_params": counts["total"],
        "step_times_s": times,
        "compile_s": compile_s,
        "peak_device_bytes": profiling.peak_device_bytes(),
        "device_bytes_before_compile": before_compile,
        "peak_device_bytes_after_compile": compile_peak,
        "compile_cache": cell.get("compile_cache"),
        "xla_python_client_preallocate": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"),
        "xla_memory": profiling.compiled_memory(compiled),
        **matmul_counts(profiling.matmul_flops(compiled)),
        "saved_for_backward_bytes": saved,
        "peak_rss_bytes": peak_rss(),
        "versions": profiling.versions("jax", "jaxlib", "flax", "optax"),
        "device": profiling.device_info(),
    }


def run_torch(cell: dict) -> dict:
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    step = common.torch_step(cell)
    saved = step.saved_bytes()
    times = []
    for i in range(cell["warmup"] + cell["steps"]):
        t0 = time.perf_counter()
        loss_value = step()
        if i >= cell["warmup"]:
            times.append(time.perf_counter() - t0)
    assert loss_value == loss_value
    # One more step, after the timed ones, under PyTorch's FLOP counter (matmuls and attention).
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return {
        "trainable_params": sum(p.numel() for p in step.params),
        "total_params": sum(p.numel() for p in step.model.parameters()),
        "step_times_s": times,
        "compile_s": None,
        "peak_device_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "xla_memory": None,
        **matmul_counts(torch_matmul_flops(counter)),
        "saved_for_backward_bytes": saved,
        "peak_rss_bytes": peak_rss(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     **({"peft": __import__("peft").__version__} if cell["method"] == "lora" else {})},
        "device": {"platform": "gpu" if cuda else "cpu",
                   "device_kind": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
                   "host": platform.node()},
    }


def run_cell(cell: dict, timeout: int, preallocate: bool = False) -> dict:
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": str(preallocate).lower()}
    try:
        proc = subprocess.run([sys.executable, __file__, "--cell", json.dumps(cell)], capture_output=True,
                              text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**cell, "error": f"timed out after {timeout} s (--timeout)"}
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-3:]
        return {**cell, "error": " | ".join(tail) or f"exit {proc.returncode}"}
    return {**cell, **json.loads(proc.stdout.strip().splitlines()[-1])}


def summarise(rows: list[dict]) -> None:
    import statistics

    for r in rows:
        if "error" in r:
            continue
        r["step_time_median_s"] = statistics.median(r["step_times_s"])
        r["examples_per_sec"] = r["batch"] / r["step_time_median_s"]
        r["peak_memory_bytes"] = r["peak_device_bytes"] or (
            r["xla_memory"]["total_bytes"] if r.get("xla_memory") else None)


def find(rows, framework, method, variant):
    for r in rows:
        if (r["framework"], r["method"], r["variant"]) == (framework, method, variant) and "error" not in r:
            return r
    return None


def ratio(a, b, key):
    if a is None or b is None or not a.get(key) or not b.get(key):
        return None
    return a[key] / b[key]


def markdown(rows: list[dict], meta: dict) -> str:
    mib = lambda n: "unmeasured" if n is None else f"{n / 2**20:,.0f}"
    lines = [
        *common.header("Train-step benchmark", date=meta["date"], command=meta["command"])[:-1],
        f"Cells run: {meta['cells_run']}  ",
        f"Device: {meta['device']}; shape: {meta['shape']}; {meta['steps']} timed steps after {meta['warmup']} "
        "warm-up steps, median reported. Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        "",
        "Peak memory: GPU rows use the allocator's peak (JAX `memory_stats`, torch `max_memory_allocated`); "
        f"JAX's memory pool here: {meta.get('jax_memory_pool', 'grown on demand')} (grown on demand, JAX's "
        "allocator counts the whole free chunks it hands out, up to twice a request: on an H100 roberta-base's "
        "weights took 24% more than their bytes, where PyTorch's count is the tensors' bytes; preallocated "
        "(`--preallocate`), it counts the bytes). "
        "CPU rows: for JAX, XLA's compiled memory analysis of the train step (arguments + outputs + temporaries "
        "- aliased); for both frameworks, the process's peak RSS (includes the runtime and libraries). "
        "Saved for backward: what autodiff keeps from the forward pass for the backward pass, parameters not "
        "counted (JAX: the residuals of `jax.vjp`, found by tracing, before XLA's fusion, which may store "
        "less; PyTorch: the tensors autograd saves, seen through `saved_tensors_hooks`); JAX's is the same on "
        "any device, PyTorch's depends on the kernels it picks there (e.g. its attention); the part of peak "
        "memory that the activation levers (remat) change. "
        "Matmul GFLOP per step: the multiply-adds (2 FLOPs each) of every matrix product the step runs "
        "(lora-jax: the dots in XLA's optimised program, after dead code is removed and recomputation "
        "added; PyTorch: `torch.utils.flop_counter` over one step); matmul GFLOP/s: those FLOPs over the "
        "median step time, the rate the whole step reaches counting its matmuls only.",
        "",
        LEGEND,
        "Peak at compile (GPU, lora-jax): the allocator's peak after compiling the step, before its first run "
        "(XLA's GPU autotuner runs candidate kernels on scratch buffers then); where it equals the peak, "
        "compilation set the peak, and a run with `--compile-cache` filled by an earlier run shows the steps' own.",
        "",
        "| framework | method | variant | trainable params | median step (s) | examples/s | peak memory (MiB) "
        "| peak at compile (MiB) | XLA analysis (MiB) | peak RSS (MiB) | saved for backward (MiB) "
        "| matmul GFLOP per step | matmul GFLOP/s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['framework']} | {r['method']} | {r['variant']} | error: {r['error'][:120]} | | | | | | | | | |")
            continue
        xla = r["xla_memory"]["total_bytes"] if r.get("xla_memory") else None
        flops = r.get("matmul_flops")
        gflop = "unmeasured" if not flops else f"{flops / 1e9:,.1f}"
        rate = "unmeasured" if not flops else f"{flops / 1e9 / r['step_time_median_s']:,.0f}"
        lines.append(
            f"| {r['framework']} | {r['method']} | {r['variant']} | {r['trainable_params']:,} | "
            f"{r['step_time_median_s']:.3f} | {r['examples_per_sec']:.2f} | {mib(r['peak_device_bytes'])} | "
            f"{mib(r.get('peak_device_bytes_after_compile'))} | {mib(xla)} | {mib(r['peak_rss_bytes'])} | {mib(r.get('saved_for_backward_bytes'))} | "
            f"{gflop} | {rate} |"
        )
    lines += ["", "## Ratios (same run)", "",
              "| comparison | step time | peak memory (device or XLA) | peak RSS | saved for backward |",
              "|---|---:|---:|---:|---:|"]
    fmt = lambda x: "n/a" if x is None else f"{x:.2f}x"
    # (label, first cell, second cell): each cell is (framework, method, variant).
    pairs = [
        ("lora-jax: LoRA / full (fp32)", ("jax", "lora", "fp32"), ("jax", "full", "fp32")),
        ("lora-jax: LoRA bf16-base+remat / full remat", ("jax", "lora", "bf16-base+remat"), ("jax", "full", "remat")),
        ("lora-jax: LoRA bf16-base+remat / full fp32", ("jax", "lora", "bf16-base+remat"), ("jax", "full", "fp32")),
        ("lora-jax: LoRA bf16-base+cheap / full remat", ("jax", "lora", "bf16-base+cheap"), ("jax", "full", "remat")),
        ("lora-jax: LoRA remat / full remat", ("jax", "lora", "remat"), ("jax", "full", "remat")),
        ("lora-jax: LoRA remat+memsched / full remat", ("jax", "lora", "remat+memsched"), ("jax", "full", "remat")),
        ("lora-jax: LoRA remat+memsched / full fp32", ("jax", "lora", "remat+memsched"), ("jax", "full", "fp32")),
        ("lora-jax LoRA: remat+memsched / remat", ("jax", "lora", "remat+memsched"), ("jax", "lora", "remat")),
        ("lora-jax LoRA: remat-cheap+memsched / remat-cheap", ("jax", "lora", "remat-cheap+memsched"),
         ("jax", "lora", "remat-cheap")),
        ("PyTorch: LoRA / full (fp32)", ("torch", "lora", "fp32"), ("torch", "full", "fp32")),
        ("LoRA fp32: lora-jax / PyTorch+peft", ("jax", "lora", "fp32"), ("torch", "lora", "fp32")),
        ("LoRA bf16: lora-jax / PyTorch+peft", ("jax", "lora", "bf16"), ("torch", "lora", "bf16")),
        ("full fp32: lora-jax / PyTorch", ("jax", "full", "fp32"), ("torch", "full", "fp32")),
        ("lora-jax LoRA: merged / factored forward", ("jax", "lora", "merged"), ("jax", "lora", "fp32")),
        ("lora-jax LoRA: remat-attention / fp32", ("jax", "lora", "remat-attention"), ("jax", "lora", "fp32")),
        ("lora-jax LoRA: remat-cheap / fp32", ("jax", "lora", "remat-cheap"), ("jax", "lora", "fp32")),
        ("LoRA: lora-jax remat-cheap / PyTorch+peft fp32", ("jax", "lora", "remat-cheap"), ("torch", "lora", "fp32")),
        ("lora-jax LoRA: remat-qkv / remat-cheap", ("jax", "lora", "remat-qkv"), ("jax", "lora", "remat-cheap")),
        ("LoRA: lora-jax remat-qkv / PyTorch+peft fp32", ("jax", "lora", "remat-qkv"), ("torch", "lora", "fp32")),
        ("LoRA: lora-jax remat-qkv / PyTorch+peft remat", ("jax", "lora", "remat-qkv"), ("torch", "lora", "remat")),
        ("LoRA, both remat: lora-jax / PyTorch+peft", ("jax", "lora", "remat"), ("torch", "lora", "remat")),
        ("LoRA, both remat: lora-jax +memsched / PyTorch+peft", ("jax", "lora", "remat+memsched"),
         ("torch", "lora", "remat")),
        ("LoRA: lora-jax bf16-base+remat / PyTorch+peft remat", ("jax", "lora", "bf16-base+remat"),
         ("torch", "lora", "remat")),
        ("AdaLoRA (r 12, all) / LoRA r=12 all (merged)", ("jax", "adalora", "merged"), ("jax", "lora-all-r12", "merged")),
        ("AdaLoRA (r 12, all) / LoRA r=8 all (merged)", ("jax", "adalora", "merged"), ("jax", "lora-all-r8", "merged")),
    ]
    for name, first, second in pairs:
        a, b = find(rows, *first), find(rows, *second)
        lines.append(f"| {name} | {fmt(ratio(a, b, 'step_time_median_s'))} | "
                     f"{fmt(ratio(a, b, 'peak_memory_bytes'))} | {fmt(ratio(a, b, 'peak_rss_bytes'))} | "
                     f"{fmt(ratio(a, b, 'saved_for_backward_bytes'))} |")
    lines.append("")
    lines.append("Ratios below 1 mean the first is faster or smaller. Speed-up = 1 / step-time ratio.")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    # Variant names broken at '-' and '+' so that neighbouring labels do not run into each other.
    labels = [f"{r['framework']}\n{r['method']}\n" + r["variant"].replace("-", "-\n").replace("+", "+\n")
              for r in ok]
    width = max(4.0, 0.55 * len(ok))
    fig, axes = plt.subplots(1, 3, figsize=(2 * width + 5, 4.5), gridspec_kw={"width_ratios": [width, width, 5]})
    colors = ["C0" if r["framework"] == "jax" else "C1" for r in ok]
    axes[0].bar(labels, [r["step_time_median_s"] for r in ok], color=colors)
    axes[0].set_ylabel("median step time (s)")
    mem = [(r["peak_memory_bytes"] or 0) / 2**20 for r in ok]
    axes[1].bar(labels, mem, color=colors)
    axes[1].set_ylabel("peak memory (MiB; GPU peak or XLA analysis)")
    for ax in axes[:2]:
        ax.tick_params(axis="x", labelsize=7)
    # The trade-off: down and to the left is better; each framework's levers trace its own curve.
    scatter = axes[2]
    for r, c, m in zip(ok, colors, mem):
        if m:
            scatter.scatter(r["step_time_median_s"], m, color=c)
            scatter.annotate(f"{r['method']} {r['variant']}", (r["step_time_median_s"], m), fontsize=6,
                             xytext=(3, 3), textcoords="offset points")
    scatter.set_xlim(left=0)
    scatter.set_ylim(bottom=0)
    scatter.set_xlabel("median step time (s)")
    scatter.set_ylabel("peak memory (MiB)")
    scatter.set_title("blue: lora-jax, orange: PyTorch", fontsize=8)
    fig.tight_layout()
    from lora_jax.report import save_figure

    save_figure(fig, path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="directory with the config.json to benchmark")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--cells", help="comma-separated framework:method:variant (default: the full grid)")
    p.add_argument("--out", default=str(ROOT / "results" / "bench"))
    p.add_argument("--name", help="output file stem (default: <model>-b<batch>-s<seq>-<platform>)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    p.add_argument("--preallocate", action="store_true",
                   help="GPU: let JAX preallocate its memory pool (its default) instead of growing it on demand; "
                   "a grown pool hands out whole free chunks up to twice a request, which its in-use count includes")
    p.add_argument("--compile-cache", metavar="DIR",
                   help="JAX's persistent compilation cache for the lora-jax cells: a second run with the same "
                   "DIR loads the compiled steps instead of compiling (and autotuning) them")
    p.add_argument("--cell", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.cell:
        cell = json.loads(args.cell)
        result = run_jax(cell) if cell["framework"] == "jax" else run_torch(cell)
        print(json.dumps(result))
        return 0
    if not (Path(args.config) / "config.json").is_file():
        print(f"error: {args.config} has no config.json", file=sys.stderr)
        return 2
    if args.batch <= 0 or args.seq <= 0 or args.steps <= 0 or args.warmup < 0:
        print("error: --batch, --seq and --steps must be > 0 and --warmup >= 0", file=sys.stderr)
        return 2
    grid = GRID
    if args.cells:
        try:
            grid = [tuple(c.split(":")) for c in args.cells.split(",")]
            assert all(len(c) == 3 and (
                (c[0] == "jax" and c[1] in ("full", *JAX_LORA) and split_variant(c[2])[0] in VARIANTS)
                or (c[0] == "torch" and c[1] in ("lora", "full") and c[2] in TORCH_VARIANTS)) for c in grid)
        except AssertionError:
            print(f"error: --cells takes framework:method:variant with jax methods full, {', '.join(JAX_LORA)}, "
                  f"torch methods lora, full; jax variants {', '.join(VARIANTS)}, each also with {MEMORY_SCHEDULER}; torch variants "
                  f"{', '.join(TORCH_VARIANTS)}",
                  file=sys.stderr)
            return 2
    # Here, so that a bad DIR fails once, not in every cell (this only imports JAX, starts no device).
    args.compile_cache = common.compile_cache(args.compile_cache)
    import datetime

    from lora_jax.report import write_text

    model_name = json.loads((Path(args.config) / "config.json").read_text()).get("model_type", "model")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def write(rows: list[dict]) -> tuple[str, dict]:
        """(Re)write the JSON and markdown after every cell, so that a grid cut short keeps what it ran."""
        summarise(rows)
        dev = next((r["device"] for r in rows if "device" in r and r["framework"] == "jax"), {})
        stem = args.name or f"{model_name}-b{args.batch}-s{args.seq}-{dev.get('platform', 'unknown')}"
        versions = {}
        for r in rows:
            versions.update(r.get("versions", {}))
        meta = {
            "command": common.command(__file__),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": f"{dev.get('platform')} ({dev.get('device_kind')}, host {dev.get('host')})",
            "shape": f"{model_name} config from {args.config}, batch {args.batch}, seq {args.seq}",
            "steps": args.steps, "warmup": args.warmup, "versions": versions,
            "jax_memory_pool": "preallocated" if args.preallocate else "grown on demand",
            "cells_run": f"{len(rows)} of {len(grid)}",
        }
        for suffix, text in ((".json", json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n"),
                             (".md", markdown(rows, meta))):
            write_text(out / f"{stem}{suffix}", text)
        return stem, meta

    rows = []
    for framework, method, variant in grid:
        cell = {"framework": framework, "method": method, "variant": variant, "config": args.config,
                "batch": args.batch, "seq": args.seq, "steps": args.steps, "warmup": args.warmup,
                "compile_cache": args.compile_cache}
        print(f"[bench] {framework} {method} {variant} ...", file=sys.stderr, flush=True)
        r = run_cell(cell, args.timeout, args.preallocate)
        rows.append(r)
        if "error" in r:
            print(f"[bench]   error: {r['error']}", file=sys.stderr, flush=True)
        else:
            times = sorted(r["step_times_s"])
            print(f"[bench]   median step {times[len(times) // 2]:.3f} s", file=sys.stderr, flush=True)
        stem, meta = write(rows)
    plot(rows, out / f"{stem}.png")
    print(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
