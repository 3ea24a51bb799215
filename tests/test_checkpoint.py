"""Checkpoints: exact resume after SIGKILL, fallback past damaged checkpoints, clear errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from lora_jax import checkpoint
from lora_jax.config import TrainConfig
from lora_jax.rundir import RunError
from lora_jax.train import fit

from .conftest import ROOT

STEPS = 240


def cmd(model, glue, out, *extra):
    return [sys.executable, str(ROOT / "scripts" / "train.py"), "--task", "rte", "--model", str(model),
            "--data-dir", str(glue), "--preset", "tiny", "--max-steps", str(STEPS), "--save-every", "20",
            "--eval-every", "80", "--lora-dropout", "0.1", "--output-dir", str(out), "--no-progress", *extra]


def saved_steps(directory: Path) -> list[int]:
    d = directory / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def as_if_killed_after_step_4(run: Path, keep_adapter: Path) -> None:
    """A 12-step run (checkpoints at 4, 8, 12) as if killed after its step-4 checkpoint: the later
    checkpoints and the outputs gone; its finished adapter is kept at ``keep_adapter`` to compare."""
    import shutil

    assert saved_steps(run) == [4, 8, 12]
    shutil.copytree(run / "adapter", keep_adapter)
    for name in ("8", "12"):
        shutil.rmtree(run / "checkpoints" / name)
    for name in ("report.json", "report.md", "adapter", "peft_adapter"):
        shutil.rmtree(run / name) if (run / name).is_dir() else (run / name).unlink()


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tiny_bert_dir, glue_dir, tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    done = subprocess.run(cmd(tiny_bert_dir, glue_dir, ref), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr

    proc = subprocess.Popen(cmd(tiny_bert_dir, glue_dir, run), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if any(s >= 60 for s in saved_steps(run)):
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-training"
    assert not (run / "report.json").exists()
    assert max(saved_steps(run)) < STEPS

    resumed = subprocess.run(cmd(tiny_bert_dir, glue_dir, run, "--resume"), capture_output=True, text=True,
                             timeout=900)
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(str(ref / "adapter" / "adapter.safetensors"))
    b = load_file(str(run / "adapter" / "adapter.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (ref, run))
    assert ra["metrics"] == rb["metrics"] and rb["resumed"]
    # The log holds each step once, as the uninterrupted run's does.
    steps = lambda d: [json.loads(l)["step"] for l in (d / "metrics.jsonl").read_text().splitlines()]
    assert steps(ref) == steps(run)


def _tiny(model, glue, out, **kw) -> TrainConfig:
    base = dict(task="rte", model=str(model), data_dir=str(glue), batch_size=8, max_seq_len=32, num_buckets=2,
                max_steps=12, save_every=4, keep_checkpoints=3, output_dir=str(out))
    return TrainConfig(**{**base, **kw})


@pytest.mark.slow
def test_damaged_newest_checkpoint_falls_back(tiny_bert_dir, glue_dir, tmp_path, caplog):
    cfg = _tiny(tiny_bert_dir, glue_dir, tmp_path / "r")
    ref, _ = fit(cfg, progress=False)
    ck = tmp_path / "r" / "checkpoints"
    assert saved_steps(tmp_path / "r") == [4, 8, 12]
    # Truncate every data file of the newest checkpoint, and leave a half-written one beside it.
    for f in (ck / "12" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    (ck / "16.orbax-checkpoint-tmp-1234").mkdir()
    report, state = fit(cfg, resume=True, progress=False)
    assert int(state.step) == 12  # resumed from 8 and trained on to 12
    assert "checkpoint" in caplog.text and "12" in caplog.text
    assert report["metrics"] == ref["metrics"]


@pytest.mark.slow
def test_resume_errors(tiny_bert_dir, glue_dir, tmp_path):
    cfg = _tiny(tiny_bert_dir, glue_dir, tmp_path / "r")
    with pytest.raises(RunError, match="no run to resume"):
        fit(cfg, resume=True, progress=False)
    fit(cfg, progress=False)
    with pytest.raises(RunError, match="flags differ.*lr"):
        fit(_tiny(tiny_bert_dir, glue_dir, tmp_path / "r", lr=1e-3), resume=True, progress=False)
    # A checkpoint from a newer lora-jax is refused by name, not skipped.
    meta = tmp_path / "r" / "checkpoints" / "12" / "meta" / "metadata"
    data = json.loads(meta.read_text())
    meta.write_text(json.dumps({**data, "format_version": checkpoint.FORMAT_VERSION + 1}))
    with pytest.raises(checkpoint.NewerFormatError, match="12 has format version 2"):
        fit(cfg, resume=True, progress=False)
    for step in (4, 8, 12):
        for f in (tmp_path / "r" / "checkpoints" / str(step)).rglob("*"):
            if f.is_file():
                f.write_bytes(b"")
    with pytest.raises(RunError, match="no intact checkpoint"):
        fit(cfg, resume=True, progress=False)


def test_checkpoint_holds_no_frozen_base(tiny_runs, tiny_bert_dir):
    import orbax.checkpoint as ocp

    run = tiny_runs["rte"]
    assert saved_steps(run) == [4]  # the session's 4-step run saves at its end
    mngr = checkpoint.manager(run / "checkpoints")
    meta = mngr.restore(4, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    mngr.close()
    assert meta["task"] == "rte" and meta["label_names"] == ["entailment", "not_entailment"]
    assert meta["base_model"] == str(tiny_bert_dir) and meta["architecture_hash"]
    meta_files = json.loads((run / "checkpoints" / "4" / "state" / "_METADATA").read_text())
    names = json.dumps(meta_files)
    assert "encoder/layer/0/attention/self/query/kernel/a" in names
    assert "params/encoder/layer/0/attention/self/key/kernel" not in names
    assert "embeddings/word_embeddings" not in names


def test_orbax_round_trip_is_exact_and_a_damaged_step_is_set_aside(tmp_path):
    """checkpoint.save / restore_latest on a small train-state-shaped tree, without training."""
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    template = {"trainable": {"lora/x/a": jnp.zeros((4, 2)), "lora/x/b": jnp.zeros((2, 4))},
                "opt": (jnp.zeros((4, 2)), jnp.zeros((2, 4))), "step": jnp.zeros((), jnp.int32)}
    states = {s: jax.tree.map(lambda z: jnp.asarray(rng.normal(size=z.shape)).astype(z.dtype), template)
              for s in (3, 7)}
    mngr = checkpoint.manager(tmp_path / "ck", keep=3)
    for step, state in states.items():
        checkpoint.save(mngr, step, state, {"task": "rte"})
    state, meta = checkpoint.restore_latest(mngr, template)
    assert meta["step"] == 7 and meta["task"] == "rte" and meta["format_version"] == checkpoint.FORMAT_VERSION
    assert isinstance(state["opt"], tuple)  # the template's structure, not Orbax's lists
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(states[7])):
        assert np.array_equal(np.asarray(got), np.asarray(want))
    # A truncated newest step: named, moved aside, and the older one restored exactly.
    for f in (tmp_path / "ck" / "7" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    state, meta = checkpoint.restore_latest(mngr, template)
    mngr.close()
    assert meta["step"] == 3
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(states[3])):
        assert np.array_equal(np.asarray(got), np.asarray(want))
    assert [p.name.split("-")[0] for p in (tmp_path / "ck").iterdir() if "damaged" in p.name] == ["7.damaged"]
