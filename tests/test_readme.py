"""Every command block of the README and docs/ runs exactly as written: the user commands of
docs/usage.md, the benchmark commands of docs/benchmarks.md, the multi-device block of
docs/multi-device.md and the README's Python example. What the benchmark commands write is checked
right after they run (``CHECKS``): these quick benchmarks are the only runs of those scripts in the
suite; tests/test_bench_scripts.py holds their bad-input cases.

The command blocks are cut into chains: a command that reads a path under runs/ that an earlier command
writes joins that command's chain, in the README's order. Chains are independent tests, so that
pytest-xdist can run two at once."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT, shared_path

pytestmark = pytest.mark.slow

OUTPUT_FLAGS = ("--output-dir", "--out", "--runs", "--results", "--merged", "--peft")


def doc_block(file: str, heading: str, language: str = "bash") -> str:
    """The first ``language`` code block under the heading ``heading`` (any level) of ``file`` (relative to
    the root)."""
    text = (ROOT / file).read_text()
    return re.search(rf"^#+ {re.escape(heading)}.*?```{language}\n(.*?)```", text, re.S | re.M).group(1)


def readme_block(heading: str) -> str:
    return doc_block("README.md", heading)


# The command blocks run here, in this order (a later block may read what an earlier one wrote).
COMMAND_BLOCKS = (("docs/usage.md", "More commands"), ("docs/benchmarks.md", "Commands"))


def readme_commands() -> list[str]:
    return [line for file, heading in COMMAND_BLOCKS for line in doc_block(file, heading).splitlines()
            if line.strip() and not line.startswith("#")]


def _paths(command: str) -> tuple[set[str], set[str]]:
    """(what the command writes, what it reads) among its runs/ arguments."""
    words = command.split()
    writes = {w for flag, w in zip(words, words[1:]) if flag in OUTPUT_FLAGS and w.startswith("runs/")}
    reads = {w.split("=", 1)[-1] for w in words if "runs/" in w} - writes
    return writes, reads


def chains(commands: list[str]) -> list[list[str]]:
    """The commands grouped so that each reads, or writes again, only what its own chain wrote before it."""
    groups: list[list[str]] = []
    writer: dict[str, int] = {}  # path -> index of the group that writes it
    for command in commands:
        writes, reads = _paths(command)
        needed = sorted({g for r in reads | writes for w, g in writer.items() if r == w or r.startswith(w + "/")})
        if needed:  # merge every chain it reads from into the first
            first = needed[0]
            for g in needed[1:]:
                groups[first] += groups[g]
                groups[g] = []
                writer = {w: first if i == g else i for w, i in writer.items()}
        else:
            first = len(groups)
            groups.append([])
        groups[first].append(command)
        writer.update({w: first for w in writes})
    # Merging keeps each chain's commands in the README's order.
    order = {c: i for i, c in enumerate(commands)}
    return [sorted(g, key=order.get) for g in groups if g]


def _chain_id(chain: list[str]) -> str:
    script = chain[0].split()[1].removeprefix("scripts/").removeprefix("benchmarks/").removesuffix(".py")
    out = next(iter(sorted(_paths(chain[0])[0])), "")
    return f"{script}-{out.removeprefix('runs/')}" if out else script


CHAINS = chains(readme_commands())


def test_block_is_cut_into_chains_by_what_each_command_reads():
    assert len(readme_commands()) >= 10
    assert sorted(c for chain in CHAINS for c in chain) == sorted(readme_commands())  # none dropped, none twice
    assert len(CHAINS) > 5  # independent chains for the xdist workers
    predict = next(c for c in readme_commands() if "predict.py" in c)
    chain = next(ch for ch in CHAINS if predict in ch)
    # predict reads the sst2 and mrpc adapters: both runs come before it in its chain.
    assert any("--output-dir runs/sst2 " in c for c in chain[:chain.index(predict)])
    assert any("--output-dir runs/mrpc " in c for c in chain[:chain.index(predict)])
    # --resume continues the run before it in the same directory.
    resume = next(c for c in readme_commands() if "--resume" in c)
    assert resume in chain and chain.index(resume) > 0


def run_readme_command(command: str) -> subprocess.CompletedProcess:
    assert command.startswith("python ")
    argv = [sys.executable, *command.split()[1:]]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{command}\n{proc.stderr[-2000:]}"
    return proc


@pytest.mark.parametrize("chain", CHAINS, ids=[_chain_id(c) for c in CHAINS])
def test_more_commands_block_runs(chain):
    shared_path("models", "all-MiniLM-L6-v2")
    for command in chain:
        script = command.split()[1]
        before = CHECKS[script][0](command) if script in CHECKS else None
        run_readme_command(command)
        if script in CHECKS:
            CHECKS[script][1](command, before)


def test_every_benchmark_command_is_checked():
    scripts = {c.split()[1] for c in readme_commands()}
    assert set(CHECKS) <= scripts, set(CHECKS) - scripts
    assert {s for s in scripts if Path(s).name.startswith(("bench", "profile"))} <= set(CHECKS)


def _flag(command: str, flag: str, default: str | None = None) -> str | None:
    words = command.split()
    return words[words.index(flag) + 1] if flag in words else default


def _nothing(command: str) -> None:
    return None


def _cache_entries(command: str) -> int:
    cache = _flag(command, "--compile-cache")
    assert cache, f"the README's quick benchmark names a --compile-cache: {command}"
    path = ROOT / cache
    return sum(1 for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def check_bench(command: str, entries_before: int) -> None:
    """benchmarks/bench.py: per-cell memory levers, FLOP counts in both frameworks, the compile cache."""
    out = ROOT / _flag(command, "--out")
    record = json.loads((out / f"{_flag(command, '--name')}.json").read_text())
    rows = {(r["framework"], r["variant"]): r for r in record["rows"]}
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
    text = (out / f"{_flag(command, '--name')}.md").read_text()
    n = len(_flag(command, "--cells").split(","))
    assert "matmul GFLOP/s" in text and "saved for backward" in text and "remat-cheap / fp32" in text
    assert f"Cells run: {n} of {n}" in text and len(rows) == n
    # The default grows JAX's GPU pool on demand (tests/test_bench_scripts.py: --preallocate).
    assert record["meta"]["jax_memory_pool"] == "grown on demand" and "JAX's memory pool here: grown on demand" in text
    assert {r["xla_python_client_preallocate"] for r in rows.values() if "xla_python_client_preallocate" in r} == {"false"}
    # The lora-jax cells compiled into the cache they name (PyTorch's do not use it).
    assert _cache_entries(command) > 0
    cache = (ROOT / _flag(command, "--compile-cache")).resolve()
    assert {r["compile_cache"] for k, r in rows.items() if k[0] == "jax"} == {str(cache)}


def check_bench_gemm(command: str, _: None) -> None:
    """benchmarks/bench_gemm.py: every shape of a layer in both frameworks, and a bench.py run's bounds."""
    config = json.loads((ROOT / _flag(command, "--config") / "config.json").read_text())
    batch, seq = int(_flag(command, "--batch", "16")), int(_flag(command, "--seq", "128"))
    out = ROOT / _flag(command, "--out")
    stem = f"gemm-{config['model_type']}-b{batch}-s{seq}-cpu"
    record = json.loads((out / f"{stem}.json").read_text())
    names = [s["name"] for s in record["meta"]["shapes"]]
    assert len(names) == 7 and len(set(names)) == 7
    assert sorted((r["framework"], r["name"]) for r in record["rows"]) == sorted(
        (f, n) for f in ("jax", "torch") for n in names)
    ffn_in = next(s for s in record["meta"]["shapes"] if s["name"] == "FFN in x W")
    assert (ffn_in["m"], ffn_in["k"], ffn_in["n"]) == (batch * seq, config["hidden_size"], config["intermediate_size"])
    repeats = int(_flag(command, "--repeats"))
    for r in record["rows"]:
        assert len(r["times_s"]) == repeats and r["median_s"] > 0 and r["gflop_per_s"] > 0
    text = (out / f"{stem}.md").read_text()
    assert "XLA / PyTorch time" in text and "that / PyTorch LoRA step" in text
    # Each bench.py row's matmuls at each framework's (dense, batched) rates.
    rates = record["meta"]["rates"]
    step_rows = [r for r in json.loads((ROOT / _flag(command, "--step")).read_text())["rows"] if r.get("matmul_flops")]
    bounds = record["meta"]["bounds"]
    assert len(bounds) == len(step_rows) > 0
    for r, b in zip(step_rows, bounds):
        times = sorted(r["step_times_s"])
        assert b["step_s"] == times[len(times) // 2]
        dense, batched = r["matmul_flops"] - r["batched_matmul_flops"], r["batched_matmul_flops"]
        for f, (d, bt) in rates.items():
            assert b["matmul_s_at"][f] == pytest.approx(dense / d + batched / bt)
    # The dense rate lies between the slowest and the fastest 2-D product of that framework.
    jax_rates = [r["gflop_per_s"] * 1e9 for r in record["rows"] if r["framework"] == "jax" and r["batch"] == 1]
    assert min(jax_rates) <= rates["jax"][0] <= max(jax_rates)


def check_bench_inference(command: str, _: None) -> None:
    """benchmarks/bench_inference.py: base, merged, unmerged and mixed-adapter serving at each batch."""
    config = json.loads((ROOT / _flag(command, "--config") / "config.json").read_text())
    out = ROOT / _flag(command, "--out")
    record = json.loads((out / f"{config['model_type']}-h{config['hidden_size']}-cpu.json").read_text())
    batches = [int(b) for b in _flag(command, "--batches", "1,32").split(",")]
    adapters = int(_flag(command, "--adapters", "8"))
    impls = _flag(command, "--mixed-impls", "gather,masked,fused").split(",")
    whats = {(r["batch"], r["what"]) for r in record["rows"]}
    assert whats == {(b, w) for b in batches for w in ("base", "merged adapter", "unmerged adapter",
                                                         *[f"mixed batch, {adapters} adapters ({i})" for i in impls])}
    assert all(0 < r["latency_q1_s"] <= r["latency_s"] <= r["latency_q3_s"] for r in record["rows"])
    assert [m["adapters"] for m in record["memory"]] == [1, 8, 64]


def check_bench_epoch(command: str, entries_before: int) -> None:
    """benchmarks/bench_epoch.py: the same batches in the unpadded cells, static padding pads more, and the
    compile cache reaching the lora-jax cells (the first finds what was there before, the next more)."""
    out = ROOT / _flag(command, "--out")
    stem = f"{_flag(command, '--task', 'sst2')}-b{_flag(command, '--batch-size', '32')}-cpu"
    record = json.loads((out / f"{stem}.json").read_text())
    rows = {r["cell"]: r for r in record["rows"]}
    assert set(rows) == set(_flag(command, "--cells").split(","))
    steps = int(_flag(command, "--steps"))
    assert all(r["steps"] == steps and not r["full_epoch"] for r in rows.values())
    assert rows["jax:packed"]["steps"] == rows["torch:random"]["steps"]  # the same batches
    # Padding everything to --max-seq-len pads more than packing does.
    assert rows["jax:pad"]["padding_share"] > rows["jax:packed"]["padding_share"]
    assert all(r["examples_per_s"] > 0 for r in rows.values())
    assert "lora-jax packed / PyTorch random (the same batches)" in record["ratios"]
    assert (out / f"{stem}.md").is_file() and (out / f"{stem}.png").stat().st_size > 1000
    cache = _flag(command, "--compile-cache")  # passed on to train.py as written
    assert rows["jax:packed"]["compile_cache"] == rows["jax:pad"]["compile_cache"] == cache
    assert rows["jax:packed"]["compile_cache_entries_before"] == entries_before
    assert rows["torch:random"]["compile_cache"] is None
    if entries_before == 0:  # a cold cache (CI, a fresh checkout): jax:packed filled it for jax:pad
        assert rows["jax:pad"]["compile_cache_entries_before"] > 0
        assert "cold: this run compiled and filled it" in (out / f"{stem}.md").read_text()
    else:  # warm from an earlier run of this command: the programs may all be there already
        assert rows["jax:pad"]["compile_cache_entries_before"] >= entries_before


def check_profile_step(command: str, _: None) -> None:
    """benchmarks/profile_step.py: each framework's kernels found and classed."""
    out = ROOT / _flag(command, "--out")
    config = Path(_flag(command, "--config"))
    stem = f"{config.name}-b{_flag(command, '--batch', '16')}-s{_flag(command, '--seq', '128')}-cpu"
    record = json.loads((out / f"{stem}.json").read_text())
    for fw in ("jax", "torch"):
        ms = record[fw]["ms_per_step"]
        assert ms.get("matmul", 0) > 0, (fw, ms)
        assert sum(ms.values()) > ms["matmul"]
    assert "| matmul |" in (out / f"{stem}.md").read_text()


def check_bench_dropout(command: str, _: None) -> None:
    """benchmarks/bench_dropout.py: both implementations timed at every shape asked for."""
    out = ROOT / _flag(command, "--out")
    record = json.loads((out / "dropout-cpu.json").read_text())
    shapes = [[int(n) for n in s.split("x")] for s in _flag(command, "--shapes").split(",")]
    assert sorted((r["shape"], r["impl"]) for r in record["rows"]) == sorted(
        (s, i) for s in shapes for i in {r["impl"] for r in record["rows"]})
    assert len({r["impl"] for r in record["rows"]}) == 2 and all(r["median_ms"] > 0 for r in record["rows"])
    assert (out / "dropout-cpu.md").read_text().count("\n| ") >= len(shapes) + 1


def check_train(command: str, _: None) -> None:
    """scripts/train.py: the console script trained what its flags asked for and wrote its report."""
    report = json.loads((ROOT / _flag(command, "--output-dir") / "report.json").read_text())
    assert report["task"] == _flag(command, "--task")
    assert report["method"] == _flag(command, "--method", "lora")
    assert report["steps"] == int(_flag(command, "--max-steps"))
    assert report["resumed"] == ("--resume" in command.split())


# script -> (what to note before it runs, the check after it ran)
def check_memory(command: str, _: None) -> None:
    """Both frameworks ran, and each run's stages are on its timeline in order, with RSS below its peak."""
    record = json.loads((ROOT / _flag(command, "--results") / "memory.json").read_text())
    assert set(record["cells"]) == {"jax lora", "torch lora"}
    for name, cell in record["cells"].items():
        names = [s["stage"] for s in cell["stages"]]
        assert names[:2] == ["start", "reading data"] and "tokenizing" in names and "evaluation" in names, names
        assert ("compile" in names) == name.startswith("jax")
        assert [s["t"] for s in cell["stages"]] == sorted(s["t"] for s in cell["stages"])
        assert 0 < cell["max_sample_mib"] <= cell["peak_rss_mib"] + 1
    assert (ROOT / _flag(command, "--results") / "memory.png").stat().st_size > 10_000
    given = [w.split("=", 1)[1] for w in shlex.split(command) if w.startswith("--jax-flags=")]
    if given:  # lora-jax's cells alone take them
        extra = shlex.split(given[0])
        assert shlex.split(record["cells"]["jax lora"]["command"])[-len(extra):] == extra
        assert not {w for w in extra if w.startswith("--")} & set(shlex.split(record["cells"]["torch lora"]["command"]))


def check_export(command: str, _: None) -> None:
    merged, peft_dir = ROOT / _flag(command, "--merged"), ROOT / _flag(command, "--peft")
    assert sorted(p.name for p in merged.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((peft_dir / "adapter_config.json").read_text())["peft_type"] == "LORA"


def check_combine(command: str, _: None) -> None:
    """The combined adapter records what it was made of, and cat's rank per kernel is the sum of the inputs'."""
    from lora_jax import adapter as adapter_lib

    meta, leaves = adapter_lib.load(ROOT / _flag(command, "--out"))
    names = [a.split("=")[0] for w, a in zip(command.split(), command.split()[1:]) if w == "--adapter"]
    inputs = [adapter_lib.load(ROOT / a.split("=")[1])[1] for w, a in zip(command.split(), command.split()[1:])
              if w == "--adapter"]
    assert meta["combined_from"]["adapters"] == names and meta["combined_from"]["how"] == "cat"
    for key, a in leaves.items():
        if key.endswith("/a"):
            assert a.shape[1] == sum(t[key].shape[1] for t in inputs if key in t), key


def check_eva_scale(command: str, _: None) -> None:
    """benchmarks/eva_scale.py: the whole budget allocated; scaled columns exactly as loud as kaiming's, unit
    columns as their eigenvalue says (aᵀCa against the eigendecomposition's share)."""
    task = _flag(command, "--task", "sst2")
    record = json.loads((ROOT / _flag(command, "--out") / f"eva-scale-{task}.json").read_text())
    rows = record["matrices"].values()
    assert sum(r["rank"] for r in rows) == record["budget"] * len(rows)
    for r in rows:
        assert len(r["unit"]) == len(r["scaled"]) == r["rank"]
        assert r["scaled"] == pytest.approx([1.0] * r["rank"], rel=1e-4)
        if r["rank"]:
            assert r["unit"][0] == pytest.approx((3 * r["d_in"] * r["top_share"]) ** 0.5, rel=1e-4)
            assert r["unit"] == sorted(r["unit"], reverse=True)
    assert "kaiming-scaled columns 1.00x" in (ROOT / _flag(command, "--out") / f"eva-scale-{task}.md").read_text()


CHECKS = {
    "scripts/train.py": (_nothing, check_train),
    "scripts/export.py": (_nothing, check_export),
    "scripts/combine.py": (_nothing, check_combine),
    "benchmarks/bench.py": (_cache_entries, check_bench),
    "benchmarks/bench_gemm.py": (_nothing, check_bench_gemm),
    "benchmarks/bench_inference.py": (_nothing, check_bench_inference),
    "benchmarks/bench_epoch.py": (_cache_entries, check_bench_epoch),
    "benchmarks/profile_step.py": (_nothing, check_profile_step),
    "benchmarks/bench_dropout.py": (_nothing, check_bench_dropout),
    "benchmarks/memory.py": (_nothing, check_memory),
    "benchmarks/eva_scale.py": (_nothing, check_eva_scale),
}


def test_many_devices_block_runs():
    """The multi-device block, as a bash script: 4 forced CPU devices, then 2 processes with --fsdp 2."""
    shared_path("models", "all-MiniLM-L6-v2")
    block = doc_block("docs/multi-device.md", "Many devices and hosts")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", "-e", "-c", block], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    four = json.loads((ROOT / "runs" / "rte-4dev" / "report.json").read_text())
    assert four["parallel"]["devices"] == 4
    two = json.loads((ROOT / "runs" / "rte-2proc" / "report.json").read_text())
    assert two["parallel"] == {"devices": 2, "processes": 2, "mesh": {"data": 1, "fsdp": 2}, "platform": "cpu"}
    assert two["steps"] == 4


def test_python_example_runs():
    """The README's Python example: LoRA as a tree transform, one optimizer step, a merge. Then what it
    promises: the base untouched, the step moved the adapters off ΔW = 0, and the merged tree gives the
    factored forward's logits."""
    import numpy as np

    shared_path("models", "all-MiniLM-L6-v2")
    cwd = os.getcwd()
    os.chdir(ROOT)  # the example's paths are relative to the checkout, as a reader runs it
    try:
        ns: dict = {}
        exec(compile(doc_block("README.md", "LoRA from Python", "python"), "README.md", "exec"), ns)
    finally:
        os.chdir(cwd)
    lora, forward, cfg, t, lcfg, batch = (ns[k] for k in ("lora", "forward", "cfg", "t", "lcfg", "batch"))
    base = lora.flatten(ns["params"])
    assert ns["frozen"] and all(np.array_equal(v, base[k.removeprefix("params/")]) for k, v in ns["frozen"].items())
    assert all(np.abs(np.asarray(v)).max() > 0 for k, v in ns["trainable"].items() if k.endswith("/b"))
    merged = forward(cfg, ns["merged"], batch)["logits"]
    factored = forward(cfg, lora.apply(t["params"], t["lora"], lcfg), batch)["logits"]
    np.testing.assert_allclose(np.asarray(merged), np.asarray(factored), atol=1e-5)


def test_tests_block_fast_tier_covers_every_module_with_a_test_file():
    """The Tests section's fast-tier command, collected as written: it selects tests from the test file
    of every lora_jax module that has one, and none marked slow (the whole suite runs them all)."""
    fast = next(line for line in readme_block("Tests").splitlines() if '-m "not slow"' in line)
    command = shlex.split(fast.split("#")[0])
    assert command[:3] == [".venv/bin/python", "-m", "pytest"]
    proc = subprocess.run([sys.executable, "-m", "pytest", *command[3:], "--collect-only", "-p",
                           "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    selected = {line.split("::")[0] for line in proc.stdout.splitlines() if "::" in line}
    modules = {p.stem for p in (ROOT / "lora_jax").glob("*.py") if p.stem != "__init__"}
    with_tests = {m for m in modules if (ROOT / "tests" / f"test_{m}.py").is_file()}
    assert len(with_tests) >= 12
    assert {f"tests/test_{m}.py" for m in with_tests} <= selected, sorted(
        {f"tests/test_{m}.py" for m in with_tests} - selected)
    readme_ids = [line for line in proc.stdout.splitlines() if line.startswith("tests/test_readme.py::")]
    assert not readme_ids  # the README's commands are all slow
