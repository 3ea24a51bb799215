"""Compiler-level mechanics: how the encoder's arithmetic is laid out for XLA, apart from the model.

Each function here computes the same numbers as the plain expression it replaces; it exists because
XLA (mostly its CPU backend) schedules, fuses or stores the plain form badly. Each says why in one
line and links the measurement that justifies it. ``docs/performance.md`` tells the whole story.

The model calls these by name. Nothing here knows what LoRA is: a kernel object that stands in a
parameter tree (``lora.LoraKernel``) declares its low-rank factors through ``factors()``.

Shapes: B = batch rows, T = sequence length.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

# ----------------------------------------------------------------------------- remat policies

# "full", "dots" and "qkv" wrap each whole layer in jax.checkpoint: "full" keeps only the layer's
# input, "dots" also every matmul output, "qkv" also the query, key and value projections and the
# attention dropout mask, so the backward pass recomputes the attention, its output projection,
# the LayerNorms and the FFN's first matmul (with LoRA those weights are frozen: the FFN input is
# not needed for any gradient, only its width-4H output, which this recomputes instead of keeping).
# "attention" recomputes only the attention scores and probabilities, "cheap" those and the FFN
# activation: what costs no dense matmul to recompute; everything else is stored as without remat.
# Measured: results/bench/roberta-b16-s128-cpu-remat.md.
LAYER_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "qkv": jax.checkpoint_policies.save_only_these_names("qkv", "attention_keep"),
}
REMAT_POLICIES = ("none", "attention", "cheap", *LAYER_REMAT_POLICIES)


def remat_attention(attend: Callable, policy: str) -> Callable:
    """``attend`` recomputed in the backward pass under the "attention" and "cheap" policies: only q, k, v
    and the 1-byte dropout keep mask are kept; the (B, heads, T, T) float scores and probabilities (two
    copies with dropout) are recomputed."""
    if policy not in ("attention", "cheap"):
        return attend
    return jax.checkpoint(attend, policy=jax.checkpoint_policies.save_only_these_names("attention_keep"))


def remat_activation(act: Callable, policy: str) -> Callable:
    """The FFN activation recomputed under "cheap": autodiff of the exact GELU keeps three (B, T, 4H) arrays of
    its inner terms besides its input; recomputing them from the input keeps the input alone."""
    return jax.checkpoint(act) if policy == "cheap" else act


# ----------------------------------------------------------------------------- matmuls


def matmul_rows(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w`` for x (..., d_in), w (d_in, d_out), computed on x as one 2-D (N, d_in) matrix.

    (B, T, d_in) @ (d_in, d_out) makes the weight gradient a dot with two contracting dimensions, which
    XLA's CPU backend runs in a slow generic loop instead of its matmul library: the roberta-base LoRA step
    took 5.71 s before (results/bench/roberta-base-b16-s128-cpu.md) and 4.76 s after
    (results/bench/roberta-b16-s128-cpu.md).
    """
    y = cast_matmul(x.reshape(-1, x.shape[-1]), w)
    return y.reshape(*x.shape[:-1], w.shape[-1])


def cast_matmul(rows: jax.Array, w: jax.Array) -> jax.Array:
    """``rows @ w`` in the dtype of ``rows``: (N, d_in) @ (d_in, d_out) -> (N, d_out).

    A ``w`` stored in another dtype (a bfloat16 frozen base under float32 compute) is cast inside
    a ``jax.checkpoint``, so the backward pass casts it again instead of keeping the cast copy
    from the forward pass. Without it, autodiff keeps a compute-dtype copy of every such weight
    alive from its use in the forward pass to the backward pass, all of them at once at the
    peak, and storing the base in bfloat16 saves little of the step's memory. With it, a bfloat16 base
    keeps exactly what a float32 one keeps for the backward pass: benchmarks/bench.py counts it, and
    tests/test_readme.py asserts it for the "bf16-base+cheap" cell on every CI run.
    The recomputation is one cast per weight; the values are the same.

    A quantized ``w`` (``quant.QuantizedKernel``, anything with ``dequantize``): :func:`quantized_matmul`.
    """
    if hasattr(w, "dequantize"):
        return quantized_matmul(rows, w)
    if w.dtype == rows.dtype:
        return rows @ w
    return _cast_then_matmul(rows, w)


