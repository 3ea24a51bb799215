#!/usr/bin/env python
"""Run a grid of fine-tuning runs (task x method x seed), resumably, and summarise it.

Each cell is one `scripts/train.py` run in its own directory under --runs. A cell
whose report.json exists is done and skipped; a cell killed half-way (config.json
and checkpoints but no report) is continued with --resume, so rerunning the same
command picks the grid up where it stopped. The summary (JSON + markdown + PNG)
goes to results/<name>/: per task and method, the dev metric's median and min-max
over seeds, trained parameters, adapter size, step time and examples/s.

    python benchmarks/grid.py --name adaptive --tasks mrpc,sst2 --methods lora-qv-r8,adalora-t8 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import common
from common import METHODS, ROOT, SHARED, torch_flags

# For context only, another model: the LoRA paper's RoBERTa-base (125M) GLUE dev results, Table 2
# (Hu et al., 2021): (LoRA r = 8 on W_q, W_v; full fine-tuning). MNLI matched accuracy, SST-2, QNLI,
# QQP, RTE accuracy; MRPC accuracy; CoLA Matthews correlation; STS-B Pearson correlation.
PAPER_TABLE2 = {"mnli": (87.5, 87.6), "sst2": (95.1, 94.8), "mrpc": (89.7, 90.2), "cola": (63.4, 63.6),
                "qnli": (93.3, 92.8), "qqp": (90.8, 91.9), "rte": (86.6, 78.7), "stsb": (91.5, 91.2)}

# The LoRA paper started MRPC, RTE and STS-B from the MNLI-adapted model.
WARM_STARTED = ("mrpc", "rte", "stsb")


def cell_dir(runs: Path, task: str, method: str, seed: int, framework: str = "jax") -> Path:
    base = runs if framework == "jax" else runs / framework
    return base / task / method / f"seed{seed}"


def run_cell(args, task: str, method: str, seed: int, framework: str = "jax") -> dict | None:
    out = cell_dir(Path(args.runs), task, method, seed, framework)
    if (out / "report.json").is_file():
        return json.loads((out / "report.json").read_text())
    if args.summarise_only:
        return None
    script = "train.py" if framework == "jax" else "train_torch.py"
    cmd = [sys.executable, str(common.script_path(script)), "--task", task, "--model", args.model,
           "--seed", str(seed), "--output-dir", str(out), "--no-progress",
           *(METHODS[method] if framework == "jax" else torch_flags(method))]
    if args.data_dir != "hub":
        cmd += ["--data-dir", args.data_dir]
    # Unset flags are left to train.py's defaults (or to a preset such as lora-paper's).
    lr = args.lr_full if method == "full" else args.lr
    cmd += (["--lr", str(lr)] if lr else []) + (["--batch-size", str(args.batch_size)] if args.batch_size else [])
    adalora = method.startswith("adalora")
    if args.max_steps:
        cmd += ["--max-steps", str(args.max_steps)]
        if framework == "jax":
            cmd += ["--eval-every", str(args.max_steps)]
        if framework == "jax" or not adalora:
            cmd += ["--save-every", str(max(1, args.max_steps // 4))]
    else:
        cmd += ["--epochs", str(args.epochs)] if args.epochs else []
        if framework == "jax" or not adalora:
            cmd += ["--save-every", str(args.save_every)]
    if args.warm_start_from and task in WARM_STARTED and framework == "jax" and not method.startswith("adalora"):
        src = cell_dir(Path(args.runs), args.warm_start_from, method, seed) / "adapter"
        if not src.is_dir():
            print(f"  no {args.warm_start_from} adapter at {src} to warm-start from: run that task first",
                  file=sys.stderr)
            return None
        cmd += ["--init-adapter", str(src)]
    cmd += list(args.extra)
    # A run stopped half-way continues from its newest checkpoint (train.py / train_torch.py --resume).
    # A lora-jax cell killed before its first checkpoint has nothing to continue from: it starts over.
    stopped = (any(p.name.isdigit() for p in (out / "checkpoints").glob("*")) if framework == "jax"
               else (out / "checkpoint.pt").is_file())
    cmd += ["--resume"] if stopped else ["--overwrite"]
    t0 = time.time()
    env = dict(os.environ)
    if args.compile_cache:
        # Seeds of one cell compile the same programs: JAX's persistent cache lets the second seed
        # load them instead (compile_time_s in its report drops; step times are unaffected).
        env.setdefault("JAX_COMPILATION_CACHE_DIR", args.compile_cache)
        env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
    try:
        common.run(cmd, env=env)
    except common.Failed as e:
        print(f"  failed: {e}", file=sys.stderr)
        return None
    print(f"  done in {time.time() - t0:.0f} s", file=sys.stderr)
    return common.report_of(out)


def _stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)} if xs else {}


def _trivial_seeds(rs: list[dict], split: str) -> int | None:
    """How many runs ended at the trivial solution (metrics.is_trivial of the final dev values); None when
    the reports predate the prediction-spread metrics."""
    from lora_jax.metrics import is_trivial

    values = [r["metrics"][split]["final"]["values"] for r in rs]
    if not all("majority_share" in v or "std_ratio" in v for v in values):
        return None
    return sum(is_trivial(v) for v in values)


def summarise(rows: list[dict], args) -> dict:
    cells: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        cells.setdefault((r["task"], r["method_name"]), []).append(r)
    summary = []
    for (task, method), rs in cells.items():
        split, metric = rs[0]["primary_metric"].split("/")
        summary.append({
            "task": task, "method": method, "seeds": [r["seed"] for r in rs],
            "metric": rs[0]["primary_metric"],
            "dev": _stats([r["metrics"][split]["final"]["values"][metric] for r in rs]),
            "all_metrics": {s: {k: _stats([r["metrics"][s]["final"]["values"][k] for r in rs])
                                for k in rs[0]["metrics"][s]["final"]["values"]} for s in rs[0]["metrics"]},
            "trainable_params": rs[0]["trainable_params"],
            "lora_params_during_training": rs[0].get("lora_params_during_training"),
            "adapter_bytes": _stats([r["adapter_bytes"] for r in rs]),
            "step_time_s": _stats([r["step_time_median_s"] for r in rs if r["step_time_median_s"]]),
            "examples_per_s": _stats([r["train_examples_per_sec"] for r in rs if r["train_examples_per_sec"]]),
            "peak_rss_bytes": _stats([r["memory"]["peak_rss_bytes"] for r in rs]),
            "wall_time_s": _stats([r["wall_time_s"] for r in rs]),
            # Total rank at the end, per seed: AdaLoRA's, or the ranks a run chose (--rank-allocation eva / gate).
            "final_ranks": [r["adaptive"]["final_total_rank"] if r.get("adaptive")
                            else r["ranks_from_data"]["total_rank"] for r in rs
                            if r.get("adaptive") or r.get("ranks_from_data")] or None,
            "trivial_seeds": _trivial_seeds(rs, split),
        })
    return {"cells": summary}


def markdown(record: dict) -> str:
    fmt = lambda s, f=".4f": "n/a" if not s else f"{s['median']:{f}} [{s['min']:{f}}-{s['max']:{f}}]"
    lines = [
        *common.header(f"Grid `{record['name']}`", date=record["date"], command=record["command"],
                       device=record["device"], versions=record["versions"]),
        f"Runs: `{record['runs']}`; model `{record['model']}`.",
        "",
        "Dev metric at the end of training: median [min-max] over seeds. Trivial: the seeds that ended at the "
        "trivial solution (at least 95% of dev predictions one class, or a regression's predictions varying less "
        "than 0.1x the labels; lora_jax.metrics). Step time: median over each run's "
        "timed steps (after the first step of each sequence length), then median over seeds. Methods: "
        + "; ".join(f"`{m}` = `{' '.join(METHODS[m])}`" for m in record["methods"]) + ".",
        "",
        "| task | method | seeds | dev metric | trivial | trained params (saved) | adapter KiB | step (s) | examples/s "
        "| peak RSS (GiB) | wall (min) |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in record["cells"]:
        lines.append(
            f"| {c['task']} | {c['method']} | {len(c['seeds'])} | {c['metric']} {fmt(c['dev'])} | "
            f"{'n/a' if c.get('trivial_seeds') is None else c['trivial_seeds']} | "
            f"{c['trainable_params']:,} | {c['adapter_bytes']['median'] / 1024:,.0f} | "
            f"{fmt(c['step_time_s'], '.3f')} | {c['examples_per_s'].get('median', float('nan')):.1f} | "
            f"{c['peak_rss_bytes']['median'] / 2**30:.2f} | {c['wall_time_s']['median'] / 60:.1f} |")
    tasks = [t for t in dict.fromkeys(c["task"] for c in record["cells"]) if t in PAPER_TABLE2]
    if tasks and "roberta" not in record["model"].lower():
        lines += ["", f"For context only (another model: RoBERTa-base, 125M parameters, not `{record['model']}`): "
                  "the LoRA paper's Table 2, dev, in percent.", "",
                  "| task | LoRA r = 8 (q, v) | full fine-tuning |", "|---|---:|---:|"]
        lines += [f"| {t} | {PAPER_TABLE2[t][0]} | {PAPER_TABLE2[t][1]} |" for t in tasks]
    elif tasks:
        lines += ["", "The LoRA paper's Table 2 (RoBERTa-base, dev, percent), to compare with:", "",
                  "| task | LoRA r = 8 (q, v) | full fine-tuning |", "|---|---:|---:|"]
        lines += [f"| {t} | {PAPER_TABLE2[t][0]} | {PAPER_TABLE2[t][1]} |" for t in tasks]
    return "\n".join(lines) + "\n"


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({c["task"] for c in record["cells"]})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for i, c in enumerate(c for c in record["cells"] if c["task"] == task):
            d = c["dev"]
            ax.errorbar([c["trainable_params"]], [d["median"]], yerr=[[d["median"] - d["min"]], [d["max"] - d["median"]]],
                        fmt="o", capsize=3, label=c["method"], color=f"C{i}")
        ax.set_xscale("log")
        ax.set_xlabel("trained parameters (saved adapter + head)")
        ax.set_ylabel(next(c["metric"] for c in record["cells"] if c["task"] == task))
        ax.set_title(task)
        ax.legend(fontsize=7)
    fig.tight_layout()
    from lora_jax.report import save_figure

    save_figure(fig, path)


def plot_costs(record: dict, path: Path) -> None:
    """Bars per task and method: peak process memory (RSS) and training examples/s, medians over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({c["task"] for c in record["cells"]})
    fig, axes = plt.subplots(2, len(tasks), figsize=(5 * len(tasks), 6.5), squeeze=False)
    for col, task in enumerate(tasks):
        cells = [c for c in record["cells"] if c["task"] == task]
        names = [c["method"] for c in cells]
        colors = ["C1" if n.startswith("torch:") else "C0" for n in names]
        rows = ((0, "peak RSS (GiB)", [c["peak_rss_bytes"].get("median", 0) / 2**30 for c in cells]),
                (1, "training examples/s", [c["examples_per_s"].get("median", 0) for c in cells]))
        for row, label, values in rows:
            ax = axes[row][col]
            ax.bar(range(len(cells)), values, color=colors)
            ax.set_xticks(range(len(cells)), names, rotation=60, ha="right", fontsize=7)
            ax.set_ylabel(label)
            ax.set_title(f"{task} (blue: lora-jax, orange: PyTorch)" if row == 0 else task, fontsize=9)
    fig.tight_layout()
    from lora_jax.report import save_figure

    save_figure(fig, path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="results/NAME/ gets the summary")
    p.add_argument("--tasks", default="rte,mrpc,sst2")
    p.add_argument("--methods", default="lora-qv-r8,lora-all-r2,lora-all-r8,adalora-t2,adalora-t8",
                   help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--max-steps", type=int, help="steps per run (default: --epochs)")
    p.add_argument("--epochs", type=float, help="epochs per run (default: train.py's or the preset's)")
    p.add_argument("--batch-size", type=int, help="default: train.py's (16) or the preset's")
    p.add_argument("--lr", type=float, help="adapter methods (default: train.py's 5e-4 or the preset's)")
    p.add_argument("--lr-full", type=float, default=5e-5, help="full fine-tuning")
    p.add_argument("--model", default=str(SHARED / "models" / "all-MiniLM-L6-v2"), help="directory or Hub id")
    p.add_argument("--data-dir", default=str(SHARED / "data" / "glue"), help="GLUE TSV directory, or hub")
    p.add_argument("--warm-start-from", help="start mrpc, rte and stsb from this task's adapter (e.g. mnli; "
                   "list it first in --tasks)")
    p.add_argument("--frameworks", default="jax", help="jax, torch or jax,torch (the PyTorch reference)")
    p.add_argument("--save-every", type=int, default=500, help="checkpoint interval of epoch-long runs")
    p.add_argument("--runs", help="run directories (default runs/grid-NAME)")
    p.add_argument("--summarise-only", action="store_true",
                   help="run nothing: summarise the cells that have finished so far")
    p.add_argument("--compile-cache", help="JAX persistent compilation cache shared by the cells "
                   "(default RUNS/.jax-cache; 'none' turns it off)")
    p.add_argument("--results", help="summary directory (default results/NAME)")
    p.add_argument("extra", nargs="*", help="more train.py flags, after --")
    args = p.parse_args()
    args.runs = args.runs or str(ROOT / "runs" / f"grid-{args.name}")
    if args.compile_cache is None:
        args.compile_cache = str(Path(args.runs).resolve() / ".jax-cache")
    elif args.compile_cache == "none":
        args.compile_cache = ""
    results = Path(args.results or ROOT / "results" / args.name)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"error: unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}", file=sys.stderr)
        return 2
    seeds = common.int_list(args.seeds, "--seeds")
    tasks = [t for t in args.tasks.split(",") if t]
    frameworks = [f for f in args.frameworks.split(",") if f]
    if set(frameworks) - {"jax", "torch"}:
        print(f"error: --frameworks takes jax and/or torch, got {args.frameworks!r}", file=sys.stderr)
        return 2
    rows, failed = [], 0
    # Seed-major within a task: a grid stopped early has every method at the seeds it reached.
    cells = [(t, m, s, f) for t in tasks for s in seeds for m in methods for f in frameworks
             if not (f == "torch" and m.startswith("adalora"))]
    missing = 0
    for i, (task, method, seed, fw) in enumerate(cells, 1):
        if not args.summarise_only:
            print(f"[{i}/{len(cells)}] {task} {method} seed {seed} ({fw})", file=sys.stderr, flush=True)
        r = run_cell(args, task, method, seed, fw)
        if r is None:
            missing += args.summarise_only
            failed += not args.summarise_only
            continue
        rows.append({**r, "method_name": method if fw == "jax" else f"torch:{method}", "seed": seed,
                     "framework": fw})
    if not rows:
        print("error: no run finished", file=sys.stderr)
        return 1
    if missing:
        print(f"{missing} of {len(cells)} cells have not finished: summarising the other {len(rows)}",
              file=sys.stderr)
    from lora_jax import profiling
    from lora_jax.report import write_text

    record = {
        "name": args.name,
        "command": common.command(__file__),
        "date": profiling.now(),
        "runs": os.path.relpath(args.runs, ROOT),
        "model": os.path.relpath(args.model, ROOT) if Path(args.model).exists() else args.model,
        "methods": methods,
        "device": rows[0]["device"],
        "versions": {k: rows[0]["versions"].get(k) for k in ("jax", "flax", "optax")},
        **summarise(rows, args),
    }
    results.mkdir(parents=True, exist_ok=True)
    write_text(results / "summary.json", json.dumps(record, indent=2) + "\n")
    write_text(results / "summary.md", markdown(record))
    plot(record, results / "metric_vs_params.png")
    plot_costs(record, results / "memory_throughput.png")
    # AdaLoRA runs: the final ranks (JSON + heatmap + budget curve) of each run, kept with the summary.
    import shutil

    for r in rows:
        src = cell_dir(Path(args.runs), r["task"], r["method_name"], r["seed"], r["framework"]) / "adaptive"
        if src.is_dir():
            for f in src.iterdir():
                dst = results / "ranks" / f"{r['task']}-{r['method_name']}-seed{r['seed']}-{f.name}"
                dst.parent.mkdir(exist_ok=True)
                shutil.copyfile(f, dst)
    print(markdown(record))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
