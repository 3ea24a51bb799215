"""Adapters on disk: our format round trip and evaluation, and Hugging Face peft interop both ways
(same logits as PeftModel in torch, max abs diff <= 1e-4) on a tiny random RoBERTa and the real MiniLM."""

import json
import shutil

import jax
import numpy as np
import pytest

from lora_jax import adapter as adapter_lib
from lora_jax import lora, weights
from lora_jax.adapter import AdapterError
from lora_jax.cli import evaluate_main
from lora_jax.evaluate import evaluate_adapter
from lora_jax.model import forward

from .conftest import shared_path, write_tiny_checkpoint

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def trained_leaves(params, lcfg, seed=0):
    """LoRA factors with non-zero B (and DoRA magnitudes off their start) and a random head, as after training."""
    adapters = lora.init(params, lcfg, jax.random.key(seed))
    out = {}
    for i, (path, ad) in enumerate(adapters.items()):
        out[f"lora/{path}/a"] = np.asarray(ad["a"])
        out[f"lora/{path}/b"] = 0.2 * np.asarray(jax.random.normal(jax.random.key(100 + i), ad["b"].shape))
        if "m" in ad:  # DoRA's magnitudes, moved off ||W||_c
            out[f"lora/{path}/m"] = np.asarray(ad["m"]) * (1 + 0.2 * np.asarray(
                jax.random.normal(jax.random.key(200 + i), ad["m"].shape)))
    for p, v in lora.flatten(params).items():
        if p.startswith("classifier/"):
            out[f"params/{p}"] = np.asarray(v) + 0.05
    return out


def jax_logits(mcfg, params, lcfg, trained, ids, mask):
    tree = lora.combine({f"params/{p}": v for p, v in lora.flatten(params).items()}, trained)
    merged = lora.merge(tree["params"], tree["lora"], lcfg)
    return np.asarray(forward(mcfg, merged, {"input_ids": ids, "attention_mask": mask})["logits"])


def batch(vocab, pad, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, vocab, (3, 10)).astype(np.int32)
    mask = np.ones_like(ids)
    ids[1, 6:], mask[1, 6:] = pad, 0
    return ids, mask


def torch_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids, dtype=torch.long),
                     attention_mask=torch.tensor(mask, dtype=torch.long)).logits.numpy()


@pytest.fixture(scope="module")
def tiny_roberta(tmp_path_factory):
    return save_torch_checkpoint(tmp_path_factory.mktemp("tiny_roberta"), "roberta")


def save_torch_checkpoint(directory, model_type, num_labels=2):
    """A random tiny ``*ForSequenceClassification`` (vocabulary 99, 2 layers of width 32), saved by transformers."""
    torch.manual_seed(0)
    config = (transformers.RobertaConfig if model_type == "roberta" else transformers.BertConfig)(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=40, num_labels=num_labels)
    transformers.AutoModelForSequenceClassification.from_config(config).save_pretrained(directory)
    return directory


def bases():
    # The real MiniLM in torch and peft takes seconds per test: the slow tier's.
    return ["tiny_roberta", pytest.param("minilm", marks=pytest.mark.slow)]


def base_dir(name, request):
    if name == "minilm":
        return shared_path("models", "all-MiniLM-L6-v2")
    return request.getfixturevalue(name)


@pytest.mark.parametrize("name", bases())
@pytest.mark.parametrize("targets", ["qv", "all"])
def test_export_to_peft_gives_same_logits(name, targets, request, tmp_path):
    d = base_dir(name, request)
    mcfg, params, _ = weights.from_pretrained(str(d), num_labels=2)
    lcfg = lora.LoraConfig(rank=4, alpha=8, targets=lora.TARGET_PRESETS[targets])
    trained = trained_leaves(params, lcfg)
    adapter_lib.export_peft(tmp_path / "peft", trained, mcfg=mcfg, lcfg=lcfg, base_model=str(d))
    base = transformers.AutoModelForSequenceClassification.from_pretrained(d, num_labels=2)
    model = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    ids, mask = batch(mcfg.vocab_size, mcfg.pad_token_id)
    ours = jax_logits(mcfg, params, lcfg, trained, ids, mask)
    theirs = torch_logits(model, ids, mask)
    assert np.abs(ours - theirs).max() <= 1e-4, np.abs(ours - theirs).max()
    assert np.abs(ours).max() > 0.01


