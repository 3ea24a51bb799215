"""The sparsity-gated rank (``--rank-allocation gate``, lora_jax/gate.py): the proximal L1 step, ΔW = 0 at
init, the gate learning rate that lets an unpushed gate close by the end of any run, the labels that give
the gates their own optimizer, and a run whose closed components are dropped from the saved adapter, which
computes what the trained state computes and exports to peft with the same logits."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lora_jax import adaptive, gate, lora, weights
from lora_jax import tree as tree_lib
from lora_jax.config import ConfigValueError, TrainConfig
from lora_jax.optim import schedule

ALL = lora.TARGET_PRESETS["all"]


def test_soft_threshold_is_the_proximal_step_of_the_l1_norm():
    tx = gate.soft_threshold(lambda t: 0.3 * (t + 1))
    params = {"g": jnp.array([1.0, 0.2, -0.5, 0.0, -0.1])}
    state = tx.init(params)
    updates = {"g": jnp.array([0.1, -0.05, 0.0, 0.2, 0.5])}
    out, state = tx.update(updates, state, params)
    z = params["g"] + updates["g"]  # [1.1, 0.15, -0.5, 0.2, 0.4], threshold 0.3 at the first update
    np.testing.assert_allclose(params["g"] + out["g"], [0.8, 0.0, -0.2, 0.0, 0.1], atol=1e-7)
    # The argmin of 0.5 (x - z)^2 + tau |x| over a fine grid: the same point.
    grid = np.linspace(-2, 2, 40001)
    for zi, xi in zip(np.asarray(z), np.asarray(params["g"] + out["g"])):
        assert abs(grid[np.argmin(0.5 * (grid - zi) ** 2 + 0.3 * np.abs(grid))] - xi) < 1e-4
    out, _ = tx.update(updates, state, params)  # the count moved on: threshold 0.6
    np.testing.assert_allclose(params["g"] + out["g"], [0.5, 0.0, 0.0, 0.0, 0.0], atol=1e-7)
    with pytest.raises(gate.GateError, match="needs the parameters"):
        tx.update(updates, state)


def test_init_keeps_lora_factors_with_open_gates_and_zero_update(tiny_bert_dir):
    _, params, _ = weights.from_pretrained(str(tiny_bert_dir), num_labels=2)
    lcfg = lora.LoraConfig(rank=4, targets=ALL)
    plain = lora.init(params, lcfg, jax.random.key(0))
    gated = gate.init(plain)
    assert set(gated) == set(plain) and len(gated) == 12
    for path, ad in gated.items():
        assert np.array_equal(ad["p"], plain[path]["a"]) and np.array_equal(ad["q"], plain[path]["b"])
        assert np.array_equal(ad["lam"], np.ones(4, np.float32))
    merged = lora.merge(params, adaptive.as_lora(gated), lcfg)
    for path, w in lora.flatten(params).items():  # ΔW = 0: B starts at zero
        assert np.array_equal(np.asarray(lora.flatten(merged)[path]), np.asarray(w)), path
    with pytest.raises(gate.GateError, match="plain LoRA factors"):
        gate.init({"x": {"a": jnp.ones((3, 2)), "b": jnp.zeros((2, 3)), "m": jnp.ones(3)}})


def _run_gate(grad: float, sparsity: float, steps: int, warmup: float = 0.06) -> float:
    """A gate's value after ``steps`` updates of a constant gradient under the gate optimizer."""
    tx = gate.optimizer(schedule(1.0, steps, warmup), sparsity, steps)
    g = {"g": jnp.ones((1,))}
    state = tx.init(g)
    for _ in range(steps):
        u, state = tx.update({"g": jnp.full((1,), grad)}, state, g)
        g = optax.apply_updates(g, u)
    return float(g["g"][0])


