"""The LoRA transform: invariants (ΔW = 0 at init, merged == factored), counts, labels, bad options,
and model-agnosticism (an MLP and a conv net)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import lora
from lora_jax.lora import LoraConfig, LoraError
from lora_jax.model import ModelConfig, forward, init_params, param_shapes
from lora_jax.report import describe_counts

TINY = ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=64, max_position_embeddings=40)


@pytest.fixture(scope="module")
def params():
    return init_params(TINY, jax.random.key(0))


def randomize_b(adapters, key):
    """Non-zero B so that ΔW != 0 (B is zero at init)."""
    out = {}
    for i, (p, ad) in enumerate(adapters.items()):
        out[p] = {"a": ad["a"], "b": 0.1 * jax.random.normal(jax.random.fold_in(key, i), ad["b"].shape)}
    return out


def batch(b=3, t=12, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, TINY.vocab_size, (b, t)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[0, 7:] = 0
    ids[0, 7:] = TINY.pad_token_id
    return {"input_ids": ids, "attention_mask": mask}


def test_delta_w_is_zero_at_init(params):
    cfg = LoraConfig(rank=4, alpha=8)
    adapters = lora.init(params, cfg, jax.random.key(1))
    merged = lora.merge(params, adapters, cfg)
    for p, w in lora.flatten(params).items():
        assert np.array_equal(np.asarray(w), np.asarray(lora.flatten(merged)[p])), p
    base = forward(TINY, params, batch())["logits"]
    factored = forward(TINY, lora.apply(params, adapters, cfg), batch())["logits"]
    np.testing.assert_array_equal(np.asarray(base), np.asarray(factored))


@pytest.mark.parametrize("preset", ["qv", "qkvo", "all"])
def test_merged_forward_equals_factored(params, preset):
    cfg = LoraConfig(rank=4, alpha=16, targets=lora.TARGET_PRESETS[preset])
    adapters = randomize_b(lora.init(params, cfg, jax.random.key(1)), jax.random.key(2))
    with jax.default_matmul_precision("highest"):
        merged = forward(TINY, lora.apply(params, adapters, cfg, mode="merged"), batch())
        factored = forward(TINY, lora.apply(params, adapters, cfg, mode="factored"), batch())
        base = forward(TINY, params, batch())
    np.testing.assert_allclose(merged["logits"], factored["logits"], atol=1e-5, rtol=1e-5)
    # ...and the adapters really change the output.
    assert np.abs(np.asarray(merged["logits"]) - np.asarray(base["logits"])).max() > 1e-4


def test_merge_is_w_plus_scaled_ab_and_pure(params):
    cfg = LoraConfig(rank=2, alpha=6)
    adapters = randomize_b(lora.init(params, cfg, jax.random.key(3)), jax.random.key(4))
    before = jax.tree.map(np.array, params)
    merged = lora.merge(params, adapters, cfg)
    path = "encoder/layer/1/attention/self/value/kernel"
    a, b = np.asarray(adapters[path]["a"], np.float64), np.asarray(adapters[path]["b"], np.float64)
    want = np.asarray(lora.flatten(params)[path], np.float64) + 3.0 * a @ b
    np.testing.assert_allclose(np.asarray(lora.flatten(merged)[path]), want, atol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, before, params)  # input not modified


def test_merge_keeps_dtype_and_sums_in_float32(params):
    cfg = LoraConfig(rank=2, alpha=2)
    bf = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    adapters = randomize_b(lora.init(bf, cfg, jax.random.key(3)), jax.random.key(4))
    merged = lora.merge(bf, adapters, cfg)
    path = "encoder/layer/0/attention/self/query/kernel"
    out = lora.flatten(merged)[path]
    assert out.dtype == jnp.bfloat16
    want = (lora.flatten(bf)[path].astype(np.float32) + adapters[path]["a"] @ adapters[path]["b"]).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(want, np.float32))


def test_roberta_base_counts():
    shapes = param_shapes(ModelConfig())  # roberta-base, without allocating
    tree = {"params": shapes, "lora": lora.init(shapes, LoraConfig(rank=8), jax.random.key(0))}
    counts = lora.count(tree, lora.labels(tree, LoraConfig(rank=8)))
    assert counts["lora"] == 12 * 2 * (768 * 8 + 8 * 768) == 294_912
    # RoBERTa head: dense 768x768 + bias, out_proj 768x2 + bias.
    assert counts["trainable"] == 768 * 768 + 768 + 768 * 2 + 2
    print(describe_counts(counts))


def test_labels_drive_partition_and_counts(params):
    cfg = LoraConfig(rank=4)
    tree = {"params": params, "lora": lora.init(params, cfg, jax.random.key(0))}
    labels = lora.labels(tree, cfg)
    flat = lora.flatten(labels)
    assert flat["params/classifier/out_proj/kernel"] == "trainable"
    assert flat["params/encoder/layer/0/attention/self/query/kernel"] == "frozen"
    assert flat["lora/encoder/layer/0/attention/self/query/kernel/a"] == "lora"
    assert sum(v == "lora" for v in flat.values()) == 2 * 2 * TINY.num_hidden_layers
    trainable, frozen = lora.partition(tree, labels)
    assert set(trainable) == {p for p, v in flat.items() if v != "frozen"}
    assert not set(trainable) & set(frozen)
    counts = lora.count(tree, labels)
    assert counts["lora"] == sum(int(np.prod(v.shape)) for p, v in trainable.items() if p.startswith("lora/"))
    back = lora.combine(frozen, trainable)
    jax.tree.map(np.testing.assert_array_equal, back, tree)


def test_full_finetuning_labels_everything_trainable(params):
    cfg = lora.full_finetuning()
    labels = lora.labels({"params": params}, cfg)
    assert set(lora.flatten(labels).values()) == {"trainable"}


def test_rslora_scale():
    assert LoraConfig(rank=16, alpha=8).scale == 0.5
    assert LoraConfig(rank=16, alpha=8, rslora=True).scale == 2.0


@pytest.mark.parametrize("init_a", ["kaiming", "gaussian"])
def test_init_a_distributions(params, init_a):
    cfg = LoraConfig(rank=8, init_a=init_a, targets=(r".*intermediate/dense/kernel",))
    ad = lora.init(params, cfg, jax.random.key(0))
    a = np.asarray(ad["encoder/layer/0/intermediate/dense/kernel"]["a"])  # (32, 8)
    if init_a == "kaiming":
        assert np.abs(a).max() <= 1 / np.sqrt(32)
    else:
        assert abs(a.std() - 1 / 8) < 0.04
    assert not np.asarray(ad["encoder/layer/0/intermediate/dense/kernel"]["b"]).any()


def test_lora_dropout_only_in_factored_training(params):
    cfg = LoraConfig(rank=4, dropout=0.5)
    adapters = randomize_b(lora.init(params, cfg, jax.random.key(1)), jax.random.key(2))
    no_drop = forward(TINY, lora.apply(params, adapters, cfg), batch())["logits"]
    dropped = forward(TINY, lora.apply(params, adapters, cfg, rng=jax.random.key(5)), batch())["logits"]
    assert np.abs(np.asarray(no_drop) - np.asarray(dropped)).max() > 1e-6
    with pytest.raises(LoraError, match="factored"):
        lora.apply(params, adapters, cfg, mode="merged", rng=jax.random.key(5))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rank=0), "rank"),
        (dict(rank=-3), "rank"),
        (dict(alpha=0), "alpha"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=-0.1), "dropout"),
        (dict(targets=("([",)), "invalid pattern"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(LoraError, match=match):
        LoraConfig(**kwargs)


def test_bad_targets(params):
    with pytest.raises(LoraError, match="matches no parameter"):
        lora.init(params, LoraConfig(targets=(r".*/attention/self/querry/kernel",)), jax.random.key(0))
    with pytest.raises(LoraError, match="exceeds min"):
        lora.init(params, LoraConfig(rank=33), jax.random.key(0))
    with pytest.raises(LoraError, match="not a matrix"):
        lora.init(params, LoraConfig(targets=(r".*query/bias",)), jax.random.key(0))
    with pytest.raises(LoraError, match="trainable pattern"):
        lora.labels({"params": params}, LoraConfig(trainable=("head/.*",)))


# ----------------------------------------------------------------------------- any Flax model


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="out")(nn.relu(nn.Dense(16, name="hidden")(x)))


class ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Conv(8, (3, 3), name="conv")(x))
        return nn.Dense(2, name="head")(h.mean((1, 2)))


def test_mlp_lora_merged_matches_manual():
    x = jax.random.normal(jax.random.key(0), (5, 10))
    params = MLP().init(jax.random.key(1), x)["params"]
    cfg = LoraConfig(rank=2, alpha=4, targets=(r"hidden/kernel",), trainable=(r"out/.*",))
    adapters = randomize_b(lora.init(params, cfg, jax.random.key(2)), jax.random.key(3))
    y = MLP().apply({"params": lora.merge(params, adapters, cfg)}, x)
    ad = adapters["hidden/kernel"]
    h = jax.nn.relu(x @ params["hidden"]["kernel"] + 2.0 * (x @ ad["a"]) @ ad["b"] + params["hidden"]["bias"])
    np.testing.assert_allclose(y, h @ params["out"]["kernel"] + params["out"]["bias"], atol=1e-5)
    tree = {"params": params, "lora": adapters}
    counts = lora.count(tree, lora.labels(tree, cfg))
    assert counts == {"lora": 10 * 2 + 2 * 16, "trainable": 16 * 3 + 3, "frozen": 10 * 16 + 16,
                      "total": 20 + 32 + 51 + 176}


def test_conv_kernel_as_matrix():
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 4))
    params = ConvNet().init(jax.random.key(1), x)["params"]
    cfg = LoraConfig(rank=3, alpha=3, targets=(r"conv/kernel",), trainable=(r"head/.*",))
    adapters = lora.init(params, cfg, jax.random.key(2))
    assert adapters["conv/kernel"]["a"].shape == (3 * 3 * 4, 3)
    assert adapters["conv/kernel"]["b"].shape == (3, 8)
    np.testing.assert_array_equal(ConvNet().apply({"params": lora.merge(params, adapters, cfg)}, x),
                                  ConvNet().apply({"params": params}, x))
    adapters = randomize_b(adapters, jax.random.key(3))
    merged = lora.merge(params, adapters, cfg)
    # Convolution is linear in its kernel: conv(W + ΔW) = conv(W) + conv(ΔW).
    dw = (adapters["conv/kernel"]["a"] @ adapters["conv/kernel"]["b"]).reshape(3, 3, 4, 8)
    conv = lambda k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(conv(merged["conv"]["kernel"]), conv(params["conv"]["kernel"]) + conv(dw), atol=1e-5)
    with pytest.raises(LoraError, match="2-D kernel"):
        lora.apply(params, adapters, cfg, mode="factored")
