"""`lora-jax combine`: each method against the ΔW it must equal, and against peft's add_weighted_adapter on
the same factors; a combined adapter that loads, evaluates and exports; one-line errors."""

import json

import numpy as np
import pytest

from lora_jax import adapter as adapter_lib
from lora_jax import lora
from lora_jax import tree as tree_lib
from lora_jax.cli import main
from lora_jax.combine import CombineError, combine_factors, factors
from lora_jax.evaluate import evaluate_adapter

from .test_export import rewrite_adapter


def random_adapters(rng, ranks=(4, 4), paths=("k1", "k2"), d_in=12, d_out=10):
    return [{p: (rng.standard_normal((d_in, r)), rng.standard_normal((r, d_out))) for p in paths} for r in ranks]


def delta(a, b, s=1.0):
    return s * a @ b


@pytest.mark.parametrize("weights", [(0.5, 0.5), (1.0, -0.3)])
def test_cat_and_svd_equal_the_weighted_sum_of_deltas(weights):
    rng = np.random.default_rng(0)
    ads = random_adapters(rng, ranks=(3, 2))
    ads[1]["k3"] = (rng.standard_normal((12, 2)), rng.standard_normal((2, 10)))  # adapted in one adapter only
    scales = (2.0, 0.5)
    want = {p: sum(w * delta(*ad[p], s) for ad, s, w in zip(ads, scales, weights) if p in ad) for p in ("k1", "k2", "k3")}
    cat = combine_factors(ads, scales, weights, "cat")
    assert cat["k1"][0].shape == (12, 5) and cat["k3"][0].shape == (12, 2)
    for p, w in want.items():
        np.testing.assert_allclose(delta(*cat[p]), w, atol=1e-12)
    full = combine_factors(ads, scales, weights, "svd", rank=5)  # the sum has rank <= 5: exact
    for p, w in want.items():
        np.testing.assert_allclose(delta(*full[p]), w, atol=1e-10)
    cut = combine_factors(ads, scales, weights, "svd", rank=2)  # the best rank-2 approximation (Eckart-Young)
    sv = np.linalg.svd(want["k1"], compute_uv=False)
    assert np.linalg.norm(delta(*cut["k1"]) - want["k1"]) == pytest.approx(np.sqrt((sv[2:] ** 2).sum()), rel=1e-9)


@pytest.mark.parametrize("w", [0.3, -2.0])
def test_linear_of_one_adapter_scales_its_delta(w):
    """(±√|ws| A)(√|ws| B) = w·s·AB: exact for one adapter; for several, cross terms A_i B_j remain."""
    rng = np.random.default_rng(1)
    ads = random_adapters(rng, paths=("k",))[:1]
    out = combine_factors(ads, (2.0,), (w,), "linear")
    np.testing.assert_allclose(delta(*out["k"]), w * delta(*ads[0]["k"], 2.0), atol=1e-12)


def one_linear(d_in=12, d_out=10):
    """A torch module with one Linear named ``lin``: the smallest thing peft adapts."""
    torch = pytest.importorskip("torch")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(d_in, d_out)

        def forward(self, x):
            return self.lin(x)

    return Net()


@pytest.mark.parametrize("how", ["linear", "cat", "svd"])
def test_each_method_matches_peft_add_weighted_adapter(how):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    rng = np.random.default_rng(2)
    ranks, alphas, weights = (4, 4), (8.0, 2.0), (0.7, -0.4)
    ads = random_adapters(rng, ranks=ranks, paths=("lin",))
    model = peft.get_peft_model(one_linear(), peft.LoraConfig(r=ranks[0], lora_alpha=alphas[0], target_modules=["lin"]),
                                adapter_name="a0")
    model.add_adapter("a1", peft.LoraConfig(r=ranks[1], lora_alpha=alphas[1], target_modules=["lin"]))
    layer = model.base_model.model.lin
    for i, ad in enumerate(ads):  # ours (d_in, r) @ (r, d_out); torch's weights are (out, in)
        layer.lora_A[f"a{i}"].weight.data = torch.tensor(ad["lin"][0].T, dtype=torch.float64).float()
        layer.lora_B[f"a{i}"].weight.data = torch.tensor(ad["lin"][1].T, dtype=torch.float64).float()
    model.add_weighted_adapter(["a0", "a1"], list(weights), "mix", combination_type=how, svd_rank=3)
    theirs = layer.get_delta_weight("mix").detach().double().numpy().T
    ours = combine_factors(ads, [a / r for a, r in zip(alphas, ranks)], weights, how, rank=3)["lin"]
    np.testing.assert_allclose(delta(*ours), theirs, atol=1e-5)


