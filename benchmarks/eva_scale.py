#!/usr/bin/env python
"""How loud ``--lora-rank auto``'s A starts (issue 34): x @ a_i against a kaiming column's, per matrix.

A run's setup takes each target kernel's input covariance C (d_in, d_in) over the first training batches,
as ``--lora-rank auto`` does (``prepare.input_covariances``), and the ranks ``eva.init`` gives at the
budget. For the components a matrix receives, the std of x @ a_i over those inputs is set beside what a
kaiming column (uniform in ±1/sqrt(d_in), lora.init's A) gives in expectation, sqrt(tr C / (3 d_in)):
- **unit** columns (eva's first A, the principal directions as they are): sqrt(a_iᵀ C a_i) with |a_i| = 1;
- **scaled** columns: the A that ``eva.init`` returns (``eva.kaiming_scaled``).
Both are measured as aᵀ C a on the same C, not assumed. B's change moves the output by x @ A times it,
so a ratio of k multiplies B's effective learning rate by about k.

Writes OUT/eva-scale-TASK.json and OUT/eva-scale-TASK.md.

    python benchmarks/eva_scale.py --task sst2 --out results/rank-baseline/eva-scale
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

import common


def loudness(cov: np.ndarray, a: np.ndarray | None) -> dict:
    """One matrix: std(x @ a_i) / kaiming's expected std for its top components as unit columns, and for the
    columns of ``a`` (d_in, r), the A that ``eva.init`` returned (None: the matrix received no component)."""
    from lora_jax import eva

    rank = 0 if a is None else a.shape[1]
    shares, vecs = eva.components(cov, max(rank, 1))
    level = np.trace(cov) / (3 * cov.shape[0])

    def ratios(cols: np.ndarray) -> list[float]:
        return [float(np.sqrt(cols[:, i] @ cov @ cols[:, i] / level)) for i in range(rank)]

    return {"d_in": cov.shape[0], "rank": rank, "top_share": float(shares[0]), "unit": ratios(vecs),
            "scaled": [] if a is None else ratios(np.asarray(a, np.float64))}


def markdown(rows: dict[str, dict], meta: dict) -> str:
    unit = [x for r in rows.values() for x in r["unit"]]
    scaled = [x for r in rows.values() for x in r["scaled"]]
    lines = common.header(f"How loud --lora-rank auto's A starts on {meta['task']}", date=meta["date"],
                          command=meta["command"], device=meta["device"])
    lines += [f"{meta['model']}, targets `{meta['targets']}`, a mean budget of {meta['budget']} per matrix, "
              f"the first {meta['batches']} training batches of {meta['batch_size']} (seed {meta['seed']}). "
              "Ratio: std(x @ a_i) over those inputs / a kaiming column's expected std, sqrt(tr C / (3 d_in)).",
              "",
              f"Over all {len(unit)} components: unit-norm columns {np.median(unit):.1f}x "
              f"[{min(unit):.1f}-{max(unit):.1f}]; kaiming-scaled columns {np.median(scaled):.2f}x "
              f"[{min(scaled):.2f}-{max(scaled):.2f}].", "",
              "| matrix | d_in | rank | top component's share | unit-norm, median [min-max] | scaled, median |",
              "|---|---:|---:|---:|---|---:|"]
    for path, r in rows.items():
        if r["rank"]:
            lines.append(f"| `{path}` | {r['d_in']} | {r['rank']} | {r['top_share']:.3f} | {np.median(r['unit']):.1f}x "
                         f"[{min(r['unit']):.1f}-{max(r['unit']):.1f}] | {np.median(r['scaled']):.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="sst2")
    p.add_argument("--model", default=str(common.SHARED / "models" / "all-MiniLM-L6-v2"))
    p.add_argument("--data-dir", default=str(common.SHARED / "data" / "glue"))
    p.add_argument("--targets", default="all")
    p.add_argument("--budget", type=int, default=8, help="mean rank per matrix (--lora-rank auto's default: 8)")
    p.add_argument("--batches", type=int, default=None, help="batches of statistics (default: eva.INIT_BATCHES)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    from lora_jax import eva, prepare
    from lora_jax.cli_common import user_errors
    from lora_jax.config import TrainConfig

    batches = eva.INIT_BATCHES if args.batches is None else args.batches
    if batches < 1 or args.budget < 1:
        raise common.fail(f"--batches and --budget must be >= 1, got {batches} and {args.budget}")
    try:
        cfg = TrainConfig(task=args.task, model=args.model, data_dir=args.data_dir, targets=args.targets,
                          lora_rank=args.budget, batch_size=args.batch_size, seed=args.seed)
        s = prepare.setup(cfg)  # fixed ranks: its adapters name the target kernels
        covs = prepare.input_covariances(s, batches)
        adapters, _ = eva.init(covs, prepare.output_widths(s), args.budget)
    except user_errors() as e:
        raise common.fail(str(e).splitlines()[0])
    rows = {p: loudness(c, adapters[p]["a"] if p in adapters else None) for p, c in covs.items()}
    import jax

    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": common.command(__file__),
            "device": f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind})", "task": args.task,
            "model": Path(args.model).name, "targets": args.targets, "budget": args.budget, "batches": batches,
            "batch_size": args.batch_size, "seed": args.seed, "code": common.code_version()}
    from lora_jax.report import write_text

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / f"eva-scale-{args.task}.json", json.dumps({**meta, "matrices": rows}, indent=1) + "\n")
    write_text(out / f"eva-scale-{args.task}.md", markdown(rows, meta))
    print(f"wrote {out / f'eva-scale-{args.task}.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
