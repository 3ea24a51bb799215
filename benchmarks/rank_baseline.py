#!/usr/bin/env python
"""The rank a user would have to choose (issue 34): fixed ranks, and candidates that choose for the user.

Reads grids' summary.json (written by benchmarks/grid.py). Per task, the fixed-rank cells are
``rank-all-rN``: LoRA on every linear layer at rank N, scale alpha / r = 1, the default recipe otherwise.
From their medians over seeds it takes
- the **oracle**: the rank with the best median dev metric, chosen in hindsight;
- the **typical** run: r = 8, the rank everybody picks;
- the **median over ranks**: the median of the per-rank medians.
Every other method of the same task is a candidate. It is set beside these three, as the issue's goal
asks: at least the median over ranks, within 0.005 of the oracle, never below r = 8, and its step time
against LoRA's at r = 8 and at r = 16 (``--lora-rank auto``'s largest rank: 2 x its budget of 8), taken
only from fixed cells of the candidate's own grid (one machine, one stretch of time).

A task and method in several grids takes the cell of the last grid named in ``--grids``. Flags a grid
passes to every run (after ``--`` on its command line, e.g. ``-- --lr 2e-4``) make another recipe: its
cells form a section of their own, named by task and those flags.

Writes OUT/rank-baseline.md, OUT/rank-baseline.json and OUT/rank-baseline.png (per task: dev metric
against trained parameters, medians with the min-max over seeds).

    python benchmarks/rank_baseline.py --grids results/rank-baseline/sst2/summary.json --out results/rank-baseline
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

import common

FIXED = re.compile(r"rank-all-r(\d+)")
TYPICAL = 8
FULL_SWEEP = (1, 2, 4, 8, 16, 32)  # the fixed ranks
CAP = 16  # --lora-rank auto's largest rank (eva.RHO x its default budget): "LoRA at the same maximum rank"
ORACLE_MARGIN = 0.005  # the "within 0.005 of the oracle"


def recipe(command: str) -> str:
    """The flags a grid command passes to every run (after ``--``), or "" for the default recipe."""
    argv = shlex.split(command or "")
    return " ".join(argv[argv.index("--") + 1:]) if "--" in argv else ""


def baseline(cells: list[dict], name: str | None = None) -> dict:
    """One task's cells (of one recipe) -> its fixed ranks, oracle, typical run and median over ranks, and its
    candidates; ``name`` labels the section (default: the task)."""
    fixed = sorted(((int(FIXED.fullmatch(c["method"]).group(1)), c) for c in cells if FIXED.fullmatch(c["method"])),
                   key=lambda rc: rc[0])
    if not fixed:
        raise ValueError(f"no rank-all-rN cells for {name or cells[0]['task']}")
    medians = {r: c["dev"]["median"] for r, c in fixed}
    oracle = max(medians, key=lambda r: (medians[r], -r))  # ties go to the smaller rank
    by_rank = dict(fixed)
    out = {
        "task": name or cells[0]["task"],
        "metric": cells[0]["metric"],
        "fixed": [{"rank": r, "dev": c["dev"], "trainable_params": c["trainable_params"],
                   "step_time_s": c["step_time_s"]["median"] if c.get("step_time_s") else None,
                   "trivial_seeds": c.get("trivial_seeds"), "grid": c.get("grid")} for r, c in fixed],
        "oracle": {"rank": oracle, "median": medians[oracle]},
        "typical": {"rank": TYPICAL, "median": medians.get(TYPICAL)},
        "median_over_ranks": float(np.median(list(medians.values()))),
        "candidates": [],
    }
    def step_of(c: dict) -> float | None:
        return (c.get("step_time_s") or {}).get("median")

    def step_ratio(c: dict, rank: int) -> float | None:
        ref = by_rank.get(rank)
        if ref is None or ref.get("grid") != c.get("grid") or not step_of(c) or not step_of(ref):
            return None  # another grid ran at another time: its step times do not compare
        return step_of(c) / step_of(ref)

    for c in cells:
        if FIXED.fullmatch(c["method"]):
            continue
        m = c["dev"]["median"]
        out["candidates"].append({
            "method": c["method"], "dev": c["dev"], "trainable_params": c["trainable_params"],
            "final_ranks": c.get("final_ranks"), "trivial_seeds": c.get("trivial_seeds"),
            "vs_oracle": m - medians[oracle],
            "at_least_median_over_ranks": m >= out["median_over_ranks"],
            "within_oracle": m >= medians[oracle] - ORACLE_MARGIN,
            "at_least_typical": None if out["typical"]["median"] is None else m >= out["typical"]["median"],
            "step_vs_typical": step_ratio(c, TYPICAL),
            "step_vs_cap": step_ratio(c, CAP),
        })
    return out


def _dev(d: dict) -> str:
    return f"{d['median']:.4f} [{d['min']:.4f}-{d['max']:.4f}]"


def _yes(v) -> str:
    return "unmeasured" if v is None else ("yes" if v else "**no**")


def markdown(tasks: list[dict], meta: dict) -> str:
    lines = [*common.header("The rank a user would have to choose: fixed ranks and candidates", date=meta["date"],
                            command=meta["command"], device=meta["device"], versions=meta["versions"]),
             f"Grids: {', '.join(meta['grids'])}. Fixed ranks are `rank-all-rN` (benchmarks/common.py): LoRA on "
             "every linear layer at rank N, alpha = N (scale 1), the default recipe otherwise. Dev metric: median "
             "[min-max] over seeds. Step time: the grid's median; a candidate's step ratios use fixed cells of its "
             "own grid only (unmeasured otherwise). Where a task and method ran in several grids, the last grid's "
             "cell is shown.", ""]
    for t in tasks:
        lines += [f"## {t['task']} ({t['metric']})", "",
                  "| rank | dev metric | trained params | step (s) | trivial seeds | grid |", "|---:|---|---:|---:|---:|---|"]
        for f in t["fixed"]:
            step = "unmeasured" if f["step_time_s"] is None else f"{f['step_time_s']:.3f}"
            lines.append(f"| {f['rank']} | {_dev(f['dev'])} | {f['trainable_params']:,} | {step} | "
                         f"{f['trivial_seeds']} | {f['grid'] or ''} |")
        typical = t["typical"]["median"]
        ran = [f["rank"] for f in t["fixed"]]
        lines += [""] + ([] if set(FULL_SWEEP) <= set(ran) else [
            f"- **Partial sweep:** only r = {', '.join(map(str, ran))} ran, of {', '.join(map(str, FULL_SWEEP))}: the oracle "
            "and the median over ranks below are over these alone."])
        lines += [f"- **Oracle** (best median, in hindsight): r = {t['oracle']['rank']}, {t['oracle']['median']:.4f}.",
                  f"- **Typical** (r = {TYPICAL}): " + ("not run" if typical is None else f"{typical:.4f}") + ".",
                  f"- **Median over ranks:** {t['median_over_ranks']:.4f}.", ""]
        if t["candidates"]:
            lines += ["| candidate | dev metric | trained params | − oracle | ≥ median over ranks | within "
                      f"{ORACLE_MARGIN} of oracle | ≥ r = {TYPICAL} | step / r = {TYPICAL}'s | step / r = {CAP}'s |",
                      "|---|---|---:|---:|---|---|---|---:|---:|"]
            for c in t["candidates"]:
                step, cap = ("unmeasured" if v is None else f"{v:.2f}x" for v in (c["step_vs_typical"], c["step_vs_cap"]))
                lines.append(f"| {c['method']} | {_dev(c['dev'])} | {c['trainable_params']:,} | {c['vs_oracle']:+.4f} | "
                             f"{_yes(c['at_least_median_over_ranks'])} | {_yes(c['within_oracle'])} | "
                             f"{_yes(c['at_least_typical'])} | {step} | {cap} |")
            lines.append("")
    return "\n".join(lines) + "\n"


def plot(tasks: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2), squeeze=False)
    # One colour per candidate in every panel (the fixed ranks take the first).
    names = list(dict.fromkeys(c["method"] for t in tasks for c in t["candidates"]))
    colour = {n: plt.get_cmap("tab10")((i + 1) % 10) for i, n in enumerate(names)}
    for ax, t in zip(axes[0], tasks):
        def bars(entries):
            x = np.array([e["trainable_params"] for e in entries], float)
            med = np.array([e["dev"]["median"] for e in entries])
            err = np.array([[e["dev"]["median"] - e["dev"]["min"] for e in entries],
                            [e["dev"]["max"] - e["dev"]["median"] for e in entries]])
            return x, med, err

        x, med, err = bars(t["fixed"])
        ax.errorbar(x, med, yerr=err, marker="o", capsize=3, label="fixed rank (rank-all-rN)",
                    color=plt.get_cmap("tab10")(0))
        for f, xi, yi in zip(t["fixed"], x, med):
            ax.annotate(f"r={f['rank']}", (xi, yi), textcoords="offset points", xytext=(4, -12), fontsize=8)
        for c in t["candidates"]:
            cx, cm, ce = bars([c])
            ax.errorbar(cx, cm, yerr=ce, marker="s", capsize=3, ls="none", label=c["method"], color=colour[c["method"]])
        ax.axhline(t["median_over_ranks"], color="grey", ls=":", lw=1, label="median over ranks")
        ax.set_xscale("log")
        ax.set_xlabel("trained parameters")
        ax.set_ylabel(t["metric"])
        ax.set_title(t["task"])
        ax.legend(fontsize=7)
    fig.tight_layout()
    from lora_jax.report import save_figure

    save_figure(fig, path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grids", required=True, help="comma-separated summary.json files of benchmarks/grid.py")
    p.add_argument("--out", required=True, help="directory for rank-baseline.{md,json,png}")
    args = p.parse_args()
    summaries = []
    for name in args.grids.split(","):
        try:
            summaries.append(json.loads(Path(name).read_text()))
        except (OSError, ValueError) as e:
            raise common.fail(f"--grids: cannot read {name} ({type(e).__name__})")
    by_task: dict[str, dict[str, dict]] = {}
    for s in summaries:  # a later grid's cell replaces an earlier one's
        flags = recipe(s.get("command", ""))
        for c in s["cells"]:
            if not c["method"].startswith("torch:"):  # the PyTorch reference has no candidates
                name = f"{c['task']}, {flags}" if flags else c["task"]
                by_task.setdefault(name, {})[c["method"]] = {**c, "grid": s.get("name")}
    try:
        tasks = [baseline(list(cells.values()), name) for name, cells in by_task.items()]
    except ValueError as e:
        raise common.fail(f"--grids: {e}")
    first = summaries[0]
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": common.command(__file__), "device": first.get("device"),
            "versions": first.get("versions"), "grids": [s["name"] for s in summaries]}
    from lora_jax.report import write_text

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # The markdown first: its header asks git whether the tree is clean, before this run changes any file.
    write_text(out / "rank-baseline.md", markdown(tasks, meta))
    write_text(out / "rank-baseline.json", json.dumps({**meta, "tasks": tasks}, indent=1) + "\n")
    plot(tasks, out / "rank-baseline.png")
    print(f"wrote {out / 'rank-baseline.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
