"""The measuring scripts refuse bad input in one line with exit 2, writing nothing.

Their successful runs are the README's quick benchmark commands: tests/test_readme.py runs each once and
checks what it wrote (rows, memory levers, FLOP counts, bounds, the compile cache). The one run here is
benchmarks/bench.py --preallocate, a setting the README's command does not use."""

import json
import subprocess
import sys

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.slow

pytest.importorskip("torch")
pytest.importorskip("peft")


def test_bench_epoch_rejects_unusable_compile_cache(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_epoch.py"), "--compile-cache",
                           str(blocker / "cache"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and "--compile-cache" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("cells, named", [("jax:nope", "jax:nope"), (",", "names no cell")])
def test_bench_epoch_bad_cell(tmp_path, cells, named):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_epoch.py"), "--cells", cells,
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and named in done.stderr
    assert not any(tmp_path.iterdir())


def test_bench_inference_bad_impl(tiny_bert_dir, tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_inference.py"), "--config",
                           str(tiny_bert_dir), "--mixed-impls", "masked,nope", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and "nope" in done.stderr
    assert not any(tmp_path.iterdir())


def test_bench_rejects_jax_only_variant_for_torch(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--cells", "torch:lora:remat-cheap",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and "torch variants" in done.stderr
    assert not any(tmp_path.iterdir())


def test_bench_preallocate_reaches_the_cells(tiny_bert_dir, tmp_path):
    # The default grows JAX's GPU pool on demand (checked on the README's run); --preallocate lets the
    # cells preallocate it.
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--config", str(tiny_bert_dir), "--batch", "2",
           "--seq", "8", "--steps", "1", "--warmup", "0", "--out", str(tmp_path), "--name", "t",
           "--cells", "jax:lora:fp32", "--preallocate"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "t.json").read_text())
    assert record["meta"]["jax_memory_pool"] == "preallocated"
    assert record["rows"][0]["xla_python_client_preallocate"] == "true"
    assert "JAX's memory pool here: preallocated" in (tmp_path / "t.md").read_text()


def test_bench_rejects_unusable_compile_cache(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--cells", "jax:lora:fp32",
                           "--compile-cache", str(blocker / "cache"), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and "--compile-cache" in done.stderr
    assert not out.exists()


@pytest.mark.parametrize("flag, named", [(["--frameworks", "jax,tf"], "jax,tf"), (["--repeats", "0"], "--repeats"),
                                         (["--config", "/nope"], "/nope"), (["--step", "/nope.json"], "/nope.json")])
def test_bench_gemm_bad_input(flag, named, tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gemm.py"), *flag, "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and named in done.stderr
    assert not any(tmp_path.iterdir())


def test_bench_gemm_refuses_a_step_of_another_shape(tiny_bert_dir, tmp_path):
    # Rates measured at seq 16 say nothing of a step timed at seq 8: refused before measuring.
    step = tmp_path / "step.json"
    step.write_text(json.dumps({"rows": [
        {"framework": "torch", "method": "lora", "variant": "fp32", "step_times_s": [2.0], "matmul_flops": 10**9,
         "batched_matmul_flops": 0, "config": str(tiny_bert_dir), "batch": 2, "seq": 8}]}))
    out = tmp_path / "out"
    other = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gemm.py"), "--config", str(tiny_bert_dir),
                            "--batch", "2", "--seq", "16", "--step", str(step), "--out", str(out), "--name", "c"],
                           capture_output=True, text=True, timeout=120)
    assert other.returncode == 2 and other.stderr.strip().count("\n") == 0 and "seq 8" in other.stderr
    assert not out.exists()


def test_common_helpers(capsys):
    """benchmarks/common.py: a failing child's last error line, a JSON result line, the results header with
    the code version, and a bad list flag as a one-line error."""
    import common

    with pytest.raises(common.Failed, match="exit 3: boom"):
        common.run([sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"])
    assert common.run_json([sys.executable, "-c", "print('noise'); print('R {\"a\": 1}')"], prefix="R ") == {"a": 1}
    head = common.header("T", date="2026-12-07", command="python x.py", device={"platform": "cpu",
                         "device_kind": "k"}, versions={"jax": "0"})
    assert head[0] == "# T (2026-12-07)" and head[2] == "Command: `python x.py`  "
    assert any(line.startswith("Code: ") for line in head)  # the commit, or "unknown" where git cannot tell
    assert common.int_list("0,1,2", "--seeds") == [0, 1, 2]
    with pytest.raises(SystemExit) as e:
        common.int_list("0,x", "--seeds")
    assert e.value.code == 2 and "--seeds must be comma-separated integers" in capsys.readouterr().err


def test_memory_stages_from_marks():
    """Samples fall in the stage whose mark precedes them; compilations count as one stage."""
    import memory

    mib = 2**20
    samples = [(0.5, 100 * mib), (1.5, 300 * mib), (2.5, 320 * mib), (3.5, 900 * mib), (4.5, 400 * mib), (5.5, 950 * mib)]
    marks = [(1.0, "tokenizing"), (3.0, "compile (8, 32)"), (4.0, "train steps"), (5.0, "compile (4, 64)")]
    got = {s["stage"]: s for s in memory.stages(samples, marks)}
    assert list(got) == ["start", "tokenizing", "compile", "train steps"]
    assert got["tokenizing"]["rss_start_mib"] == 100 and got["tokenizing"]["rss_max_mib"] == 320
    assert got["compile"]["rss_max_mib"] == 950 and got["compile"]["seconds"] == 1.5  # 3-4 and 5-5.5
    assert got["train steps"]["rss_start_mib"] == 900


@pytest.mark.parametrize("flags, named", [(["--budget", "0"], "--budget"), (["--task", "nope"], "nope")])
def test_eva_scale_bad_input(flags, named, tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "eva_scale.py"), *flags, "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and named in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()
