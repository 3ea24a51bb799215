#!/usr/bin/env python
"""Training throughput on real data: batch layouts, lora-jax vs PyTorch + peft.

Runs one training epoch of a GLUE task (default SST-2, MiniLM, LoRA r = 8 on q, v, batch 32)
several ways, each a real training run in its own subprocess (`scripts/train.py` or
`benchmarks/train_torch.py`). Cells of the same sampling train on the same batches in the same
order (`data.train_order`):

  random batches (a shuffle cut into batches; a batch's composition does not depend on length)
    jax:packed      lora-jax's default: each batch packed end to end into few rows
    jax:random      lora-jax, one example per row, padded up to one of --num-buckets lengths
    jax:pad         lora-jax, one example per row, padded to --max-seq-len (one static shape)
    torch:random    PyTorch + peft, each batch padded to its own longest example
                    (DataCollatorWithPadding's rule)
    torch:pad       PyTorch + peft, every batch padded to --max-seq-len
  length-grouped batches (sorted by length within windows of 64 batches; Hugging Face's group_by_length)
    jax:by-length   lora-jax before packing (--batching by-length), length buckets
    torch:by-length PyTorch + peft, dynamic padding

Examples/s counts the timed steps (compilation and each shape's first step excluded, the
clock stopped once the loss is on the host); wall time is the whole run, evaluation
included. Padding every batch to 128 is slow on CPU, so `--pad-steps N` runs the padded
cells on the first N batches of the epoch's order only: the order is a random permutation
of the epoch's batches, so their examples/s estimates the epoch's (the report says so).

    python benchmarks/bench_epoch.py                           # results/epoch/<name>.{json,md,png}
    python benchmarks/bench_epoch.py --pad-steps 300           # padded cells on a sample of the epoch
    python benchmarks/bench_epoch.py --steps 20 --cells jax:packed,torch:random   # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import common
from common import ROOT, SHARED
CELLS = ("jax:packed", "jax:random", "jax:pad", "torch:random", "torch:pad", "jax:by-length", "torch:by-length")


def cell_command(cell: str, args, out: Path) -> list[str]:
    framework, layout = cell.split(":")
    script = "train.py" if framework == "jax" else "train_torch.py"
    cmd = [sys.executable, str(common.script_path(script)), "--task", args.task, "--model", args.model,
           "--targets", "qv", "--lora-rank", "8", "--lora-alpha", "8", "--lr", str(args.lr),
           "--batch-size", str(args.batch_size), "--max-seq-len", str(args.max_seq_len),
           "--seed", str(args.seed), "--output-dir", str(out), "--overwrite", "--no-progress"]
    if args.data_dir != "hub":
        cmd += ["--data-dir", args.data_dir]
    cmd += ["--batching", {"packed": "packed", "by-length": "by-length"}.get(layout, "random")]
    if layout == "pad":
        cmd += ["--num-buckets", "0"]
    elif framework == "jax":
        cmd += ["--num-buckets", str(args.num_buckets)]
    steps = args.pad_steps if layout == "pad" and args.pad_steps else args.steps
    cmd += ["--max-steps", str(steps)] if steps else ["--epochs", "1"]
    if framework == "jax" and steps:
        cmd += ["--eval-every", str(steps)]
    if framework == "jax":
        cmd += ["--save-every", "1000000"]  # a throughput run: no mid-run checkpoints
        if args.compile_cache:
            cmd += ["--compile-cache", args.compile_cache]
    return cmd


def cache_entries(directory: str | None) -> int | None:
    """Files in a compilation cache directory (0 when it does not exist yet); None without one."""
    if not directory:
        return None
    path = Path(directory).expanduser()
    return sum(1 for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def run_cell(cell: str, args) -> dict:
    out = Path(args.runs) / cell.replace(":", "-")
    cmd = cell_command(cell, args, out)
    cached = cache_entries(args.compile_cache) if cell.startswith("jax") else None
    print(f"[epoch] {cell}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    t0 = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        print(f"  failed ({done.returncode}): {last}", file=sys.stderr)
        return {"cell": cell, "error": last}
    r = json.loads((out / "report.json").read_text())
    print(f"  {r['train_examples_per_sec']:.1f} examples/s, {time.time() - t0:.0f} s", file=sys.stderr)
    split, metric = r["primary_metric"].split("/")
    padded = None
    if cell.startswith("jax"):
        padded = r.get("padding_share")
    return {
        "cell": cell,
        "steps": r["steps"],
        "full_epoch": r["steps"] >= r["train_examples"] // args.batch_size,
        "train_examples": r["train_examples"],
        "examples_per_s": r["train_examples_per_sec"],
        "tokens_per_s": r["train_tokens_per_sec"],
        "step_time_median_s": r["step_time_median_s"],
        "wall_time_s": r["wall_time_s"],
        "compile_s": r.get("compile_time_s"),  # lora-jax's train steps; PyTorch compiles nothing
        "compile_cache": r.get("compile_cache"),
        "compile_cache_entries_before": cached,  # 0: a cold cache, which this run fills
        "padding_share": padded,
        "dev": {metric: r["metrics"][split]["final"]["values"][metric]},
        "peak_rss_bytes": r["memory"]["peak_rss_bytes"],
        "versions": r["versions"],
        "device": r["device"],
        "command": " ".join(["python", *[os.path.relpath(c, ROOT) if c.startswith(str(ROOT)) else c
                                          for c in cmd[1:]]]),
    }


def cache_note(row: dict) -> str:
    before = row["compile_cache_entries_before"]
    state = ("warm: compiled steps loaded from it, tracing and lowering still run" if before
             else "cold: this run compiled and filled it")
    return (f"{row['cell']}: JAX's persistent compilation cache `{row['compile_cache']}`, {before} files in it "
            f"before the run ({state}).")


def markdown(record: dict) -> str:
    rows = [r for r in record["rows"] if "error" not in r]
    lines = [
        *common.header(f"Training throughput on {record['task']}", date=record["date"],
                       command=record["command"])[:-1],
        f"Cells run: {record.get('cells_run', 'all')}  ",
        f"Device: {record['device']}; model `{record['model']}`; LoRA r = 8 on query, value; batch "
        f"{record['batch_size']}, max length {record['max_seq_len']}; versions {record['versions']}.",
        "",
        "Examples/s over the timed steps (each shape's first step and compilation excluded). "
        "`full epoch` no: the first N batches of the epoch's random batch order, an estimate of the epoch's rate.",
        "",
        *[cache_note(r) for r in rows if r.get("compile_cache")],
        *([""] if any(r.get("compile_cache") for r in rows) else []),
        "| cell | steps | full epoch | examples/s | tokens/s | median step (s) | padding share | wall (s) | "
        "compile (s) | dev |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        pad = "n/a" if r["padding_share"] is None else f"{r['padding_share']:.2f}"
        dev = ", ".join(f"{k} {v:.4f}" for k, v in r["dev"].items())
        compiled = "n/a" if r.get("compile_s") is None else f"{r['compile_s']:.0f}"
        lines.append(f"| {r['cell']} | {r['steps']} | {'yes' if r['full_epoch'] else 'no'} | "
                     f"{r['examples_per_s']:.1f} | {r['tokens_per_s']:.0f} | {r['step_time_median_s']:.3f} | {pad} | "
                     f"{r['wall_time_s']:.0f} | {compiled} | {dev} |")
    for r in record["rows"]:
        if "error" in r:
            lines.append(f"| {r['cell']} | error: {r['error'][:100]} | | | | | | | | |")
    if record.get("ratios"):
        lines += ["", "| ratio (examples/s) | value |", "|---|---:|"]
        lines += [f"| {k} | {v:.2f}x |" for k, v in record["ratios"].items()]
    lines += ["", "Dev metrics are after the steps run (a throughput run, not a tuned one)."]
    return "\n".join(lines) + "\n"


def ratios(rows: list[dict]) -> dict:
    """Examples/s ratios between cells of this run; framework against framework only on the same batches."""
    get = {r["cell"]: r["examples_per_s"] for r in rows if "error" not in r}
    pairs = {
        "lora-jax packed / PyTorch random (the same batches)": ("jax:packed", "torch:random"),
        "lora-jax by-length / PyTorch by-length (the same batches)": ("jax:by-length", "torch:by-length"),
        "lora-jax / PyTorch, both padded to max length": ("jax:pad", "torch:pad"),
        "lora-jax packed / lora-jax random, one example per row": ("jax:packed", "jax:random"),
        "lora-jax packed / lora-jax by-length": ("jax:packed", "jax:by-length"),
        "lora-jax random / lora-jax padded to max length": ("jax:random", "jax:pad"),
        "PyTorch random / PyTorch padded to max length": ("torch:random", "torch:pad"),
    }
    return {name: get[a] / get[b] for name, (a, b) in pairs.items() if a in get and b in get}


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lora_jax.report import save_figure

    rows = [r for r in record["rows"] if "error" not in r]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([r["cell"] for r in rows], [r["examples_per_s"] for r in rows],
           color=["C0" if r["cell"].startswith("jax") else "C1" for r in rows])
    ax.set_ylabel("training examples/s")
    ax.set_title(f"{record['task']}, batch {record['batch_size']}, {record['device']}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="sst2")
    p.add_argument("--model", default=str(SHARED / "models" / "all-MiniLM-L6-v2"))
    p.add_argument("--data-dir", default=str(SHARED / "data" / "glue"), help="GLUE TSV directory, or hub")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-seq-len", type=int, default=128)
    p.add_argument("--num-buckets", type=int, default=8, help="lora-jax's length buckets (jax:random, jax:by-length) or packed row counts (jax:packed)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, help="steps per cell (default: one epoch)")
    p.add_argument("--pad-steps", type=int, help="steps of the padded cells (default: as --steps)")
    p.add_argument("--cells", default=",".join(CELLS), help=f"comma-separated, from {', '.join(CELLS)}")
    p.add_argument("--compile-cache", metavar="DIR", default=os.environ.get("LORA_JAX_COMPILE_CACHE"),
                   help="JAX's persistent compilation cache for the lora-jax cells (train.py --compile-cache): "
                   "a run after one that filled DIR loads the compiled steps (default: $LORA_JAX_COMPILE_CACHE, else off)")
    p.add_argument("--runs", default=str(ROOT / "runs" / "bench-epoch"), help="run directories")
    p.add_argument("--out", default=str(ROOT / "results" / "epoch"))
    p.add_argument("--name", help="output file stem (default <task>-b<batch>-<platform>)")
    args = p.parse_args()
    cells = [c for c in args.cells.split(",") if c]
    bad = [c for c in cells if c not in CELLS]
    if not cells:
        print(f"error: --cells names no cell; choose from {', '.join(CELLS)}", file=sys.stderr)
        return 2
    if bad:
        print(f"error: unknown cell {bad[0]!r}; choose from {', '.join(CELLS)}", file=sys.stderr)
        return 2
    for flag in ("steps", "pad_steps", "batch_size"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            print(f"error: --{flag.replace('_', '-')} must be >= 1, got {v}", file=sys.stderr)
            return 2

    # Here, so that a bad DIR fails once, not in each cell; the cells get --compile-cache as written.
    common.compile_cache(args.compile_cache)

    from lora_jax import profiling
    from lora_jax.report import write_text

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, ok = [], []
    for c in cells:
        rows.append(run_cell(c, args))
        ok = [r for r in rows if "error" not in r]
        if not ok:
            continue
        # The device as the cells' runs saw it (a lora-jax cell's first): this process does not start
        # JAX, whose memory preallocation on a GPU would take what the cells' processes need.
        device = next(r["device"] for r in sorted(ok, key=lambda r: not r["cell"].startswith("jax")))
        stem = args.name or f"{args.task}-b{args.batch_size}-{device['platform']}"
        record = {
            "command": common.command(__file__),
            "date": profiling.now(),
            "cells_run": f"{len(rows)} of {len(cells)}",
            "task": args.task,
            "model": os.path.relpath(args.model, ROOT) if Path(args.model).exists() else args.model,
            "batch_size": args.batch_size,
            "max_seq_len": args.max_seq_len,
            "device": f"{device['platform']} ({device.get('device_kind', '?')}, host {device.get('host', '?')})",
            "versions": {**next((r["versions"] for r in ok if r["cell"].startswith("torch")), {}),
                         **next((r["versions"] for r in ok if r["cell"].startswith("jax")), {})},
            "rows": rows,
            "ratios": ratios(rows),
        }
        record["versions"] = {k: v for k, v in record["versions"].items() if v}
        # Rewritten after every cell, so that a run cut short keeps the cells it finished.
        write_text(out / f"{stem}.json", json.dumps(record, indent=2) + "\n")
        write_text(out / f"{stem}.md", markdown(record))
    if not ok:
        print("error: no cell finished", file=sys.stderr)
        return 1
    plot(record, out / f"{stem}.png")
    print(markdown(record))
    return 0 if len(ok) == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
