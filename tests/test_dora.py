"""DoRA (Liu et al., 2024): the adapted kernel m·(W + sAB)/||W + sAB||_c, computed as peft computes it.

Anchors: the model at init is the base; merged equals factored; one layer's output and its gradients
for A, B and m equal peft's DoraLinearLayer (the norm a constant in the backward pass), with and without
LoRA dropout; an exported adapter loads in PeftModel with equal logits and imports back; training keeps
the base bit-identical and moves m; a DoRA adapter refuses to be combined."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import adapter as adapter_lib
from lora_jax import lora, weights
from lora_jax import tree as tree_lib
from lora_jax.config import ConfigValueError, TrainConfig
from lora_jax.dropout import dropout
from lora_jax.model import ModelConfig, forward, init_params

from .conftest import TINY
from .test_adapter import batch, save_torch_checkpoint, torch_logits, trained_leaves

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def logits(mcfg, params, ids, mask):
    return np.asarray(forward(mcfg, params, {"input_ids": ids, "attention_mask": mask})["logits"])


def test_starts_at_the_base_and_merged_equals_factored():
    mcfg = ModelConfig(model_type="bert", **{**TINY, "num_labels": 2, "num_hidden_layers": 1})
    params = init_params(mcfg, jax.random.key(0))
    cfg = lora.LoraConfig(rank=4, alpha=8, dora=True, targets=lora.TARGET_PRESETS["all"])
    adapters = lora.init(params, cfg, jax.random.key(1))
    flat = tree_lib.flatten(params)
    for path, f in adapters.items():  # m = ||W||_c: one norm per output column
        np.testing.assert_allclose(f["m"], np.linalg.norm(np.asarray(flat[path]), axis=0), rtol=1e-6)
    ids, mask = batch(mcfg.vocab_size, mcfg.pad_token_id)
    # The encoder's output: a random model's logits hardly depend on its input, its hidden states do.
    hidden = jax.jit(lambda p: forward(mcfg, p, {"input_ids": ids, "attention_mask": mask})["hidden"])
    trained = lora.table(lora.combine(trained_leaves(params, cfg))["lora"])
    without_m = {p: {"a": f["a"], "b": f["b"]} for p, f in trained.items()}
    with jax.default_matmul_precision("highest"):
        base = hidden(params)
        np.testing.assert_allclose(hidden(lora.apply(params, adapters, cfg)), base, atol=1e-5)
        np.testing.assert_allclose(hidden(lora.merge(params, adapters, cfg)), base, atol=1e-5)
        factored = hidden(lora.apply(params, trained, cfg))
        merged = hidden(lora.merge(params, trained, cfg))
        plain = hidden(lora.merge(params, without_m, cfg))
    np.testing.assert_allclose(merged, factored, atol=1e-5)
    assert np.abs(merged - plain).max() > 0.1 and np.abs(merged - base).max() > 0.02  # m and ΔW both show


class FixedMask(torch.nn.Module):
    """peft's LoRA dropout replaced by a given multiplier: the same mask in both frameworks."""

    def __init__(self, multiplier):
        super().__init__()
        self.multiplier = multiplier

    def forward(self, x):
        return x * self.multiplier