@pytest.mark.parametrize("steps", [40, 300])
def test_the_gate_rate_lets_an_unpushed_gate_close_by_the_end_of_any_run(steps):
    # Nothing pushes the gate: the threshold alone moves it, by sparsity * TRAVEL over the whole run.
    assert _run_gate(0.0, 0.55, steps) == 0.0
    assert _run_gate(0.0, 0.45, steps) == pytest.approx(1 - 0.45 * gate.TRAVEL, abs=1e-4)
    # A steady push (the loss falls as the gate grows): Adam's direction is 1, the threshold takes half.
    assert _run_gate(-1e-3, 0.5, steps) == pytest.approx(1 + 0.5 * gate.TRAVEL, abs=1e-3)
    assert _run_gate(0.0, 0.0, steps) == 1.0  # sparsity 0: nothing closes
    with pytest.raises(gate.GateError, match="--gate-sparsity"):
        gate.optimizer(schedule(1.0, steps, 0.0), -0.1, steps)


def test_labels_give_the_gates_their_own_optimizer():
    keys = {f: tree_lib.adapter_key("enc/q/kernel", f) for f in ("p", "lam", "q")}
    label_of = {keys["p"]: lora.LORA, keys["lam"]: lora.LORA, keys["q"]: lora.LORA,
                tree_lib.param_key("classifier/kernel"): lora.TRAINABLE}
    assert gate.labels(label_of) == {keys["p"]: lora.LORA_A, keys["lam"]: gate.GATE, keys["q"]: lora.LORA_B,
                                     tree_lib.param_key("classifier/kernel"): lora.TRAINABLE}


def test_closed_gates_are_dropped_without_changing_delta_w():
    rng = np.random.default_rng(0)
    trainable = {}
    for path, lam in (("x/kernel", [0.7, 0.0, -1.2]), ("y/kernel", [0.0, 0.0, 0.0])):
        trainable[tree_lib.adapter_key(path, "p")] = rng.standard_normal((5, 3)).astype(np.float32)
        trainable[tree_lib.adapter_key(path, "lam")] = np.array(lam, np.float32)
        trainable[tree_lib.adapter_key(path, "q")] = rng.standard_normal((3, 4)).astype(np.float32)
    assert gate.final_ranks(trainable) == {"x/kernel": 2, "y/kernel": 0}
    assert int(gate.total_rank(trainable)) == 2
    saved, ranks = adaptive.truncate(trainable, gate.final_mask(trainable), scale=0.5)
    assert ranks == {"x/kernel": 2}  # a matrix with every gate closed keeps no adapter
    dense = {p: 0.5 * ad["a"] @ ad["b"] for p, ad in adaptive.as_lora(
        {p: {f: trainable[tree_lib.adapter_key(p, f)] for f in ("p", "lam", "q")} for p in ("x/kernel",)}).items()}
    a, b = saved[tree_lib.adapter_key("x/kernel", "a")], saved[tree_lib.adapter_key("x/kernel", "b")]
    np.testing.assert_allclose(a @ b, dense["x/kernel"], rtol=1e-6)


def test_bad_combinations_are_refused():
    for bad, match in [(dict(rank_allocation="gate", method="full"), "needs --method lora"),
                       (dict(rank_allocation="gate", dora=True), "not with --dora"),
                       (dict(rank_allocation="gate", gate_sparsity=2.5), "--gate-sparsity must be in"),
                       (dict(rank_allocation="gate", gate_sparsity=-1.0), "--gate-sparsity must be in")]:
        with pytest.raises(ConfigValueError, match=match):
            TrainConfig(**bad).validate()
    TrainConfig(rank_allocation="eva", dora=True).validate()  # EVA keeps DoRA's magnitudes


