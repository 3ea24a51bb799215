"""Tokenizers straight from the ``tokenizers`` library, so that training and serving never import
``transformers`` (which imports torch: about 220 MiB of the process peak, results/memory/).

A checkpoint directory is read the way its files say:

* ``tokenizer.json`` (a fast tokenizer: MiniLM's, most Hub models): loaded as it is, padding off;
* ``vocab.txt`` (BERT's word pieces): ``BertWordPieceTokenizer``, lower-cased unless
  ``tokenizer_config.json`` says ``do_lower_case: false``;
* ``vocab.json`` + ``merges.txt`` (RoBERTa's byte-level BPE): ``ByteLevelBPETokenizer`` with RoBERTa's
  ``<s> A </s></s> B </s>`` template;
* anything else (a SentencePiece model, say): ``transformers.AutoTokenizer``, behind the same interface.

``tests/test_tokenize.py`` checks the ids and type ids against ``AutoTokenizer`` on real GLUE pairs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CHUNK = 512  # examples encoded at once

# The pad token of each layout when the directory's configs name none.
_DEFAULT_PAD = {"wordpiece": "[PAD]", "bpe": "<pad>"}


class TokenizerError(ValueError):
    """A directory whose tokenizer files are missing or unreadable."""


def _config(directory: Path) -> dict:
    """tokenizer_config.json overlaid by special_tokens_map.json (either may be missing)."""
    out: dict = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        file = directory / name
        if file.is_file():
            value = json.loads(file.read_text(encoding="utf-8"))
            out.update(value if isinstance(value, dict) else {})
    return out


def _token(value) -> str | None:
    """A special token as configs spell it: a string, or {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    """Texts (one column or a pair) -> ragged ids and type ids, truncated (longest first) to a length;
    ``pad_token_id`` for the batches."""

    def __init__(self, backend, pad_token_id: int):
        self.backend, self.pad_token_id = backend, pad_token_id

    def encode(self, columns: tuple[list[str], ...], max_len: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        tok = self.backend
        tok.no_padding()
        tok.enable_truncation(max_len, strategy="longest_first")
        inputs = list(zip(*columns)) if len(columns) == 2 else list(columns[0])
        ids, type_ids = [], []
        # In chunks: each Encoding keeps what truncation cut off (its "overflowing" parts), which for long
        # texts and a short max_len is many times the ids kept (1 GB for RTE at length 32, all at once).
        for i in range(0, len(inputs), CHUNK):
            for e in tok.encode_batch(inputs[i:i + CHUNK]):
                ids.append(np.asarray(e.ids, np.int32))
                type_ids.append(np.asarray(e.type_ids, np.int32))
        return ids, type_ids


class _Transformers(Tokenizer):
    """``transformers.AutoTokenizer`` for layouts the ``tokenizers`` library cannot read alone."""

    def encode(self, columns, max_len):
        enc = self.backend(*columns, truncation=True, max_length=max_len, padding=False,
                           return_token_type_ids=True, return_attention_mask=False)
        return ([np.asarray(x, np.int32) for x in enc["input_ids"]],
                [np.asarray(x, np.int32) for x in enc["token_type_ids"]])


def load(path: str) -> Tokenizer:
    """The tokenizer of the checkpoint directory ``path``; raises TokenizerError."""
    from tokenizers import Tokenizer as Backend
    from tokenizers.implementations import BertWordPieceTokenizer, ByteLevelBPETokenizer
    from tokenizers.processors import RobertaProcessing

    d = Path(path)
    try:
        cfg = _config(d)
        pad = _token(cfg.get("pad_token"))
        if (d / "tokenizer.json").is_file():
            backend, kind = Backend.from_file(str(d / "tokenizer.json")), "json"
            pad = pad or (backend.padding or {}).get("pad_token")
        elif (d / "vocab.txt").is_file():
            backend, kind = BertWordPieceTokenizer(str(d / "vocab.txt"),
                                                   lowercase=cfg.get("do_lower_case", True)), "wordpiece"
        elif (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
            bpe = ByteLevelBPETokenizer(str(d / "vocab.json"), str(d / "merges.txt"),
                                        add_prefix_space=cfg.get("add_prefix_space", False), trim_offsets=True)
            bos, eos = _token(cfg.get("bos_token")) or "<s>", _token(cfg.get("eos_token")) or "</s>"
            bpe.post_processor = RobertaProcessing((eos, bpe.token_to_id(eos)), (bos, bpe.token_to_id(bos)))
            backend, kind = bpe, "bpe"
        else:
            from transformers import AutoTokenizer

            hf = AutoTokenizer.from_pretrained(path)
            return _Transformers(hf, int(hf.pad_token_id))
    except Exception as e:  # unreadable JSON, a damaged vocabulary, a missing directory
        raise TokenizerError(f"cannot load a tokenizer from {path}: {type(e).__name__}: {e}") from None
    pad = pad or _DEFAULT_PAD.get(kind)
    pad_id = backend.token_to_id(pad) if pad else None
    if pad_id is None:
        raise TokenizerError(f"the tokenizer in {path} has no pad token ({pad!r} is not in its vocabulary)")
    return Tokenizer(backend, pad_id)
