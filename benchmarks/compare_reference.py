#!/usr/bin/env python
"""Do lora-jax and the PyTorch reference train alike? Start both from the same values and compare.

In the study the two frameworks differ in three random things: the head's initial
weights, LoRA's initial A, and dropout masks. This script removes them one at a
time: for each method it trains lora-jax (`scripts/train.py`) and PyTorch
(`benchmarks/train_torch.py --same-init`: lora-jax's initial head and adapters) from
identical values, once with the model's dropout off and once with it on, and
compares their loss at every step and their dev metrics. With dropout off the
curves should agree up to float rounding; what is left with dropout on is the
effect of the masks alone.

Dropout off means a copy of the model directory (links to its files) whose
config.json sets the dropout probabilities to 0; both frameworks read it.

    python benchmarks/compare_reference.py --task rte --methods full,lora-qv-r8 --epochs 1 -- --num-buckets 4

Writes results/<name>/compare.json, compare.md and curves.png (default name: same-init).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import common
from common import METHODS, ROOT, SHARED, torch_flags


def without_dropout(model: Path, where: Path) -> Path:
    """A directory that is ``model`` with every dropout probability set to 0 (other files linked)."""
    where.mkdir(parents=True, exist_ok=True)
    for f in model.iterdir():
        if f.name != "config.json" and not (where / f.name).exists():
            (where / f.name).symlink_to(f.resolve())
    config = json.loads((model / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if config.get("classifier_dropout") is not None:  # None: the head uses hidden_dropout_prob
        config["classifier_dropout"] = 0.0
    from lora_jax.report import write_text

    write_text(where / "config.json", json.dumps(config, indent=2) + "\n")
    return where


def losses(run: Path) -> np.ndarray:
    """The training loss of every step, in step order (metrics.jsonl of either framework)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    steps = [r["step"] for r in rows]
    if steps != list(range(1, len(steps) + 1)):
        raise SystemExit(f"error: {run}/metrics.jsonl does not log every step")
    return np.array([r["loss"] for r in rows])


def run(script: str, flags: list[str], out: Path) -> dict:
    if (out / "report.json").is_file():  # finished earlier: a rerun of the command resumes the comparison
        return json.loads((out / "report.json").read_text())
    cmd = [sys.executable, str(common.script_path(script)), *flags, "--output-dir", str(out), "--no-progress",
           "--overwrite"]
    print(f"  {script} {' '.join(flags)}", file=sys.stderr, flush=True)
    t0 = time.time()
    try:
        common.run(cmd)
    except common.Failed as e:
        raise SystemExit(f"error: {script} failed: {e}") from None
    print(f"  done in {time.time() - t0:.0f} s", file=sys.stderr)
    return common.report_of(out)


