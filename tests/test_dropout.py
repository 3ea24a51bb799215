"""dropout.keep_mask: the right keep rate, unbiased, no pattern between the four draws of one
hash, a quarter of bernoulli's hashing, and the fallback for keys and shapes it does not take."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import dropout
from lora_jax.model import ModelConfig, build, dummy_batch, init_params

SHAPE = (8, 4, 128, 256)  # 2**20 draws


def sigmas(observed: float, p: float, n: int) -> float:
    return abs(observed - p) / np.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_keep_rate_and_unbiased_scale(rate):
    keep, scale = dropout.keep_mask(jax.random.key(0), rate, SHAPE)
    keep = np.asarray(keep)
    p = dropout.keep_threshold(rate) / 2**16
    assert abs(p - (1 - rate)) < 2**-16
    assert sigmas(keep.mean(), p, keep.size) < 5
    assert scale * p == pytest.approx(1.0, abs=1e-12)  # E[keep · scale] = 1 exactly
    x = jnp.full(SHAPE, 3.0)
    assert float(dropout.dropout(x, rate, jax.random.key(1)).mean()) == pytest.approx(3.0, rel=5e-3)


def test_draws_of_one_hash_are_independent():
    """Elements 4i..4i+3 share one threefry hash: each of the four slots, and every pair of them,
    must keep at the right rate (a slot reusing another's bits would keep together with it)."""
    keep, _ = dropout.keep_mask(jax.random.key(2), 0.5, SHAPE)
    slots = np.asarray(keep).reshape(-1, 4)
    n = slots.shape[0]
    for i in range(4):
        assert sigmas(slots[:, i].mean(), 0.5, n) < 5
        for j in range(i + 1, 4):
            assert sigmas((slots[:, i] & slots[:, j]).mean(), 0.25, n) < 5
            assert sigmas((slots[:, i] == slots[:, j]).mean(), 0.5, n) < 5


def test_masks_follow_the_key_and_do_not_repeat():
    a, _ = dropout.keep_mask(jax.random.key(3), 0.1, (64, 128))
    b, _ = dropout.keep_mask(jax.random.key(3), 0.1, (64, 128))
    c, _ = dropout.keep_mask(jax.random.key(4), 0.1, (64, 128))
    raw, _ = dropout.keep_mask(jax.random.PRNGKey(3), 0.1, (64, 128))  # legacy uint32[2] keys too
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, raw)
    assert (np.asarray(a) != np.asarray(c)).mean() > 0.1
    rows = np.asarray(a)
    assert len({r.tobytes() for r in rows}) == len(rows)  # no row repeats another


def test_one_hash_per_four_elements():
    """The point of the module: the jaxpr hashes shape/4 counters (bernoulli hashes one counter
    per element, inside its random_bits primitive)."""

    def hashed(fn):
        eqns = [e for e in jax.make_jaxpr(fn)(jax.random.key(0)).jaxpr.eqns]
        sizes = []
        while eqns:
            e = eqns.pop()
            if e.primitive.name == "threefry2x32":
                sizes.append(int(np.prod(e.invars[2].aval.shape)))
            for p in e.params.values():
                inner = getattr(p, "jaxpr", p)
                if hasattr(inner, "eqns"):
                    eqns.extend(inner.eqns)
        return sum(sizes)

    shape = (16, 12, 128, 128)
    ours = hashed(lambda k: dropout.keep_mask(k, 0.1, shape)[0])
    assert ours == np.prod(shape) // 4


@pytest.mark.parametrize("key,shape", [(jax.random.key(0), (30, 5)), (jax.random.key(0, impl="rbg"), (32, 8))])
def test_fallback_for_other_shapes_and_keys(key, shape):
    keep, scale = dropout.keep_mask(key, 0.25, shape)
    assert keep.shape == shape and keep.dtype == jnp.bool_
    assert scale == pytest.approx(1 / 0.75)


def test_module_is_identity_when_deterministic_and_keeps_dtype():
    x = jnp.ones((4, 8), jnp.bfloat16)
    layer = dropout.Dropout(0.3)
    assert layer.apply({}, x, deterministic=True) is x
    y = layer.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(5)})
    assert y.dtype == jnp.bfloat16
    kept = np.asarray(y, np.float32)
    assert set(np.unique(kept)) <= {0.0, float(jnp.asarray(2**16 / dropout.keep_threshold(0.3), jnp.bfloat16))}


@pytest.mark.slow
def test_model_dropout_uses_the_new_masks_and_stays_deterministic():
    """The encoder's train forward: same rng, same logits; another rng, other logits."""
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=40, hidden_dropout_prob=0.3,
                      attention_probs_dropout_prob=0.3)
    model, params = build(cfg), init_params(cfg, jax.random.key(0))
    batch = dummy_batch(2, 16)
    run = lambda seed: model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                                   deterministic=False, rngs={"dropout": jax.random.key(seed)})["logits"]
    np.testing.assert_array_equal(run(1), run(1))
    assert not np.allclose(run(1), run(2))
