"""A quantized frozen base (--param-dtype int8|nf4, through qwix): what is stored, that the train step computes
with exactly the dequantized base that evaluation and export rebuild, that autodiff keeps no float copy of a
dequantized weight, and that a quantized run's adapter evaluates, exports and serves as the run saw it."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import lora, quant
from lora_jax import tree as tree_lib
from lora_jax.config import ConfigValueError, TrainConfig
from lora_jax.eval_step import model_params
from lora_jax.model import ModelConfig, forward, init_params
from lora_jax.prepare import split_for_training

from .conftest import TINY
from .test_adapter import batch

NF4_LEVELS = 16
# Every kernel's input width a multiple of nf4's block of 64, so that nf4 stores them all.
WIDE = {**TINY, "hidden_size": 64, "intermediate_size": 128}


def test_int8_is_absmax_per_output_channel():
    w = np.random.default_rng(0).standard_normal((128, 48)).astype(np.float32)
    q = quant.quantize_kernel(w, "int8")
    assert q.q.qvalue.dtype == jnp.int8 and q.q.scale.shape == (1, 48) and q.shape == (128, 48)
    err = np.abs(np.asarray(q.dequantize()) - w)
    assert (err <= np.asarray(q.q.scale) / 2 * (1 + 1e-4)).all()  # the nearest step of its own column
    louder = w.copy()
    louder[:, 0] *= 10
    scale = np.asarray(quant.quantize_kernel(louder, "int8").q.scale)
    np.testing.assert_allclose(scale[0, 0], 10 * np.asarray(q.q.scale)[0, 0], rtol=1e-6)
    np.testing.assert_array_equal(scale[0, 1:], np.asarray(q.q.scale)[0, 1:])  # the other columns' scales stay


def test_nf4_is_blockwise_normal_float():
    w = np.random.default_rng(1).standard_normal((128, 48)).astype(np.float32)
    q = quant.quantize_kernel(w, "nf4")
    codes, scale = np.asarray(q.q.qvalue), np.asarray(q.q.scale)
    assert codes.dtype == np.uint8 and codes.max() < NF4_LEVELS and scale.shape == (128 // quant.NF4_BLOCK, 48)
    # Each block of 64 inputs of a column: absmax scale, every value one of 16 fixed levels times it.
    blocks = w.reshape(2, 64, 48)
    np.testing.assert_allclose(scale, np.abs(blocks).max(axis=1), rtol=1e-6)
    levels = np.asarray(q.dequantize()).reshape(2, 64, 48) / scale[:, None, :]
    assert len(np.unique(np.round(levels, 5))) == NF4_LEVELS
    assert np.abs(levels - blocks / scale[:, None, :]).max() < 0.17  # half NF4's widest gap (0.304 / 2)
    with pytest.raises(ValueError, match="int8, nf4"):
        quant.quantize_kernel(w, "int4")


@pytest.mark.parametrize("kind", quant.QUANTIZED)
def test_store_quantizes_frozen_kernels_and_keeps_the_rest(kind):
    rng = np.random.default_rng(0)
    frozen = {"params/encoder/a/kernel": rng.standard_normal((64, 16)).astype(np.float32),
              "params/encoder/b/kernel": rng.standard_normal((32, 16)).astype(np.float32),  # 32: not nf4's block
              "params/embeddings/word_embeddings/embedding": rng.standard_normal((64, 16)).astype(np.float32),
              "params/embeddings/position_embeddings/embedding": rng.standard_normal((8, 16)).astype(np.float32),
              "params/encoder/a/bias": rng.standard_normal(16).astype(np.float32)}
    stored = quant.store(dict(frozen), kind)
    assert set(stored) == set(frozen)
    for k, v in stored.items():
        if k.endswith("/kernel") and (kind == "int8" or "/a/" in k):
            assert isinstance(v, quant.QuantizedKernel) and v.shape == frozen[k].shape, k
        elif "word_embeddings" in k:  # the largest leaf left: bfloat16, promoted exactly where it is used
            assert v.dtype == jnp.bfloat16, k
        else:
            assert v is frozen[k], k


def _quantized_and_round_trip(kind, lcfg, mcfg):
    params = init_params(mcfg, jax.random.key(0))
    trainable, frozen, _, _ = split_for_training(params, lcfg, jax.random.key(1))
    trainable = {k: v + 0.05 for k, v in trainable.items()}  # B != 0: the adapters matter
    dense = quant.round_trip(params, kind)
    _, dense_frozen, _, _ = split_for_training(dense, lcfg, jax.random.key(1))
    return trainable, quant.store(dict(frozen), kind), dense_frozen


@pytest.mark.slow  # six compilations of a small model: 5 s
@pytest.mark.parametrize("kind", quant.QUANTIZED)
def test_the_quantized_forward_is_the_round_trip_base(kind):
    """What the train step computes on stored codes equals the plain model on round_trip's base: the base
    that evaluation, serving and export rebuild for a quantized run's adapter."""
    mcfg = ModelConfig(model_type="bert", **{**WIDE, "num_hidden_layers": 1})
    lcfg = lora.LoraConfig(rank=2, alpha=4)
    trainable, stored, dense = _quantized_and_round_trip(kind, lcfg, mcfg)
    ids, mask = batch(mcfg.vocab_size, mcfg.pad_token_id)
    hidden = jax.jit(lambda p: forward(mcfg, p, {"input_ids": ids, "attention_mask": mask})["hidden"])
    with jax.default_matmul_precision("highest"):
        want = hidden(model_params(trainable, dense, lcfg, mode="factored"))
        for mode in ("factored", "merged"):
            np.testing.assert_allclose(hidden(model_params(trainable, stored, lcfg, mode=mode)), want, atol=2e-5)
    float_base = hidden(model_params(trainable, _quantized_and_round_trip("int8", lora.LoraConfig(rank=2, alpha=4),
                                                                          mcfg)[2], lcfg, mode="factored"))
    if kind == "nf4":  # 4 bits move the numbers: a test that dequantized nothing would not see it
        assert np.abs(float_base - want).max() > 1e-3


