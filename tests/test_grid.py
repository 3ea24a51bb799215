"""The study scripts: benchmarks/grid.py runs a grid with the PyTorch reference, resumes a stopped
cell from its checkpoint and skips finished ones; benchmarks/reproduce_paper.sh with the MNLI-style
warm start, run on the tiny checkpoint."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from lora_jax.config import TrainConfig

from .conftest import ROOT

pytest.importorskip("torch")
pytest.importorskip("peft")


def _grid(model, glue, runs, results, *flags):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "grid.py"), "--name", "t", "--model", str(model),
           "--data-dir", str(glue), "--runs", str(runs), "--results", str(results), *flags]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((results / "summary.json").read_text())


@pytest.mark.slow
def test_grid_with_reference_resumes_and_summarises(tiny_bert_dir, glue_dir, tmp_path):
    runs, results = tmp_path / "runs", tmp_path / "results"
    flags = ["--tasks", "rte", "--methods", "lora-qv-r8,adalora-t2", "--seeds", "0,1", "--max-steps", "8",
             "--frameworks", "jax,torch", "--", "--max-seq-len", "32", "--num-buckets", "0"]
    summary = _grid(tiny_bert_dir, glue_dir, runs, results, *flags)
    cells = {c["method"]: c for c in summary["cells"]}
    assert set(cells) == {"lora-qv-r8", "torch:lora-qv-r8", "adalora-t2"}  # no AdaLoRA in the reference
    assert all(c["dev"]["n"] == 2 for c in cells.values())
    # The same trained parameter count in both frameworks (peft: LoRA + the classifier it saves).
    assert cells["lora-qv-r8"]["trainable_params"] == cells["torch:lora-qv-r8"]["trainable_params"]
    assert (results / "summary.md").is_file() and (results / "metric_vs_params.png").stat().st_size > 1000
    assert (results / "ranks" / "rte-adalora-t2-seed0-ranks.json").is_file()
    # Trivial seeds counted from each run's dev predictions, in both frameworks.
    for c in cells.values():
        reports = [json.loads((runs / ("torch" if c["method"].startswith("torch:") else "") / "rte"
                               / c["method"].removeprefix("torch:") / f"seed{seed}" / "report.json").read_text())
                   for seed in (0, 1)]
        shares = [r["metrics"]["dev"]["final"]["values"]["majority_share"] for r in reports]
        assert c["trivial_seeds"] == sum(x >= 0.95 for x in shares)

    # A cell stopped after its checkpoints (no report) continues from them; finished cells are skipped.
    cell = runs / "rte" / "lora-qv-r8" / "seed1"
    (cell / "report.json").unlink()
    torch_report = runs / "torch" / "rte" / "lora-qv-r8" / "seed0" / "report.json"
    before = torch_report.stat().st_mtime_ns
    _grid(tiny_bert_dir, glue_dir, runs, results, *flags)
    assert json.loads((cell / "report.json").read_text())["resumed"] is True
    assert torch_report.stat().st_mtime_ns == before
    assert (results / "memory_throughput.png").stat().st_size > 1000

    # A cell killed before its first checkpoint (config.json, no checkpoint) starts over.
    import shutil

    (cell / "report.json").unlink()
    shutil.rmtree(cell / "checkpoints")
    _grid(tiny_bert_dir, glue_dir, runs, results, *flags)
    assert json.loads((cell / "report.json").read_text())["resumed"] is False

    # --summarise-only runs nothing: a missing cell stays missing and the others are summarised.
    (cell / "report.json").unlink()
    summary = _grid(tiny_bert_dir, glue_dir, runs, results, "--summarise-only", *flags)
    assert not (cell / "report.json").exists()
    cells = {c["method"]: c for c in summary["cells"]}
    assert cells["lora-qv-r8"]["dev"]["n"] == 1 and cells["torch:lora-qv-r8"]["dev"]["n"] == 2


@pytest.mark.slow
def test_reproduce_paper_script_with_warm_start(tiny_bert_dir, glue_dir, tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "MODEL": str(tiny_bert_dir), "GLUE_DIR": str(glue_dir),
           "TASKS": "sst2,rte", "WARM_START": "sst2", "RUNS": str(tmp_path / "runs"),
           "RESULTS": str(tmp_path / "results"),
           # The paper's 512 positions and epochs do not fit the tiny model or a test's time.
           "EXTRA": "--max-steps 4 --max-seq-len 32 --num-buckets 0"}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "reproduce_paper.sh")], capture_output=True, text=True,
                          env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    cfg = json.loads((tmp_path / "runs" / "rte" / "lora-paper" / "seed0" / "config.json").read_text())
    assert cfg["init_adapter"] == str(tmp_path / "runs" / "sst2" / "lora-paper" / "seed0" / "adapter")
    assert cfg["lr"] == 5e-4 and cfg["batch_size"] == 32 and cfg["weight_decay"] == 0.1  # the paper's RTE row
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    assert {c["task"] for c in summary["cells"]} == {"sst2", "rte"}

    bad = subprocess.run(["bash", str(ROOT / "benchmarks" / "reproduce_paper.sh")], capture_output=True, text=True,
                         env={**env, "WARM_START": "mnli"}, timeout=60)
    assert bad.returncode == 2 and "WARM_START=mnli must come first in TASKS" in bad.stderr


def _torch_cmd(model, glue, out, *extra):
    return [sys.executable, str(ROOT / "benchmarks" / "train_torch.py"), "--task", "rte", "--model", str(model),
            "--data-dir", str(glue), "--batch-size", "4", "--max-seq-len", "32", "--max-steps", "150",
            "--save-every", "5", "--lora-dropout", "0.1", "--output-dir", str(out), "--no-progress", *extra]


@pytest.mark.slow
def test_torch_reference_takes_peft_options(tiny_bert_dir, glue_dir, tmp_path):
    """The grid's peft options reach peft: OLoRA's start and DoRA, in one short run."""
    cmd = [*_torch_cmd(tiny_bert_dir, glue_dir, tmp_path / "r"), "--max-steps", "3", "--dora", "--lora-init", "olora"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    config = json.loads((tmp_path / "r" / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["init_lora_weights"] == "olora"
    # The reference's default LoRA+ ratio is lora-jax's (repeated there so that it never imports JAX).
    assert json.loads((tmp_path / "r" / "report.json").read_text())["loraplus_lr_ratio"] == \
        TrainConfig(method="lora").loraplus_lr_ratio
    bad = subprocess.run([*cmd, "--same-init"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--same-init" in bad.stderr


@pytest.mark.slow
def test_torch_reference_sigkill_then_resume(tiny_bert_dir, glue_dir, tmp_path):
    """The PyTorch reference continues a killed run from its checkpoint: the same trained adapter and
    losses as the run that was never stopped (LoRA dropout on, so the RNG state is restored too)."""
    import signal
    import time

    import torch

    ref, run = tmp_path / "ref", tmp_path / "run"
    done = subprocess.run(_torch_cmd(tiny_bert_dir, glue_dir, ref), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (ref / "checkpoint.pt").exists()  # removed once the run is complete

    proc = subprocess.Popen(_torch_cmd(tiny_bert_dir, glue_dir, run), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if (run / "checkpoint.pt").is_file():
            ckpt_step = torch.load(run / "checkpoint.pt", weights_only=False)["step"]
            if ckpt_step >= 10:
                os.kill(proc.pid, signal.SIGKILL)
                break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-training"
    assert not (run / "report.json").exists()

    # Other settings than the checkpoint's: refused in one line.
    bad = subprocess.run([*_torch_cmd(tiny_bert_dir, glue_dir, run), "--resume", "--lr", "1e-2"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "lr" in bad.stderr and bad.stderr.strip().count("\n") == 0

    resumed = subprocess.run([*_torch_cmd(tiny_bert_dir, glue_dir, run), "--resume"], capture_output=True,
                             text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    from safetensors.torch import load_file

    a = load_file(str(ref / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (ref, run))
    assert rb["resumed"] and ra["metrics"] == rb["metrics"]
    losses = lambda d: [json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert losses(ref) == losses(run)


def _script(name: str):
    # benchmarks/ is on the tests' path (pyproject.toml, pytest's pythonpath), as it is on the scripts'.
    import importlib

    return importlib.import_module(name)


def test_every_grid_method_is_a_valid_training_config():
    from lora_jax.cli import build_parser, config_from_args

    for name, flags in _script("common").METHODS.items():
        cfg = config_from_args(build_parser().parse_args(["--task", "rte", *flags]))
        cfg.validate()
        if name.startswith("adalora"):
            # Scale alpha / initial rank: 1 for the paper's setting, 16 for the -s16 variants.
            want = 16.0 if "-s16" in name else 1.0
            assert cfg.method == "adalora" and cfg.lora_alpha / cfg.adalora_init_rank == want, name
        elif name.startswith("lora-all"):
            want = 16.0 if "-s16" in name else 1.0
            assert cfg.lora_alpha / cfg.lora_rank == want, name
        if name.startswith("lora-") and "plus" not in name:  # measured as plain LoRA before LoRA+ was the default
            assert cfg.loraplus_lr_ratio == 1.0, name
        if name == "rank-all-adalora":  # AdaLoRA's best recipe so far, unchanged
            assert flags == _script("common").METHODS["adalora-t8-s16-late"] and cfg.method == "adalora"
        elif name.startswith("rank-all-"):  # issue 34's baseline and candidates: scale 1, the default recipe
            screen = name.endswith("-plain")  # a screen of auto with B's rate A's (results/rank-baseline/screens/)
            assert cfg.lora_alpha == cfg.lora_rank and cfg.loraplus_lr_ratio == (
                1.0 if screen else TrainConfig().loraplus_lr_ratio), name
            want = "gate" if "-gate" in name else "eva" if "-auto" in name else "fixed"
            assert cfg.rank_allocation == want, name


def _cells(task: str, cells: dict[str, list[float]], steps: dict[str, float] | None = None) -> list[dict]:
    stat = lambda xs: {"median": float(np.median(xs)), "min": min(xs), "max": max(xs), "n": len(xs)}
    return [{"task": task, "method": m, "metric": "dev/accuracy", "dev": stat(xs), "trainable_params": 1000 * (i + 1),
             "step_time_s": {"median": (steps or {}).get(m, 0.1)}, "trivial_seeds": 0}
            for i, (m, xs) in enumerate(cells.items())]


@pytest.mark.slow
def test_rank_baseline_script_writes_its_table_and_plot(tmp_path):
    grid = {"name": "g", "command": "python benchmarks/grid.py", "device": {"platform": "cpu"}, "versions": {},
            "cells": _cells("sst2", {"rank-all-r1": [0.8, 0.81, 0.82], "rank-all-r8": [0.83, 0.84, 0.85],
                                     "torch:rank-all-r8": [0.1, 0.1, 0.1]})}
    (tmp_path / "summary.json").write_text(json.dumps(grid))
    script = [sys.executable, str(ROOT / "benchmarks" / "rank_baseline.py")]
    done = subprocess.run([*script, "--grids", str(tmp_path / "summary.json"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    md = (tmp_path / "out" / "rank-baseline.md").read_text()
    assert "**Oracle** (best median, in hindsight): r = 8, 0.8400" in md and "torch" not in md.split("## sst2")[1]
    assert "**Partial sweep:** only r = 1, 8 ran" in md
    # A later grid's cell of the same task and method replaces the earlier one's.
    grid2 = {**grid, "name": "g2", "cells": _cells("sst2", {"rank-all-r1": [0.9, 0.9, 0.9]})}
    (tmp_path / "summary2.json").write_text(json.dumps(grid2))
    done = subprocess.run([*script, "--grids", f"{tmp_path / 'summary.json'},{tmp_path / 'summary2.json'}",
                           "--out", str(tmp_path / "out2")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "r = 1, 0.9000" in (tmp_path / "out2" / "rank-baseline.md").read_text()
    # A grid whose runs all took other flags (after --) is another recipe: a section of its own.
    grid3 = {**grid, "name": "g3", "command": "python benchmarks/grid.py --name g3 -- --lr 2e-4",
             "cells": _cells("sst2", {"rank-all-r8": [0.7, 0.7, 0.7]})}
    (tmp_path / "summary3.json").write_text(json.dumps(grid3))
    done = subprocess.run([*script, "--grids", f"{tmp_path / 'summary.json'},{tmp_path / 'summary3.json'}",
                           "--out", str(tmp_path / "out3")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    md = (tmp_path / "out3" / "rank-baseline.md").read_text()
    assert "## sst2 (dev/accuracy)" in md and "## sst2, --lr 2e-4 (dev/accuracy)" in md
    assert "r = 8, 0.8400" in md and "r = 8, 0.7000" in md
    assert (tmp_path / "out" / "rank-baseline.png").stat().st_size > 1000
    bad = subprocess.run([*script, "--grids", str(tmp_path / "nope.json"), "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "nope.json" in bad.stderr


def test_rank_baseline_finds_the_oracle_the_typical_run_and_judges_candidates():
    b = _script("rank_baseline").baseline(_cells("rte", {
        "rank-all-r2": [0.50, 0.55, 0.60], "rank-all-r4": [0.60, 0.61, 0.62], "rank-all-r8": [0.56, 0.57, 0.70],
        "rank-all-r16": [0.61, 0.61, 0.61], "cand-good": [0.60, 0.606, 0.7], "cand-bad": [0.5, 0.56, 0.9]},
        steps={"rank-all-r8": 0.2, "cand-good": 0.21}))
    assert [f["rank"] for f in b["fixed"]] == [2, 4, 8, 16]
    # Ties between r = 4 and r = 16 (0.61) go to the smaller rank.
    assert b["oracle"] == {"rank": 4, "median": 0.61}
    assert b["typical"] == {"rank": 8, "median": 0.57}
    assert b["median_over_ranks"] == pytest.approx(np.median([0.55, 0.61, 0.57, 0.61]))
    good, bad = b["candidates"]
    assert good["within_oracle"] and good["at_least_typical"] and good["at_least_median_over_ranks"]
    assert good["step_vs_typical"] == pytest.approx(1.05) and good["step_vs_cap"] == pytest.approx(2.1)
    assert not bad["within_oracle"] and not bad["at_least_typical"] and not bad["at_least_median_over_ranks"]
    assert bad["step_vs_typical"] == pytest.approx(0.5)
    # Step times of another grid (another stretch of time) are not compared.
    cells = _cells("rte", {"rank-all-r8": [0.5], "rank-all-r16": [0.5], "cand": [0.5]}, steps={"cand": 0.2})
    for c, grid in zip(cells, ("old", "new", "new")):
        c["grid"] = grid
    (cand,) = _script("rank_baseline").baseline(cells)["candidates"]
    assert cand["step_vs_typical"] is None and cand["step_vs_cap"] == pytest.approx(2.0)


def test_adaptive_report_pairs_each_adalora_method_with_lora_at_its_budget():
    pairs = _script("adaptive_report").pairs(["lora-qv-r8", "adalora-t2", "adalora-t8-s16", "lora-all-r8", "full"])
    assert pairs == [("adalora-t2", "lora-all-r2"), ("adalora-t8-s16", "lora-all-r8")]
    # With LoRA at scale 16 in the grid too, each AdaLoRA method meets both settings at its budget.
    pairs = _script("adaptive_report").pairs(["adalora-t8-s16", "lora-all-r8", "lora-all-r8-s16", "lora-all-r2-s16"])
    assert pairs == [("adalora-t8-s16", "lora-all-r8"), ("adalora-t8-s16", "lora-all-r8-s16")]
    assert _script("adaptive_report").lora_variant("lora-all-r8-s16") == "lora-all-rN-s16"


def _summary(command: str, cells: dict[tuple[str, str], list[float]]) -> dict:
    """A grid summary.json as benchmarks/grid.py writes it, with the fields adaptive_overview reads."""
    stat = lambda xs: {"median": sorted(xs)[len(xs) // 2], "min": min(xs), "max": max(xs), "n": len(xs)}
    return {"command": command, "cells": [{"task": t, "method": m, "dev": stat(xs), "trainable_params": 1000}
                                          for (t, m), xs in cells.items()]}


@pytest.mark.slow
def test_adaptive_overview_groups_pairs_by_recipe_and_run_length(tmp_path):
    grids = {
        "g300": _summary("python benchmarks/grid.py --name g300 --max-steps 300 -- --num-buckets 4", {
            ("rte", "adalora-t2-s16"): [0.50, 0.52, 0.55], ("rte", "lora-all-r2"): [0.54, 0.56, 0.58],
            ("rte", "lora-qv-r8"): [0.60, 0.61, 0.62]}),  # no AdaLoRA partner: not a row
        "g600": _summary("python benchmarks/grid.py --name g600 --max-steps 600", {
            ("mrpc", "adalora-t8-s16"): [0.80, 0.82, 0.84], ("mrpc", "lora-all-r8"): [0.79, 0.81, 0.83],
            ("mrpc", "adalora-t8-s16-late"): [0.70, 0.71, 0.90], ("mrpc", "adalora-t2-s16"): [0.7, 0.7, 0.7],
            ("sst2", "adalora-t2-s16"): [0.90, 0.91, 0.92], ("sst2", "lora-all-r2"): [0.88, 0.89, 0.95]}),
    }
    for name, s in grids.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(s))
    run = lambda *a: subprocess.run([sys.executable, str(ROOT / "benchmarks" / "adaptive_overview.py"),
                                     "--results-root", str(tmp_path), *a], capture_output=True, text=True, timeout=300)
    done = run("--grids", "g300,g600")
    assert done.returncode == 0, done.stderr
    md = (tmp_path / "adaptive" / "overview.md").read_text()
    assert (tmp_path / "adaptive" / "overview.png").stat().st_size > 1000
    rows = [r for r in md.splitlines() if r.startswith("| adalora")]
    # Per pair: rte 0.52 - 0.56; mrpc 0.82 - 0.81 and the late recipe 0.71 - 0.81; sst2 0.91 - 0.89.
    # mrpc adalora-t2-s16 has no lora-all-r2 in its grid and makes no row.
    assert len(rows) == 4 + 3
    summary = {tuple(c.strip() for c in r.split("|")[1:3]): r for r in rows
               if re.search(r"\d+ of \d+ \|$", r)}
    assert "-0.0400 | 0 of 1" in summary[("adalora-tN-s16", "300 steps")]
    assert "+0.0150 | 2 of 2" in summary[("adalora-tN-s16", "600 steps")]  # mean of +0.01 and +0.02
    assert "-0.1000 | 0 of 1" in summary[("adalora-tN-s16-late", "600 steps")]
    # A grid that is not there: one line, exit 2.
    done = run("--grids", "g300,nope")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "nope/summary.json not found" in done.stderr


def test_grid_summary_keeps_each_seeds_final_total_rank():
    def row(seed, **extra):
        return {"task": "sst2", "method_name": "m", "seed": seed, "primary_metric": "dev/accuracy",
                "metrics": {"dev": {"final": {"values": {"accuracy": 0.8, "majority_share": 0.5}}}},
                "trainable_params": 10, "adapter_bytes": 100, "step_time_median_s": 0.1,
                "train_examples_per_sec": 5.0, "memory": {"peak_rss_bytes": 1}, "wall_time_s": 1.0, **extra}

    summarise = _script("grid").summarise
    gated = [row(0, ranks_from_data={"total_rank": 400}), row(1, ranks_from_data={"total_rank": 380})]
    assert summarise(gated, None)["cells"][0]["final_ranks"] == [400, 380]
    assert summarise([row(0, adaptive={"final_total_rank": 288})], None)["cells"][0]["final_ranks"] == [288]
    assert summarise([row(0)], None)["cells"][0]["final_ranks"] is None  # a fixed rank
