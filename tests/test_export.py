"""`lora-jax export`: a trained adapter (ours or peft's) as a merged checkpoint that transformers loads, and
as a peft adapter that PeftModel loads on the original base, both with lora-jax's logits; and outputs that
are written whole or not at all, never over something that exists."""

import numpy as np
import pytest

from lora_jax import lora
from lora_jax import tree as tree_lib
from lora_jax.cli import main
from lora_jax.evaluate import load_for_eval
from lora_jax.model import forward

from .test_adapter import batch, torch_logits

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def lora_jax_logits(adapter_dir, ids, mask, peft_input=False):
    """The factored forward (x@W + s·(x@A)@B) of an adapter on its base: no merge involved."""
    mcfg, lcfg, trained, frozen, _, _ = load_for_eval(str(adapter_dir), peft=peft_input)
    tree = lora.combine(frozen, trained)
    adapted = np.asarray(forward(mcfg, lora.apply(tree["params"], tree["lora"], lcfg), {"input_ids": ids, "attention_mask": mask})["logits"])
    without = np.asarray(forward(mcfg, tree["params"], {"input_ids": ids, "attention_mask": mask})["logits"])
    assert np.abs(adapted - without).max() > 1e-3  # ΔW shows: an export that dropped it would fail
    return adapted, mcfg


def hf_logits(model_dir, ids, mask, peft_dir=None):
    """Logits of a Hugging Face checkpoint in PyTorch, or of a peft adapter on that base (``peft_dir``)."""
    if peft_dir is None:
        return torch_logits(transformers.AutoModelForSequenceClassification.from_pretrained(model_dir).eval(), ids, mask)
    base = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    return torch_logits(peft.PeftModel.from_pretrained(base, peft_dir).eval(), ids, mask)


def rewrite_adapter(src, dst, seed=0, rank=None):
    """A copy of a saved adapter with B (and the head) moved far from their init, as after a long run, so
    that ΔW shows in the logits; ``rank`` cuts A and B to fewer columns / rows."""
    from lora_jax import adapter as adapter_lib
    from lora_jax.model import ModelConfig

    meta, trained = adapter_lib.load(src)
    rng = np.random.default_rng(seed)
    out = {}
    for k, v in trained.items():
        if k.endswith("/b"):
            v = 0.3 * rng.standard_normal(v.shape).astype(np.float32)
        elif tree_lib.is_param(k):
            v = v + 0.05 * rng.standard_normal(v.shape).astype(np.float32)
        if rank is not None and k.endswith("/a"):
            v = v[:, :rank]
        if rank is not None and k.endswith("/b"):
            v = v[:rank]
        out[k] = v
    lcfg = adapter_lib.lora_config(meta)
    if rank is not None:
        lcfg = lora.LoraConfig(**{**meta["lora"], "targets": lcfg.targets, "trainable": lcfg.trainable, "rank": rank})
    adapter_lib.export(dst, out, mcfg=ModelConfig(**meta["model_config"]), lcfg=lcfg, base_model=meta["base_model"],
                       task=meta["task"], label_names=tuple(meta["label_names"]), max_seq_len=meta["max_seq_len"],
                       base_fingerprint=meta["base_fingerprint"])
    return dst


def test_export_merged_and_peft_give_our_logits(tiny_runs, tiny_bert_dir, tmp_path, capsys):
    adapter = rewrite_adapter(tiny_runs["rte"] / "adapter", tmp_path / "adapter")
    assert main(["export", "--adapter", str(adapter), "--merged", str(tmp_path / "m"),
                 "--peft", str(tmp_path / "p")]) == 0
    assert "merged:" in capsys.readouterr().out
    ids, mask = batch(60, 0)
    ours, mcfg = lora_jax_logits(adapter, ids, mask)
    assert np.abs(ours).max() > 1e-3
    assert transformers.AutoConfig.from_pretrained(tmp_path / "m").id2label == {0: "entailment", 1: "not_entailment"}
    assert np.abs(hf_logits(tmp_path / "m", ids, mask) - ours).max() <= 1e-4
    assert np.abs(hf_logits(tiny_bert_dir, ids, mask, peft_dir=tmp_path / "p") - ours).max() <= 1e-4
    # A peft adapter goes the same way: the one just written, merged.
    assert main(["export", "--adapter", str(tmp_path / "p"), "--merged", str(tmp_path / "m2")]) == 0
    assert np.abs(hf_logits(tmp_path / "m2", ids, mask) - ours).max() <= 1e-4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left


def test_export_bad_input(tiny_runs, tmp_path, capsys):
    adapter = tiny_runs["rte"] / "adapter"
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")

    def fails(argv, match):
        assert main(["export", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert match in err and len(err.splitlines()) == 1, err

    fails(["--adapter", str(adapter)], "name at least one output")
    fails(["--adapter", str(tmp_path / "nope"), "--merged", str(tmp_path / "m")], "does not exist")
    fails(["--adapter", str(adapter), "--merged", str(taken)], "already exists")
    fails(["--adapter", str(adapter), "--merged", str(adapter / "m")], "inside the adapter directory")
    fails(["--adapter", str(adapter), "--merged", str(tmp_path / "a" / "b")], "parent directory")
    fails(["--adapter", str(adapter), "--merged", str(tmp_path / "x"), "--peft", str(tmp_path / "x")],
          "the same directory")
    assert (taken / "keep.txt").read_text() == "mine"  # nothing already saved is lost
    assert not (tmp_path / "m").exists() and not (tmp_path / "x").exists()
    # --overwrite replaces it, whole.
    assert main(["export", "--adapter", str(adapter), "--merged", str(taken), "--overwrite"]) == 0
    assert sorted(p.name for p in taken.iterdir()) == ["config.json", "model.safetensors"]


def test_export_of_full_finetuning_has_no_peft_form(tiny_runs, tmp_path, capsys):
    """An adapter without LoRA factors still merges (it is the whole trained tree) but has no peft form."""
    from lora_jax import adapter as adapter_lib

    meta, trained = adapter_lib.load(tiny_runs["rte"] / "adapter")
    head = tree_lib.base_only(trained)
    cfg = adapter_lib.lora_config(meta)
    from lora_jax.model import ModelConfig

    adapter_lib.export(tmp_path / "head", head, mcfg=ModelConfig(**meta["model_config"]),
                       lcfg=lora.LoraConfig(targets=(), trainable=cfg.trainable), base_model=meta["base_model"],
                       task=meta["task"], label_names=tuple(meta["label_names"]))
    assert main(["export", "--adapter", str(tmp_path / "head"), "--peft", str(tmp_path / "p")]) == 2
    assert "no LoRA factors" in capsys.readouterr().err
    assert main(["export", "--adapter", str(tmp_path / "head"), "--merged", str(tmp_path / "m")]) == 0