@pytest.mark.slow
def test_gated_run_drops_closed_components_and_exports_them_to_peft(tiny_bert_dir, glue_dir, tmp_path):
    from lora_jax import adapter as adapter_lib
    from lora_jax.cli import main
    from lora_jax.eval_step import model_params
    from lora_jax.model import forward
    from lora_jax.train import fit

    from .test_adapter import batch
    from .test_checkpoint import _tiny
    from .test_export import hf_logits, lora_jax_logits, rewrite_adapter

    out = tmp_path / "run"
    cfg = _tiny(tiny_bert_dir, glue_dir, out, rank_allocation="gate", targets="all", lora_rank=4, lora_alpha=4.0,
                gate_sparsity=0.6, lr=5e-3, batching="random", num_buckets=0)
    report, state = fit(cfg, progress=False)
    assert report["compilations"] == 1  # one batch shape, and gates that close change no shape
    chosen = report["ranks_from_data"]
    assert chosen["allocation"] == "gate" and chosen["start_rank"] == 4 and chosen["matrices"] == 12
    ranks = chosen["ranks"]
    assert 0 < sum(ranks.values()) < 4 * 12  # some closed, some open
    assert ranks == gate.final_ranks({k: np.asarray(v) for k, v in state.trainable.items()})
    logged = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    in_use = [r["rank"] for r in logged if "rank" in r]
    assert in_use[0] <= 48 and in_use[-1] == sum(ranks.values())
    assert "`--rank-allocation gate`" in (out / "report.md").read_text()
    _, saved = adapter_lib.load(out / "adapter")
    assert {tree_lib.adapter_path(k)[0]: v.shape[1] for k, v in saved.items() if k.endswith("/a")} == \
        {p: r for p, r in ranks.items() if r}

    # The saved adapter computes what the trained gated state computes.
    mcfg, params, _ = weights.from_pretrained(str(tiny_bert_dir), num_labels=2)
    frozen = {tree_lib.param_key(p): v for p, v in lora.flatten(params).items() if not p.startswith("classifier/")}
    ids = np.random.default_rng(0).integers(5, mcfg.vocab_size, (4, 12)).astype(np.int32)
    inputs = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    want = np.asarray(forward(mcfg, model_params(state.trainable, frozen, cfg.lora_config(), mode="merged"),
                              inputs)["logits"])
    meta, _ = adapter_lib.load(out / "adapter")
    got = np.asarray(forward(mcfg, model_params(saved, frozen, adapter_lib.lora_config(meta), mode="merged"),
                             inputs)["logits"])
    np.testing.assert_allclose(got, want, atol=1e-5)

    # peft's PeftModel, with the rank_pattern of the surviving ranks, gives our logits. The gates of a
    # 12-step run are small, and A holds them: A is scaled up and B moved, so that ΔW shows in the logits.
    pytest.importorskip("peft")
    assert json.loads((out / "peft_adapter" / "adapter_config.json").read_text())["rank_pattern"]
    from lora_jax.model import ModelConfig

    adapter_lib.export(tmp_path / "louder", {k: 100 * v if k.endswith("/a") else v for k, v in saved.items()},
                       mcfg=ModelConfig(**meta["model_config"]), lcfg=adapter_lib.lora_config(meta),
                       base_model=meta["base_model"], task=meta["task"], label_names=tuple(meta["label_names"]),
                       max_seq_len=meta["max_seq_len"], base_fingerprint=meta["base_fingerprint"])
    adapter = rewrite_adapter(tmp_path / "louder", tmp_path / "moved")
    assert main(["export", "--adapter", str(adapter), "--peft", str(tmp_path / "p")]) == 0
    ids, mask = batch(60, 0)
    ours, _ = lora_jax_logits(adapter, ids, mask)
    assert np.abs(hf_logits(tiny_bert_dir, ids, mask, peft_dir=tmp_path / "p") - ours).max() <= 1e-4


@pytest.mark.slow
def test_resume_continues_the_gates_bit_identically(tiny_bert_dir, glue_dir, tmp_path):
    from safetensors.numpy import load_file

    from lora_jax.train import fit

    from .test_checkpoint import _tiny, as_if_killed_after_step_4

    run = tmp_path / "run"
    cfg = _tiny(tiny_bert_dir, glue_dir, run, rank_allocation="gate", targets="all", lora_rank=4, lora_alpha=4.0,
                gate_sparsity=0.6, lr=5e-3)
    ref, _ = fit(cfg, progress=False)
    as_if_killed_after_step_4(run, tmp_path / "ref-adapter")
    report, state = fit(cfg, resume=True, progress=False)
    assert int(state.step) == 12 and report["resumed"]
    assert report["ranks_from_data"] == ref["ranks_from_data"] and report["metrics"] == ref["metrics"]
    assert 0 < report["ranks_from_data"]["total_rank"] < 48  # the threshold's count resumed too: gates closed
    a, b = (load_file(str(d / "adapter.safetensors")) for d in (tmp_path / "ref-adapter", run / "adapter"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
