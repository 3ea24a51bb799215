"""Numerical parity with PyTorch `transformers` on the same checkpoint, and model options."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import weights
from lora_jax.lora import flatten
from lora_jax.model import ConfigError, ModelConfig, forward, init_params

from .conftest import shared_path

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def padded_batch(vocab: int, pad: int, b: int = 3, t: int = 11, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, vocab, (b, t)).astype(np.int64)
    mask = np.ones_like(ids)
    for row, n in enumerate([t, 6, 3][:b]):
        ids[row, n:] = pad
        mask[row, n:] = 0
    types = np.zeros_like(ids)
    return ids, mask, types


def compare(tm, directory, ids, mask, types, num_labels):
    with torch.no_grad():
        to = tm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                token_type_ids=torch.tensor(types), output_hidden_states=True)
    cfg, params, _ = weights.from_pretrained(str(directory), num_labels=num_labels)
    jo = forward(cfg, params, {"input_ids": ids.astype(np.int32), "attention_mask": mask.astype(np.int32),
                               "token_type_ids": types.astype(np.int32)})
    real = mask[..., None].astype(bool)
    hidden_diff = np.abs(np.where(real, to.hidden_states[-1].numpy() - np.asarray(jo["hidden"]), 0)).max()
    logit_diff = np.abs(to.logits.numpy() - np.asarray(jo["logits"])).max()
    assert hidden_diff <= 1e-4, hidden_diff
    assert logit_diff <= 1e-4, logit_diff
    return to.logits.numpy(), np.asarray(jo["logits"])


@pytest.mark.parametrize("num_labels", [3, 1])
def test_parity_tiny_roberta_saved_by_torch(tmp_path, num_labels):
    torch.manual_seed(0)
    tc = transformers.RobertaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=64, max_position_embeddings=40, num_labels=num_labels)
    tm = transformers.RobertaForSequenceClassification(tc).eval()
    tm.save_pretrained(tmp_path)  # model.safetensors with torch names and (out, in) weights
    ids, mask, types = padded_batch(99, tc.pad_token_id)
    t_logits, _ = compare(tm, tmp_path, ids, mask, types, num_labels)
    assert t_logits.shape == (3, num_labels)


def test_parity_tiny_bert_with_token_types(tmp_path):
    torch.manual_seed(1)
    tc = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, max_position_embeddings=40, num_labels=2)
    tm = transformers.BertForSequenceClassification(tc).eval()
    tm.save_pretrained(tmp_path)
    ids, mask, types = padded_batch(99, tc.pad_token_id)
    types[:, 4:] = 1
    compare(tm, tmp_path, ids, mask, types, 2)


@pytest.mark.slow
def test_parity_real_minilm(tmp_path):
    src = shared_path("models", "all-MiniLM-L6-v2")
    torch.manual_seed(0)
    tm = transformers.BertForSequenceClassification.from_pretrained(src, num_labels=2).eval()
    tm.save_pretrained(tmp_path)  # the same encoder plus torch's fresh head, so both sides share it
    tok = transformers.AutoTokenizer.from_pretrained(src)
    enc = tok(["A man is playing a guitar.", "Short one."],
              ["Someone plays music on an instrument while others listen.", "Ok."],
              padding=True, truncation=True, max_length=64, return_tensors="np")
    assert enc["attention_mask"].min() == 0  # the batch really has padding
    compare(tm, tmp_path, enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], 2)

    # And the encoder straight from ../shared agrees with torch's BertModel.
    with torch.no_grad():
        bm = transformers.BertModel.from_pretrained(src).eval()
        ref = bm(**{k: torch.tensor(v) for k, v in enc.items()}).last_hidden_state.numpy()
    cfg, params, report = weights.from_pretrained(str(src))
    assert sorted(report.missing) == ["classifier/bias", "classifier/kernel"]
    hidden = np.asarray(forward(cfg, params, {k: v.astype(np.int32) for k, v in enc.items()})["hidden"])
    real = enc["attention_mask"][..., None].astype(bool)
    assert np.abs(np.where(real, ref - hidden, 0)).max() <= 1e-4


@pytest.mark.slow
def test_gradients_match_torch_autograd(tmp_path):
    """Every parameter's gradient of a cross-entropy loss agrees with torch autograd (eval mode).

    Guards the hand-written LayerNorm backward and the dense layers' 2-D row layout."""
    torch.manual_seed(2)
    tc = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, max_position_embeddings=40, num_labels=3)
    tm = transformers.BertForSequenceClassification(tc).eval()
    tm.save_pretrained(tmp_path)
    ids, mask, types = padded_batch(99, tc.pad_token_id)
    labels = np.array([0, 2, 1])
    out = tm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types))
    torch.nn.functional.cross_entropy(out.logits, torch.tensor(labels)).backward()
    cfg, params, _ = weights.from_pretrained(str(tmp_path), num_labels=3)
    batch = {"input_ids": ids.astype(np.int32), "attention_mask": mask.astype(np.int32),
             "token_type_ids": types.astype(np.int32)}

    def loss(p):
        logp = jax.nn.log_softmax(forward(cfg, p, batch)["logits"])
        return -jnp.take_along_axis(logp, jnp.asarray(labels)[:, None], 1).mean()

    grads = jax.grad(loss)(params)
    # Our names and (in, out) layout -> torch's, through the same mapping the loader uses.
    ref = {name.removeprefix("bert."): t.grad.numpy() for name, t in tm.named_parameters() if t.grad is not None}
    checked = 0
    for path, g in flatten(grads).items():
        name, transpose = weights.flax_to_torch_name(path)
        if name not in ref:
            continue
        want = ref[name].T if transpose else ref[name]
        np.testing.assert_allclose(np.asarray(g), want, atol=2e-5, rtol=1e-4, err_msg=path)
        checked += 1
    assert checked >= 30  # every encoder matrix, LayerNorm and the head


