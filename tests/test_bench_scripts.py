"""The measuring scripts run end to end on a tiny checkpoint and record what they claim to:
scripts/bench.py (train step, lora-jax vs PyTorch, memory levers), scripts/bench_epoch.py (real-data throughput, buckets vs static padding, lora-jax vs PyTorch) and
scripts/profile_step.py (per-class step profile in both frameworks), scripts/bench_inference.py
(base, merged, unmerged and mixed-adapter serving) and scripts/bench_gemm.py (single matmuls at the
step's shapes in both frameworks). Their numbers are not asserted
as speeds: only the structure, and facts that follow from the padding rules."""

import json
import subprocess
import sys

import pytest

from .conftest import ROOT

pytest.importorskip("torch")
pytest.importorskip("peft")


def test_bench_epoch_cells(tiny_bert_dir, glue_dir, tmp_path):
    out = tmp_path / "epoch"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_epoch.py"), "--model", str(tiny_bert_dir),
           "--data-dir", str(glue_dir), "--batch-size", "8", "--max-seq-len", "48", "--num-buckets", "2",
           "--pad-steps", "3", "--runs", str(tmp_path / "runs"), "--out", str(out), "--name", "t",
           "--compile-cache", str(tmp_path / "xla-cache")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "t.json").read_text())
    rows = {r["cell"]: r for r in record["rows"]}
    assert set(rows) == {"jax:buckets", "jax:pad", "torch:dynamic", "torch:pad"}
    # The unpadded cells ran the whole (tiny) epoch; the padded ones the 3 steps asked for.
    assert rows["jax:buckets"]["full_epoch"] and rows["torch:dynamic"]["full_epoch"]
    assert rows["jax:pad"]["steps"] == rows["torch:pad"]["steps"] == 3 and not rows["jax:pad"]["full_epoch"]
    assert rows["jax:buckets"]["steps"] == rows["torch:dynamic"]["steps"]  # the same batches
    # Padding everything to 48 pads more than the length buckets do.
    assert rows["jax:pad"]["padding_share"] > rows["jax:buckets"]["padding_share"]
    assert all(r["examples_per_s"] > 0 for r in rows.values())
    assert "lora-jax buckets / the faster PyTorch cell" in record["ratios"]
    assert (out / "t.md").is_file() and (out / "t.png").stat().st_size > 1000
    # The cache reached the lora-jax runs: the first found it empty and filled it, the second found it filled.
    assert rows["jax:buckets"]["compile_cache"] == rows["jax:pad"]["compile_cache"] == str(tmp_path / "xla-cache")
    assert rows["jax:buckets"]["compile_cache_entries_before"] == 0 < rows["jax:pad"]["compile_cache_entries_before"]
    assert rows["torch:dynamic"]["compile_cache"] is None
    assert "cold: this run compiled and filled it" in (out / "t.md").read_text()


def test_bench_epoch_rejects_unusable_compile_cache(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_epoch.py"), "--compile-cache",
                           str(blocker / "cache"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and "--compile-cache" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("cells, named", [("jax:nope", "jax:nope"), (",", "names no cell")])
def test_bench_epoch_bad_cell(tmp_path, cells, named):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_epoch.py"), "--cells", cells,
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and named in done.stderr
    assert not any(tmp_path.iterdir())


def test_profile_step_both_frameworks(tiny_bert_dir, tmp_path):
    cmd = [sys.executable, str(ROOT / "scripts" / "profile_step.py"), "--config", str(tiny_bert_dir),
           "--batch", "4", "--seq", "16", "--warmup", "1", "--steps", "1", "--out", str(tmp_path), "--name", "t"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "t.json").read_text())
    for fw in ("jax", "torch"):
        ms = record[fw]["ms_per_step"]
        assert ms.get("matmul", 0) > 0, (fw, ms)  # the kernels were found and classed
        assert sum(ms.values()) > ms["matmul"]
    assert "| matmul |" in (tmp_path / "t.md").read_text()


def test_bench_inference_rows(tiny_bert_dir, tmp_path):
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_inference.py"), "--config", str(tiny_bert_dir),
           "--seq", "16", "--batches", "1,4", "--adapters", "3", "--calls", "3", "--warmup", "1",
           "--mixed-impls", "masked,gather", "--out", str(tmp_path), "--name", "t"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "t.json").read_text())
    whats = {(r["batch"], r["what"]) for r in record["rows"]}
    assert whats == {(b, w) for b in (1, 4) for w in ("base", "merged adapter", "unmerged adapter",
                                                       "mixed batch, 3 adapters (masked)",
                                                       "mixed batch, 3 adapters (gather)")}
    assert all(0 < r["latency_q1_s"] <= r["latency_s"] <= r["latency_q3_s"] for r in record["rows"])
    assert [m["adapters"] for m in record["memory"]] == [1, 8, 64]


