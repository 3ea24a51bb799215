"""One base in memory, many adapters: predictions, adapter switching, merged export.

``Predictor`` loads the base once and any number of lora-jax adapters (each
with its own task head and label names). Adapters are arguments of one jitted
function, so switching between adapters of the same shapes compiles nothing
and reloads nothing; ``predict_mixed`` serves a batch of many adapters in one
call (``mixed``).

``export_merged`` writes W + ΔW as a plain Hugging Face checkpoint
(``config.json`` + ``model.safetensors``) that PyTorch ``transformers`` loads:
no LoRA code on the inference path.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np

from . import adapter as adapter_lib
from . import batching
from . import data as data_lib
from . import lora, weights
from . import tree as tree_lib
from .files import write_text
from .mixed import mixed_forward, stack_adapters
from .model import ModelConfig
from .eval_step import make_eval_step

log = logging.getLogger(__name__)


class PredictError(ValueError):
    """A request that cannot be answered (unknown adapter, wrong input shape for the task, empty text)."""


@dataclass
class LoadedAdapter:
    name: str
    task: data_lib.Task
    mcfg: ModelConfig
    lcfg: lora.LoraConfig
    trained: dict[str, np.ndarray]
    label_names: tuple[str, ...]
    max_seq_len: int


def merged_params(params: dict, trained: dict, lcfg: lora.LoraConfig) -> dict:
    """The plain parameter tree of base + adapter + head: W + ΔW at every adapted kernel."""
    tree = lora.combine(tree_lib.base_keys(params), trained)
    return lora.merge(tree["params"], tree.get("lora", {}), lcfg) if tree.get("lora") else tree["params"]


def export_merged(directory: Path, params: dict, mcfg: ModelConfig, label_names: Sequence[str] = ()) -> None:
    """Write a merged tree as a Hugging Face ``*ForSequenceClassification`` checkpoint."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf = mcfg.to_hf()
    if label_names:
        hf["id2label"] = {str(i): n for i, n in enumerate(label_names)}
        hf["label2id"] = {n: i for i, n in enumerate(label_names)}
    weights.save_safetensors(params, directory / weights.SAFETENSORS, prefix=f"{mcfg.model_type}.")
    write_text(directory / "config.json", json.dumps(hf, indent=2) + "\n")