@pytest.mark.slow
def test_bfloat16_compute_close_to_float32():
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=40)
    params = init_params(cfg, jax.random.key(0))
    ids, mask, _ = padded_batch(64, 1)
    batch = {"input_ids": ids.astype(np.int32), "attention_mask": mask.astype(np.int32)}
    f32 = forward(cfg, params, batch)
    bf = forward(ModelConfig(**{**cfg.__dict__, "dtype": "bfloat16"}), params, batch)
    assert bf["hidden"].dtype == jnp.bfloat16 and bf["logits"].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(bf["hidden"], np.float32), f32["hidden"], atol=0.1)


@pytest.mark.slow
def test_remat_same_gradients():
    base = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, max_position_embeddings=40)
    params = init_params(ModelConfig(**base), jax.random.key(0))
    ids, mask, _ = padded_batch(64, 1)
    batch = {"input_ids": ids.astype(np.int32), "attention_mask": mask.astype(np.int32)}

    def grads(remat):
        cfg = ModelConfig(**base, remat=remat)
        loss = lambda p: forward(cfg, p, batch, train=True, rng=jax.random.key(1))["logits"].sum()
        return jax.grad(loss)(params)

    ref = grads("none")
    for policy in ("attention", "cheap", "qkv", "full", "dots"):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), ref, grads(policy))


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_logits_alone_same_logits_and_gradients_for_less_work(model_type):
    """hidden=False (training, evaluation, serving): the last layer runs the first token's row alone."""
    base = dict(model_type=model_type, vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, max_position_embeddings=40, type_vocab_size=2)
    params = init_params(ModelConfig(**base), jax.random.key(0))
    ids, mask, _ = padded_batch(64, 1)
    batch = {"input_ids": ids.astype(np.int32), "attention_mask": mask.astype(np.int32)}
    for remat in ("none", "cheap", "full"):
        cfg = ModelConfig(**base, remat=remat)
        loss = lambda p, hidden: jnp.square(forward(cfg, p, batch, hidden=hidden)["logits"]).sum()
        alone = forward(cfg, params, batch, hidden=False)
        assert set(alone) == {"logits"}
        np.testing.assert_allclose(alone["logits"], forward(cfg, params, batch)["logits"], atol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                     jax.grad(loss)(params, True), jax.grad(loss)(params, False))
        # With dropout: the same key gives a train step of the same shapes and finite gradients.
        train = lambda p: forward(cfg, p, batch, train=True, rng=jax.random.key(1), hidden=False)["logits"].sum()
        assert all(np.isfinite(g).all() for g in jax.tree.leaves(jax.grad(train)(params)))
    flops = {h: jax.jit(jax.grad(loss), static_argnums=1).lower(params, h).compile().cost_analysis()["flops"]
             for h in (True, False)}
    assert flops[False] < 0.8 * flops[True], flops  # 2 layers: the second's queries, FFN and output on 1 row of 11