def test_combine_errors_in_the_function():
    rng = np.random.default_rng(3)
    ads = random_adapters(rng, ranks=(4, 2))
    with pytest.raises(CombineError, match="use --how cat or --how svd"):
        combine_factors(ads, (1, 1), (1, 1), "linear")
    with pytest.raises(CombineError, match="2 weights for 1 adapters"):
        combine_factors(ads[:1], (1,), (1, 1), "cat")
    with pytest.raises(CombineError, match="exceeds"):
        combine_factors(ads, (1, 1), (1, 1), "svd", rank=11)
    with pytest.raises(CombineError, match="finite"):
        combine_factors(ads, (1, 1), (float("nan"), 1), "cat")


@pytest.mark.slow  # evaluation compiles the eval step: 14 s
def test_combine_cli_writes_an_adapter_that_loads_and_evaluates(tiny_runs, glue_dir, tmp_path, capsys):
    a = rewrite_adapter(tiny_runs["rte"] / "adapter", tmp_path / "a", seed=1)
    b = rewrite_adapter(tiny_runs["rte"] / "adapter", tmp_path / "b", seed=2, rank=2)
    out = tmp_path / "ab"
    assert main(["combine", "--adapter", f"x={a}", "--adapter", f"y={b}", "--weights", "0.5,0.5",
                 "--how", "cat", "--head", "y", "--out", str(out)]) == 0
    assert "head from y" in capsys.readouterr().out
    meta, leaves = adapter_lib.load(out)
    assert meta["combined_from"] == {"adapters": ["x", "y"], "weights": [0.5, 0.5], "how": "cat", "head": "y"}
    (ma, ta), (mb, tb) = adapter_lib.load(a), adapter_lib.load(b)
    sa, sb, sc = (adapter_lib.lora_config(m).scale for m in (ma, mb, meta))
    fa, fb, fc = factors(ta), factors(tb), factors(leaves)
    assert sc == 1.0 and fa.keys() == fc.keys()
    for p in fc:
        np.testing.assert_allclose(delta(*fc[p], sc), 0.5 * delta(*fa[p], sa) + 0.5 * delta(*fb[p], sb), atol=1e-6)
    for k in tree_lib.base_only(leaves):
        np.testing.assert_array_equal(leaves[k], tb[k])  # y's head
    res = evaluate_adapter(str(out), data_dir=str(glue_dir), batch_size=8)
    assert 0 <= res["dev"]["accuracy"] <= 1
    # It exports like any adapter: a peft directory with per-module ranks where they differ.
    assert main(["export", "--adapter", str(out), "--peft", str(tmp_path / "p")]) == 0
    assert json.loads((tmp_path / "p" / "adapter_config.json").read_text())["r"] == adapter_lib.lora_config(ma).rank + 2


def test_combine_cli_bad_input(tiny_runs, tmp_path, capsys):
    a = tiny_runs["rte"] / "adapter"
    b = rewrite_adapter(a, tmp_path / "b", rank=2)

    def fails(argv, match):
        assert main(["combine", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert match in err and len(err.splitlines()) == 1, err

    out = ["--out", str(tmp_path / "o")]
    fails(["--adapter", f"x={a}", "--adapter", f"y={tiny_runs['stsb'] / 'adapter'}", *out], "another task")
    fails(["--adapter", f"x={a}", "--adapter", f"y={b}", "--how", "linear", *out], "use --how cat")
    fails(["--adapter", f"x={a}", "--adapter", f"y={b}", "--weights", "1", *out], "1 values for 2 adapters")
    fails(["--adapter", f"x={a}", "--adapter", f"y={b}", "--weights", "1,a", *out], "comma-separated numbers")
    fails(["--adapter", f"x={a}", "--adapter", f"x={b}", *out], "given twice")
    fails(["--adapter", f"x={a}", "--head", "z", *out], "--head 'z' is not one of")
    fails(["--adapter", f"x={a}", "--out", str(b)], "already exists")
    fails(["--adapter", f"x={tmp_path / 'nope'}", *out], "does not exist")
    assert not (tmp_path / "o").exists()