@jax.checkpoint
def _cast_then_matmul(rows, w):
    return rows @ w.astype(rows.dtype)


@jax.custom_vjp
def quantized_matmul(rows: jax.Array, w) -> jax.Array:
    """``rows @ dequantize(w)`` for a frozen quantized kernel: (N, d_in) -> (N, d_out).

    In the forward pass (and in a rematerialised layer's recomputation) the dequantization waits for the rows:
    0 x one of their elements is added to the dequantized kernel, inside the fusion that dequantizes. Without
    it XLA:CPU dequantized the kernels ahead of use and held them: at roberta-base shape the LoRA step's
    temporaries on an nf4 base were 532-550 MiB against 262 MiB on a float32 base (--remat full,
    memory-optimised scheduler), 262 MiB with it (results/memory/quantized-base/). The backward pass's
    dequantization is left free: tied to the incoming gradient as well, the --remat cheap step grew from
    1,785 to 2,586 MiB. The codes are integers and frozen: no gradient reaches them, and only they are kept
    for the backward pass.
    """
    return rows @ _dequantize_after(w, rows)


def _dequantize_after(w, x: jax.Array) -> jax.Array:
    """``w`` dequantized to ``x``'s dtype, made to depend on ``x`` (a NaN or inf in its first element reaches
    the product, whose result it already reaches)."""
    return w.dequantize(x.dtype) + 0 * x.reshape(-1)[0]


def _quantized_fwd(rows, w):
    return quantized_matmul(rows, w), w


def _quantized_bwd(w, g):
    return g @ w.dequantize(g.dtype).T, None


quantized_matmul.defvjp(_quantized_fwd, _quantized_bwd)


def dense(w, dtype=jnp.float32) -> jax.Array:
    """A stored weight as a plain array of ``dtype``: a cast, or a quantized weight's dequantization."""
    return w.dequantize(dtype) if hasattr(w, "dequantize") else w.astype(dtype)


# ----------------------------------------------------------------------------- LayerNorm


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def normalize(x: jax.Array, eps: float) -> jax.Array:
    """(x - mean) / sqrt(var + eps) over the last axis, float32.

    Its gradient is the textbook LayerNorm gradient, two row means, instead of the five reductions and
    intermediates that autodiff of the forward produces: XLA's CPU reductions are slow (LayerNorm's share
    of the step against PyTorch's: results/profile/roberta-base-b16-s128-cpu-gate.md, docs/performance.md).
    """
    return _normalize_fwd(x, eps)[0]


def _normalize_fwd(x, eps):
    mean = x.mean(-1, keepdims=True)
    centered = x - mean
    rstd = jax.lax.rsqrt(jnp.square(centered).mean(-1, keepdims=True) + eps)
    y = centered * rstd
    return y, (y, rstd)


def _normalize_bwd(eps, res, g):
    y, rstd = res
    return (rstd * (g - g.mean(-1, keepdims=True) - y * (g * y).mean(-1, keepdims=True)),)


normalize.defvjp(_normalize_fwd, _normalize_bwd)


# ----------------------------------------------------------------------------- between layers


def unfusable(d: jax.Array) -> jax.Array:
    """``d`` divided by (1 + 0 x itself): the same numbers (NaN where ``d`` is inf or NaN), but XLA's
    fusion counts a float divide as expensive and never copies it into several consumers."""
    return d / (1 + 0 * d)


@jax.custom_vjp
def unfused_gradient(x):
    """The identity, with its gradient passed through ``unfusable``. Between layers that are not
    rematerialised: without it XLA:CPU's fusion recomputed the residual stream's gradient chain
    (LayerNorm backward, dropout, adds) from the top layer down inside each consumer, so the first
    layers' backward fusions cost the most (80 ms each in a roberta-base LoRA step, profiled) and the
    step with --remat cheap took 6.15 s instead of 4.85 s (results/bench/roberta-b16-s128-cpu-gate.md)."""
    return x


