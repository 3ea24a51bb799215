"""Packed batches (lora_jax.packing): the same per-example logits and gradients as one example per
row, every example placed once, and batches that are random samples by default."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from lora_jax import batching

from lora_jax import data as data_lib
from lora_jax import packing
from lora_jax.model import ModelConfig, forward, init_params


def _encoded(lengths, labels=None, seed=0) -> data_lib.Encoded:
    rng = np.random.default_rng(seed)
    ids = [np.concatenate([[2], rng.integers(5, 60, n - 2), [3]]).astype(np.int32) for n in lengths]
    # Two segments in each example (token type 1 on its second half), as in sentence-pair tasks.
    types = [(np.arange(n) >= n // 2).astype(np.int32) for n in lengths]
    labels = np.arange(len(lengths)) % 3 if labels is None else labels
    return data_lib.Encoded(ids, types, np.asarray(labels), pad_id=0)


def test_first_fit_places_every_example_once_within_the_row_length():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 40, 50)
    rows = packing.first_fit(lengths, 48)
    placed = sorted(i for r in rows for i in r)
    assert placed == list(range(50))
    assert all(lengths[r].sum() <= 48 for r in rows)
    assert len(rows) <= np.ceil(11 / 9 * lengths.sum() / 48) + 1
    with pytest.raises(ValueError, match="does not fit"):
        packing.first_fit(np.array([49]), 48)


def test_pack_lays_examples_end_to_end_with_their_own_positions():
    enc = _encoded([5, 9, 4, 12, 7, 3])
    idx = np.array([4, 0, 3, 5, 1, 2])
    b = packing.pack(enc, idx, row_len=16, row_counts=(2, 4, 6))
    assert b["input_ids"].shape == (4, 16)  # 40 tokens need 3 rows of 16; the next row count is 4
    np.testing.assert_array_equal(b["labels"], enc.labels[idx])
    flat = b["input_ids"].reshape(-1)
    for e, i in enumerate(idx):
        n = len(enc.ids[i])
        start = b["first_index"][e]
        np.testing.assert_array_equal(flat[start:start + n], enc.ids[i])
        np.testing.assert_array_equal(b["position_ids"].reshape(-1)[start:start + n], np.arange(n))
        np.testing.assert_array_equal(b["token_type_ids"].reshape(-1)[start:start + n], enc.type_ids[i])
        assert len(set(b["attention_mask"].reshape(-1)[start:start + n])) == 1  # one example number
    assert (b["attention_mask"] > 0).sum() == sum(len(enc.ids[i]) for i in idx)
    assert packing.padding_share(enc.lengths, [idx], 16, (2, 4, 6)) == pytest.approx(1 - 40 / 64)


@pytest.mark.parametrize("model_type, remat, layouts", [
    ("roberta", "cheap", ((3, False),)),  # the default remat; 3 rows, logits alone (training's forward)
    pytest.param("bert", "none", ((3, False), (8, True)), marks=pytest.mark.slow),
    pytest.param("roberta", "full", ((3, False), (8, True)), marks=pytest.mark.slow),
    pytest.param("bert", "qkv", ((3, True), (8, False)), marks=pytest.mark.slow),
])
def test_packed_rows_give_the_same_logits_and_gradients(model_type, remat, layouts):
    """Per-example logits and gradients of packed rows equal those of one example per row (1e-5), for
    each remat policy's code path, with the last layer on the first tokens alone or on every token."""
    extra = dict(type_vocab_size=2, pad_token_id=0) if model_type == "bert" else dict(type_vocab_size=1, pad_token_id=1)
    cfg = ModelConfig(model_type=model_type, vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=40, num_labels=3, remat=remat, **extra)
    params = init_params(cfg, jax.random.key(0))
    enc = _encoded([5, 9, 4, 12, 7, 3, 16, 2])
    if model_type == "roberta":  # one token type, and RoBERTa's pad id
        enc = data_lib.Encoded(enc.ids, [np.zeros_like(t) for t in enc.type_ids], enc.labels, pad_id=1)
    idx = np.array([6, 1, 4, 0, 7, 3, 2, 5])
    one_per_row = batching.collate(enc, idx, (16,), len(idx))

    @partial(jax.jit, static_argnums=2)
    @partial(jax.value_and_grad, has_aux=True)
    def loss(p, batch, hidden):
        logits = forward(cfg, p, batch, hidden=hidden)["logits"]
        return jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * jax.nn.one_hot(batch["labels"], 3), -1)), logits

    inputs = lambda batch: {k: v for k, v in batch.items() if k != "example_mask"}
    (ref_loss, ref_logits), ref_grads = loss(params, inputs(one_per_row), False)
    for n_rows, hidden in layouts:
        batch = packing.pack(enc, idx, row_len=24, row_counts=(n_rows,))
        assert batch["input_ids"].shape == (n_rows, 24)
        (l, logits), grads = loss(params, inputs(batch), hidden)
        np.testing.assert_allclose(logits, ref_logits, atol=1e-5)
        np.testing.assert_allclose(l, ref_loss, atol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), grads, ref_grads)


