"""One base in memory, many adapters: predictions, adapter switching, merged export.

``Predictor`` loads the base once and any number of lora-jax adapters (each
with its own task head and label names). Adapters are arguments of one jitted
function, so switching between adapters of the same shapes compiles nothing
and reloads nothing.

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
import jax.numpy as jnp
import numpy as np

from . import adapter as adapter_lib
from . import batching
from . import data as data_lib
from . import lora, weights
from . import tree as tree_lib
from .model import ModelConfig, forward
from .files import write_text
from .eval_step import make_eval_step

log = logging.getLogger(__name__)


MIXED_IMPLS = ("gather", "masked", "fused")


@jax.tree_util.register_pytree_node_class
@dataclass
class GatheredKernel:
    """A kernel whose update differs per example: ``x @ w + x @ Δ[idx[i]]`` for row i of the batch.

    ``a`` (d_in, K, r) and ``b`` (K, r, d_out) hold K adapters' LoRA factors (scale folded into
    ``b``, ranks zero-padded to a common r); with ``b=None``, ``a`` (K, d_in, d_out) holds whole
    per-adapter kernels (task heads). ``idx`` (B,) picks each example's adapter. Like
    ``lora.LoraKernel`` it stands in a parameter tree where the model computes ``x @ kernel``.

    ``impl`` picks how the LoRA factors are applied (the results agree to rounding):

    - ``gather`` (the default): each row's own (d_in, r) and (r, d_out) gathered, then batched
      products.
    - ``masked``: two dense products over all K adapters at once, ``x @ A`` (d_in, K·r) and, after
      zeroing every column that is not the row's own adapter, ``@ B`` (K·r, d_out). K·r is small
      (64 for 8 adapters of rank 8), so the K-fold FLOPs cost little, and two plain GEMMs
      replace a gather and per-example batched products of width r.
    - ``fused``: as ``masked``, with ``x @ A`` joined to the base product: ``x @ [w | A]``, one
      GEMM (d_out + K·r wide) instead of two.

    All three were measured on an H100 and this CPU (results/inference/): within 1.06x of the
    base model at batch 32 on both. ``gather`` is the best or tied on the CPU and within 3% of the
    best on the H100, where ``fused`` is ahead.

    ``a``'s layout (d_in, K, r) makes the (d_in, K·r) matrix of ``masked`` a free reshape.
    """

    w: jax.Array
    a: jax.Array
    b: jax.Array | None
    idx: jax.Array
    impl: str = "gather"

    def tree_flatten(self):
        return (self.w, self.a, self.b, self.idx), self.impl

    @classmethod
    def tree_unflatten(cls, impl, children):
        return cls(*children, impl)

    @property
    def shape(self):
        return self.w.shape

    def astype(self, dtype) -> "GatheredKernel":
        return GatheredKernel(self.w.astype(dtype), self.a.astype(dtype),
                              None if self.b is None else self.b.astype(dtype), self.idx, self.impl)

    def __rmatmul__(self, x):
        if self.b is None:
            # Whole kernels (heads): x times every adapter's kernel, then each row keeps its own. Gathering
            # a (B, d_in, d_out) copy of the bank instead would move B full matrices through memory.
            every = jnp.einsum("b...d,kdo->b...ko", x, self.a)
            own = jax.nn.one_hot(self.idx, self.a.shape[0], dtype=every.dtype)
            return x @ self.w + jnp.einsum("b...ko,bk->b...o", every, own)
        d_in, k, r = self.a.shape
        if self.impl == "gather":
            low = jnp.einsum("b...d,dbr->b...r", x, self.a[:, self.idx])
            return x @ self.w + jnp.einsum("b...r,bro->b...o", low, self.b[self.idx])
        d_out = self.w.shape[1]
        # (B, K·r): 1 on the r columns of the row's own adapter, broadcast over the sequence axes.
        own = jnp.repeat(jax.nn.one_hot(self.idx, k, dtype=x.dtype), r, axis=1)
        own = own.reshape(own.shape[:1] + (1,) * (x.ndim - 2) + own.shape[1:])
        rows = x.reshape(-1, d_in)
        if self.impl == "fused":
            both = (rows @ jnp.concatenate([self.w, self.a.reshape(d_in, k * r)], axis=1)).reshape(*x.shape[:-1], -1)
            y, low = both[..., :d_out], both[..., d_out:]
        else:
            y = (rows @ self.w).reshape(*x.shape[:-1], d_out)
            low = (rows @ self.a.reshape(d_in, k * r)).reshape(*x.shape[:-1], k * r)
        return y + (low * own) @ self.b.reshape(k * r, d_out)


@jax.tree_util.register_pytree_node_class
@dataclass
class GatheredBias:
    """A bias that differs per example: ``bank[idx[i]]`` for row i (the model adds it to ``x @ kernel``)."""

    base: jax.Array  # (d_out,), for Flax's shape check
    bank: jax.Array  # (K, d_out)
    idx: jax.Array

    def tree_flatten(self):
        return (self.base, self.bank, self.idx), None

    @classmethod
    def tree_unflatten(cls, _, children):
        return cls(*children)

    @property
    def shape(self):
        return self.base.shape

    def astype(self, dtype) -> "GatheredBias":
        return GatheredBias(self.base.astype(dtype), self.bank.astype(dtype), self.idx)

    def __radd__(self, y):
        per_example = self.base + self.bank[self.idx]  # (B, d_out)
        return y + per_example.reshape(per_example.shape[:1] + (1,) * (y.ndim - 2) + per_example.shape[1:])


def stack_adapters(base: dict[str, Any], adapters: Sequence[tuple[dict, lora.LoraConfig]]) -> tuple[dict, int]:
    """K adapters (trained leaves, LoraConfig) of one base, stacked on an adapter axis K.

    LoRA factors: ``a`` (d_in, K, r_max), ``b`` (K, r_max, d_out) with each adapter's scale folded in and
    ranks zero-padded (zero rows and columns add nothing); an adapter that does not adapt a kernel
    contributes zeros. Heads: whole per-adapter kernels and biases; the label axis is padded to the
    widest head, with -1e9 biases so that padded classes get no probability. ``base`` is the flat base
    tree (for kernel shapes). Returns ({"lora": ..., "head": ...}, widest head).
    """
    k = len(adapters)
    heads_width = [v.shape[-1] for trained, _ in adapters for p, v in trained.items()
                   if tree_lib.param_path(p) in tree_lib.HEAD_OUTPUT]
    c_max = max(heads_width) if heads_width else 1
    r_max = max(cfg.rank for _, cfg in adapters)
    paths = sorted({tree_lib.adapter_path(key)[0] for trained, _ in adapters for key in tree_lib.adapters_only(trained)})
    bank_lora = {}
    for path in paths:
        d_in, d_out = base[path].shape
        a = np.zeros((d_in, k, r_max), np.float32)
        b = np.zeros((k, r_max, d_out), np.float32)
        for i, (trained, cfg) in enumerate(adapters):
            key_a, key_b = tree_lib.adapter_key(path, "a"), tree_lib.adapter_key(path, "b")
            if key_a in trained:
                r = trained[key_a].shape[1]  # per matrix: adaptive-rank adapters vary
                a[:, i, :r] = trained[key_a]
                b[i, :r, :] = np.asarray(trained[key_b]) * cfg.scale
        bank_lora[path] = {"a": a, "b": b}
    heads = sorted({tree_lib.param_path(key) for trained, _ in adapters for key in tree_lib.base_only(trained)})
    bank_head = {}
    for path in heads:
        leaves = [np.asarray(trained[tree_lib.param_key(path)], np.float32) for trained, _ in adapters]
        if path in tree_lib.HEAD_OUTPUT:
            stacked = np.full((k, *leaves[0].shape[:-1], c_max), -1e9 if path.endswith("bias") else 0.0, np.float32)
            for i, v in enumerate(leaves):
                stacked[i, ..., : v.shape[-1]] = v
        else:
            stacked = np.stack(leaves)
        bank_head[path] = stacked
    return {"lora": bank_lora, "head": bank_head}, c_max


def mixed_forward(mcfg: ModelConfig, bank: dict, frozen: dict, batch: dict, idx: jax.Array,
                  impl: str = "gather") -> jax.Array:
    """Logits (B, widest head) for a batch whose row i uses adapter ``idx[i]`` of ``bank``.

    ``frozen`` is the flat base without its head; ``mcfg.num_labels`` is the widest head; ``impl``
    is one of :data:`MIXED_IMPLS` (see :class:`GatheredKernel`).
    """
    if impl not in MIXED_IMPLS:
        raise ValueError(f"mixed-batch impl {impl!r} is not one of {', '.join(MIXED_IMPLS)}")
    params = dict(frozen)
    for path, f in bank["lora"].items():
        params[path] = GatheredKernel(params[path], f["a"], f["b"], idx, impl)
    for path, stacked in bank["head"].items():
        zero = jnp.zeros(stacked.shape[1:], stacked.dtype)
        params[path] = (GatheredKernel(zero, stacked, None, idx) if path.endswith("kernel")
                        else GatheredBias(zero, stacked, idx))
    return forward(mcfg, tree_lib.unflatten(params), batch, hidden=False)["logits"]


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
