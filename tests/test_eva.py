"""Ranks chosen from the data (``--lora-rank auto``, lora_jax/eva.py): the input statistics that the probes
take inside a jitted forward, the global allocation, the factors, and a run whose per-matrix ranks are saved,
reported and exported to peft with the same logits."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import eva
from lora_jax import tree as tree_lib
from lora_jax.cli import main
from lora_jax.config import ConfigValueError, TrainConfig


def test_allocate_gives_the_budget_to_the_largest_shares_across_matrices():
    shares = {"a": np.array([0.5, 0.2, 0.1]), "b": np.array([0.3, 0.25, 0.05]), "c": np.array([0.01])}
    assert eva.allocate(shares, 4) == {"a": 2, "b": 2, "c": 0}
    assert eva.allocate(shares, 3) == {"a": 1, "b": 2, "c": 0}
    assert eva.allocate(shares, 7) == {"a": 3, "b": 3, "c": 1}
    assert sum(eva.allocate(shares, 5).values()) == 5


def test_components_are_the_inputs_principal_directions():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 6)) * np.array([5, 3, 2, 1, 0.5, 0.1]) + 40.0  # a large mean, as hidden states have
    cov = eva.covariance(x.T @ x, x.sum(0), len(x))
    np.testing.assert_allclose(cov, np.cov(x, rowvar=False, bias=True), atol=1e-8)
    shares, vecs = eva.components(cov, cap=3)
    _, s, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)  # PCA: the mean is not a direction
    np.testing.assert_allclose(shares, (s**2 / np.sum(s**2))[:3], rtol=1e-6)
    np.testing.assert_allclose(np.abs(vecs.T @ vt[:3].T), np.eye(3), atol=1e-6)
    shares, vecs = eva.components(np.diag([4.0, 1.0, 0.0]), cap=3)  # no variance along the third axis
    np.testing.assert_allclose(shares, [0.8, 0.2])
    np.testing.assert_allclose(np.abs(vecs), np.eye(3)[:, :2])
    with pytest.raises(eva.EvaError, match="no input"):
        eva.components(np.zeros((4, 4)), cap=2)
    with pytest.raises(eva.EvaError, match="no input"):
        eva.covariance(np.zeros((4, 4)), np.zeros(4), 0)


def test_init_starts_from_zero_updates_within_the_caps():
    rng = np.random.default_rng(1)
    spread = rng.standard_normal((500, 8))                                  # variance in every direction
    narrow = rng.standard_normal((500, 8)) * np.r_[10.0, np.full(7, 0.01)]  # nearly one direction
    grams = {"spread": spread.T @ spread, "narrow": narrow.T @ narrow, "flat": np.eye(8)}
    adapters, ranks = eva.init(grams, {"spread": 5, "narrow": 8, "flat": 8}, rank=2, rho=2.0)
    assert sum(ranks.values()) == 6 and max(ranks.values()) <= 4
    assert ranks["narrow"] == 1  # its one direction holds almost all of its variance; the rest is noise
    for p, ad in adapters.items():
        r = ranks[p]
        assert ad["a"].shape == (8, r) and ad["b"].shape == (r, {"spread": 5}.get(p, 8))
        # Orthogonal columns, each as loud on these inputs as a kaiming column is on average: tr C / (3 d_in).
        a, cov = np.asarray(ad["a"], np.float64), grams[p]
        level = np.trace(cov) / (3 * 8)
        np.testing.assert_allclose(a.T @ cov @ a, level * np.eye(r), rtol=1e-4, atol=1e-5 * level)
        assert not np.asarray(ad["b"]).any()  # ΔW = 0
    _, none = eva.init({"x": np.eye(3), "y": 100 * np.eye(3)}, {"x": 3, "y": 3}, rank=1, rho=1.0)
    assert none == {"x": 1, "y": 1}  # the cap spreads the budget even where shares tie


def test_probe_sums_the_inputs_of_real_rows_and_computes_the_product():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 5, 4)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)
    mask = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]) > 0
    got = {}

    @jax.jit
    def f(x, w, mask):
        return x @ eva.InputProbe(w, mask, "k", lambda p, g: got.setdefault(p, []).append(g))

    y = f(x, w, mask)
    jax.effects_barrier()
    real = np.asarray(x)[np.asarray(mask)]
    second, first, n = got["k"][0]
    np.testing.assert_allclose(second, real.T @ real, rtol=1e-5)
    np.testing.assert_allclose(first, real.sum(0), rtol=1e-5, atol=1e-6)
    assert n == 8
    np.testing.assert_allclose(np.asarray(y), np.asarray(x @ w), rtol=1e-5)


def test_bad_combinations_are_refused():
    for bad, match in [(dict(rank_allocation="eva", method="full"), "needs --method lora"),
                       (dict(rank_allocation="eva", lora_init="pissa"), "sets A from the data"),
                       (dict(rank_allocation="svd"), "--rank-allocation must be one of")]:
        with pytest.raises(ConfigValueError, match=match):
            TrainConfig(**bad).validate()

def test_lora_rank_auto_on_the_command_line(capsys):
    from lora_jax.cli import build_parser, config_from_args

    cfg = config_from_args(build_parser().parse_args(["--task", "rte", "--lora-rank", "auto"]))
    assert cfg.rank_allocation == "eva" and cfg.lora_rank == TrainConfig().lora_rank  # the budget: the default
    cfg = config_from_args(build_parser().parse_args(["--task", "rte", "--rank-allocation", "eva", "--lora-rank", "4"]))
    assert (cfg.rank_allocation, cfg.lora_rank) == ("eva", 4)
    with pytest.raises(ConfigValueError, match="not with --rank-allocation fixed"):
        config_from_args(build_parser().parse_args(["--task", "rte", "--lora-rank", "auto", "--rank-allocation", "fixed"]))
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--task", "rte", "--lora-rank", "some"])
    assert e.value.code == 2 and "a positive integer or auto" in capsys.readouterr().err


@pytest.mark.slow
def test_auto_rank_run_saves_reports_and_exports_its_ranks(tiny_bert_dir, glue_dir, tmp_path):
    from lora_jax import adapter as adapter_lib

    from .test_adapter import batch
    from .test_export import hf_logits, lora_jax_logits, rewrite_adapter

    out = tmp_path / "run"
    assert main(["train", "--task", "rte", "--model", str(tiny_bert_dir), "--data-dir", str(glue_dir),
                 "--lora-rank", "auto", "--targets", "all", "--max-steps", "3", "--batch-size", "8",
                 "--max-seq-len", "32", "--num-buckets", "0", "--output-dir", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    chosen = report["ranks_from_data"]
    assert chosen["allocation"] == "eva" and chosen["mean_budget"] == 8
    ranks = chosen["ranks"]
    assert sum(ranks.values()) == 8 * len(ranks) and len(set(ranks.values())) > 1  # not one rank everywhere
    assert "## Ranks chosen from the data" in (out / "report.md").read_text()
    _, trained = adapter_lib.load(out / "adapter")
    saved = {tree_lib.adapter_path(k)[0]: v.shape[1] for k, v in trained.items() if k.endswith("/a")}
    assert saved == {p: r for p, r in ranks.items() if r}
    peft_config = json.loads((out / "peft_adapter" / "adapter_config.json").read_text())
    assert len(peft_config["rank_pattern"]) > 0
    # The exported peft adapter (B moved off zero so that ΔW shows) gives PeftModel our logits.
    adapter = rewrite_adapter(out / "adapter", tmp_path / "moved")
    assert main(["export", "--adapter", str(adapter), "--peft", str(tmp_path / "p")]) == 0
    ids, mask = batch(60, 0)
    ours, _ = lora_jax_logits(adapter, ids, mask)
    assert np.abs(hf_logits(tiny_bert_dir, ids, mask, peft_dir=tmp_path / "p") - ours).max() <= 1e-4


@pytest.mark.slow
def test_resume_rebuilds_the_same_ranks_and_continues_bit_identically(tiny_bert_dir, glue_dir, tmp_path):
    from safetensors.numpy import load_file

    from lora_jax.train import fit

    from .test_checkpoint import _tiny, as_if_killed_after_step_4

    run = tmp_path / "run"
    cfg = _tiny(tiny_bert_dir, glue_dir, run, rank_allocation="eva", targets="all")
    ref, _ = fit(cfg, progress=False)
    as_if_killed_after_step_4(run, tmp_path / "ref-adapter")
    report, state = fit(cfg, resume=True, progress=False)
    assert int(state.step) == 12 and report["resumed"]
    assert report["ranks_from_data"] == ref["ranks_from_data"] and report["metrics"] == ref["metrics"]
    a, b = (load_file(str(d / "adapter.safetensors")) for d in (tmp_path / "ref-adapter", run / "adapter"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