class Predictor:
    """Predictions from one base model and named adapters.

    >>> p = Predictor({"rte": "runs/rte/adapter", "sst2": "runs/sst2/adapter"})
    >>> p.predict([("A man sleeps.", "Someone rests.")], adapter="rte")
    [{"label": "entailment", "probs": {"entailment": 0.9, "not_entailment": 0.1}}]
    """

    def __init__(self, adapters: dict[str, str], *, model: str | None = None, batch_size: int = 32,
                 num_buckets: int = 4, force_base: bool = False):
        if not adapters:
            raise PredictError("no adapters given")
        self.batch_size = batch_size
        self.errors: dict[str, str] = {}  # adapters that could not be loaded, with why
        metas = {}
        for name, directory in adapters.items():
            try:
                metas[name] = adapter_lib.load(Path(directory))
            except adapter_lib.AdapterError as e:
                self.errors[name] = str(e)
        if not metas:
            raise PredictError("no adapter could be loaded: " + "; ".join(self.errors.values()))
        first = next(iter(metas.values()))[0]
        self.base = model or first["base_model"]
        self.model_dir = weights.resolve(self.base)
        base_cfg = weights.read_config(self.model_dir, num_labels=first["model_config"]["num_labels"])
        self.params, report = weights.load_params(self.model_dir, base_cfg)
        # One base for every adapter: the first adapter's (quantized, if it was trained so); _attach refuses others.
        self.quantization = first.get(adapter_lib.BASE_QUANTIZATION)
        self.params = adapter_lib.base_as_trained(self.params, first)
        self.base_hash = base_cfg.architecture_hash()
        self.base_fingerprint, self.force_base = report.fingerprint, force_base
        self.tokenizer = data_lib.load_tokenizer(str(self.model_dir))
        self.adapters: dict[str, LoadedAdapter] = {}
        self._eval: dict[tuple, Callable] = {}
        self._bank: dict | None = None
        self._num_buckets = num_buckets
        for name, (meta, trained) in metas.items():
            try:
                self.adapters[name] = self._attach(name, meta, trained)
            except (adapter_lib.AdapterError, data_lib.DataError) as e:
                self.errors[name] = str(e)
        if not self.adapters:
            raise PredictError("no adapter could be loaded: " + "; ".join(self.errors.values()))

    def _attach(self, name: str, meta: dict, trained: dict) -> LoadedAdapter:
        if meta["architecture_hash"] != self.base_hash:
            raise adapter_lib.AdapterError(
                f"adapter {name!r} was trained on another base ({meta['base_model']}), not {self.base}")
        adapter_lib.check_base(meta, self.base_fingerprint, self.base, f"adapter {name!r}", force=self.force_base)
        if meta.get(adapter_lib.BASE_QUANTIZATION) != self.quantization:
            raise adapter_lib.AdapterError(
                f"adapter {name!r} was trained on a base stored as {meta.get(adapter_lib.BASE_QUANTIZATION) or 'float'}, "
                f"the first adapter on {self.quantization or 'float'}: serve them from two predictors")
        num_labels = meta["model_config"]["num_labels"]
        mcfg = weights.read_config(self.model_dir, num_labels=num_labels)
        head_free = {p: v for p, v in tree_lib.flatten(self.params).items() if not tree_lib.is_head(p)}
        adapter_lib.check_fits({k: v for k, v in trained.items()
                                if not (tree_lib.is_param(k) and tree_lib.is_head(tree_lib.param_path(k)))},
                               tree_lib.unflatten(head_free), f"adapter {name!r}")
        task = data_lib.get_task(meta["task"])
        # On the device once: host arrays would be copied over again in every call.
        return LoadedAdapter(name, task, mcfg, adapter_lib.lora_config(meta),
                             jax.device_put({k: np.asarray(v, np.float32) for k, v in trained.items()}),
                             tuple(meta["label_names"]) or tuple(str(i) for i in range(num_labels)),
                             int(meta.get("max_seq_len") or min(128, mcfg.max_positions)))

    def frozen_for(self, ad: LoadedAdapter) -> dict:
        return {k: v for k, v in tree_lib.base_keys(self.params).items() if k not in ad.trained}

    def eval_fn(self, ad: LoadedAdapter) -> Callable:
        # One jitted function per head width: adapters are arguments, so switching compiles nothing new.
        key = (ad.mcfg.num_labels, ad.lcfg.rank, ad.lcfg.targets, ad.lcfg.scale)
        if key not in self._eval:
            self._eval[key] = make_eval_step(ad.mcfg, ad.lcfg)
        return self._eval[key]

    def check(self, text: Any, adapter: str) -> tuple[list[str], LoadedAdapter]:
        """Validate one input for ``adapter``: a string (single-sentence task) or a pair."""
        if not isinstance(adapter, str):
            raise PredictError(f"an adapter is named by a string, got {type(adapter).__name__}")
        if adapter in self.errors:
            raise PredictError(f"adapter {adapter!r} could not be loaded: {self.errors[adapter]}")
        if adapter not in self.adapters:
            raise PredictError(f"unknown adapter {adapter!r}; loaded: {', '.join(self.adapters) or 'none'}")
        ad = self.adapters[adapter]
        parts = [text] if isinstance(text, str) else list(text) if isinstance(text, (list, tuple)) else None
        if parts is None or not all(isinstance(p, str) for p in parts) or not 1 <= len(parts) <= 2:
            raise PredictError("an input is a string or a pair of strings")
        if any(not p.strip() for p in parts):
            raise PredictError("empty text")
        want = len(ad.task.text_columns)
        if len(parts) != want:
            raise PredictError(f"task {ad.task.name} takes {'a text pair' if want == 2 else 'one text'}, "
                               f"got {'a pair' if len(parts) == 2 else 'one text'}")
        return parts, ad

    def _encode(self, parts: list[list[str]], ad: LoadedAdapter) -> data_lib.Encoded:
        columns = tuple(list(col) for col in zip(*parts))
        return data_lib.encode(self.tokenizer, data_lib.Examples(columns, np.zeros(len(parts)), "request"),
                               ad.max_seq_len)

    @staticmethod
    def _answer(row: np.ndarray, ad: LoadedAdapter) -> dict:
        row = row[: ad.mcfg.num_labels]
        if ad.task.is_regression:
            return {"score": float(row[0])}
        probs = np.asarray(jax.nn.softmax(row))
        return {"label": ad.label_names[int(row.argmax())],
                "probs": {n: float(p) for n, p in zip(ad.label_names, probs)}}

    def predict(self, texts: Sequence[Any], adapter: str) -> list[dict]:
        """Label and class probabilities (or a score, for regression) for each input, all for one adapter."""
        checked = [self.check(t, adapter)[0] for t in texts]
        ad = self.adapters[adapter]
        if not checked:
            return []
        enc = self._encode(checked, ad)
        buckets = batching.bucket_lengths(ad.max_seq_len, self._num_buckets)
        fn, frozen = self.eval_fn(ad), self.frozen_for(ad)
        logits = np.zeros((len(checked), ad.mcfg.num_labels), np.float32)
        for idx in batching.eval_order(enc.lengths, self.batch_size):
            batch = batching.collate(enc, idx, buckets, self.batch_size)
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
            logits[idx] = np.asarray(fn(ad.trained, frozen, inputs))[: len(idx)]
        return [self._answer(row, ad) for row in logits]

    # ------------------------------------------------------------------------- mixed batches

    def adapter_bank(self) -> dict:
        """Every loaded adapter stacked on a leading axis (built once); see :func:`stack_adapters`."""
        if self._bank is None:
            names = list(self.adapters)
            ads = [self.adapters[n] for n in names]
            arrays, c_max = stack_adapters(tree_lib.flatten(self.params), [(a.trained, a.lcfg) for a in ads])
            arrays = jax.device_put(arrays)  # once, not in every call
            mcfg = weights.read_config(self.model_dir, num_labels=c_max)
            frozen = {p: v for p, v in tree_lib.flatten(self.params).items() if not tree_lib.is_head(p)}
            self._bank = {"names": names, "index": {n: i for i, n in enumerate(names)}, "mcfg": mcfg,
                          "arrays": arrays, "frozen": frozen,
                          "fn": jax.jit(lambda b, f, x, i: mixed_forward(mcfg, b, f, x, i))}
        return self._bank

    def predict_mixed(self, texts: Sequence[Any], adapters: Sequence[str]) -> list[dict]:
        """Like :meth:`predict`, but each input names its own adapter; one jitted call per batch
        serves them all (per-example gathered LoRA factors and heads)."""
        if len(texts) != len(adapters):
            raise PredictError("predict_mixed needs one adapter name per input")
        checked = [self.check(t, a) for t, a in zip(texts, adapters)]
        if not checked:
            return []
        bank = self.adapter_bank()
        ids, type_ids = [None] * len(checked), [None] * len(checked)
        by_adapter: dict[str, list[int]] = {}
        for i, (_, ad) in enumerate(checked):
            by_adapter.setdefault(ad.name, []).append(i)
        for name, rows in by_adapter.items():  # each adapter truncates to its own training length
            enc = self._encode([checked[i][0] for i in rows], self.adapters[name])
            for j, i in enumerate(rows):
                ids[i], type_ids[i] = enc.ids[j], enc.type_ids[j]
        enc = data_lib.Encoded(ids, type_ids, np.zeros(len(ids)), int(self.tokenizer.pad_token_id))
        which = np.array([bank["index"][ad.name] for _, ad in checked], np.int32)
        max_len = max(self.adapters[n].max_seq_len for n in by_adapter)
        buckets = batching.bucket_lengths(max_len, self._num_buckets)
        logits = np.zeros((len(checked), bank["mcfg"].num_labels), np.float32)
        for idx in batching.eval_order(enc.lengths, self.batch_size):
            batch = batching.collate(enc, idx, buckets, self.batch_size)
            rows = np.concatenate([idx, np.repeat(idx[:1], self.batch_size - len(idx))])
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
            logits[idx] = np.asarray(bank["fn"](bank["arrays"], bank["frozen"], inputs, which[rows]))[: len(idx)]
        return [self._answer(row, ad) for row, (_, ad) in zip(logits, checked)]
