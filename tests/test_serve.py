"""Serving: merged export that PyTorch loads with the same logits, one base with many adapters,
switching without recompiling, and per-line errors in predict."""

import json

import jax
import numpy as np
import pytest

from lora_jax import lora, weights
from lora_jax.cli import predict_main
from lora_jax.model import ModelConfig, forward, init_params
from lora_jax.mixed import MIXED_IMPLS, mixed_forward, stack_adapters
from lora_jax.serve import PredictError, Predictor, export_merged, merged_params

from .conftest import TINY, write_tiny_checkpoint
from .test_adapter import batch, jax_logits, trained_leaves

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("model_type", ["roberta", "bert"])
def test_merged_export_loads_in_transformers(model_type, tmp_path):
    torch.manual_seed(0)
    kw = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              max_position_embeddings=40, num_labels=3)
    tc = (transformers.RobertaConfig if model_type == "roberta" else transformers.BertConfig)(**kw)
    cls = (transformers.RobertaForSequenceClassification if model_type == "roberta"
           else transformers.BertForSequenceClassification)
    cls(tc).save_pretrained(tmp_path / "base")
    mcfg, params, _ = weights.from_pretrained(str(tmp_path / "base"), num_labels=3)
    lcfg = lora.LoraConfig(rank=4, alpha=8, targets=lora.TARGET_PRESETS["all"])
    trained = trained_leaves(params, lcfg)
    merged = merged_params(params, trained, lcfg)
    ids, mask = batch(99, mcfg.pad_token_id)
    # The merged tree runs in the plain model and equals the factored forward.
    tree = lora.combine({f"params/{p}": v for p, v in lora.flatten(params).items()}, trained)
    with jax.default_matmul_precision("highest"):
        factored = forward(mcfg, lora.apply(tree["params"], tree["lora"], lcfg), {"input_ids": ids,
                                                                                  "attention_mask": mask})
        plain = forward(mcfg, merged, {"input_ids": ids, "attention_mask": mask})
    np.testing.assert_allclose(plain["logits"], factored["logits"], atol=1e-5)
    export_merged(tmp_path / "merged", merged, mcfg, ("a", "b", "c"))
    tm = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert tm.config.id2label == {0: "a", 1: "b", 2: "c"}
    with torch.no_grad():
        theirs = tm(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits.numpy()
    assert np.abs(theirs - np.asarray(plain["logits"])).max() <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("impl", MIXED_IMPLS)
def test_mixed_forward_equals_each_adapter_alone(impl):
    # Four adapters of different ranks, targets and kinds (zero-padded in the bank); rows name them in
    # mixed order, and one row is padded, so a row taking another's factors would show.
    mcfg = ModelConfig(model_type="bert", **{**TINY, "num_labels": 3})
    params = init_params(mcfg, jax.random.key(0))
    cfgs = [lora.LoraConfig(rank=2, alpha=4), lora.LoraConfig(rank=4, alpha=4),
            lora.LoraConfig(rank=4, alpha=8, targets=lora.TARGET_PRESETS["all"]),
            lora.LoraConfig(rank=2, alpha=4, dora=True)]  # DoRA: a per-adapter gain on each column
    adapters = [trained_leaves(params, c, seed=s) for s, c in enumerate(cfgs)]
    for s, ad in enumerate(adapters):  # heads differ too
        for k in ad:
            if k.startswith("params/"):
                ad[k] = ad[k] + 0.1 * s
    flat = lora.flatten(params)
    bank, c_max = stack_adapters(flat, list(zip(adapters, cfgs)))
    frozen = {p: v for p, v in flat.items() if not p.startswith("classifier/")}
    ids, mask = batch(mcfg.vocab_size, mcfg.pad_token_id)
    ids, mask = np.concatenate([ids, ids[::-1]]), np.concatenate([mask, mask[::-1]])
    idx = np.array([0, 2, 3, 1, 3, 2], np.int32)
    with jax.default_matmul_precision("highest"):
        mixed = np.asarray(mixed_forward(mcfg, bank, frozen, {"input_ids": ids, "attention_mask": mask},
                                         jax.numpy.asarray(idx), impl))
        for row, k in enumerate(idx):
            alone = jax_logits(mcfg, params, cfgs[k], adapters[k], ids[row:row + 1], mask[row:row + 1])
            np.testing.assert_allclose(mixed[row], alone[0], atol=1e-5)
    with pytest.raises(ValueError, match="not one of"):
        mixed_forward(mcfg, bank, frozen, {"input_ids": ids, "attention_mask": mask}, jax.numpy.asarray(idx), "x")


@pytest.fixture(scope="module")
def two_adapters(tiny_runs):
    """The session's tiny rte and sst2 adapters (tests/conftest.py): the same shapes, other labels."""
    return {task: tiny_runs[task] / "adapter" for task in ("rte", "sst2")}


def test_predictor_switches_adapters_without_recompiling(two_adapters):
    p = Predictor({k: str(v) for k, v in two_adapters.items()}, batch_size=4)
    rte = p.predict([("the cat sat", "good cat"), ("a dog", "bad dog")], adapter="rte")
    sst = p.predict(["good movie", "bad film"], adapter="sst2")
    assert set(rte[0]["probs"]) == {"entailment", "not_entailment"}
    assert set(sst[0]["probs"]) == {"negative", "positive"}
    assert sum(rte[0]["probs"].values()) == pytest.approx(1.0, abs=1e-5)
    fn = p.eval_fn(p.adapters["rte"])
    assert fn is p.eval_fn(p.adapters["sst2"])  # same shapes: one function for both
    before = fn._cache_size()
    for _ in range(2):
        again = p.predict([("the cat sat", "good cat"), ("a dog", "bad dog")], adapter="rte")
        p.predict(["good movie", "bad film"], adapter="sst2")
    assert fn._cache_size() == before
    assert again == rte
    # The adapters live on the device: no call copies them over again.
    assert all(isinstance(x, jax.Array) for a in p.adapters.values() for x in jax.tree.leaves(a.trained))
    with pytest.raises(PredictError, match="unknown adapter 'mnli'"):
        p.predict(["x"], adapter="mnli")


@pytest.mark.slow
def test_mixed_batch_equals_serving_each_alone(two_adapters, tiny_runs):
    adapters = {**two_adapters, "stsb": tiny_runs["stsb"] / "adapter"}  # a regression head of 1 output
    p = Predictor({k: str(v) for k, v in adapters.items()}, batch_size=4)
    texts = [("the cat sat", "good cat"), "good movie", ("a dog ran away", "bad dog"), "bad film was awful",
             "it was very good", ("man", "woman"), ("a cat", "the cat sat on the mat")]
    names = ["rte", "sst2", "rte", "sst2", "sst2", "rte", "stsb"]  # 2, 2 and 1 outputs: heads padded
    mixed = p.predict_mixed(texts, names)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(p.adapter_bank()["arrays"]))
    for t, n, m in zip(texts, names, mixed):
        alone = p.predict([t], adapter=n)[0]
        if n == "stsb":
            assert m["score"] == pytest.approx(alone["score"], abs=1e-5)
            continue
        assert m["label"] == alone["label"]
        for label, prob in alone["probs"].items():
            assert m["probs"][label] == pytest.approx(prob, abs=1e-5)


