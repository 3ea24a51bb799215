"""Adaptive rank (AdaLoRA): ΔW = 0 at init, the budget schedule, the allocator keeping the most
important triplets, one compilation for a whole run, truncated adapters equal to the trained
model, peft export with a rank_pattern (PeftModel in torch gives the same logits), bad input."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import adapter as adapter_lib
from lora_jax import adaptive, lora, weights
from lora_jax import batching
from lora_jax import data as data_lib
from lora_jax.adaptive import AdaLoraConfig, AdaptiveError
from lora_jax.cli import train_main
from lora_jax.config import TrainConfig
from lora_jax.evaluate import evaluate_adapter
from lora_jax.model import forward
from lora_jax.eval_step import model_params
from lora_jax.prepare import setup
from lora_jax.train import fit
from lora_jax.train_step import task_loss

QV = lora.TARGET_PRESETS["qv"]
ALL = lora.TARGET_PRESETS["all"]


def _cfg(**kw) -> AdaLoraConfig:
    base = dict(init_rank=4, target_rank=2, total_steps=100, warmup_steps=10, final_steps=20, interval=5)
    return AdaLoraConfig(**{**base, **kw})


def test_delta_w_is_zero_at_init(tiny_bert_dir):
    _, params, _ = weights.from_pretrained(str(tiny_bert_dir), num_labels=2)
    adapters = adaptive.init(params, ALL, 4, jax.random.key(0))
    assert len(adapters) == 12
    ad = next(iter(adapters.values()))
    assert ad["p"].shape[1] == 4 and ad["lam"].shape == (4,) and ad["q"].shape[0] == 4
    assert float(jnp.abs(ad["p"]).max()) > 0 and float(jnp.abs(ad["q"]).max()) > 0  # only λ is zero
    merged = lora.merge(params, adaptive.as_lora(adapters), lora.LoraConfig(rank=4, targets=ALL))
    for path, w in lora.flatten(params).items():
        assert np.array_equal(np.asarray(lora.flatten(merged)[path]), np.asarray(w)), path


def test_orthogonal_init_starts_where_the_regulariser_points(tiny_bert_dir):
    _, params, _ = weights.from_pretrained(str(tiny_bert_dir), num_labels=2)
    orth = adaptive.init(params, QV, 4, jax.random.key(0), how="orthogonal")
    gauss = adaptive.init(params, QV, 4, jax.random.key(0))
    assert float(adaptive.orthogonality(orth)) < 1e-8 < float(adaptive.orthogonality(gauss))
    assert all(float(jnp.abs(a["a"]).max()) == 0 for a in adaptive.as_lora(orth).values())  # ΔW = 0 still
    with pytest.raises(AdaptiveError, match="--adalora-init must be gaussian or orthogonal"):
        adaptive.init(params, QV, 4, jax.random.key(0), how="svd")


def test_gradient_directions_are_the_top_singular_triplets():
    g = np.random.default_rng(0).normal(size=(12, 7))
    d = adaptive.gradient_directions({"w": g}, 3)["w"]
    p, q = d["p"].astype(np.float64), d["q"].astype(np.float64)
    assert p.shape == (12, 3) and q.shape == (3, 7)
    np.testing.assert_allclose(p.T @ p, np.eye(3), atol=1e-6)
    np.testing.assert_allclose(q @ q.T, np.eye(3), atol=1e-6)
    # Singular values by another route (eigenvalues of GᵀG): P, Q pick the largest three, in order,
    # and P·diag(σ)·Q is the best rank-3 approximation (what is left is the other σ²).
    sigma = np.sqrt(np.linalg.eigvalsh(g.T @ g)[::-1])
    np.testing.assert_allclose(np.diag(p.T @ g @ q.T), sigma[:3], rtol=1e-5)
    rest = g - p @ np.diag(sigma[:3]) @ q
    np.testing.assert_allclose(np.sum(rest**2), np.sum(sigma[3:] ** 2), rtol=1e-4)


def test_budget_schedule_is_cubic_from_initial_to_target():
    cfg = _cfg()
    n = 3  # b0 = 12, bT = 6; pruning spans steps 10..80
    b = [int(cfg.budget(t, n)) for t in range(101)]
    assert b[:11] == [12] * 11 and b[80:] == [6] * 21
    assert all(x >= y for x, y in zip(b, b[1:]))
    assert b[45] == round(6 + 6 * 0.5 ** 3)


def test_schedule_shares_set_the_steps_a_step_count_overrides():
    cfg = TrainConfig(task="rte", method="adalora", adalora_warmup_frac=0.5, adalora_final_frac=0.3)
    s = cfg.adalora_config(600)
    assert (s.warmup_steps, s.final_steps) == (300, 180)
    d = TrainConfig(task="rte", method="adalora").adalora_config(600)
    assert (d.warmup_steps, d.final_steps) == (60, 150)  # the defaults: 10% and 25%
    s = dataclasses.replace(cfg, adalora_final_steps=20).adalora_config(600)
    assert (s.warmup_steps, s.final_steps) == (300, 20)


def test_orthogonality_is_zero_only_for_orthonormal_factors():
    key = jax.random.key(0)
    p = jnp.linalg.qr(jax.random.normal(key, (16, 4)))[0]
    q = jnp.linalg.qr(jax.random.normal(jax.random.key(1), (8, 4)))[0].T
    assert float(adaptive.orthogonality({"w": {"p": p, "lam": jnp.ones(4), "q": q}})) < 1e-10
    assert float(adaptive.orthogonality({"w": {"p": 2 * p, "lam": jnp.ones(4), "q": q}})) > 1.0


def _reference_scores(cfg, aux, trainable, grads, paths):
    """The paper's importance, written out with numpy: EMA of |θ g|, EMA of its deviation, triplet sum."""
    scores = []
    for path in paths:
        s = {}
        for f in ("p", "lam", "q"):
            k = f"lora/{path}/{f}"
            sens = np.abs(np.asarray(trainable[k]) * np.asarray(grads[k]))
            ipt = cfg.beta1 * np.asarray(aux["ipt"][k]) + (1 - cfg.beta1) * sens
            unc = cfg.beta2 * np.asarray(aux["unc"][k]) + (1 - cfg.beta2) * np.abs(sens - ipt)
            s[f] = ipt * unc
        scores.append(s["lam"] + s["p"].mean(axis=0) + s["q"].mean(axis=1))
    return np.stack(scores)


