"""Shared fixtures: tiny random checkpoints, a tiny tokenizer and GLUE-shaped TSV files, all
built in a temporary directory without network. ``shared`` points at the real files in
``../shared`` (skipped outside CI when absent, a failure in CI).

Two tiers (markers in pyproject.toml): a test that starts a subprocess, trains the real MiniLM,
runs README commands, a benchmark or the PyTorch reference, or compiles for long is marked ``slow``;
the rest is the fast tier, ``python -m pytest -q -m "not slow"`` (at most 90 s here). An unmarked
test that starts Python or a shell fails (``_fast_tier_starts_no_process``), so the fast tier cannot
grow slow by accident. Every subprocess of one test run shares one JAX persistent compilation cache
(``_one_compile_cache_per_run``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import jax
import numpy as np
import pytest

from lora_jax import weights
from lora_jax.model import ModelConfig, init_params

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

TINY = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=72)

WORDS = ("the a cat dog sat on mat is not good bad movie film great awful it was very "
         "and but man woman ran away home").split()


def shared_path(*parts: str) -> Path:
    """A file under ../shared; skips outside CI when it is missing, fails in CI."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        if IN_CI:
            pytest.fail(f"{p} is missing: CI must have ../shared")
        pytest.skip(f"{p} not present (outside CI)")
    return p


def write_tiny_checkpoint(directory: Path, model_type: str = "bert", seed: int = 0, **overrides) -> ModelConfig:
    """A random tiny encoder saved like a Hugging Face checkpoint (config.json + model.safetensors)
    and a word-piece tokenizer whose vocabulary covers WORDS."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *"abcdefghijklmnopqrstuvwxyz.,!?'"]
    vocab += [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
    extra = dict(type_vocab_size=2, layer_norm_eps=1e-12, pad_token_id=0) if model_type == "bert" else \
        dict(type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1)
    cfg = ModelConfig(model_type=model_type, **{**TINY, **extra, "vocab_size": max(TINY["vocab_size"], len(vocab)), **overrides})
    (directory / "config.json").write_text(json.dumps(cfg.to_hf()))
    params = init_params(cfg, jax.random.key(seed))
    # A base checkpoint has no task head: the loader must initialise it.
    base = {k: v for k, v in params.items() if k != "classifier"}
    weights.save_safetensors(base, directory / weights.SAFETENSORS, prefix=f"{model_type}.")
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 64}))
    return cfg


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto`` (pyproject.toml): two workers for the whole suite, where most time is
    single-threaded XLA compilation in subprocesses; none for the fast tier, which starting workers
    (each importing JAX and torch) would slow down."""
    if "not slow" in (config.option.markexpr or "") or (os.cpu_count() or 1) < 2:
        return 0
    return 2


def pytest_collection_modifyitems(config, items):
    """The longest tests are handed out first: the README's chains, then the other slow tests, then
    the fast tier. With ``--maxschedchunk 1`` (pyproject.toml) each xdist worker takes the next test
    when it finishes one, so the short tests at the end fill in and neither worker is left alone
    with a long one."""
    items.sort(key=lambda item: (item.nodeid.split("::")[0] != "tests/test_readme.py",
                                 item.get_closest_marker("slow") is None))