def markdown(record: dict) -> str:
    lines = [
        *common.header("lora-jax and PyTorch from the same initial values", date=record["date"],
                       command=record["command"], device=record["device"], versions=record["versions"]),
        f"Model `{record['model']}`, task {record['task']}, seed {record['seed']}.",
        "",
        "Both frameworks start from lora-jax's initial head and LoRA factors (`train_torch.py --same-init`) and "
        "see the same batches in the same order. |Δ loss| is the absolute difference of the two training losses "
        "at the same step. Dropout off: the model's config with every dropout probability 0.",
        "",
        "| method | dropout | steps | max abs Δ loss | median abs Δ loss | first step abs Δ > 1e-3 "
        "| dev lora-jax | dev PyTorch |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in record["rows"]:
        lines.append(f"| {r['method']} | {r['dropout']} | {r['steps']} | {r['max_abs_diff']:.2e} | "
                     f"{r['median_abs_diff']:.2e} | {r['first_step_above_1e-3'] or 'none'} | "
                     f"{r['dev_jax']:.4f} | {r['dev_torch']:.4f} |")
    return "\n".join(lines) + "\n"


def plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lora_jax.report import save_figure

    fig, axes = plt.subplots(2, len(curves), figsize=(5 * len(curves), 6), squeeze=False, sharex="col")
    for col, (title, (ours, theirs)) in enumerate(curves.items()):
        steps = np.arange(1, len(ours) + 1)
        axes[0][col].plot(steps, ours, label="lora-jax", lw=1)
        axes[0][col].plot(steps, theirs, label="PyTorch", lw=1, ls="--")
        axes[0][col].set_title(title, fontsize=9)
        axes[0][col].set_ylabel("training loss")
        axes[0][col].legend(fontsize=7)
        axes[1][col].semilogy(steps, np.maximum(np.abs(ours - theirs), 1e-9), lw=1)
        axes[1][col].set_ylabel("|Δ loss|")
        axes[1][col].set_xlabel("step")
    fig.tight_layout()
    save_figure(fig, path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="rte")
    p.add_argument("--methods", default="full,lora-qv-r8", help="grid method names (benchmarks/grid.py), no AdaLoRA")
    p.add_argument("--model", default=str(SHARED / "models" / "all-MiniLM-L6-v2"))
    p.add_argument("--data-dir", default=str(SHARED / "data" / "glue"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--lr", type=float, default=1e-3, help="LoRA (the study's)")
    p.add_argument("--lr-full", type=float, default=5e-5, help="full fine-tuning (the study's)")
    p.add_argument("--dropout", default="off,on", help="off, on, or both (default)")
    p.add_argument("--name", default="same-init")
    p.add_argument("--runs", help="default runs/<name>")
    p.add_argument("--results", help="default results/<name>")
    p.add_argument("extra", nargs="*", help="after --: flags passed to both train.py and train_torch.py")
    args = p.parse_args()

    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS or m.startswith("adalora") or m == "lora-paper"]
    if bad:
        print(f"error: --methods: {', '.join(bad)} is not a LoRA or full grid method", file=sys.stderr)
        return 2
    settings = [d for d in args.dropout.split(",") if d]
    if not settings or set(settings) - {"off", "on"}:
        print(f"error: --dropout takes off and/or on, got {args.dropout!r}", file=sys.stderr)
        return 2
    model = Path(args.model)
    if not (model / "config.json").is_file():
        print(f"error: --model {model} has no config.json", file=sys.stderr)
        return 2
    runs = Path(args.runs or ROOT / "runs" / args.name)
    results = Path(args.results or ROOT / "results" / args.name)
    models = {"on": model}
    if "off" in settings:
        models["off"] = without_dropout(model, runs / "model-no-dropout")

    rows, curves, reports = [], {}, []
    for method in methods:
        for dropout in settings:
            shared_flags = ["--task", args.task, "--model", str(models[dropout]), "--data-dir", args.data_dir,
                      "--seed", str(args.seed), "--lr", str(args.lr_full if method == "full" else args.lr),
                      *args.extra]
            shared_flags += ["--max-steps", str(args.max_steps)] if args.max_steps else ["--epochs", str(args.epochs)]
            cell = runs / method / f"dropout-{dropout}"
            ours = run("train.py", [*shared_flags, *METHODS[method], "--log-every", "1"], cell / "jax")
            theirs = run("train_torch.py", [*shared_flags, *torch_flags(method), "--same-init"], cell / "torch")
            a, b = losses(cell / "jax"), losses(cell / "torch")
            diff = np.abs(a - b)
            above = np.nonzero(diff > 1e-3)[0]
            split, metric = ours["primary_metric"].split("/")
            rows.append({
                "method": method, "dropout": dropout, "steps": len(a),
                "max_abs_diff": float(diff.max()), "median_abs_diff": float(np.median(diff)),
                "first_step_above_1e-3": int(above[0]) + 1 if len(above) else None,
                "dev_jax": ours["metrics"][split]["final"]["values"][metric],
                "dev_torch": theirs["metrics"][split]["final"]["values"][metric],
                "metric": ours["primary_metric"],
            })
            curves[f"{method}, dropout {dropout}"] = (a, b)
            reports.append(ours)

    from lora_jax import profiling
    from lora_jax.report import write_text

    torch_versions = profiling.versions("torch", "transformers", "peft")
    record = {
        "command": common.command(__file__),
        "date": profiling.now(),
        "task": args.task, "seed": args.seed,
        "model": os.path.relpath(model, ROOT),
        "device": reports[0]["device"],
        "versions": {**{k: reports[0]["versions"].get(k) for k in ("jax", "flax", "optax")}, **torch_versions},
        "rows": rows,
    }
    results.mkdir(parents=True, exist_ok=True)
    write_text(results / "compare.json", json.dumps(record, indent=2) + "\n")
    write_text(results / "compare.md", markdown(record))
    plot(curves, results / "curves.png")
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