def test_allocator_keeps_the_budget_of_most_important_triplets():
    rng = np.random.default_rng(0)
    paths = ["m0/kernel", "m1/kernel", "m2/kernel"]
    trainable, grads = {}, {}
    for path in paths:
        for f, shape in (("p", (6, 4)), ("lam", (4,)), ("q", (4, 5))):
            trainable[f"lora/{path}/{f}"] = jnp.asarray(rng.normal(size=shape), jnp.float32)
            grads[f"lora/{path}/{f}"] = jnp.asarray(rng.normal(size=shape), jnp.float32)
    trainable["params/classifier/bias"] = jnp.zeros(2)
    grads["params/classifier/bias"] = jnp.ones(2)
    cfg = _cfg()
    aux = adaptive.init_state(trainable)
    # Some history, so the uncertainty term is not trivially zero.
    aux = {**aux, "ipt": {k: 0.5 * jnp.abs(v) for k, v in aux["ipt"].items()}}
    ref = _reference_scores(cfg, aux, trainable, grads, paths)

    step = 45  # a reallocation step inside the pruning phase
    new_aux, out, info = adaptive.allocate(cfg, aux, trainable, grads, jnp.asarray(step))
    budget = int(cfg.budget(step, 3))
    mask = np.stack([np.asarray(new_aux["mask"][p]) for p in paths])
    assert int(mask.sum()) == budget == int(info["rank"]) < 12
    kept, dropped = ref[mask > 0], ref[mask == 0]
    assert kept.min() >= dropped.max()
    for i, p in enumerate(paths):
        lam = np.asarray(out[f"lora/{p}/lam"])
        np.testing.assert_array_equal(lam, np.asarray(trainable[f"lora/{p}/lam"]) * mask[i])
        np.testing.assert_array_equal(np.asarray(out[f"lora/{p}/p"]), np.asarray(trainable[f"lora/{p}/p"]))

    # Between reallocations the mask holds and λ is left free to regrow.
    aux2, out2, _ = adaptive.allocate(cfg, new_aux, out, grads, jnp.asarray(step + 1))
    np.testing.assert_array_equal(np.stack([np.asarray(aux2["mask"][p]) for p in paths]), mask)
    assert all(np.array_equal(np.asarray(out2[k]), np.asarray(out[k])) for k in out)
    # In the final phase the last mask applies at every step.
    regrown = {**out, **{f"lora/{p}/lam": jnp.ones(4) for p in paths}}
    _, out3, _ = adaptive.allocate(cfg, aux2, regrown, grads, jnp.asarray(95))
    np.testing.assert_array_equal(np.stack([np.asarray(out3[f"lora/{p}/lam"]) for p in paths]), mask)
    # Before warm-up ends nothing is masked.
    _, _, info4 = adaptive.allocate(cfg, adaptive.init_state(trainable), trainable, grads, jnp.asarray(5))
    assert int(info4["rank"]) == 12 and int(info4["budget"]) == 12