def _run_base(tmp_path_factory) -> Path:
    """This test run's temporary directory, the same for every xdist worker."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def built_once(tmp_path_factory, name: str, build) -> Path:
    """``build(directory)`` run once per test run, whichever xdist worker asks first; the others wait
    for it (a file lock) and read what it wrote."""
    from filelock import FileLock

    directory = _run_base(tmp_path_factory) / name
    built = Path(f"{directory}.built")
    with FileLock(f"{directory}.lock"):
        if not built.is_file():
            shutil.rmtree(directory, ignore_errors=True)  # what a failed build left
            directory.mkdir(parents=True)
            build(directory)
            built.write_text("")
    return directory


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    return built_once(tmp_path_factory, "tiny_bert", lambda d: write_tiny_checkpoint(d, "bert"))


def _sentence(rng) -> str:
    return " ".join(rng.choice(WORDS, size=rng.integers(3, 12)))


def write_glue(root: Path, n_train: int = 64, n_dev: int = 24, seed: int = 0) -> Path:
    """GLUE-layout TSVs for rte, sst2, stsb and cola with learnable labels (a keyword decides)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("dev", n_dev)):
        rte = ["index\tsentence1\tsentence2\tlabel"]
        sst = ["sentence\tlabel"]
        sts = ["index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"]
        cola = []
        for i in range(n):
            a, b = _sentence(rng), _sentence(rng)
            pos = rng.random() < 0.5
            b2 = ("good " + b) if pos else ("bad " + b)
            rte.append(f"{i}\t{a}\t{b2}\t{'entailment' if pos else 'not_entailment'}")
            sst.append(f"{b2}\t{int(pos)}")
            sts.append(f"{i}\tg\tf\t2012\t{i}\tnone\tnone\t{a}\t{b2}\t{(4.0 if pos else 1.0) + rng.random():.3f}")
            cola.append(f"src\t{int(pos)}\t\t{b2}")
        for task, lines in (("RTE", rte), ("SST-2", sst), ("STS-B", sts), ("CoLA", cola)):
            (root / task).mkdir(parents=True, exist_ok=True)
            (root / task / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="session")
def glue_dir(tmp_path_factory) -> Path:
    return built_once(tmp_path_factory, "glue", write_glue)


# The tiny runs that many tests read: one length bucket (every batch padded to 32), so that each
# task compiles one train step and one eval step.
TINY_RUN = dict(batch_size=8, max_seq_len=32, num_buckets=0, max_steps=4, lr=1e-2)


class TinyRuns(Mapping):
    """{task: run directory} of LoRA runs of the tiny BERT on rte and sst2 (two labels) and stsb
    (regression), each trained once per test run, when a test first asks for it: report.json,
    adapter/, peft_adapter/ and checkpoints/. Read them; copy before changing anything. Each xdist
    worker walks the tasks from another start, so that two workers train two runs at once."""

    TASKS = ("rte", "sst2", "stsb")

    def __init__(self, tmp_path_factory, model: Path, glue: Path):
        self.factory, self.model, self.glue = tmp_path_factory, model, glue
        worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
        start = int(worker.removeprefix("gw")) if worker.removeprefix("gw").isdigit() else 0
        self.order = self.TASKS[start % 3:] + self.TASKS[:start % 3]

    def __getitem__(self, task: str) -> Path:
        from lora_jax.config import TrainConfig
        from lora_jax.train import fit

        if task not in self.TASKS:
            raise KeyError(task)
        return built_once(self.factory, f"tiny-run-{task}", lambda out: fit(TrainConfig(
            task=task, model=str(self.model), data_dir=str(self.glue), output_dir=str(out), **TINY_RUN),
            progress=False))

    def __iter__(self):
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.TASKS)


@pytest.fixture(scope="session")
def tiny_runs(tiny_bert_dir, glue_dir, tmp_path_factory) -> TinyRuns:
    return TinyRuns(tmp_path_factory, tiny_bert_dir, glue_dir)


@pytest.fixture(scope="session", autouse=True)
def _one_compile_cache_per_run(tmp_path_factory):
    """Subprocesses inherit JAX's persistent compilation cache through the environment: identical
    tiny steps (the same script run twice, a killed run and its resume) compile once per test run.
    This process keeps it off, having imported JAX before: in-process tests compile as users do and
    the compiled-memory tests see fresh executables. A run's own --compile-cache still wins."""
    cache = _run_base(tmp_path_factory) / "jax-compile-cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAX_COMPILATION_CACHE_DIR", str(cache))
        mp.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
        yield cache


@pytest.fixture(autouse=True)
def _fast_tier_starts_no_process(request, monkeypatch):
    """A test outside the slow tier that starts Python or a shell (a script, a run, a benchmark) fails,
    naming the marker it lacks. Other programs pass: the standard library asks `uname` for
    platform.processor()."""
    if request.node.get_closest_marker("slow") is not None:
        return
    original = subprocess.Popen.__init__

    def guarded(self, args, *rest, **kwargs):
        program = Path((args.split() if isinstance(args, str) else list(args))[0]).name
        if "python" in program or program in ("bash", "sh") or program == Path(sys.executable).name:
            raise AssertionError(f"{request.node.nodeid} starts {program}: mark it @pytest.mark.slow")
        original(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded)
