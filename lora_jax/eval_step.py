"""The eval step, shared by training, evaluation and serving: merged adapters, no dropout, logits.

Inference imports this, never training. ``model_params`` is how every step turns the flat
``(trainable, frozen)`` split back into the tree the model runs with.
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from . import adaptive, lora, metrics, parallel
from . import batching
from . import data as data_lib
from . import tree as tree_lib
from .model import ModelConfig, forward


def model_params(trainable: dict, frozen: dict, lcfg: lora.LoraConfig, *, mode: str, rng=None) -> dict:
    """The parameter tree the model runs with: base + head, with the adapters applied."""
    tree = lora.combine(frozen, trainable)
    adapters = tree.get(tree_lib.ADAPTERS)
    if not adapters:
        return tree[tree_lib.PARAMS]
    if adaptive.is_svd(adapters):
        adapters = adaptive.as_lora(adapters)
    return lora.apply(tree[tree_lib.PARAMS], adapters, lcfg, mode=mode, rng=rng)


def make_eval_step(mcfg: ModelConfig, lcfg: lora.LoraConfig, mesh=None) -> Callable:
    """``eval(trainable, frozen, batch) -> logits (B, num_labels)``; adapters merged (no dropout).

    With a ``mesh`` the logits come back replicated, readable on every process.
    """

    def evaluate(trainable, frozen, batch):
        params = model_params(trainable, frozen, lcfg, mode="merged")
        return forward(mcfg, params, batch, train=False, hidden=False)["logits"]

    if mesh is None:
        return jax.jit(evaluate)
    return jax.jit(evaluate, out_shardings=parallel.replicated(mesh))


def evaluate(task: data_lib.Task, dev: dict[str, data_lib.Encoded], buckets: tuple[int, ...], eval_fn: Callable,
             trainable: dict, frozen: dict, batch_size: int, mesh=None) -> dict[str, dict[str, float]]:
    """Metrics per dev split, e.g. {"dev": {"accuracy": 0.7}}.

    With a ``mesh`` each process builds its rows of every batch and all of them
    see all logits (``eval_fn`` from ``make_eval_step(..., mesh)``).
    """
    rows = parallel.local_rows(batch_size, mesh) if mesh is not None else None
    results = {}
    for split, enc in dev.items():
        preds = np.zeros(len(enc), np.float32 if task.is_regression else np.int64)
        for idx in batching.eval_order(enc.lengths, batch_size):
            batch = batching.collate(enc, idx, buckets, batch_size, rows=rows)
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
            if mesh is not None:
                inputs = parallel.put_batch(inputs, mesh)
            logits = parallel.to_host(eval_fn(trainable, frozen, inputs))[: len(idx)]
            preds[idx] = metrics.predictions_from_logits(logits, task.is_regression)
        results[split] = {**metrics.compute(task.metrics, preds, enc.labels),
                          **metrics.spread(preds, enc.labels, task.is_regression)}
    return results