def _adalora(model, glue, out, **kw) -> TrainConfig:
    base = dict(task="rte", model=str(model), data_dir=str(glue), method="adalora", targets="all",
                adalora_init_rank=4, adalora_target_rank=2, adalora_interval=3, batch_size=8, max_seq_len=32,
                num_buckets=1, max_steps=30, lr=5e-3, warmup_ratio=0.0, log_every=1, output_dir=str(out))
    return TrainConfig(**{**base, **kw})


@pytest.mark.slow
def test_gradient_init_starts_lambda_on_the_task_gradient(tiny_bert_dir, glue_dir, tmp_path):
    """--adalora-init gradient: ΔW = 0 still, and ∂L/∂λ_i is scale · σ_i(∂L/∂W) on the probe batches,
    at least what random orthonormal P, Q give (Ky Fan: no orthonormal pair projects more)."""
    cfg = _adalora(tiny_bert_dir, glue_dir, tmp_path / "g", adalora_init="gradient", adalora_init_batches=2)
    grad_init = setup(cfg)
    orth_init = setup(dataclasses.replace(cfg, adalora_init="orthogonal"))
    lcfg = cfg.lora_config()
    batches = [batching.collate(grad_init.train, idx, grad_init.buckets, cfg.batch_size)
               for idx in batching.train_order(grad_init.train.lengths, cfg.batch_size, seed=cfg.seed, epoch=0)[:2]]

    def loss(trainable, frozen):
        params = model_params(trainable, frozen, lcfg, mode="factored")
        return sum(task_loss(forward(grad_init.mcfg, params, b)["logits"], b["labels"], False) for b in batches)

    d_lam = jax.grad(loss)(grad_init.trainable, grad_init.frozen)
    d_lam_orth = jax.grad(loss)(orth_init.trainable, orth_init.frozen)
    d_w = jax.grad(loss, argnums=1)(grad_init.trainable, grad_init.frozen)
    paths = list(adaptive.svd_keys(grad_init.trainable))
    assert len(paths) == 12
    ratio = []
    for path in paths:
        assert not np.any(np.asarray(grad_init.trainable[f"lora/{path}/lam"]))  # λ = 0: ΔW = 0
        g = np.asarray(d_w[f"params/{path}"], np.float64)
        g = g.reshape(-1, g.shape[-1])
        sigma = np.sqrt(np.clip(np.linalg.eigvalsh(g.T @ g)[::-1][:4], 0, None))
        got = np.abs(np.asarray(d_lam[f"lora/{path}/lam"], np.float64))
        np.testing.assert_allclose(got, lcfg.scale * sigma, rtol=1e-3, atol=1e-7, err_msg=path)
        random = np.linalg.norm(np.asarray(d_lam_orth[f"lora/{path}/lam"]))
        assert np.linalg.norm(got) >= random * (1 - 1e-4), path
        ratio.append(np.linalg.norm(got) / max(random, 1e-12))
    assert np.median(ratio) > 2  # random directions see a small share of the gradient


