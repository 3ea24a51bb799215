"""A sparsity-gated rank (SoRA-style, Ding et al., EMNLP 2023): one gate per rank-1 component, pruned
by a proximal L1 step, so that each matrix keeps the components its task needs.

Conventions
-----------
* Each target kernel W ``(d_in, d_out)`` gets ΔW = scale · P · diag(g) · Q in AdaLoRA's SVD-form tree
  (``adaptive``): ``{"p": (d_in, r), "lam": (r,) the gates, "q": (r, d_out)}``. P starts as LoRA's A
  (kaiming), Q as LoRA's B (zeros), so ΔW = 0 at init; the gates start at 1. The model runs these
  adapters through ``adaptive.as_lora`` (A = P·diag(g), B = Q), as it runs AdaLoRA's.
* P trains as LoRA's A and Q as LoRA's B (LoRA+ applies: :func:`labels`). The gates have a label of
  their own, :data:`GATE`, and an optimizer of their own (:func:`optimizer`): Adam's direction at
  the gate learning rate η_g(t), then the soft-threshold g ← sign(z)·max(|z| − τ_t, 0) of
  z = g + update, with τ_t = sparsity · η_g(t). Both run inside the jitted train step.
* A gate at exactly 0 removes its component from ΔW; it reopens only if the task pushes it harder
  than the threshold. At the end, components whose gate is 0 are dropped: the saved adapter is
  plain LoRA at each matrix's surviving rank (``adaptive.truncate``; peft: ``rank_pattern``).

Why the gates have their own learning rate: at the adapters' rate (5e-4 over a few hundred
steps) a gate could move by about 0.1 in a whole run and none would reach 0. η_g follows the
run's warm-up and linear decay with its peak set so that the rates sum to :data:`TRAVEL` over the
run, whatever its length: a gate can close from 1 and open again. The threshold then sums to
sparsity · TRAVEL. Adam's direction is about ±1 for a gate the task pushes steadily and about 0 for
one it does not, so ``sparsity`` reads as the steadiness of push a component needs to stay: at
0.5 a gate that nothing pushes reaches 0 at the end of the run.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import lora
from . import tree as tree_lib

GATE = "lora_gate"  # the gates' label (lora.factor_labels splits "lora" into A, B and this)
TRAVEL = 2.0  # the sum of the gate learning rate over a run


class GateError(ValueError):
    """Gate options that cannot work."""


def init(adapters: dict) -> dict:
    """LoRA's ``{path: {"a", "b"}}`` as gated ``{path: {"p": a, "lam": ones (r,), "q": b}}`` (same ΔW)."""
    out = {}
    for path, ad in adapters.items():
        if set(ad) != {"a", "b"}:
            raise GateError(f"gated ranks take plain LoRA factors, {path} has {sorted(ad)} (DoRA?)")
        out[path] = {"p": ad["a"], "lam": jnp.ones((ad["a"].shape[1],), jnp.float32), "q": ad["b"]}
    return out


def gate_keys(trainable: dict) -> list[str]:
    """The flat keys of the gates in a trainable dict."""
    return [k for k in tree_lib.adapters_only(trainable) if tree_lib.adapter_path(k)[1] == "lam"]


def total_rank(trainable: dict) -> jax.Array:
    """The number of open (nonzero) gates over all matrices; traceable."""
    return sum(jnp.sum(trainable[k] != 0) for k in gate_keys(trainable))


def final_mask(trainable: dict) -> dict:
    """``{"mask": {path: 1.0 where the gate is open}}``: what ``adaptive.truncate`` keeps at export."""
    return {"mask": {tree_lib.adapter_path(k)[0]: (np.asarray(trainable[k]) != 0).astype(np.float32)
                     for k in gate_keys(trainable)}}


def final_ranks(trainable: dict) -> dict[str, int]:
    """Each matrix's number of open gates."""
    return {p: int(m.sum()) for p, m in final_mask(trainable)["mask"].items()}


class SoftThresholdState(NamedTuple):
    count: jax.Array


def soft_threshold(threshold: optax.Schedule) -> optax.GradientTransformation:
    """Turn an update u of parameters θ into the proximal L1 step: the new θ is
    sign(θ + u)·max(|θ + u| − threshold(t), 0), with t the number of updates so far. It reads ``params``."""

    def init_fn(params):
        del params
        return SoftThresholdState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        if params is None:
            raise GateError("soft_threshold needs the parameters: pass params to update")
        tau = threshold(state.count)

        def step(u, p):
            z = p + u
            return jnp.sign(z) * jnp.maximum(jnp.abs(z) - tau, 0.0) - p

        return jax.tree.map(step, updates, params), SoftThresholdState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)


def optimizer(schedule, sparsity: float, total_steps: int) -> optax.GradientTransformation:
    """The gates' optimizer: Adam's direction at η_g(t) = TRAVEL · schedule(t) / Σ schedule, then the
    soft-threshold at sparsity · η_g(t). ``schedule(t)`` is the run's shape (warm-up, decay) at any peak."""
    if not 0 <= sparsity < 2:
        raise GateError(f"--gate-sparsity must be in [0, 2), got {sparsity}")
    area = float(jnp.sum(schedule(jnp.arange(total_steps))))
    if area <= 0:
        raise GateError("the learning-rate schedule is zero over the whole run: the gates cannot move")

    def rate(t):
        return TRAVEL * schedule(t) / area

    return optax.chain(optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8), optax.scale_by_learning_rate(rate),
                       soft_threshold(lambda t: sparsity * rate(t)))


def labels(label_of: dict[str, str]) -> dict[str, str]:
    """Flat labels of a gated run: P as LoRA's A, Q as LoRA's B, the gates as :data:`GATE`."""
    names = {"p": lora.LORA_A, "q": lora.LORA_B, "lam": GATE}
    return {k: (names.get(tree_lib.adapter_path(k)[1], label) if label == lora.LORA else label)
            for k, label in label_of.items()}
