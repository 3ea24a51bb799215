"""GLUE reading (the real files and their quirks) and tokenizing."""

import numpy as np
import pytest


from lora_jax import data as data_lib
from lora_jax.data import DataError, get_task

from .conftest import shared_path

# (task, split, rows, label counts in class-index order) from ../shared/data/glue/MANIFEST.md
REAL = [
    ("sst2", "train", 67349, [29780, 37569]),
    ("sst2", "dev", 872, [428, 444]),
    ("mrpc", "train", 3668, [1194, 2474]),
    ("mrpc", "dev", 408, [129, 279]),
    ("rte", "train", 2490, [1249, 1241]),
    ("rte", "dev", 277, [146, 131]),
    ("wnli", "train", 635, [323, 312]),
    ("wnli", "dev", 71, [40, 31]),
    ("qnli", "dev", 5463, [2702, 2761]),
    ("mnli", "dev_matched", 9815, [3479, 3123, 3213]),  # entailment, neutral, contradiction
]


@pytest.mark.parametrize("task, split, rows, counts", REAL)
def test_real_glue_files(task, split, rows, counts):
    root = shared_path("data", "glue")
    ex = data_lib.load_split(get_task(task), split, str(root))
    assert len(ex) == rows
    assert np.bincount(ex.labels).tolist() == counts
    assert all(len(t) == rows for t in ex.texts)


def test_mrpc_bom_and_quotes():
    root = shared_path("data", "glue")
    ex = data_lib.load_split(get_task("mrpc"), "train", str(root))
    # QUOTE_NONE keeps a leading quote as text instead of swallowing the following tabs.
    assert any(t.startswith('"') for t in ex.texts[0] + ex.texts[1])


def test_mnli_reconstruction_via_dev_file():
    f = shared_path("data", "glue", "MNLI", "dev_matched_reconstructed.tsv")
    ex = data_lib.load_split(get_task("mnli"), "dev_matched", file=str(f))
    assert len(ex) == 9815 and len(ex.texts) == 2


def test_cola_has_no_header(tmp_path):
    (tmp_path / "CoLA").mkdir()
    (tmp_path / "CoLA" / "train.tsv").write_text("gj04\t1\t\tThe cat sat.\ngj04\t0\t*\tCat the sat.\n")
    ex = data_lib.load_split(get_task("cola"), "train", str(tmp_path))
    assert ex.labels.tolist() == [1, 0] and ex.texts[0] == ["The cat sat.", "Cat the sat."]


@pytest.mark.parametrize("content, match", [
    ("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\n", r"train.tsv:3: 3 columns, expected 4"),
    ("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n", r"train.tsv:2: label 'maybe' is not one of"),
    ("index\tsentence1\tsentence2\tlabel\n", "holds no examples"),
    ("index\tpremise\tsentence2\tlabel\n0\ta\tb\tentailment\n", "header lacks column"),
    ("", "is empty"),
])
def test_malformed_files_name_file_and_line(tmp_path, content, match):
    (tmp_path / "RTE").mkdir()
    (tmp_path / "RTE" / "train.tsv").write_text(content)
    with pytest.raises(DataError, match=match):
        data_lib.load_split(get_task("rte"), "train", str(tmp_path))


def test_missing_file_and_unknown_task(tmp_path):
    with pytest.raises(DataError, match=r"RTE/dev.tsv not found"):
        data_lib.load_split(get_task("rte"), "dev", str(tmp_path))
    with pytest.raises(DataError, match="unknown task 'glue9'"):
        get_task("glue9")
    with pytest.raises(DataError, match="not a directory"):
        data_lib.load_split(get_task("rte"), "dev", str(tmp_path / "nope"))


def test_hub_failure_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(DataError, match="--data-dir"):
        data_lib.load_split(get_task("rte"), "dev")


def test_truncation_to_max_seq_len(tiny_bert_dir):
    tok = data_lib.load_tokenizer(str(tiny_bert_dir))
    ex = data_lib.Examples((["the cat " * 40],), np.array([1]), "mem")
    assert len(data_lib.encode(tok, ex, 12).ids[0]) == 12


def test_real_tokenizer_ignores_shipped_fixed_padding():
    tok = data_lib.load_tokenizer(str(shared_path("models", "all-MiniLM-L6-v2")))
    ex = data_lib.Examples((["hello world"],), np.array([0]), "mem")
    assert len(data_lib.encode(tok, ex, 128).ids[0]) == 4  # [CLS] hello world [SEP], not 128
