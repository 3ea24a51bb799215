#!/usr/bin/env python
"""AdaLoRA against fixed-rank LoRA from a grid's summary: results/<name>/analysis.md (+ PNG).

Reads results/<name>/summary.json and the per-run final ranks in results/<name>/ranks/
(both written by benchmarks/grid.py) and writes: AdaLoRA vs LoRA at the same final
budget (the mean rank per matrix equal), the step-time ratio within the grid,
and where AdaLoRA put its rank, by matrix type and by layer, averaged over runs.

    python benchmarks/adaptive_report.py --name adaptive
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

from common import ROOT

def pairs(methods) -> list[tuple[str, str]]:
    """(AdaLoRA method, LoRA method at the same final mean rank on every linear layer).

    ``adalora-tN`` and its variants ``adalora-tN-...`` pair with ``lora-all-rN`` and with every
    variant ``lora-all-rN-...`` among ``methods`` (``lora-all-rN`` alone when none is there).
    """
    out = []
    for m in methods:
        hit = re.fullmatch(r"adalora-t(\d+)(-.+)?", m)
        if hit:
            n = hit.group(1)
            partners = [x for x in methods if re.fullmatch(rf"lora-all-r{n}(-.+)?", x)]
            out += [(m, x) for x in partners or [f"lora-all-r{n}"]]
    return out


def lora_variant(method: str) -> str:
    """``lora-all-r8-s16`` -> ``lora-all-rN-s16``: the LoRA setting with its rank left open."""
    return re.sub(r"^lora-all-r\d+", "lora-all-rN", method)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="adaptive")
    p.add_argument("--results", help="the grid's summary directory (default results/NAME)")
    p.add_argument("--note", help="a caveat to print under the table (e.g. what else ran on the machine)")
    args = p.parse_args()
    from lora_jax import adaptive
    from lora_jax.report import save_figure, write_text

    d = Path(args.results) if args.results else ROOT / "results" / args.name
    if not (d / "summary.json").is_file():
        print(f"error: {d}/summary.json not found: run benchmarks/grid.py --name {args.name} first", file=sys.stderr)
        return 2
    summary = json.loads((d / "summary.json").read_text())
    cells = {(c["task"], c["method"]): c for c in summary["cells"]}
    tasks = list(dict.fromkeys(c["task"] for c in summary["cells"]))
    f = lambda s: f"{s['median']:.4f} [{s['min']:.4f}-{s['max']:.4f}]"
    lines = [f"# AdaLoRA vs fixed-rank LoRA (grid `{summary['name']}`)", "",
             "From [`summary.json`](summary.json) (command, versions, device and date there) and the final ranks "
             "in [`ranks/`](ranks/). Dev metric: median [min-max] over seeds; Δ: AdaLoRA median minus LoRA median. "
             "Step-time ratio: AdaLoRA's median step over LoRA's, same grid (same batches, same machine).", "",
             "| task | AdaLoRA | metric | LoRA at the same final budget | metric | Δ | saved params (Ada / LoRA) | "
             "step-time ratio |", "|---|---|---|---|---|---:|---|---:|"]
    deltas: dict[str, list[float]] = {}
    for task in tasks:
        for ada, fixed in pairs(dict.fromkeys(c["method"] for c in summary["cells"])):
            a, b = cells.get((task, ada)), cells.get((task, fixed))
            if not (a and b):
                continue
            delta = a["dev"]["median"] - b["dev"]["median"]
            deltas.setdefault(lora_variant(fixed), []).append(delta)
            lines.append(f"| {task} | {ada} | {f(a['dev'])} | {fixed} | {f(b['dev'])} | {delta:+.4f} | "
                         f"{a['trainable_params']:,} / {b['trainable_params']:,} | "
                         f"{a['step_time_s']['median'] / b['step_time_s']['median']:.2f}x |")
        ref = cells.get((task, "lora-qv-r8"))
        if ref:
            for ada, _ in pairs(dict.fromkeys(c["method"] for c in summary["cells"])):
                a = cells.get((task, ada))
                if a:
                    lines.append(f"| {task} | {ada} | {f(a['dev'])} | lora-qv-r8 | {f(ref['dev'])} | "
                                 f"{a['dev']['median'] - ref['dev']['median']:+.4f} | "
                                 f"{a['trainable_params']:,} / {ref['trainable_params']:,} | "
                                 f"{a['step_time_s']['median'] / ref['step_time_s']['median']:.2f}x |")
    for variant, ds in deltas.items():
        lines += ["", f"Mean Δ at equal budget against `{variant}` over {len(ds)} task x budget pairs: "
                      f"{np.mean(ds):+.4f}."]
    if args.note:
        lines += ["", f"Note: {args.note}"]

    rank_files = sorted((d / "ranks").glob("*-ranks.json"))
    if rank_files:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        groups: dict[str, list[dict]] = {}
        for rf in rank_files:
            r = json.loads(rf.read_text())
            key = rf.name.rsplit("-seed", 1)[0]
            groups.setdefault(key, []).append(r)
        lines += ["", "## Where the rank went (final ranks, mean over seeds)", ""]
        fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.8), squeeze=False)
        for ax, (key, runs) in zip(axes[0], sorted(groups.items())):
            layers, names, _ = adaptive.rank_table(runs[0]["ranks"])
            grid = np.mean([adaptive.rank_table(r["ranks"])[2] for r in runs], axis=0)
            init = runs[0]["init_rank"]
            lines += [f"**{key}** ({len(runs)} runs; start {init} per matrix, target mean {runs[0]['target_rank']:g}; "
                      f"matrices at rank 0: {np.mean([r['pruned_to_zero'] for r in runs]):.1f} on average)", "",
                      "| layer | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
            lines += [f"| {layer} | " + " | ".join(f"{v:.1f}" for v in row) + " |" for layer, row in zip(layers, grid)]
            lines += ["| mean | " + " | ".join(f"{v:.1f}" for v in grid.mean(axis=0)) + " |", ""]
            im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=init, aspect="auto")
            ax.set_xticks(range(len(names)), names, fontsize=7)
            ax.set_yticks(range(len(layers)), layers)
            ax.set_xlabel("matrix")
            ax.set_ylabel("layer")
            ax.set_title(key, fontsize=9)
            fig.colorbar(im, ax=ax)
        fig.tight_layout()
        save_figure(fig, d / "ranks_mean.png")
        lines += ["Heatmaps: [`ranks_mean.png`](ranks_mean.png); dev metric against parameters: "
                  "[`metric_vs_params.png`](metric_vs_params.png)."]
    write_text(d / "analysis.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