@pytest.mark.slow
def test_layer_remat_lowers_the_compiled_step_memory():
    # What XLA allocates, not what JAX hands it: a recomputation that may run early (in the forward
    # pass) saves nothing. Before the gradient gate (compiler._gated_backward) "qkv" and "full" left this
    # at "none"'s on the CPU, or above it.
    base = dict(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                intermediate_size=128, max_position_embeddings=130)
    params = init_params(ModelConfig(**base), jax.random.key(0))
    rng = np.random.default_rng(0)
    batch = {"input_ids": rng.integers(3, 64, (8, 128)).astype(np.int32), "attention_mask": np.ones((8, 128), np.int32)}

    def temp_bytes(remat):
        cfg = ModelConfig(**base, remat=remat)
        loss = lambda p: forward(cfg, p, batch, train=True, rng=jax.random.key(1))["logits"].sum()
        return jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes

    temp = {remat: temp_bytes(remat) for remat in ("none", "qkv", "full")}
    assert temp["qkv"] < 0.75 * temp["none"], temp
    assert temp["full"] < temp["none"], temp


@pytest.mark.slow
def test_light_remat_same_dropout_fewer_saved_activations():
    # Sequence 128 over heads of size 4: the (B, heads, T, T) attention activations dominate.
    base = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=32, max_position_embeddings=130)
    params = init_params(ModelConfig(**base), jax.random.key(0))
    ids, mask, _ = padded_batch(64, 1, b=4, t=128)
    batch = {"input_ids": ids.astype(np.int32), "attention_mask": mask.astype(np.int32)}

    def run(remat):
        cfg = ModelConfig(**base, remat=remat)
        loss = lambda p: forward(cfg, p, batch, train=True, rng=jax.random.key(1))["logits"].sum()
        value, grads = jax.jit(jax.value_and_grad(loss))(params)
        # The leaves of the VJP closure are what autodiff keeps for the backward pass (the
        # parameters among them, the same under every policy).
        saved = sum(leaf.nbytes for leaf in jax.tree.leaves(jax.vjp(loss, params)[1]))
        return float(value), grads, saved

    loss_ref, grads_ref, saved_ref = run("none")
    scores = 2 * 4 * 4 * 128 * 128  # layers x batch x heads x T x T
    ffn = 2 * 4 * 128 * 32  # layers x batch x T x intermediate
    saved = {}
    for remat in ("attention", "cheap"):
        loss, grads, saved[remat] = run(remat)
        # The same dropout masks (the same loss to the last bit) and the same gradients.
        assert loss == loss_ref
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads_ref, grads)
    # At least the float probabilities before and after dropout go (a 1-byte keep mask stays) ...
    assert saved["attention"] <= saved_ref - 2 * 4 * scores
    # ... and with "cheap" also at least two float arrays of the FFN width.
    assert saved["cheap"] <= saved["attention"] - 2 * 4 * ffn


@pytest.mark.slow
def test_dropout_needs_rng_and_is_deterministic_given_it():
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=40)
    params = init_params(cfg, jax.random.key(0))
    ids, mask, _ = padded_batch(64, 1)
    batch = {"input_ids": ids.astype(np.int32), "attention_mask": mask.astype(np.int32)}
    with pytest.raises(ValueError, match="rng"):
        forward(cfg, params, batch, train=True)
    a = forward(cfg, params, batch, train=True, rng=jax.random.key(3))["logits"]
    b = forward(cfg, params, batch, train=True, rng=jax.random.key(3))["logits"]
    c = forward(cfg, params, batch, train=False)["logits"]
    np.testing.assert_array_equal(a, b)
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 0


@pytest.mark.parametrize("field, value, match", [
    ("model_type", "gpt2", "unsupported model_type"),
    ("hidden_act", "swish", "unsupported hidden_act"),
    ("num_attention_heads", 5, "not divisible"),
    ("dtype", "float16", "unsupported dtype"),
    ("remat", "some", "unknown remat"),
    ("attention_probs_dropout_prob", 1.0, "must be in"),
])
def test_bad_model_config(field, value, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig(**{field: value})