def test_bench_inference_bad_impl(tiny_bert_dir, tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_inference.py"), "--config",
                           str(tiny_bert_dir), "--mixed-impls", "masked,nope", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and "nope" in done.stderr
    assert not any(tmp_path.iterdir())


def test_bench_saved_for_backward(tiny_bert_dir, tmp_path):
    cmd = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--config", str(tiny_bert_dir), "--batch", "2",
           "--seq", "16", "--steps", "1", "--warmup", "1", "--out", str(tmp_path), "--name", "t",
           "--cells", "jax:lora:fp32,jax:lora:remat-attention,jax:lora:remat-cheap,jax:lora:bf16-base+cheap,"
           "jax:lora:remat-qkv,torch:lora:fp32,torch:lora:remat", "--compile-cache", str(tmp_path / "xla-cache")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {(r["framework"], r["variant"]): r for r in json.loads((tmp_path / "t.json").read_text())["rows"]}
    assert not [r["error"] for r in rows.values() if "error" in r]
    saved = {k: r["saved_for_backward_bytes"] for k, r in rows.items()}
    assert all(v > 0 for v in saved.values()), saved
    # Each remat policy keeps less for the backward pass than none, "cheap" less than "attention".
    assert saved["jax", "fp32"] > saved["jax", "remat-attention"] > saved["jax", "remat-cheap"], saved
    # Recomputing each layer from its input and q, k, v keeps less again.
    assert saved["jax", "remat-qkv"] < saved["jax", "remat-cheap"], saved
    # A bfloat16 base under float32 compute keeps no float32 copies of its weights.
    assert saved["jax", "bf16-base+cheap"] == saved["jax", "remat-cheap"], saved
    # PyTorch's activation checkpointing keeps only each layer's input, and still trains the LoRA factors.
    assert saved["torch", "remat"] < saved["torch", "fp32"], saved
    assert rows["torch", "remat"]["trainable_params"] == rows["torch", "fp32"]["trainable_params"]
    # Both frameworks count the matmuls they run: the same model, ours a little less (the last layer
    # computes its classifier row only); recomputing q, k, v and the FFN input adds matmuls.
    flops = {k: r["matmul_flops"] for k, r in rows.items()}
    assert 0.5 * flops["torch", "fp32"] < flops["jax", "fp32"] < flops["torch", "fp32"], flops
    assert flops["jax", "remat-qkv"] > flops["jax", "remat-cheap"] >= flops["jax", "fp32"], flops
    # Attention's batched products, apart: a share of the whole in both, of the same order.
    share = {k: r["batched_matmul_flops"] / r["matmul_flops"] for k, r in rows.items()}
    assert 0 < share["jax", "fp32"] < 1 and 0 < share["torch", "fp32"] < 1, share
    assert 0.5 < share["jax", "fp32"] / share["torch", "fp32"] < 2, share
    text = (tmp_path / "t.md").read_text()
    assert "matmul GFLOP/s" in text and "saved for backward" in text and "remat-cheap / fp32" in text and "Cells run: 7 of 7" in text
    # The lora-jax cells compiled into the cache they name (PyTorch's do not use it).
    assert any((tmp_path / "xla-cache").iterdir())
    assert {r["compile_cache"] for k, r in rows.items() if k[0] == "jax"} == {str(tmp_path / "xla-cache")}


def test_bench_rejects_jax_only_variant_for_torch(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--cells", "torch:lora:remat-cheap",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and "torch variants" in done.stderr
    assert not any(tmp_path.iterdir())


def test_bench_preallocate_reaches_the_cells(tiny_bert_dir, tmp_path):
    # The default grows JAX's GPU pool on demand; --preallocate lets the cells preallocate it.
    for flag, pool, env in (([], "grown on demand", "false"), (["--preallocate"], "preallocated", "true")):
        cmd = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--config", str(tiny_bert_dir), "--batch", "2",
               "--seq", "8", "--steps", "1", "--warmup", "0", "--out", str(tmp_path), "--name", "t",
               "--cells", "jax:lora:fp32", *flag]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        record = json.loads((tmp_path / "t.json").read_text())
        assert record["meta"]["jax_memory_pool"] == pool
        assert record["rows"][0]["xla_python_client_preallocate"] == env
        assert f"JAX's memory pool here: {pool}" in (tmp_path / "t.md").read_text()


def test_bench_rejects_unusable_compile_cache(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--cells", "jax:lora:fp32",
                           "--compile-cache", str(blocker / "cache"), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and "--compile-cache" in done.stderr
    assert not out.exists()


def test_bench_gemm_times_every_shape_in_both_frameworks(tiny_bert_dir, tmp_path):
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_gemm.py"), "--config", str(tiny_bert_dir), "--batch", "2",
           "--seq", "8", "--repeats", "2", "--warmup", "1", "--out", str(tmp_path), "--name", "g"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "g.json").read_text())
    config = json.loads((tiny_bert_dir / "config.json").read_text())
    names = [s["name"] for s in record["meta"]["shapes"]]
    assert len(names) == 7 and len(set(names)) == 7
    assert sorted((r["framework"], r["name"]) for r in record["rows"]) == sorted(
        (f, n) for f in ("jax", "torch") for n in names)
    ffn_in = next(s for s in record["meta"]["shapes"] if s["name"] == "FFN in x W")
    assert (ffn_in["m"], ffn_in["k"], ffn_in["n"]) == (2 * 8, config["hidden_size"], config["intermediate_size"])
    for r in record["rows"]:
        assert len(r["times_s"]) == 2 and r["median_s"] > 0 and r["gflop_per_s"] > 0
    assert "XLA / PyTorch time" in (tmp_path / "g.md").read_text()

    # With a bench.py run's rows: each row's matmuls at each framework's rates.
    step = tmp_path / "step.json"
    shape = {"config": str(tiny_bert_dir), "batch": 2, "seq": 8}
    step.write_text(json.dumps({"rows": [
        {"framework": "torch", "method": "lora", "variant": "fp32", "step_times_s": [2.0, 3.0, 4.0],
         "matmul_flops": 10**9, "batched_matmul_flops": 0, **shape},
        {"framework": "jax", "method": "lora", "variant": "fp32", "step_times_s": [1.0],
         "matmul_flops": 3 * 10**9, "batched_matmul_flops": 10**9, **shape}]}))
    done = subprocess.run(cmd + ["--name", "b", "--step", str(step)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # A step of another shape: the rates measured here would not apply to it.
    other = subprocess.run(cmd + ["--name", "c", "--step", str(step), "--seq", "16"], capture_output=True, text=True,
                           timeout=600)
    assert other.returncode == 2 and other.stderr.strip().count("\n") == 0 and "seq 8" in other.stderr
    assert not (tmp_path / "c.json").exists()
    record = json.loads((tmp_path / "b.json").read_text())
    dense_torch, _ = record["meta"]["rates"]["torch"]
    dense_jax, batched_jax = record["meta"]["rates"]["jax"]
    torch_row, jax_row = record["meta"]["bounds"]
    assert torch_row["step_s"] == 3.0 and torch_row["matmul_s_at"]["torch"] == pytest.approx(1e9 / dense_torch)
    assert jax_row["matmul_s_at"]["jax"] == pytest.approx(2e9 / dense_jax + 1e9 / batched_jax)
    # The dense rate lies between the slowest and the fastest 2-D product of that framework.
    rates = [r["gflop_per_s"] * 1e9 for r in record["rows"] if r["framework"] == "jax" and r["batch"] == 1]
    assert min(rates) <= dense_jax <= max(rates)
    assert "that / PyTorch LoRA step" in (tmp_path / "b.md").read_text()


@pytest.mark.parametrize("flag, named", [(["--frameworks", "jax,tf"], "jax,tf"), (["--repeats", "0"], "--repeats"),
                                         (["--config", "/nope"], "/nope"), (["--step", "/nope.json"], "/nope.json")])
def test_bench_gemm_bad_input(flag, named, tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_gemm.py"), *flag, "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and named in done.stderr
    assert not any(tmp_path.iterdir())