@pytest.mark.parametrize("name", bases())
def test_import_peft_trained_in_torch(name, request, tmp_path):
    d = base_dir(name, request)
    torch.manual_seed(0)
    base = transformers.AutoModelForSequenceClassification.from_pretrained(d, num_labels=2)
    cfg = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=16, target_modules=["query", "value"])
    model = peft.get_peft_model(base, cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    mcfg0 = weights.read_config(weights.resolve(str(d)))
    ids, mask = batch(mcfg0.vocab_size, mcfg0.pad_token_id)
    for _ in range(3):  # a few real steps so that B != 0 and the head moves
        loss = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                     labels=torch.tensor([0, 1, 1])).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.save_pretrained(tmp_path / "peft")
    theirs = torch_logits(model, ids, mask)

    mcfg, params, _ = weights.from_pretrained(str(d), num_labels=2)
    lcfg, trained = adapter_lib.import_peft(tmp_path / "peft", params, mcfg)
    assert lcfg.rank == 4 and lcfg.scale == 4.0
    assert any(np.abs(v).max() > 0 for k, v in trained.items() if k.endswith("/b"))
    ours = jax_logits(mcfg, params, lcfg, trained, ids, mask)
    assert np.abs(ours - theirs).max() <= 1e-4, np.abs(ours - theirs).max()


def test_import_rejects_unsupported_peft_options(tiny_roberta, tmp_path):
    mcfg, params, _ = weights.from_pretrained(str(tiny_roberta), num_labels=2)
    lcfg = lora.LoraConfig(rank=2)
    adapter_lib.export_peft(tmp_path / "p", trained_leaves(params, lcfg), mcfg=mcfg, lcfg=lcfg, base_model="x")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps({**cfg, "lora_bias": True, "bias": "all"}))
    with pytest.raises(AdapterError, match=r"unsupported peft options: lora_bias=True, bias='all'"):
        adapter_lib.import_peft(tmp_path / "p", params, mcfg)
    # DoRA is read, but a config that says so must come with every module's magnitude.
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(AdapterError, match="use_dora is true but 0 of its 4 adapted modules"):
        adapter_lib.import_peft(tmp_path / "p", params, mcfg)
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(AdapterError, match="IA3"):
        adapter_lib.import_peft(tmp_path / "p", params, mcfg)
    # PiSSA saved without conversion: its factors belong to a residual base we cannot see.
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps({**cfg, "init_lora_weights": "pissa_niter_4"}))
    with pytest.raises(AdapterError, match="path_initial_model_for_weight_conversion"):
        adapter_lib.import_peft(tmp_path / "p", params, mcfg)


@pytest.mark.slow  # two evaluations, each compiling the eval step: 16 s of the fast tier's 107
def test_adapter_round_trip_and_evaluate(tiny_runs, glue_dir, capsys):
    run = tiny_runs["rte"]
    report = json.loads((run / "report.json").read_text())
    assert report["adapter_bytes"] < report["full_model_fp32_bytes"] / 5
    res = evaluate_adapter(str(run / "adapter"), data_dir=str(glue_dir), batch_size=8)
    assert res == {"dev": report["metrics"]["dev"]["final"]["values"]}
    peft_res = evaluate_adapter(str(run / "peft_adapter"), peft=True, task="rte",
                                data_dir=str(glue_dir), batch_size=8, max_seq_len=32)
    assert peft_res == res
    assert evaluate_main(["--adapter", str(run / "adapter"), "--data-dir", str(glue_dir)]) == 0
    assert "dev: accuracy=" in capsys.readouterr().out


def test_adapter_bad_input(tiny_runs, glue_dir, tmp_path, capsys):
    good = tiny_runs["rte"] / "adapter"

    def fails(argv, match):
        assert evaluate_main(argv + ["--data-dir", str(glue_dir)]) == 2
        err = capsys.readouterr().err.strip()
        assert match in err and len(err.splitlines()) == 1, err

    fails(["--adapter", str(tmp_path / "nope")], "does not exist")
    fails(["--adapter", str(tmp_path)], "not an adapter directory")
    fails(["--adapter", str(tiny_runs['rte'] / "peft_adapter")], "pass --peft")
    # Another base: same family, other shapes.
    other = tmp_path / "other"
    write_tiny_checkpoint(other, "bert", intermediate_size=48)
    fails(["--adapter", str(good), "--model", str(other)], "is not the architecture the adapter")
    # A newer format.
    newer = tmp_path / "newer"
    shutil.copytree(good, newer)
    meta = json.loads((newer / "adapter_config.json").read_text())
    (newer / "adapter_config.json").write_text(json.dumps({**meta, "format_version": 99}))
    fails(["--adapter", str(newer)], "format version 99")
    # Rank/targets that do not fit the base.
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    from safetensors.numpy import load_file, save_file
    t = load_file(str(bad / "adapter.safetensors"))
    key = next(k for k in t if k.endswith("/a"))
    t[key.replace("layer/0", "layer/7")] = t.pop(key)
    save_file(t, str(bad / "adapter.safetensors"))
    fails(["--adapter", str(bad)], "layer/7/attention/self/query/kernel is not in the base model")
    # Another task: ours know their own; a peft adapter does not, and its head must fit the task.
    fails(["--adapter", str(good), "--task", "stsb"], "was trained on rte, not stsb")
    fails(["--adapter", str(tiny_runs['rte'] / "peft_adapter"), "--peft", "--task", "stsb"],
          "classifier/bias: adapter (2,) vs base (1,)")
