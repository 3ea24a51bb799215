"""Data parallelism: the same run on 1 device, on 4 forced CPU devices, and in 2 processes
(jax.distributed over gloo on localhost) gives the same losses and the same trained parameters.

Device counts are fixed when JAX starts, so every run is a subprocess of the real CLI.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from lora_jax import parallel

ROOT = Path(__file__).resolve().parents[1]


def _cmd(model: Path, glue: Path, out: Path, *extra: str) -> list[str]:
    # LoRA dropout with the factored forward: the per-example dropout masks must not depend on
    # how the batch is split either. Random batches one example per row: what a run on several devices
    # trains on (packed rows cannot be split evenly), so the one-device run has the same layout.
    return [sys.executable, str(ROOT / "scripts" / "train.py"), "--task", "rte", "--preset", "tiny",
            "--model", str(model), "--data-dir", str(glue), "--output-dir", str(out), "--no-progress",
            "--lora-dropout", "0.1", "--lora-forward", "factored", "--max-steps", "6", "--eval-every", "3",
            "--num-buckets", "0", "--batching", "random", *extra]


def _env(devices: int) -> dict:
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "JAX_PLATFORMS": "cpu"}


def _run(cmd: list[str], devices: int) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env(devices))
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _losses(out: Path) -> np.ndarray:
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return np.array([r["loss"] for r in recs if "loss" in r])


def _assert_same_run(ref: Path, other: Path) -> None:
    a, b = _losses(ref), _losses(other)
    assert len(a) == len(b) == 6
    np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)
    pa, pb = load_file(ref / "adapter" / "adapter.safetensors"), load_file(other / "adapter" / "adapter.safetensors")
    assert pa.keys() == pb.keys() and len(pa) > 0
    for k in pa:
        np.testing.assert_allclose(pb[k], pa[k], atol=1e-5, rtol=0, err_msg=k)
    # B starts at zero: nonzero B means training moved them, so the equality is not the trivial one.
    assert all(np.abs(pa[k]).max() > 0 for k in pa if k.endswith("/b"))


@pytest.fixture(scope="module")
def one_device_run(tiny_bert_dir, glue_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dp") / "one"
    _run(_cmd(tiny_bert_dir, glue_dir, out), devices=1)
    assert json.loads((out / "report.json").read_text())["parallel"]["devices"] == 1
    return out


@pytest.mark.slow
def test_four_devices_match_one(one_device_run, tiny_bert_dir, glue_dir, tmp_path):
    out = tmp_path / "four"
    _run(_cmd(tiny_bert_dir, glue_dir, out), devices=4)
    report = json.loads((out / "report.json").read_text())
    assert report["parallel"] == {"devices": 4, "processes": 1, "mesh": {"data": 4, "fsdp": 1}, "platform": "cpu"}
    assert report["compilations"] <= len(report["buckets"])
    _assert_same_run(one_device_run, out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_with_fsdp_match_one_device(one_device_run, tiny_bert_dir, glue_dir, tmp_path):
    """2 processes x 2 devices, the frozen base sharded over a 2-device fsdp axis."""
    out = tmp_path / "two"
    port = _free_port()
    procs = [
        subprocess.Popen(
            _cmd(tiny_bert_dir, glue_dir, out, "--fsdp", "2", "--coordinator-address", f"localhost:{port}",
                 "--num-processes", "2", "--process-id", str(pid)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(2))
        for pid in (0, 1)
    ]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    # One voice: only process 0 prints the summary and writes the files.
    assert "report:" in results[0][0] and "report:" not in results[1][0]
    report = json.loads((out / "report.json").read_text())
    assert report["parallel"]["processes"] == 2 and report["parallel"]["mesh"] == {"data": 2, "fsdp": 2}
    _assert_same_run(one_device_run, out)


@pytest.mark.slow
def test_two_processes_refuse_a_bad_output_dir_alike(tiny_bert_dir, glue_dir, tmp_path):
    """Process 0 alone checks the output directory (two processes probing one directory at once could see
    each other's probe files, which failed a two-process run in CI once); the other process ends with the
    same one-line error, and the directory is left as it was."""
    out = tmp_path / "not-a-run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    port = _free_port()
    procs = [subprocess.Popen(_cmd(tiny_bert_dir, glue_dir, out, "--coordinator-address", f"localhost:{port}",
                                   "--num-processes", "2", "--process-id", str(pid)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(1))
             for pid in (0, 1)]
    errors = [p.communicate(timeout=600)[1].strip().splitlines()[-1] for p in procs]
    assert [p.returncode for p in procs] == [2, 2]
    assert errors[0] == errors[1] and errors[0].startswith(f"error: --output-dir {out} holds files that are not")
    assert sorted(x.name for x in out.iterdir()) == ["notes.txt"]


@pytest.mark.slow
def test_batch_that_does_not_divide_is_one_line_error(tiny_bert_dir, glue_dir, tmp_path):
    done = subprocess.run(_cmd(tiny_bert_dir, glue_dir, tmp_path / "r", "--batch-size", "6"),
                          capture_output=True, text=True, timeout=600, env=_env(4))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == \
        "error: --batch-size 6 does not divide over 4 devices: use a multiple of 4"
    assert not (tmp_path / "r").exists()


def test_fsdp_spec_splits_largest_divisible_dimension():
    from jax.sharding import PartitionSpec as P

    assert parallel._fsdp_spec((32, 128), 4) == P(None, "fsdp")
    assert parallel._fsdp_spec((128, 32), 4) == P("fsdp")
    assert parallel._fsdp_spec((30, 7), 4) == P()  # nothing divides: replicated
    assert parallel._fsdp_spec((30, 8), 4) == P(None, "fsdp")
    assert parallel._fsdp_spec((128,), 1) == P()


def test_mesh_errors():
    with pytest.raises(parallel.ParallelError, match="--fsdp 2 does not divide the 1 devices"):
        parallel.make_mesh(2)
    with pytest.raises(parallel.ParallelError, match="--fsdp must be >= 1"):
        parallel.make_mesh(0)
    mesh = parallel.make_mesh()
    assert parallel.local_batch_size(5, mesh) == 5 and parallel.local_rows(4, mesh) == slice(0, 4)
    with pytest.raises(parallel.ParallelError, match="--process-id must be in"):
        parallel.initialize(parallel.DistributedConfig("localhost:1", 2, 5))
