"""Per-seed dev metrics of the robust-recipe study, from the run reports copied next to this file.

    python results/robust-lora/per_seed.py RUNS [TASK ...] > results/robust-lora/per-seed.md

RUNS is the grid's run directory (`--runs` of scripts/grid.py); TASKs, if given, the tasks to list. Each finished run's report.json is
copied to reports/TASK-METHOD-seedK.json here (PyTorch runs: torch-TASK-...), so that the table can be
checked without the runs.
"""
import json
import shutil
import sys
from pathlib import Path

from lora_jax.metrics import is_trivial

here = Path(__file__).parent
runs = Path(sys.argv[1])
only = set(sys.argv[2:])
(here / "reports").mkdir(exist_ok=True)
rows = {}
for report in sorted(runs.glob("**/seed*/report.json")):
    seed_dir = report.parent
    parts = seed_dir.relative_to(runs).parts  # [torch,] task, method, seedK
    framework = "torch" if parts[0] == "torch" else "jax"
    task, method, seed = parts[-3], parts[-2], int(parts[-1][4:])
    if only and task not in only:
        continue
    name = f"{'torch-' if framework == 'torch' else ''}{task}-{method}-seed{seed}.json"
    shutil.copyfile(report, here / "reports" / name)
    r = json.loads(report.read_text())
    split, metric = r["primary_metric"].split("/")
    values = r["metrics"][split]["final"]["values"]
    rows.setdefault((task, f"{'torch:' if framework == 'torch' else ''}{method}"), {})[seed] = (values[metric], is_trivial(values),
                                                                                                 values.get("majority_share"))
seeds = sorted({s for v in rows.values() for s in v})
print("# Per-seed dev metric (final), robust-recipe study\n")
print("`*`: the run ended at the trivial solution (lora_jax.metrics.is_trivial); in brackets the share of "
      "dev predictions in the most common class. Reports: `reports/`.\n")
print("| task | method | " + " | ".join(f"seed {s}" for s in seeds) + " | trivial |")
print("|---|---|" + "---:|" * len(seeds) + "---:|")
for (task, method), by_seed in sorted(rows.items()):
    cells = []
    for s in seeds:
        if s not in by_seed:
            cells.append("not run")
            continue
        v, trivial, share = by_seed[s]
        cells.append(f"{v:.4f}{'*' if trivial else ''}" + (f" ({share:.2f})" if share is not None else ""))
    n_trivial = sum(t for _, t, _ in by_seed.values())
    print(f"| {task} | {method} | " + " | ".join(cells) + f" | {n_trivial} of {len(by_seed)} |")