@pytest.mark.parametrize("rate", [0.0, 0.3])
def test_one_layer_and_its_gradients_equal_peft(rate):
    d_in, d_out, r, alpha = 12, 10, 3, 6.0
    rng = np.random.default_rng(0)
    w, bias = rng.standard_normal((d_in, d_out)).astype(np.float32), rng.standard_normal(d_out).astype(np.float32)
    a = rng.standard_normal((d_in, r)).astype(np.float32) * 0.3
    b = rng.standard_normal((r, d_out)).astype(np.float32) * 0.3
    m = (np.linalg.norm(w, axis=0) * (1 + 0.3 * rng.standard_normal(d_out))).astype(np.float32)
    x = rng.standard_normal((2, 5, d_in)).astype(np.float32)
    c = rng.standard_normal((2, 5, d_out)).astype(np.float32)  # the loss is sum(y · c)
    key = jax.random.key(3) if rate else None
    scale = alpha / r

    def ours(a, b, m):
        y = jnp.asarray(x) @ lora.LoraKernel(jnp.asarray(w), a, b, key, m, scale, rate) + bias
        return jnp.sum(y * c), y

    with jax.default_matmul_precision("highest"):
        (_, y), grads = jax.value_and_grad(ours, argnums=(0, 1, 2), has_aux=True)(a, b, m)
        h = np.asarray(dropout(jnp.asarray(x), rate, key))

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(d_in, d_out))
    model = peft.get_peft_model(net, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["0"], use_dora=True,
                                                     lora_dropout=rate))
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.base_layer.weight.copy_(torch.tensor(w.T))
        layer.base_layer.bias.copy_(torch.tensor(bias))
        layer.lora_A["default"].weight.copy_(torch.tensor(a.T))
        layer.lora_B["default"].weight.copy_(torch.tensor(b.T))
        layer.lora_magnitude_vector["default"].weight.copy_(torch.tensor(m))
    if rate:
        layer.lora_dropout["default"] = FixedMask(torch.tensor(np.where(x != 0, h / x, 0.0)))
    model.train()
    ty = model(torch.tensor(x))
    (ty * torch.tensor(c)).sum().backward()
    np.testing.assert_allclose(np.asarray(y), ty.detach().numpy(), atol=1e-5)
    theirs = (layer.lora_A["default"].weight.grad.numpy().T, layer.lora_B["default"].weight.grad.numpy().T,
              layer.lora_magnitude_vector["default"].weight.grad.numpy())
    for name, g, t in zip("abm", grads, theirs):
        np.testing.assert_allclose(np.asarray(g), t, rtol=1e-4, atol=1e-5, err_msg=name)


def test_peft_export_loads_with_equal_logits_and_imports_back(tmp_path):
    mcfg, params, _ = weights.from_pretrained(str(save_torch_checkpoint(tmp_path / "base", "bert")), num_labels=2)
    cfg = lora.LoraConfig(rank=4, alpha=8, dora=True, targets=lora.TARGET_PRESETS["all"])
    trained = trained_leaves(params, cfg)
    ids, mask = batch(99, mcfg.pad_token_id)
    tree = lora.combine(tree_lib.base_keys(params), trained)
    ours = logits(mcfg, lora.apply(tree["params"], tree["lora"], cfg), ids, mask)
    adapter_lib.export_peft(tmp_path / "p", trained, mcfg=mcfg, lcfg=cfg, base_model="x")
    assert json.loads((tmp_path / "p" / "adapter_config.json").read_text())["use_dora"] is True
    base = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=2)
    model = peft.PeftModel.from_pretrained(base, tmp_path / "p").eval()
    assert np.abs(torch_logits(model, ids, mask) - ours).max() <= 1e-4
    # Saved by peft itself, read back by us: the same leaves and configuration.
    model.save_pretrained(tmp_path / "again")
    lcfg, leaves = adapter_lib.import_peft(tmp_path / "again", params, mcfg)
    assert lcfg.dora and set(leaves) == set(trained)
    for k, v in trained.items():
        np.testing.assert_allclose(leaves[k], v, atol=1e-6, err_msg=k)
    # A magnitude of the wrong width is caught before any arithmetic.
    bad = dict(trained)
    key = next(k for k in bad if k.endswith("/m"))
    bad[key] = bad[key][:-1]
    with pytest.raises(adapter_lib.AdapterError, match="DoRA magnitude of shape"):
        adapter_lib.check_fits(bad, params, "it")


def test_loraplus_puts_m_with_b():
    labels = lora.factor_labels({"lora/q/kernel/a": "lora", "lora/q/kernel/b": "lora", "lora/q/kernel/m": "lora",
                                 "params/classifier/kernel": "trainable"})
    assert labels == {"lora/q/kernel/a": "lora_a", "lora/q/kernel/b": "lora_b", "lora/q/kernel/m": "lora_b",
                      "params/classifier/kernel": "trainable"}