@pytest.mark.slow
def test_adalora_run_compiles_once_and_saves_the_trained_model(tiny_bert_dir, glue_dir, tmp_path):
    cfg = _adalora(tiny_bert_dir, glue_dir, tmp_path / "run")
    report, state = fit(cfg, progress=False)
    assert report["compilations"] == 1  # masks, not shapes: one train step for the whole run
    ada = report["adaptive"]
    ranks = json.loads((tmp_path / "run" / "adaptive" / "ranks.json").read_text())
    assert ada["matrices"] == 12 and ada["final_total_rank"] == 24 == sum(ranks["ranks"].values())
    assert len(set(ranks["ranks"].values())) > 1  # the budget moved between matrices
    for f in ("ranks.png", "budget.png"):
        assert (tmp_path / "run" / "adaptive" / f).stat().st_size > 1000
    logged = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    budgets = [r["budget"] for r in logged if "budget" in r]
    assert budgets[0] == 48 and budgets[-1] == 24 and all(x >= y for x, y in zip(budgets, budgets[1:]))
    assert report["lora_params"] < report["lora_params_during_training"]

    # The saved (truncated) adapter computes what the trained SVD-form state computes.
    mcfg, params, _ = weights.from_pretrained(str(tiny_bert_dir), num_labels=2)
    frozen = {f"params/{p}": v for p, v in lora.flatten(params).items() if not p.startswith("classifier/")}
    ids = np.random.default_rng(0).integers(5, mcfg.vocab_size, (4, 12)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    trained_state = model_params(state.trainable, frozen, cfg.lora_config(), mode="merged")
    want = np.asarray(forward(mcfg, trained_state, batch)["logits"])
    meta, saved = adapter_lib.load(tmp_path / "run" / "adapter")
    lcfg = adapter_lib.lora_config(meta)
    got = np.asarray(forward(mcfg, model_params(saved, frozen, lcfg, mode="merged"), batch)["logits"])
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.abs(want).max() > 0
    # ... and evaluating it gives the run's final dev metrics.
    res = evaluate_adapter(tmp_path / "run" / "adapter", data_dir=str(glue_dir))
    assert res["dev"] == pytest.approx(report["metrics"]["dev"]["final"]["values"])


torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def test_truncated_adapter_exports_to_peft_with_rank_pattern(tmp_path):
    """Ranks 0..4 across matrices (one pruned to nothing): PeftModel loads it, same logits, and back."""
    from .test_adapter import save_torch_checkpoint

    mcfg, params, _ = weights.from_pretrained(str(save_torch_checkpoint(tmp_path / "base", "roberta")), num_labels=2)
    lcfg = lora.LoraConfig(rank=4, alpha=8, targets=QV)
    adapters = adaptive.init(params, QV, 4, jax.random.key(0))
    trainable = {f"params/{p}": np.asarray(v) for p, v in lora.flatten(params).items() if p.startswith("classifier/")}
    masks = {}
    for i, (path, ad) in enumerate(adapters.items()):
        trainable[f"lora/{path}/p"] = np.asarray(ad["p"]) * 50
        trainable[f"lora/{path}/q"] = np.asarray(ad["q"]) * 50
        masks[path] = (np.arange(4) < i).astype(np.float32)  # ranks 0, 1, 2, 3
        trainable[f"lora/{path}/lam"] = np.linspace(0.5, 1.5, 4).astype(np.float32) * masks[path]
    leaves, ranks = adaptive.truncate(trainable, {"mask": masks}, lcfg.scale)
    assert sorted(ranks.values()) == [1, 2, 3]  # the rank-0 matrix is dropped, not saved as r = 0
    tlcfg = adaptive.truncated_config(lcfg, ranks)

    frozen = {f"params/{p}": v for p, v in lora.flatten(params).items() if not p.startswith("classifier/")}
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 99, (3, 10)).astype(np.int32)
    mask = np.ones_like(ids)
    batch = {"input_ids": ids, "attention_mask": mask}
    want = np.asarray(forward(mcfg, model_params({k: jnp.asarray(v) for k, v in trainable.items()}, frozen, lcfg,
                                                 mode="merged"), batch)["logits"])
    ours = np.asarray(forward(mcfg, model_params(leaves, frozen, tlcfg, mode="merged"), batch)["logits"])
    np.testing.assert_allclose(ours, want, atol=1e-5)

    adapter_lib.export_peft(tmp_path / "peft", leaves, mcfg=mcfg, lcfg=tlcfg, base_model=str(tmp_path / "base"))
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert sorted(cfg["rank_pattern"].values()) == [1, 2] and cfg["r"] == 3
    base = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=2)
    model = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(ids, dtype=torch.long),
                       attention_mask=torch.tensor(mask, dtype=torch.long)).logits.numpy()
    assert np.abs(theirs - want).max() <= 1e-4, np.abs(theirs - want).max()
    assert np.abs(want - np.asarray(forward(mcfg, params, batch)["logits"])).max() > 1e-3  # the adapter matters

    back_cfg, back = adapter_lib.import_peft(tmp_path / "peft", params, mcfg)
    again = np.asarray(forward(mcfg, model_params(back, frozen, back_cfg, mode="merged"), batch)["logits"])
    np.testing.assert_allclose(again, want, atol=1e-5)


@pytest.mark.parametrize("flags, message", [
    (["--adalora-init-rank", "4", "--adalora-target-rank", "6"], "--adalora-target-rank 6.0 must be in (0, init rank 4]"),
    (["--adalora-interval", "0"], "--adalora-interval must be > 0, got 0"),
    (["--adalora-init", "gradient", "--adalora-init-batches", "0"], "--adalora-init-batches must be > 0, got 0"),
    (["--adalora-warmup-steps", "5", "--adalora-final-steps", "3"],
     "--adalora-warmup-steps 5 + --adalora-final-steps 3 leave no steps to prune in a run of 8 steps"),
    (["--adalora-warmup-frac", "1.5"], "--adalora-warmup-frac must be in [0, 1), got 1.5"),
    (["--adalora-warmup-frac", "0.6", "--adalora-final-frac", "0.5"],
     "--adalora-warmup-frac 0.6 + --adalora-final-frac 0.5 leave no share of the run to prune"),
])
def test_bad_schedules_are_one_line_errors(flags, message, tiny_bert_dir, glue_dir, tmp_path, capsys):
    out = tmp_path / "r"
    argv = ["--task", "rte", "--preset", "tiny", "--method", "adalora", "--model", str(tiny_bert_dir),
            "--data-dir", str(glue_dir), "--output-dir", str(out), "--no-progress", *flags]
    assert train_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err
    assert not (out / "checkpoints").exists() and not (out / "report.json").exists()