def test_config_refuses_a_quantized_base_for_full_finetuning():
    with pytest.raises(ConfigValueError, match="freezes nothing"):
        TrainConfig(method="full", param_dtype="nf4").validate()
    assert TrainConfig(param_dtype="int8").forward_mode() == "factored"


@pytest.mark.slow
@pytest.mark.parametrize("kind", quant.QUANTIZED)
def test_no_float_copy_of_a_dequantized_weight_is_kept_for_backward(kind):
    """Dequantized inside a checkpoint: the backward pass keeps what a float32 base's keeps, and the gradients are
    those of the round-trip base."""
    from lora_jax.profiling import saved_for_backward_bytes
    from lora_jax.train_step import make_loss_fn

    mcfg = ModelConfig(model_type="bert", **WIDE)
    lcfg = lora.LoraConfig(rank=4, alpha=8)
    trainable, stored, dense = _quantized_and_round_trip(kind, lcfg, mcfg)
    loss_fn = make_loss_fn(mcfg, lcfg, mode="factored", regression=False)
    rng = np.random.default_rng(0)
    b = {"input_ids": rng.integers(3, 64, (4, 16)).astype(np.int32), "attention_mask": np.ones((4, 16), np.int32),
         "labels": np.array([0, 1, 0, 1], np.int32)}
    loss = lambda t, f, b: loss_fn(t, f, b, jax.random.key(2))[0]
    assert saved_for_backward_bytes(loss, trainable, stored, b) == saved_for_backward_bytes(loss, trainable, dense, b)
    with jax.default_matmul_precision("highest"):
        jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-6),
                     jax.grad(loss)(trainable, stored, b), jax.grad(loss)(trainable, dense, b))


@pytest.mark.slow
def test_a_quantized_run_keeps_its_codes_and_evaluates_exports_and_serves_as_it_trained(
        tiny_runs, tiny_bert_dir, glue_dir, tmp_path, capsys):
    from lora_jax import adapter as adapter_lib
    from lora_jax.cli import main
    from lora_jax.evaluate import evaluate_adapter, load_for_eval
    from lora_jax.prepare import setup
    from lora_jax.serve import Predictor
    from lora_jax.train import fit

    from .test_export import hf_logits
    from .test_train import run_steps, tiny_cfg

    cfg = tiny_cfg(tiny_bert_dir, glue_dir, tmp_path, task="rte", num_buckets=0, param_dtype="int8")
    s, state, frozen_before, trainable_before, _, _ = run_steps(cfg, 3)
    assert any(isinstance(v, quant.QuantizedKernel) for v in s.frozen.values())
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, s.frozen), frozen_before)  # codes untouched
    assert all(not np.array_equal(np.asarray(v), trainable_before[k]) for k, v in state.trainable.items())

    fit(cfg, progress=False)
    run = tmp_path / "run"
    report = json.loads((run / "report.json").read_text())
    assert "| frozen base stored as | int8 matrix kernels" in (run / "report.md").read_text()
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())[adapter_lib.BASE_QUANTIZATION] == "int8"
    assert evaluate_adapter(str(run / "adapter"), data_dir=str(glue_dir), batch_size=8) == {
        "dev": report["metrics"]["dev"]["final"]["values"]}
    # The trained adapter on the stored codes, as the run computes = the merged export in transformers.
    ids, mask = batch(60, 0)
    mcfg, lcfg, trained, _, _, _ = load_for_eval(str(run / "adapter"))
    ours = np.asarray(forward(mcfg, model_params(trained, setup(cfg).frozen, lcfg, mode="factored"),
                              {"input_ids": ids, "attention_mask": mask})["logits"])
    assert main(["export", "--adapter", str(run / "adapter"), "--merged", str(tmp_path / "m")]) == 0
    # (A float base instead of the dequantized one is off by about 1e-4 here: the bound is tighter.)
    assert np.abs(hf_logits(tmp_path / "m", ids, mask) - ours).max() <= 2e-5
    # One predictor serves one base: a float-base adapter beside it is refused, by name.
    p = Predictor({"q": str(run / "adapter"), "float": str(tiny_runs["rte"] / "adapter")})
    assert "q" in p.adapters and "float" in p.errors and "stored as float" in p.errors["float"]
    capsys.readouterr()
