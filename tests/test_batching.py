"""Batching: bucket lengths, the training order, padded batches."""

import itertools

import numpy as np

from lora_jax import batching
from lora_jax import data as data_lib


def test_bucket_lengths():
    assert batching.bucket_lengths(128, 8) == (16, 32, 48, 64, 80, 96, 112, 128)
    assert batching.bucket_lengths(128, 1) == (128,)
    assert batching.bucket_lengths(100, 3)[-1] == 100
    assert batching.bucket_for(17, (16, 32)) == 32
    short = np.random.default_rng(0).integers(4, 30, 1000)
    fitted = batching.bucket_lengths(128, 4, short)
    assert len(fitted) == 5 and fitted[-2:] == (29, 128)  # the longest example, then --max-seq-len
    assert batching.bucket_lengths(16, 4, np.array([3, 3, 40])) == (3, 16)  # truncated to --max-seq-len
    batches = [np.arange(i, i + 10) for i in range(0, 1000, 10)]
    spaced = tuple(b for b in batching.bucket_lengths(32, 4) if b >= 8)
    assert batching.padding_share(short, batches, fitted) <= batching.padding_share(short, batches, spaced)


def test_fit_buckets_finds_the_least_padding():
    """Against every choice of buckets, on small random length sets."""
    rng = np.random.default_rng(1)

    def slots(lengths, buckets):
        b = np.array(sorted(buckets))
        return int(b[np.searchsorted(b, lengths)].sum())

    for _ in range(100):
        lengths = rng.integers(1, 40, rng.integers(1, 60))
        k = int(rng.integers(1, 6))
        got = batching.fit_buckets(lengths, k)
        values = np.unique(lengths)
        best = min(slots(lengths, c + (values[-1],))
                   for c in itertools.combinations(values[:-1], min(k, len(values)) - 1))
        assert slots(lengths, got) == best
        assert len(got) == min(k, len(values)) and got[-1] == lengths.max()


def test_train_order_is_deterministic_and_covers_data():
    lengths = np.random.default_rng(0).integers(5, 120, 103)
    a = batching.train_order(lengths, 10, seed=1, epoch=0, batching="by-length")
    b = batching.train_order(lengths, 10, seed=1, epoch=0, batching="by-length")
    c = batching.train_order(lengths, 10, seed=1, epoch=1, batching="by-length")
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    flat = np.concatenate(a)
    assert len(flat) == 100 and len(set(flat.tolist())) == 100 and all(len(x) == 10 for x in a)
    buckets = batching.bucket_lengths(128, 8)
    grouped = batching.padding_share(lengths, a, buckets)
    random = batching.padding_share(lengths, [np.arange(i, i + 10) for i in range(0, 100, 10)], buckets)
    assert grouped < random  # length grouping pads less than arbitrary batches


def test_collate_pads_to_bucket_and_marks_filler(tiny_bert_dir):
    tok = data_lib.load_tokenizer(str(tiny_bert_dir))
    ex = data_lib.Examples((["the cat sat", "a dog"], ["good movie", "bad"]), np.array([1, 0]), "mem")
    enc = data_lib.encode(tok, ex, 16)
    assert enc.ids[0][0] == tok.backend.token_to_id("[CLS]") and enc.type_ids[0].max() == 1
    batch = batching.collate(enc, np.array([1]), (8, 16), 4)
    assert batch["input_ids"].shape == (4, 8)
    assert batch["example_mask"].tolist() == [True, False, False, False]
    n = len(enc.ids[1])
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (8 - n)
    assert (batch["input_ids"][0, n:] == enc.pad_id).all()
