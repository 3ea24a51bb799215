"""PiSSA and OLoRA: the pretrained model at step 0, peft's factors and residual, and a trained adapter
that is saved as a plain one for the original base (never the residual) with the same logits."""

import jax
import numpy as np
import pytest

from lora_jax import lora, lora_init
from lora_jax import tree as tree_lib
from lora_jax.config import ConfigValueError, TrainConfig
from lora_jax.model import ModelConfig, forward, init_params

from .conftest import TINY
from .test_combine import one_linear

HOWS = ["pissa", "olora"]


def tiny_bert():
    mcfg = ModelConfig(model_type="bert", **{**TINY, "num_labels": 2})
    return mcfg, init_params(mcfg, jax.random.key(0))


def logits(mcfg, params, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, mcfg.vocab_size, (3, 12)).astype(np.int32)
    with jax.default_matmul_precision("highest"):
        return np.asarray(forward(mcfg, params, {"input_ids": ids, "attention_mask": np.ones_like(ids)})["logits"])


@pytest.mark.parametrize("how", HOWS)
def test_step_zero_is_the_pretrained_model(how):
    mcfg, params = tiny_bert()
    lcfg = lora.LoraConfig(rank=4, alpha=8, targets=lora.TARGET_PRESETS["all"], init_a=how)
    initial = lora_init.init(params, lcfg)
    res = lora_init.residual(params, initial, lcfg)
    for path, f in initial.items():
        assert np.abs(f["a"]).max() > 0.01 and np.abs(f["b"]).max() > 0.01  # both factors start away from 0
        w = np.asarray(tree_lib.flatten(params)[path])
        assert np.abs(np.asarray(tree_lib.flatten(res)[path]) - w).max() > 0.01  # the base itself moved
    np.testing.assert_allclose(logits(mcfg, lora.apply(res, initial, lcfg)), logits(mcfg, params), atol=1e-5)
    if how == "pissa":  # s·A0·B0 is the best rank-r part: the residual's singular values are the rest
        k = np.asarray(tree_lib.flatten(params)[path], np.float64)
        sv = np.linalg.svd(k, compute_uv=False)
        np.testing.assert_allclose(np.linalg.svd(np.asarray(tree_lib.flatten(res)[path], np.float64),
                                                 compute_uv=False)[:len(sv) - 4], sv[4:], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("how", HOWS)
def test_factors_and_residual_match_peft(how):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    net = one_linear()
    w = net.lin.weight.detach().numpy().copy()  # torch (out, in); our kernel is its transpose
    model = peft.get_peft_model(net, peft.LoraConfig(r=3, lora_alpha=6, target_modules=["lin"], init_lora_weights=how))
    layer = model.base_model.model.lin
    lcfg = lora.LoraConfig(rank=3, alpha=6, targets=("lin/kernel",), trainable=(), init_a=how)
    params = {"lin": {"kernel": w.T}}
    initial = lora_init.init(params, lcfg)
    ours = lcfg.scale * initial["lin/kernel"]["a"] @ initial["lin/kernel"]["b"]
    theirs = layer.get_delta_weight("default").detach().numpy().T
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    np.testing.assert_allclose(np.asarray(lora_init.residual(params, initial, lcfg)["lin"]["kernel"]),
                               layer.base_layer.weight.detach().numpy().T, atol=1e-5)
    if how == "olora":  # QR is unique once R's diagonal signs are fixed: the factors themselves agree
        np.testing.assert_allclose(initial["lin/kernel"]["b"], layer.lora_B["default"].weight.detach().numpy().T, atol=1e-5)


def test_plain_equivalent_applies_to_the_original_base():
    mcfg, params = tiny_bert()
    lcfg = lora.LoraConfig(rank=4, alpha=8, init_a="pissa", rslora=True)
    initial = lora_init.init(params, lcfg)
    res = lora_init.residual(params, initial, lcfg)
    rng = np.random.default_rng(1)
    trained = {tree_lib.adapter_key(p, x): f[x] + 0.1 * rng.standard_normal(f[x].shape).astype(np.float32)
               for p, f in initial.items() for x in ("a", "b")}
    trained_tree = {p: {x: trained[tree_lib.adapter_key(p, x)] for x in ("a", "b")} for p in initial}
    plain, pcfg = lora_init.plain_equivalent(trained, initial, lcfg)
    assert pcfg.rank == 8 and pcfg.scale == pytest.approx(lcfg.scale) and pcfg.rslora
    plain_tree = {p: {x: plain[tree_lib.adapter_key(p, x)] for x in ("a", "b")} for p in initial}
    np.testing.assert_allclose(logits(mcfg, lora.merge(params, plain_tree, pcfg)),
                               logits(mcfg, lora.merge(res, trained_tree, lcfg)), atol=1e-5)


def test_config_errors():
    for bad, match in [(dict(method="adalora"), "needs --method lora"),
                       (dict(init_adapter="x"), "choose one")]:
        with pytest.raises(ConfigValueError, match=match):
            TrainConfig(lora_init="pissa", **bad).validate()
    with pytest.raises(lora.LoraError, match="lora_init.init"):
        lora.init({"k": np.ones((4, 4))}, lora.LoraConfig(rank=2, targets=("k",), trainable=(), init_a="olora"),
                  jax.random.key(0))


@pytest.mark.slow
@pytest.mark.parametrize("how", HOWS)
def test_trained_run_saves_an_adapter_for_the_original_base(how, tiny_bert_dir, glue_dir, tmp_path):
    """The run's own model (residual + trained factors) and its saved adapter on the original base give the
    same logits; the peft export is the same plain rank-2r adapter."""
    import json

    from lora_jax.evaluate import load_for_eval
    from lora_jax.train import fit

    cfg = TrainConfig(task="rte", model=str(tiny_bert_dir), data_dir=str(glue_dir), output_dir=str(tmp_path / "r"),
                      batch_size=8, max_seq_len=32, num_buckets=0, max_steps=4, lr=1e-2, lora_init=how, lora_rank=4)
    _, state = fit(cfg, progress=False)
    from lora_jax.prepare import initial_trainable
    from lora_jax import weights

    mcfg = weights.read_config(tiny_bert_dir, num_labels=2)
    _, _, frozen, _, _, _ = initial_trainable(cfg, tiny_bert_dir, mcfg)  # the residual base, as training had it
    run = lora.combine(frozen, {k: np.asarray(v) for k, v in state.trainable.items()})
    run_logits = logits(mcfg, lora.apply(run["params"], run["lora"], cfg.lora_config()))
    mcfg2, lcfg2, trained, frozen2, _, meta = load_for_eval(str(tmp_path / "r" / "adapter"))
    saved = lora.combine(frozen2, trained)
    assert lcfg2.rank == 8 and meta["lora"]["init_a"] == how
    np.testing.assert_allclose(logits(mcfg2, lora.apply(saved["params"], saved["lora"], lcfg2)), run_logits, atol=1e-5)
    assert json.loads((tmp_path / "r" / "peft_adapter" / "adapter_config.json").read_text())["r"] == 8