def test_predict_cli_per_line_errors(two_adapters, tiny_bert_dir, tmp_path, capsys):
    other = tmp_path / "other_base"
    write_tiny_checkpoint(other, "bert", intermediate_size=48)
    # An adapter whose metadata names a base of another architecture.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    for f in two_adapters["sst2"].iterdir():
        (foreign / f.name).write_bytes(f.read_bytes())
    meta = json.loads((foreign / "adapter_config.json").read_text())
    meta["architecture_hash"] = "0" * 16
    (foreign / "adapter_config.json").write_text(json.dumps(meta))
    lines = [
        {"adapter": "rte", "text": "the cat sat", "text_pair": "good cat"},
        {"adapter": "sst2", "text": "good movie"},
        {"adapter": "mnli", "text": "a", "text_pair": "b"},
        {"adapter": "sst2", "text": "good", "text_pair": "movie"},
        {"adapter": "sst2", "text": "   "},
        {"adapter": "foreign", "text": "good movie"},
    ]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(l) for l in lines) + "\nnot json\n")
    out = tmp_path / "out.jsonl"
    code = predict_main(["--adapter", f"rte={two_adapters['rte']}", "--adapter", f"sst2={two_adapters['sst2']}",
                         "--adapter", f"foreign={foreign}", "--input", str(src), "--output", str(out)])
    assert code == 0
    res = [json.loads(l) for l in out.read_text().splitlines()]
    assert [r["line"] for r in res] == list(range(1, 8))
    assert res[0]["label"] in ("entailment", "not_entailment") and res[1]["label"] in ("negative", "positive")
    assert "unknown adapter 'mnli'" in res[2]["error"]
    assert "takes one text" in res[3]["error"]
    assert res[4]["error"] == "empty text"
    assert "trained on another base" in res[5]["error"]
    assert res[6]["error"].startswith("not JSON")
    assert "2 of 7 lines answered" in capsys.readouterr().err


def test_predict_cli_bad_flags(two_adapters, tmp_path, capsys):
    assert predict_main(["--adapter", "rte", "--input", "x"]) == 2
    assert "NAME=DIR" in capsys.readouterr().err
    assert predict_main(["--adapter", f"rte={two_adapters['rte']}", "--input", str(tmp_path / "none.jsonl")]) == 2
    assert "cannot read --input" in capsys.readouterr().err