def _batch_label_means(order, labels):
    return np.array([labels[b].mean() for b in order])


def test_random_batches_have_the_label_spread_of_a_shuffle_and_length_grouped_ones_do_not():
    """Where length goes with the label (here: the longer half is positive), a batch sorted by length is
    a biased sample. The default order's batch label means must vary as a plain shuffle's do: their
    variance is p(1-p)/B (N-B)/(N-1) (sampling without replacement), tested by a chi-square on the
    epoch's batches; length-grouped batches must fail the same test."""
    rng = np.random.default_rng(0)
    n, b = 4096, 32
    lengths = rng.integers(4, 120, n)
    labels = (lengths > np.median(lengths)).astype(np.float64)
    p = labels.mean()
    expected = p * (1 - p) / b * (n - b) / (n - 1)

    def p_value(order):
        means = _batch_label_means(order, labels)
        chi2 = ((means - p) ** 2).sum() / expected  # ~ chi-square with len(means) - 1 dof
        return 2 * min(stats.chi2.cdf(chi2, len(means) - 1), stats.chi2.sf(chi2, len(means) - 1))

    for epoch in range(3):
        assert p_value(batching.train_order(lengths, b, seed=0, epoch=epoch, batching="random")) > 1e-3
        assert p_value(batching.train_order(lengths, b, seed=0, epoch=epoch, batching="by-length")) < 1e-6


@pytest.mark.parametrize("high", [41, 120])
def test_row_length_is_the_candidate_that_pads_least(high):
    lengths = np.random.default_rng(1).integers(3, high, 2000)
    b = packing.Batcher.for_training("packed", lengths, (128,), batch_size=32, max_seq_len=128, num_buckets=4, seed=0)
    epoch0 = b.order(lengths, 32, seed=0, epoch=0)
    shares = {n: packing.padding_share(lengths, epoch0, n, packing.row_buckets(lengths, epoch0, n, 4, 32))
              for n in packing.row_lengths(lengths, 128)}
    assert set(shares) == {-(-(high - 1) // 8) * 8, 128}
    assert b.row_len in shares and b.padding_share(lengths, epoch0) == min(shares.values())
    assert b.row_counts[-1] == 32  # one example per row always fits


def test_row_counts_hold_every_epoch_of_the_run_without_the_fallback():
    """A later epoch's fullest batch gets a row count of its own, not the batch-size fallback that would set
    the memory peak (RTE, 3 epochs: 23 rows instead of 32, results/memory/)."""
    lengths = np.random.default_rng(0).integers(10, 120, 400)
    kw = dict(batch_size=16, max_seq_len=128, num_buckets=3, seed=0)
    orders = [b for e in range(3) for b in batching.train_order(lengths, 16, seed=0, epoch=e, batching="random")]
    one = packing.Batcher.for_training("packed", lengths, (128,), **kw, epochs=1)
    run = packing.Batcher.for_training("packed", lengths, (128,), **kw, epochs=3)
    need = [len(packing.first_fit(lengths[b], run.row_len)) for b in orders]
    assert max(need) < 16
    assert any(batching.bucket_for(n, one.row_counts) == 16 for n in need)  # fitted to epoch 0 alone: the fallback
    assert all(batching.bucket_for(n, run.row_counts) < 16 for n in need)
    assert set(one.row_counts) < set(run.row_counts) and max(need) in run.row_counts
