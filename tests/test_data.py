"""GLUE reading (the real files and their quirks), tokenizing, bucketing and batching."""

import itertools

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


def test_bucket_lengths():
    assert data_lib.bucket_lengths(128, 8) == (16, 32, 48, 64, 80, 96, 112, 128)
    assert data_lib.bucket_lengths(128, 1) == (128,)
    assert data_lib.bucket_lengths(100, 3)[-1] == 100
    assert data_lib.bucket_for(17, (16, 32)) == 32
    short = np.random.default_rng(0).integers(4, 30, 1000)
    fitted = data_lib.bucket_lengths(128, 4, short)
    assert len(fitted) == 5 and fitted[-2:] == (29, 128)  # the longest example, then --max-seq-len
    assert data_lib.bucket_lengths(16, 4, np.array([3, 3, 40])) == (3, 16)  # truncated to --max-seq-len
    batches = [np.arange(i, i + 10) for i in range(0, 1000, 10)]
    spaced = tuple(b for b in data_lib.bucket_lengths(32, 4) if b >= 8)
    assert data_lib.padding_share(short, batches, fitted) <= data_lib.padding_share(short, batches, spaced)


def test_fit_buckets_finds_the_least_padding():
    """Against every choice of buckets, on small random length sets."""
    rng = np.random.default_rng(1)

    def slots(lengths, buckets):
        b = np.array(sorted(buckets))
        return int(b[np.searchsorted(b, lengths)].sum())

    for _ in range(100):
        lengths = rng.integers(1, 40, rng.integers(1, 60))
        k = int(rng.integers(1, 6))
        got = data_lib.fit_buckets(lengths, k)
        values = np.unique(lengths)
        best = min(slots(lengths, c + (values[-1],))
                   for c in itertools.combinations(values[:-1], min(k, len(values)) - 1))
        assert slots(lengths, got) == best
        assert len(got) == min(k, len(values)) and got[-1] == lengths.max()


def test_train_order_is_deterministic_and_covers_data():
    lengths = np.random.default_rng(0).integers(5, 120, 103)
    a = data_lib.train_order(lengths, 10, seed=1, epoch=0, batching="by-length")
    b = data_lib.train_order(lengths, 10, seed=1, epoch=0, batching="by-length")
    c = data_lib.train_order(lengths, 10, seed=1, epoch=1, batching="by-length")
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    flat = np.concatenate(a)
    assert len(flat) == 100 and len(set(flat.tolist())) == 100 and all(len(x) == 10 for x in a)
    buckets = data_lib.bucket_lengths(128, 8)
    grouped = data_lib.padding_share(lengths, a, buckets)
    random = data_lib.padding_share(lengths, [np.arange(i, i + 10) for i in range(0, 100, 10)], buckets)
    assert grouped < random  # length grouping pads less than arbitrary batches


def test_collate_pads_to_bucket_and_marks_filler(tiny_bert_dir):
    tok = data_lib.load_tokenizer(str(tiny_bert_dir))
    ex = data_lib.Examples((["the cat sat", "a dog"], ["good movie", "bad"]), np.array([1, 0]), "mem")
    enc = data_lib.encode(tok, ex, 16)
    assert enc.ids[0][0] == tok.cls_token_id and enc.type_ids[0].max() == 1
    batch = data_lib.collate(enc, np.array([1]), (8, 16), 4)
    assert batch["input_ids"].shape == (4, 8)
    assert batch["example_mask"].tolist() == [True, False, False, False]
    n = len(enc.ids[1])
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (8 - n)
    assert (batch["input_ids"][0, n:] == enc.pad_id).all()


def test_truncation_to_max_seq_len(tiny_bert_dir):
    tok = data_lib.load_tokenizer(str(tiny_bert_dir))
    ex = data_lib.Examples((["the cat " * 40],), np.array([1]), "mem")
    assert len(data_lib.encode(tok, ex, 12).ids[0]) == 12


def test_real_tokenizer_ignores_shipped_fixed_padding():
    tok = data_lib.load_tokenizer(str(shared_path("models", "all-MiniLM-L6-v2")))
    ex = data_lib.Examples((["hello world"],), np.array([0]), "mem")
    assert len(data_lib.encode(tok, ex, 128).ids[0]) == 4  # [CLS] hello world [SEP], not 128
