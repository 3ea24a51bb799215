"""The train step: one pure function, ``jax.jit``-compiled with its state donated, and what it needs.

Parameter flow: the model's parameters and the LoRA adapters form one tree
``{"params": ..., "lora": ...}``; ``lora.labels`` marks each leaf, and
``lora.partition`` splits it into a flat ``trainable`` dict (the LoRA factors
and the head, float32) and a flat ``frozen`` dict (the base, any dtype). Only
``trainable`` is differentiated, optimized (optax.multi_transform over the
same labels) and donated; ``frozen`` is passed unchanged into every step, so
it stays bit-identical and owns no optimizer state.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import adaptive, compiler, gate, lora, parallel
from . import tree as tree_lib
from .config import XLA_CPU_SCHEDULERS
from .eval_step import model_params
from .model import ModelConfig, forward
from .profiling import stage


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    trainable: dict[str, jax.Array]
    opt_state: Any
    rng: jax.Array
    aux: Any  # adaptive-rank allocator state ({} for LoRA and full fine-tuning)


def new_state(trainable: dict, optimizer, seed: int, *, adalora: bool = False) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        trainable=trainable,
        opt_state=optimizer.init(trainable),
        rng=jax.random.key_data(jax.random.key(seed + 1)),
        aux=adaptive.init_state(trainable) if adalora else {},
    )


def task_loss(logits: jax.Array, labels: jax.Array, regression: bool) -> jax.Array:
    """Mean cross-entropy over classes, or mean squared error for regression (num_labels = 1)."""
    if regression:
        return jnp.mean(jnp.square(logits[:, 0] - labels.astype(jnp.float32)))
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def make_loss_fn(mcfg: ModelConfig, lcfg: lora.LoraConfig, *, mode: str, regression: bool,
                 ada: adaptive.AdaLoraConfig | None = None) -> Callable:
    """``loss_fn(trainable, frozen, batch, rng) -> (loss, task_loss)``, dropout on: what the train
    step differentiates with respect to ``trainable``. With ``ada`` the loss adds the orthogonality
    regulariser; the task loss is returned beside it for logging."""

    def loss_fn(trainable, frozen, batch, rng):
        k_lora, k_drop = jax.random.split(rng)
        params = model_params(trainable, frozen, lcfg, mode=mode, rng=k_lora)
        logits = forward(mcfg, params, batch, train=True, rng=k_drop, hidden=False)["logits"]
        loss = task_loss(logits, batch["labels"], regression)
        if ada is None or ada.orth_reg == 0:
            return loss, loss
        reg = adaptive.orthogonality(lora.combine(trainable)[tree_lib.ADAPTERS])
        return loss + ada.orth_reg * reg, loss

    return loss_fn


def compiler_options(xla_scheduler: str) -> dict[str, str] | None:
    """The XLA options for a train step under ``xla_scheduler`` on this process's backend (None: XLA's own;
    other backends than the CPU ignore the choice)."""
    return compiler.cpu_scheduler_options(None if xla_scheduler == "default" else XLA_CPU_SCHEDULERS[xla_scheduler])


def make_train_step(mcfg: ModelConfig, lcfg: lora.LoraConfig, optimizer, *, mode: str, regression: bool,
                    mesh=None, ada: adaptive.AdaLoraConfig | None = None, xla_scheduler: str = "default",
                    gated: bool = False) -> Callable:
    """``step(state, frozen, batch) -> (state, {"loss", "grad_norm"})``, jitted with ``state`` donated.

    With ``ada`` (AdaLoRA) the loss adds the orthogonality regulariser, the
    allocator runs after the update (importance, budget, λ masks) and the
    metrics add "budget" and "rank" (total rank in use). "loss" is the task loss. With ``gated``
    (``--rank-allocation gate``) the metrics add "rank", the number of open gates.

    With a ``mesh`` (see ``parallel``), the inputs arrive already placed (batch
    sharded, state replicated) and the outputs are pinned replicated, so the
    state keeps its placement from step to step; the loss is the mean over the
    global batch whatever the number of devices.

    ``xla_scheduler="memory"`` compiles the step with XLA:CPU's memory-optimised scheduler (CPU only):
    with a layer remat policy it keeps the counters of the recomputation's dropout draws from being
    prepared in the forward pass and held to the backward (results/profile/xla-cpu-remat/).
    """

    loss_fn = make_loss_fn(mcfg, lcfg, mode=mode, regression=regression, ada=ada)

    def step(state: TrainState, frozen: dict, batch: dict) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(state.rng, state.step)
        # Gradients with respect to `trainable` only: no zero gradients are formed for the base.
        (_, loss), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable, frozen, batch, rng)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        out = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        aux = state.aux
        if ada is not None:
            aux, trainable, extra = adaptive.allocate(ada, aux, trainable, grads, state.step + 1)
            out.update(extra)
        if gated:
            out["rank"] = gate.total_rank(trainable)
        new = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state, aux=aux)
        return new, out

    options = compiler_options(xla_scheduler)
    if mesh is None:
        return jax.jit(step, donate_argnums=0, compiler_options=options)
    return jax.jit(step, donate_argnums=0, out_shardings=parallel.replicated(mesh), compiler_options=options)


_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "first_index", "labels")


def model_inputs(batch: dict) -> dict:
    """What the train step reads of a batch (packed batches add position_ids and first_index)."""
    return {k: batch[k] for k in _MODEL_INPUTS if k in batch}


class PerShape:
    """Ahead-of-time compiles ``fn`` once per input shape and counts the compilations.

    A bounded number of shapes (length buckets) means a bounded number of
    compilations; the count and the compile seconds go into the report.
    """

    def __init__(self, fn: Callable):
        self.fn = fn
        self.compiled: dict[tuple, Any] = {}
        self.compile_seconds = 0.0

    def __call__(self, *args):
        key = tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(args[-1]))
        if key not in self.compiled:
            stage(f"compile {key[0][0]}")
            t0 = time.perf_counter()
            self.compiled[key] = self.fn.lower(*args).compile()
            self.compile_seconds += time.perf_counter() - t0
            stage("train steps")
        return self.compiled[key](*args)

    @property
    def count(self) -> int:
        return len(self.compiled)

    def largest(self):
        """The executable for the largest input (by element count), for the memory analysis."""
        if not self.compiled:
            return None
        key = max(self.compiled, key=lambda k: sum(int(np.prod(s)) for s, _ in k))
        return self.compiled[key]
