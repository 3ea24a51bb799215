"""Shared fixtures: tiny random checkpoints, a tiny tokenizer and GLUE-shaped TSV files, all
built in a temporary directory without network. ``shared`` points at the real files in
``../shared`` (skipped outside CI when absent, a failure in CI)."""

from __future__ import annotations

import json
import os
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


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny_bert")
    write_tiny_checkpoint(d, "bert")
    return d


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
    return write_glue(tmp_path_factory.mktemp("glue"))