@pytest.mark.parametrize("bad, match", [(dict(method="full"), "--dora needs --method lora"),
                                        (dict(method="adalora"), "--dora needs --method lora"),
                                        (dict(lora_init="pissa"), "kaiming or gaussian, not pissa")])
def test_config_refuses_what_dora_cannot_do(bad, match):
    with pytest.raises(ConfigValueError, match=match):
        TrainConfig(dora=True, **bad).validate()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["merged", "factored"])
def test_training_moves_m_and_keeps_the_base(mode, tiny_bert_dir, glue_dir, tmp_path):
    from .test_train import run_steps, tiny_cfg

    cfg = tiny_cfg(tiny_bert_dir, glue_dir, tmp_path, num_buckets=0, dora=True)
    s, state, frozen_before, trainable_before, _, _ = run_steps(cfg, 4, mode=mode)
    for k, v in s.frozen.items():
        assert np.array_equal(np.asarray(v), frozen_before[k]), k
    ms = [k for k in trainable_before if k.endswith("/m")]
    assert ms and len(ms) == len([k for k in trainable_before if k.endswith("/a")])
    for k in ms:
        assert not np.array_equal(np.asarray(state.trainable[k]), trainable_before[k]), k
    assert s.counts["lora"] == sum(v.size for k, v in trainable_before.items() if k.startswith("lora/"))


@pytest.mark.slow
def test_merged_and_factored_steps_agree(tiny_bert_dir, glue_dir, tmp_path):
    from .test_train import run_steps, tiny_cfg

    cfg = tiny_cfg(tiny_bert_dir, glue_dir, tmp_path, num_buckets=0, dora=True)
    _, merged, *_ = run_steps(cfg, 3, mode="merged")
    _, factored, *_ = run_steps(cfg, 3, mode="factored")
    for k, v in merged.trainable.items():
        np.testing.assert_allclose(np.asarray(v), np.asarray(factored.trainable[k]), atol=2e-5, err_msg=k)


@pytest.mark.slow
def test_a_dora_run_exports_evaluates_and_does_not_combine(tiny_bert_dir, glue_dir, tmp_path, capsys):
    from lora_jax.cli import main
    from lora_jax.evaluate import evaluate_adapter, load_for_eval
    from lora_jax.train import fit

    from .test_export import hf_logits

    cfg = TrainConfig(task="rte", model=str(tiny_bert_dir), data_dir=str(glue_dir), output_dir=str(tmp_path / "r"),
                      batch_size=8, max_seq_len=32, num_buckets=0, max_steps=4, lr=1e-2, lora_rank=4, dora=True,
                      lora_dropout=0.1)
    fit(cfg, progress=False)
    run = tmp_path / "r"
    report = json.loads((run / "report.json").read_text())
    assert report["config"]["dora"] is True
    res = evaluate_adapter(str(run / "adapter"), data_dir=str(glue_dir), batch_size=8)
    assert res == {"dev": report["metrics"]["dev"]["final"]["values"]}
    mcfg, lcfg, trained, frozen, _, _ = load_for_eval(str(run / "adapter"))
    assert lcfg.dora and any(k.endswith("/m") for k in trained)
    ids, mask = batch(60, 0)
    tree = lora.combine(frozen, trained)
    ours = logits(mcfg, lora.apply(tree["params"], tree["lora"], lcfg), ids, mask)
    assert np.abs(hf_logits(tiny_bert_dir, ids, mask, peft_dir=run / "peft_adapter") - ours).max() <= 1e-4
    assert main(["export", "--adapter", str(run / "adapter"), "--merged", str(tmp_path / "m")]) == 0
    assert np.abs(hf_logits(tmp_path / "m", ids, mask) - ours).max() <= 1e-4
    capsys.readouterr()
    assert main(["combine", "--adapter", f"a={run / 'adapter'}", "--adapter", f"b={run / 'adapter'}",
                 "--how", "cat", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert "DoRA adapter does not combine" in err and len(err.splitlines()) == 1, err