unfused_gradient.defvjp(lambda x: (x, None), lambda _, g: (unfusable(g),))


def low_rank_factors(grads) -> list[jax.Array]:
    """The leaves of ``grads`` that kernel objects declare as low-rank factors (``factors()``: LoRA's A
    and B); plain arrays declare none."""
    nodes = jax.tree.leaves(grads, is_leaf=lambda n: hasattr(n, "factors"))
    return [f for n in nodes if hasattr(n, "factors") for f in n.factors()]


def gated_layer(*, deterministic: bool, rows: tuple[int, int]) -> Callable:
    """``call(layer, x, mask)`` for a rematerialised layer, with its backward pass gated on the gradient.

    A rematerialised layer's recomputation depends only on what the forward pass saved (its input; with
    "qkv" also q, k, v), so a scheduler may run it early, in the forward pass, where its outputs then
    live as long as if they had been kept. XLA's CPU scheduler does: without the gate "full" and "qkv"
    left the CPU step's memory exactly at --remat none's (results/profile/xla-cpu-remat/). The gate adds
    0 x one element of the incoming gradient to those saved activations, a data dependence (an
    optimization barrier is not: XLA removes barriers before scheduling), so the recomputation waits for
    the gradient on every backend, at the cost of one elementwise pass over each. (A NaN or inf in that
    element reaches the recomputation, where the gradient is already NaN or inf.)

    The gradient a layer hands down goes through ``unfusable``: without it, XLA's CPU fusion copied the
    residual stream's gradient chain into each consumer, and every layer's pieces of it stayed alive
    until the last layer's backward (MiniLM's LoRA step with "full", dropout off: 325 -> 223 MiB).
    ``rows``: (B, T), what marks an activation among the saved values.
    """
    return nn.custom_vjp(partial(_call_layer, deterministic=deterministic),
                         forward_fn=partial(_layer_forward, deterministic=deterministic),
                         backward_fn=partial(_gated_backward, rows=rows))


def _call_layer(layer, x, mask, *, deterministic):
    return layer(x, mask, deterministic)


def _layer_forward(layer, x, mask, *, deterministic):
    return nn.vjp(partial(_call_layer, deterministic=deterministic), layer, x, mask)


def _gated_backward(vjp_fn, g, *, rows):
    """vjp_fn's saved values, the float ones of shape (B, T, ...), made to depend on ``g``; then vjp_fn(g),
    its (B, T, ...) float gradients passed through an identity XLA will not fuse into their consumers."""
    activation = lambda a: a.shape[:2] == rows and jnp.issubdtype(a.dtype, jnp.floating)
    saved, tree = jax.tree.flatten(vjp_fn)
    zero = 0 * g.reshape(-1)[0]
    saved = [s + zero.astype(s.dtype) if activation(s) else s for s in saved]
    grads = jax.tree.unflatten(tree, saved)(g)
    # Low-rank factors' gradients tied into the gradient handed down, so that their dots (small outputs
    # from (B·T, ·) arrays, which nothing else waits for) run now and free what they read
    # (results/bench/roberta-b16-s128-cpu-tie.md). Not other parameters': a frozen weight's gradient is
    # dead code that XLA drops, and tying it in would compute it (tried: 1.3x the step time,
    # results/bench/roberta-b16-s128-cpu-tie-all-params.md).
    tie = sum((0 * w.reshape(-1)[0] for w in low_rank_factors(grads)), start=jnp.zeros((), g.dtype))
    return jax.tree.map(lambda d: unfusable(d + tie.astype(d.dtype)) if activation(d) else d, grads)


# ----------------------------------------------------------------------------- compiler options


def cpu_scheduler_options(scheduler_type: str | None) -> dict[str, str] | None:
    """XLA options that pick XLA:CPU's instruction scheduler (None: XLA's own). Other backends ignore the
    choice. The memory-optimised scheduler keeps the counters of a recomputation's dropout draws from being
    prepared in the forward pass and held to the backward (results/profile/xla-cpu-remat/)."""
    if scheduler_type is None or jax.default_backend() != "cpu":
        return None
    return {"xla_cpu_scheduler_type": scheduler_type}
