"""Tokenizers read with the `tokenizers` library alone: the same ids and type ids as transformers'
AutoTokenizer (BERT word pieces, RoBERTa byte-level BPE, a tokenizer.json), one-line errors, and a training
run that never imports torch or transformers."""

import json
import subprocess
import sys

import pytest

from lora_jax import data, tokenize

from .conftest import shared_path, write_tiny_checkpoint

transformers = pytest.importorskip("transformers")

ODD = ["Café naïve résumé", "北京 is big", "emoji 😀 here", "  spaces   everywhere  ", "UPPER lower MiXeD", "a" * 300]


def same_as_transformers(directory, columns, lengths=(16, 128)):
    ours = tokenize.load(str(directory))
    hf = transformers.AutoTokenizer.from_pretrained(str(directory))
    assert ours.pad_token_id == hf.pad_token_id
    for n in lengths:
        ids, type_ids = ours.encode(columns, n)
        enc = hf(*columns, truncation=True, max_length=n, padding=False, return_token_type_ids=True,
                 return_attention_mask=False)
        assert [list(x) for x in ids] == enc["input_ids"]
        assert [list(x) for x in type_ids] == enc["token_type_ids"]
    assert max(len(x) for x in ours.encode(columns, lengths[0])[0]) == lengths[0]  # truncation was exercised


def test_tiny_bert_vocab_txt(tmp_path):
    write_tiny_checkpoint(tmp_path, "bert")
    same_as_transformers(tmp_path, (ODD,))
    same_as_transformers(tmp_path, (ODD, ODD[::-1]))


@pytest.mark.parametrize("model", ["all-MiniLM-L6-v2", "roberta-base-tokenizer"])
@pytest.mark.parametrize("task", ["rte", "sst2"])
def test_real_tokenizers_on_real_glue(model, task):
    directory = shared_path("models", model)
    t = data.get_task(task)
    dev = data.load_dev(t, str(shared_path("data", "glue")), None, 400)["dev"]
    same_as_transformers(directory, dev.texts)
    same_as_transformers(directory, tuple([*col[:5], *ODD] for col in dev.texts))


def test_tokenizer_errors(tmp_path):
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "tokenizer.json").write_text("{not json")
    with pytest.raises(tokenize.TokenizerError, match="cannot load a tokenizer from"):
        tokenize.load(str(tmp_path / "json"))
    (tmp_path / "nopad").mkdir()
    (tmp_path / "nopad" / "vocab.txt").write_text("[UNK]\n[CLS]\n[SEP]\nword\n")
    with pytest.raises(tokenize.TokenizerError, match="no pad token"):
        tokenize.load(str(tmp_path / "nopad"))
    with pytest.raises(data.DataError, match="cannot load a tokenizer from"):
        data.load_tokenizer(str(tmp_path / "missing"))


@pytest.mark.slow
def test_training_imports_neither_torch_nor_transformers(tiny_bert_dir, glue_dir, tmp_path):
    """Importing transformers pulls in torch (about 220 MiB of resident memory): a run must not."""
    code = f"""
import json, sys
from lora_jax.config import TrainConfig
from lora_jax.train import fit
fit(TrainConfig(task="rte", model={str(tiny_bert_dir)!r}, data_dir={str(glue_dir)!r}, output_dir={str(tmp_path / 'r')!r},
                batch_size=8, max_seq_len=32, num_buckets=0, max_steps=2), progress=False)
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
