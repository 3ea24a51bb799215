#!/usr/bin/env python
"""Every AdaLoRA-vs-LoRA grid in one table and one plot: results/adaptive/overview.{md,png}.

Reads results/<grid>/summary.json of each grid (written by benchmarks/grid.py), pairs each AdaLoRA
method with LoRA on every linear layer at the same final mean rank (``lora-all-rN``, the
scale-1 setting), and groups the pairs by recipe and run length: for each group, the mean Δ
(AdaLoRA median minus LoRA median) over its task x budget pairs, the issue's accuracy target.

    python benchmarks/adaptive_overview.py                       # every results/adaptive*/ grid
    python benchmarks/adaptive_overview.py --grids adaptive-rte-s16-600,adaptive-sst2-s16-600
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path

import numpy as np

from common import ROOT


def run_length(command: str) -> str:
    """``600 steps`` / ``3 epochs`` from a grid command line; ``default`` when it sets neither."""
    argv = shlex.split(command)
    for flag, unit in (("--max-steps", "steps"), ("--epochs", "epochs")):
        if flag in argv and argv.index(flag) + 1 < len(argv):
            return f"{argv[argv.index(flag) + 1]} {unit}"
    return "default"


def rows_of(name: str, summary: dict) -> list[dict]:
    """One row per (task, AdaLoRA method) that has ``lora-all-rN`` at its target rank in the same grid."""
    cells = {(c["task"], c["method"]): c for c in summary["cells"]}
    steps = run_length(summary["command"])
    out = []
    for (task, method), a in cells.items():
        hit = re.fullmatch(r"adalora-t(\d+)(-.+)?", method)
        b = cells.get((task, f"lora-all-r{hit.group(1)}")) if hit else None
        if b is None:
            continue
        out.append({"grid": name, "task": task, "recipe": f"adalora-tN{hit.group(2) or ''}", "method": method,
                    "rank": int(hit.group(1)), "steps": steps, "seeds": a["dev"]["n"], "ada": a["dev"],
                    "lora": b["dev"], "params": (a["trainable_params"], b["trainable_params"]),
                    "delta": a["dev"]["median"] - b["dev"]["median"]})
    return out


def groups_of(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Rows by (recipe, run length), in the order first seen."""
    out: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        out.setdefault((r["recipe"], r["steps"]), []).append(r)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grids", help="comma-separated grid names under --results-root (default: every adaptive*)")
    p.add_argument("--results-root", default=str(ROOT / "results"))
    p.add_argument("--out", help="directory for overview.md and overview.png (default RESULTS_ROOT/adaptive)")
    args = p.parse_args()
    root = Path(args.results_root)
    names = ([g for g in args.grids.split(",") if g] if args.grids
             else sorted(d.name for d in root.glob("adaptive*") if (d / "summary.json").is_file()))
    rows = []
    for name in names:
        f = root / name / "summary.json"
        if not f.is_file():
            print(f"error: {f} not found: run benchmarks/grid.py --name {name} first", file=sys.stderr)
            return 2
        rows += rows_of(name, json.loads(f.read_text()))
    if not rows:
        print(f"error: no grid among {', '.join(names) or '(none)'} pairs an adalora-tN method with lora-all-rN",
              file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else root / "adaptive"
    fmt = lambda s: f"{s['median']:.4f} [{s['min']:.4f}-{s['max']:.4f}]"
    lines = ["# AdaLoRA against LoRA at the same final budget: every grid", "",
             "Written by `python benchmarks/adaptive_overview.py` from each grid's `summary.json` (its command, "
             "versions, device and date are there). AdaLoRA (`adalora-tN...`: initial rank 1.5N, final mean rank N, "
             "every linear layer) against LoRA r = N on every linear layer, scale 1 (`lora-all-rN`), in the same "
             "grid. Dev metric: median [min-max] over seeds; Δ: AdaLoRA's median minus LoRA's. Trained "
             "parameters: the saved adapter (AdaLoRA at its final ranks, in the first seed's run) plus the head.", "",
             "| recipe | run | task | mean rank | seeds | AdaLoRA | LoRA | Δ | trained params, Ada / LoRA | grid |",
             "|---|---|---|---:|---:|---|---|---:|---|---|"]
    groups = groups_of(rows)
    for (recipe, steps), rs in groups.items():
        for r in sorted(rs, key=lambda r: (r["task"], r["rank"])):
            lines.append(f"| {recipe} | {steps} | {r['task']} | {r['rank']} | {r['seeds']} | {fmt(r['ada'])} | "
                         f"{fmt(r['lora'])} | {r['delta']:+.4f} | {r['params'][0]:,} / {r['params'][1]:,} | "
                         f"[`{r['grid']}`](../{r['grid']}/) |")
    lines += ["", "| recipe | run | pairs | tasks | mean Δ | pairs ahead or level |", "|---|---|---:|---|---:|---:|"]
    for (recipe, steps), rs in groups.items():
        ds = [r["delta"] for r in rs]
        lines.append(f"| {recipe} | {steps} | {len(rs)} | {', '.join(sorted({r['task'] for r in rs}))} | "
                     f"{np.mean(ds):+.4f} | {sum(d >= 0 for d in ds)} of {len(ds)} |")
    lines += ["", "The issue's target is a mean Δ >= 0 over tasks and budgets. Plot: [`overview.png`](overview.png)."]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows})
    colors = {t: plt.get_cmap("tab10")(i) for i, t in enumerate(tasks)}
    labels, values, cols = [], [], []
    for (recipe, steps), rs in groups.items():
        for r in sorted(rs, key=lambda r: (r["task"], r["rank"])):
            labels.append(f"{recipe} {steps}: {r['task']} r{r['rank']}")
            values.append(r["delta"])
            cols.append(colors[r["task"]])
    fig, ax = plt.subplots(figsize=(7, 0.28 * len(rows) + 1.2))
    ax.barh(range(len(rows)), values, color=cols)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("Δ dev metric, AdaLoRA median - LoRA median (same final mean rank)")
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=colors[t]) for t in tasks], labels=tasks, fontsize=7)
    fig.tight_layout()
    from lora_jax.report import save_figure, write_text

    out.mkdir(parents=True, exist_ok=True)
    save_figure(fig, out / "overview.png")
    write_text(out / "overview.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
