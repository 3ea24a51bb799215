"""lora-jax and the PyTorch reference implement the same training: started from the same values
(``benchmarks/train_torch.py --same-init``) with dropout off, their per-step losses agree up to float
rounding over a whole run (warm-up, decay, clipping, weight decay and LoRA's scale included)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from .conftest import ROOT, write_tiny_checkpoint

pytestmark = pytest.mark.slow

pytest.importorskip("torch")
pytest.importorskip("peft")

STEPS = 16
# The subprocess runs below pass --num-buckets 0: one shape, so one compilation of each step (the
# default eight buckets spent about three quarters of a tiny run compiling).


def _losses(run_dir) -> np.ndarray:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    return np.array([r["loss"] for r in rows])


def _run(script: str, out, common: list[str], *extra: str) -> np.ndarray:
    where = "scripts" if script == "train.py" else "benchmarks"
    cmd = [sys.executable, str(ROOT / where / script), *common, "--output-dir", str(out), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return _losses(out)


@pytest.fixture(scope="module")
def no_dropout_bert(tmp_path_factory):
    d = tmp_path_factory.mktemp("bert_no_dropout")
    write_tiny_checkpoint(d, "bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return d


@pytest.mark.parametrize("method", ["lora", "full"])
def test_same_init_and_no_dropout_give_the_same_loss_curve(method, no_dropout_bert, glue_dir, tmp_path):
    common = ["--task", "rte", "--model", str(no_dropout_bert), "--data-dir", str(glue_dir), "--method", method,
              "--max-steps", str(STEPS), "--batch-size", "4", "--lr", "2e-2", "--max-seq-len", "32", "--seed", "3",
              "--warmup-ratio", "0.25", "--num-buckets", "0"]
    if method == "lora":
        # Plain LoRA: peft's LoRA+ optimizer differs from ours (no weight decay, B's rate for the head's biases).
        common += ["--targets", "all", "--lora-rank", "4", "--lora-alpha", "8", "--loraplus-lr-ratio", "1"]
    ours = _run("train.py", tmp_path / "jax", common, "--log-every", "1", "--no-progress")
    theirs = _run("train_torch.py", tmp_path / "torch", common, "--same-init", "--no-progress")
    # The run trains: a fresh head predicts about 50/50 (loss ln 2); training moves the loss off it.
    assert np.abs(ours - np.log(2)).max() > 0.03
    np.testing.assert_allclose(theirs, ours, atol=2e-4, rtol=0)
    if method == "lora":
        # The comparison is sharp enough to see a 5% change of the learning rate.
        lr = common.index("--lr") + 1
        off = _run("train_torch.py", tmp_path / "torch-lr", [*common[:lr], "2.1e-2", *common[lr + 1:]],
                   "--same-init", "--no-progress")
        assert np.abs(off - ours).max() > 1e-3


def test_same_init_rejects_adalora(no_dropout_bert, glue_dir, tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_torch.py"), "--task", "rte", "--model", str(no_dropout_bert),
           "--data-dir", str(glue_dir), "--method", "adalora", "--same-init", "--output-dir", str(tmp_path / "x")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "--same-init" in done.stderr


def test_compare_reference_script(tiny_bert_dir, glue_dir, tmp_path):
    """benchmarks/compare_reference.py on the tiny model (dropout 0.1): dropout off, the curves agree; on, the
    two frameworks' masks differ and so do the curves. A rerun finds the finished runs and reuses them."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "compare_reference.py"), "--task", "rte", "--model",
           str(tiny_bert_dir), "--data-dir", str(glue_dir), "--methods", "lora-qv-r8", "--max-steps", "6",
           "--lr", "1e-2", "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "results"), "--",
           "--batch-size", "4", "--max-seq-len", "32", "--num-buckets", "0"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "results" / "compare.json").read_text())
    rows = {r["dropout"]: r for r in record["rows"]}
    assert rows["off"]["steps"] == rows["on"]["steps"] == 6
    assert rows["off"]["max_abs_diff"] < 2e-4 and rows["off"]["first_step_above_1e-3"] is None
    assert rows["on"]["max_abs_diff"] > 1e-3
    assert json.loads((tmp_path / "runs" / "model-no-dropout" / "config.json").read_text())["hidden_dropout_prob"] == 0
    assert (tmp_path / "results" / "curves.png").stat().st_size > 1000
    assert "| lora-qv-r8 | off | 6 |" in (tmp_path / "results" / "compare.md").read_text()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and "train.py" not in again.stderr  # nothing ran twice


@pytest.mark.parametrize("flags, message", [
    (["--methods", "adalora-t2"], "--methods"),
    (["--dropout", "sometimes"], "--dropout"),
    (["--model", "/nonexistent"], "--model"),
])
def test_compare_reference_bad_input(flags, message, tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "compare_reference.py"), "--runs", str(tmp_path), *flags]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and message in done.stderr

