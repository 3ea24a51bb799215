"""LoRA as a pure transform of parameter pytrees (Hu et al., 2021).

Conventions
-----------
* Parameter trees are nested dicts of arrays (Flax Linen ``params``). A leaf is
  named by its ``/``-joined path (``tree``), e.g. ``encoder/layer/0/attention/self/query/kernel``;
  target and trainable patterns are matched with ``re.fullmatch`` on that path.
* Flax kernels are ``(d_in, d_out)``: the transpose of torch's ``(out, in)``.
  A kernel of higher rank (a conv kernel ``(kh, kw, c_in, c_out)``) is treated as
  the ``(kh*kw*c_in, c_out)`` matrix, so LoRA applies to any Flax model.
* Adapters are ``{kernel_path: {"a": (d_in, r), "b": (r, d_out)}}``, kept in
  float32 whatever the base dtype. ``b`` starts at zero, so ΔW = 0 at init.
* ΔW = scale · a @ b, with scale = alpha / r (or alpha / sqrt(r) with rsLoRA).
* DoRA (Liu et al., 2024) adds ``"m": (d_out,)``, a trained magnitude per output column: the
  adapted kernel is m · (W + ΔW) / ||W + ΔW||_c, the norm taken over d_in for each column (torch's
  rows) and treated as a constant in the backward pass (the paper's section 4.3, peft's form).
  ``m`` starts at ||W||_c, so the adapted kernel starts at W.

The "LoRA tree" that training, checkpoints and counts work on is
``{"params": params, "lora": adapters}``; :func:`labels` marks each of its
leaves "lora", "trainable" or "frozen", and that one labelling drives the
optimizer, the checkpoint filter and the parameter counts.

This module depends on no model code: it imports jax, numpy, and our ``tree`` conventions,
``dropout`` and ``compiler`` helpers.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from . import tree as tree_lib
from .compiler import cast_matmul, dense
from .dropout import dropout
from .tree import flatten, unflatten

Params = dict[str, Any]
Adapters = dict[str, dict[str, jax.Array]]

# Target presets for BERT/RoBERTa-style parameter paths.
TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "qv": (r".*attention/self/(query|value)/kernel",),
    "qkvo": (r".*attention/(self/(query|key|value)|output/dense)/kernel",),
    "all": (
        r".*attention/(self/(query|key|value)|output/dense)/kernel",
        r".*layer/\d+/(intermediate|output)/dense/kernel",
    ),
}

LORA, TRAINABLE, FROZEN = "lora", "trainable", "frozen"
LORA_A, LORA_B = "lora_a", "lora_b"  # factor_labels: the adapters' label split by factor (LoRA+)
MAGNITUDE = "m"  # DoRA's magnitude vector, a leaf beside "a" and "b"


class LoraError(ValueError):
    """A LoRA option or target that does not fit the parameter tree."""


@dataclass(frozen=True)
class LoraConfig:
    """What LoRA adapts and how.

    Attributes:
      rank: r, the inner dimension of ΔW = a @ b; 0 < r <= min(d_in, d_out).
      alpha: ΔW is scaled by alpha / r (or alpha / sqrt(r) with ``rslora``).
      dropout: dropout rate on the LoRA input path only (x -> dropout -> a -> b);
        needs the factored forward, since a merged weight has no separate path.
      targets: regexes (fullmatch on ``/``-joined paths) of the kernels to adapt.
        Empty means no adapters (full fine-tuning uses this with ``trainable=(".*",)``).
      trainable: regexes of base parameters trained in full and saved with the
        adapter (the task head).
      init_a: "kaiming" (uniform, bound 1/sqrt(d_in): torch's Linear default and
        peft's) or "gaussian" (std 1/r, peft's ``init_lora_weights="gaussian"``), both with B = 0;
        or "pissa" / "olora", A and B from the base kernel (``lora_init``, which also makes the
        residual base that these train on).
      rslora: use alpha / sqrt(r) (Kalajdzievski, 2023) instead of alpha / r.
      dora: DoRA: each adapter also trains a magnitude vector ``m`` (see the module docstring).
    """

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    targets: tuple[str, ...] = TARGET_PRESETS["qv"]
    trainable: tuple[str, ...] = (rf"{tree_lib.HEAD}/.*",)
    init_a: Literal["kaiming", "gaussian", "pissa", "olora"] = "kaiming"
    rslora: bool = False
    dora: bool = False

    def __post_init__(self):
        if self.targets:
            if not isinstance(self.rank, int) or self.rank <= 0:
                raise LoraError(f"LoRA rank must be a positive integer, got {self.rank!r}")
            if not self.alpha > 0:
                raise LoraError(f"LoRA alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise LoraError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if self.init_a not in ("kaiming", "gaussian", "pissa", "olora"):
            raise LoraError(f"init_a must be kaiming, gaussian, pissa or olora, got {self.init_a!r}")
        if self.dora and self.init_a not in ("kaiming", "gaussian"):
            raise LoraError(f"DoRA starts from the base kernel's column norms: use it with kaiming or gaussian "
                            f"initialisation, not {self.init_a}")
        for pattern in self.targets + self.trainable:
            try:
                re.compile(pattern)
            except re.error as e:
                raise LoraError(f"invalid pattern {pattern!r}: {e}") from None

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def full_finetuning() -> LoraConfig:
    """The configuration of full fine-tuning: no adapters, every parameter trainable."""
    return LoraConfig(targets=(), trainable=(".*",))


# ----------------------------------------------------------------------------- paths


def _matches(path: str, patterns: tuple[str, ...]) -> bool:
    return any(re.fullmatch(p, path) for p in patterns)


def target_paths(params: Params, cfg: LoraConfig) -> list[str]:
    """Paths of the kernels ``cfg.targets`` selects.

    Raises LoraError if a pattern matches nothing (a typo would otherwise
    silently train only the head) or selects a leaf that is not a matrix.
    """
    flat = flatten(params)
    for pattern in cfg.targets:
        if not any(re.fullmatch(pattern, p) for p in flat):
            raise LoraError(f"LoRA target pattern {pattern!r} matches no parameter")
    paths = [p for p in flat if _matches(p, cfg.targets)]
    for p in paths:
        if np.ndim(flat[p]) < 2:
            raise LoraError(f"LoRA target {p} has shape {np.shape(flat[p])}: not a matrix or kernel")
    return paths


def _as_matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """A kernel ``(..., d_out)`` as the matrix ``(prod(...), d_out)``."""
    return int(np.prod(shape[:-1])), int(shape[-1])


# ----------------------------------------------------------------------------- init / merge


def init(params: Params, cfg: LoraConfig, key: jax.Array) -> Adapters:
    """Fresh adapters for every target kernel; ``b = 0`` so ΔW = 0.

    Returns ``{path: {"a": (d_in, r), "b": (r, d_out)}}`` in float32, with DoRA also
    ``"m": ||W||_c (d_out,)``, so the adapted kernel starts at W. (PiSSA and OLoRA start from the
    base kernel instead: ``lora_init.init``.)
    """
    if cfg.init_a not in ("kaiming", "gaussian"):
        raise LoraError(f"lora.init makes kaiming or gaussian adapters; {cfg.init_a} is lora_init.init's")
    flat = flatten(params)
    adapters = {}
    paths = target_paths(params, cfg)
    for i, path in enumerate(paths):
        d_in, d_out = _as_matrix_shape(np.shape(flat[path]))
        if cfg.rank > min(d_in, d_out):
            raise LoraError(
                f"LoRA rank {cfg.rank} exceeds min(d_in, d_out) = {min(d_in, d_out)} of {path}"
            )
        k = jax.random.fold_in(key, i)
        if cfg.init_a == "gaussian":
            a = jax.random.normal(k, (d_in, cfg.rank), jnp.float32) / cfg.rank
        else:
            bound = 1.0 / math.sqrt(d_in)
            a = jax.random.uniform(k, (d_in, cfg.rank), jnp.float32, -bound, bound)
        adapters[path] = {"a": a, "b": jnp.zeros((cfg.rank, d_out), jnp.float32)}
        if cfg.dora:
            adapters[path][MAGNITUDE] = column_norm(jnp.asarray(flat[path], jnp.float32))
    return adapters


def column_norm(w: jax.Array) -> jax.Array:
    """||w||_c: the L2 norm of each output column of a kernel ``(..., d_out)``, over all other axes -> (d_out,)."""
    w = w.astype(jnp.float32)
    return jnp.sqrt(jnp.sum(jnp.square(w), axis=tuple(range(w.ndim - 1))))


def dora_gain(v: jax.Array, m: jax.Array) -> jax.Array:
    """m / ||v||_c (d_out,), float32, for the adapted direction v = W + ΔW; the norm is a constant to autodiff
    (DoRA's memory-saving form, as peft computes it: no gradient flows through it)."""
    return m.astype(jnp.float32) / jax.lax.stop_gradient(column_norm(v))


def is_dora(adapters: dict) -> bool:
    """Whether adapters (``{path: {...}}`` or nested by path) carry DoRA magnitudes."""
    return any(MAGNITUDE in f for f in table(adapters).values())


def delta(adapter: dict[str, jax.Array], cfg: LoraConfig) -> jax.Array:
    """ΔW = scale · a @ b as a float32 ``(d_in, d_out)`` matrix."""
    a = adapter["a"].astype(jnp.float32)
    b = adapter["b"].astype(jnp.float32)
    return cfg.scale * jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def table(adapters: dict) -> Adapters:
    """``{path: {"a", "b"}}`` from adapters in that form or nested by path (as ``unflatten`` leaves them)."""
    out: Adapters = {}
    for key, leaf in flatten(adapters).items():
        path, _, factor = key.rpartition("/")
        out.setdefault(path, {})[factor] = leaf
    return out


def merged_kernel(w: jax.Array, adapter: dict[str, jax.Array], cfg: LoraConfig) -> jax.Array:
    """W + ΔW in float32 (W's shape); with DoRA, m · (W + ΔW) / ||W + ΔW||_c."""
    v = dense(w) + delta(adapter, cfg).reshape(w.shape)
    return v * dora_gain(v, adapter[MAGNITUDE]) if MAGNITUDE in adapter else v


def merge(params: Params, adapters: Adapters, cfg: LoraConfig) -> Params:
    """A new tree with the adapted kernel (:func:`merged_kernel`) at each target, cast back to W's dtype.

    Pure: ``params`` is not modified. The result runs in the plain model.
    """
    flat = flatten(params)
    out = dict(flat)
    for path, adapter in table(adapters).items():
        out[path] = merged_kernel(flat[path], adapter, cfg).astype(flat[path].dtype)
    return unflatten(out)


@jax.tree_util.register_pytree_node_class
@dataclass
class LoraKernel:
    """A kernel that computes ``x @ W + scale · dropout(x) @ a @ b`` without forming W + ΔW.

    It stands in a parameter tree where a model does ``x @ kernel``: JAX arrays
    defer ``@`` to an unknown right operand, so ``__rmatmul__`` takes over and
    the model code needs no LoRA branch. ``w`` is the first leaf, so Flax's
    shape check against the declared kernel still applies.

    With DoRA's magnitude ``m`` (d_out,) and g = m / ||W + ΔW||_c (a constant to autodiff), it computes
    ``g · (x @ W + scale · x @ a @ b)``; with LoRA dropout, peft's form
    ``x @ W + (g - 1) · (h @ W) + g · scale · h @ a @ b`` for h = dropout(x). DoRA forms W + ΔW for the norm.
    """

    w: jax.Array
    a: jax.Array
    b: jax.Array
    key: jax.Array | None = None
    m: jax.Array | None = None
    scale: float = 1.0
    dropout: float = 0.0

    def tree_flatten(self):
        return (self.w, self.a, self.b, self.key, self.m), (self.scale, self.dropout)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    @property
    def shape(self):
        return self.w.shape

    @property
    def dtype(self):
        return self.w.dtype

    def factors(self) -> tuple[jax.Array, ...]:
        """The adapter's small trained leaves (a, b, and DoRA's m): what ``compiler`` treats as low-rank
        factors (in a gradient tree too)."""
        return (self.a, self.b) if self.m is None else (self.a, self.b, self.m)

    def astype(self, dtype) -> "LoraKernel":
        # The compute dtype applies to the factors (the fp32 masters stay outside). ``w`` keeps
        # its stored dtype: the product casts it (compiler.cast_matmul), so a bfloat16 base's cast
        # copy is not kept for the backward pass. DoRA's gain is computed in float32 from m.
        return LoraKernel(self.w, self.a.astype(dtype), self.b.astype(dtype), self.key, self.m, self.scale,
                          self.dropout)

    def __rmatmul__(self, x: jax.Array) -> jax.Array:
        dt = x.dtype
        h = dropout(x, self.dropout, self.key)
        # 2-D rows, as compiler.matmul_rows does for plain kernels: XLA's CPU backend runs the gradients
        # of (batch, seq, d) products (two contracting dimensions) in a slow loop.
        rows, h = x.reshape(-1, x.shape[-1]), h.reshape(-1, x.shape[-1])
        low = self.scale * ((h @ self.a.astype(dt)) @ self.b.astype(dt))
        base = cast_matmul(rows, self.w)
        if self.m is None:
            y = base + low.astype(dt)
        else:
            ab = jnp.matmul(self.a.astype(jnp.float32), self.b.astype(jnp.float32))
            g = dora_gain(dense(self.w) + self.scale * ab, self.m).astype(dt)
            if self.dropout == 0 or self.key is None:
                y = g * (base + low.astype(dt))
            else:  # the base path sees x, the adapter's sees h: peft's form
                y = base + (g - 1) * cast_matmul(h, self.w) + g * low.astype(dt)
        return y.reshape(*x.shape[:-1], y.shape[-1])


def apply(
    params: Params,
    adapters: Adapters,
    cfg: LoraConfig,
    *,
    mode: Literal["merged", "factored"] = "factored",
    rng: jax.Array | None = None,
) -> Params:
    """The parameter tree a model runs with.

    ``merged``: W + ΔW (works with any Flax model; no LoRA dropout).
    ``factored``: :class:`LoraKernel` leaves, for models that compute ``x @ kernel``;
    LoRA dropout is applied when ``rng`` is given and ``cfg.dropout > 0``.
    """
    if mode == "merged":
        if rng is not None and cfg.dropout > 0:
            raise LoraError("LoRA dropout needs the factored forward (a merged weight has no LoRA path)")
        return merge(params, adapters, cfg)
    if mode != "factored":
        raise LoraError(f"unknown LoRA forward mode {mode!r}")
    flat = flatten(params)
    out = dict(flat)
    for i, (path, adapter) in enumerate(table(adapters).items()):
        w = flat[path]
        if len(w.shape) != 2:
            raise LoraError(f"the factored forward needs a 2-D kernel; {path} has shape {w.shape}")
        key = None if rng is None or cfg.dropout == 0 else jax.random.fold_in(rng, i)
        out[path] = LoraKernel(w, adapter["a"], adapter["b"], key, adapter.get(MAGNITUDE), cfg.scale, cfg.dropout)
    return unflatten(out)


# ----------------------------------------------------------------------------- labels / counts


def labels(tree: dict, cfg: LoraConfig) -> dict:
    """Label every leaf of ``{"params": ..., "lora": ...}`` as "lora", "trainable" or "frozen".

    Adapter leaves are "lora"; base parameters matching ``cfg.trainable`` are
    "trainable"; every other base parameter is "frozen" (adapted kernels too:
    their adapters train, they do not). Same structure as ``tree``.
    """
    params = flatten(tree.get(tree_lib.PARAMS, {}))
    for pattern in cfg.trainable:
        if params and not any(re.fullmatch(pattern, p) for p in params):
            raise LoraError(f"trainable pattern {pattern!r} matches no parameter")
    out = {tree_lib.PARAMS: unflatten({p: TRAINABLE if _matches(p, cfg.trainable) else FROZEN for p in params})}
    if tree_lib.ADAPTERS in tree:
        out[tree_lib.ADAPTERS] = jax.tree_util.tree_map(lambda _: LORA, tree[tree_lib.ADAPTERS])
    return out


def factor_labels(label_of: dict[str, str]) -> dict[str, str]:
    """Flat labels with each LoRA leaf's "lora" split into "lora_a" and "lora_b" by its factor (the
    path's last part), so an optimizer can treat B apart from A (LoRA+). DoRA's magnitude goes with B,
    as in peft's ``create_loraplus_optimizer`` (every 1-D trained leaf there). Other labels are kept."""
    def split(path: str, label: str) -> str:
        if label != LORA:
            return label
        return {"a": LORA_A, "b": LORA_B, MAGNITUDE: LORA_B}.get(path.rpartition("/")[2], label)

    return {p: split(p, label) for p, label in label_of.items()}


def partition(tree: dict, label_tree: dict) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a tree into flat ``(trainable, frozen)`` dicts; "lora" counts as trainable."""
    flat, flat_labels = flatten(tree), flatten(label_tree)
    trainable = {p: v for p, v in flat.items() if flat_labels[p] != FROZEN}
    frozen = {p: v for p, v in flat.items() if flat_labels[p] == FROZEN}
    return trainable, frozen


def combine(*flats: dict[str, Any]) -> dict:
    """Inverse of :func:`partition`: flat dicts -> one nested tree."""
    merged: dict[str, Any] = {}
    for f in flats:
        merged.update(f)
    tree = unflatten(merged)
    if tree_lib.ADAPTERS in tree:  # adapter keys are paths themselves: regroup as {path: {"a", "b"}}
        tree[tree_lib.ADAPTERS] = table(tree[tree_lib.ADAPTERS])
    return tree


def count(tree: dict, label_tree: dict) -> dict[str, int]:
    """Number of scalars per label, plus "total" (base + adapters)."""
    counts = {LORA: 0, TRAINABLE: 0, FROZEN: 0}
    flat_labels = flatten(label_tree)
    for path, leaf in flatten(tree).items():
        counts[flat_labels[path]] += int(np.prod(np.shape(leaf)))
    counts["total"] = sum(counts.values())
    return counts
