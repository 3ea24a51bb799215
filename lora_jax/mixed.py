"""Mixed batches: one jitted forward in which every row of a batch uses its own adapter.

The adapters of one base are stacked on an adapter axis K (:func:`stack_adapters`); kernel and bias
objects stand in the parameter tree where the model computes ``x @ kernel + bias`` and pick each row's
own factors (:class:`GatheredKernel`, :class:`GatheredBias`), so the model needs no serving branch.
Shapes: B = batch rows, K = adapters, r = the largest rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import lora
from . import tree as tree_lib
from .model import ModelConfig, forward


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

    ``gain`` (K, d_out), when some adapter is DoRA's: row i's output is multiplied by ``gain[idx[i]]``,
    m / ||W + ΔW||_c for a DoRA adapter and 1 for the others (DoRA's kernel is that gain times W + ΔW).
    """

    w: jax.Array
    a: jax.Array
    b: jax.Array | None
    idx: jax.Array
    impl: str = "gather"
    gain: jax.Array | None = None

    def tree_flatten(self):
        return (self.w, self.a, self.b, self.idx, self.gain), self.impl

    @classmethod
    def tree_unflatten(cls, impl, children):
        w, a, b, idx, gain = children
        return cls(w, a, b, idx, impl, gain)

    @property
    def shape(self):
        return self.w.shape

    def astype(self, dtype) -> "GatheredKernel":
        return GatheredKernel(self.w.astype(dtype), self.a.astype(dtype),
                              None if self.b is None else self.b.astype(dtype), self.idx, self.impl,
                              None if self.gain is None else self.gain.astype(dtype))

    def __rmatmul__(self, x):
        y = self._product(x)
        if self.gain is None:
            return y
        g = self.gain[self.idx]  # (B, d_out), broadcast over the sequence axes
        return y * g.reshape(g.shape[:1] + (1,) * (y.ndim - 2) + g.shape[1:])

    def _product(self, x):
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
    contributes zeros. Where some adapter is DoRA's, ``gain`` (K, d_out): see :class:`GatheredKernel`.
    Heads: whole per-adapter kernels and biases; the label axis is padded to the
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
        gain, dora = np.ones((k, d_out), np.float32), False
        for i, (trained, cfg) in enumerate(adapters):
            key_a, key_b = tree_lib.adapter_key(path, "a"), tree_lib.adapter_key(path, "b")
            if key_a in trained:
                r = trained[key_a].shape[1]  # per matrix: adaptive-rank adapters vary
                a[:, i, :r] = trained[key_a]
                b[i, :r, :] = np.asarray(trained[key_b]) * cfg.scale
            key_m = tree_lib.adapter_key(path, lora.MAGNITUDE)
            if key_m in trained:
                v = lora.merged_kernel(base[path], {"a": trained[key_a], "b": trained[key_b]}, cfg)
                gain[i], dora = np.asarray(lora.dora_gain(v, trained[key_m])), True
        bank_lora[path] = {"a": a, "b": b, **({"gain": gain} if dora else {})}
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
        params[path] = GatheredKernel(params[path], f["a"], f["b"], idx, impl, f.get("gain"))
    for path, stacked in bank["head"].items():
        zero = jnp.zeros(stacked.shape[1:], stacked.dtype)
        params[path] = (GatheredKernel(zero, stacked, None, idx) if path.endswith("kernel")
                        else GatheredBias(zero, stacked, idx))
    return forward(mcfg, tree_lib.unflatten(params), batch, hidden=False)["logits"]
