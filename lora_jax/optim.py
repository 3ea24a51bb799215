"""The optimizer: AdamW per label over the trainable leaves, with one warm-up/decay schedule.

The labels come from ``lora.labels`` (the one labelling that also drives the checkpoint filter and the
parameter counts); frozen leaves never reach the optimizer, so they own no state.
"""

from __future__ import annotations

import jax
import optax

from . import gate, lora
from .config import TrainConfig


def no_weight_decay(path: str) -> bool:
    """Biases and LayerNorm parameters are not decayed (as in BERT, RoBERTa and the LoRA paper)."""
    return path.endswith("/bias") or "LayerNorm" in path


def schedule(lr: float, total_steps: int, warmup_ratio: float) -> optax.Schedule:
    """Linear warm-up from 0 to ``lr`` over ``warmup_ratio`` of the steps, then linear decay to 0."""
    warmup = int(round(warmup_ratio * total_steps))
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, max(warmup, 1)), optax.linear_schedule(lr, 0.0, max(total_steps - warmup, 1))],
        [warmup],
    ) if warmup else optax.linear_schedule(lr, 0.0, max(total_steps, 1))


def make_optimizer(label_of: dict[str, str], cfg: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW per label ("lora", "trainable") with one schedule.

    ``label_of`` maps each trainable flat path to its label (from ``lora.labels``);
    frozen parameters never reach the optimizer, so they own no state. LoRA+
    (``loraplus_lr_ratio``) splits the adapters' label into A's and B's
    (``lora.factor_labels``), B's learning rate that many times A's;
    ``head_only_steps`` holds the adapters' learning rate at 0 for those first steps. A gated rank
    (``--rank-allocation gate``) labels its factors as A and B and its gates apart (``gate.labels``); the
    gates take ``gate.optimizer``.
    """

    def decay_mask(params):
        # Inside multi_transform the other label's leaves are empty MaskedNodes: map per entry.
        return {k: jax.tree.map(lambda _: not no_weight_decay(k), v) for k, v in params.items()}

    def shaped(lr: float, held: int = 0) -> optax.Schedule:
        sched = schedule(lr, total_steps - held, cfg.warmup_ratio)
        return optax.join_schedules([optax.constant_schedule(0.0), sched], [held]) if held else sched

    def adamw(lr: float, held: int = 0):
        return optax.adamw(shaped(lr, held), b1=0.9, b2=0.999, eps=1e-8, weight_decay=cfg.weight_decay,
                           mask=decay_mask)

    if cfg.rank_allocation == "gate":
        label_of = gate.labels(label_of)
    elif cfg.loraplus_lr_ratio != 1:
        label_of = lora.factor_labels(label_of)
    same = adamw(cfg.lr)

    def transform(label: str):
        if label == gate.GATE:  # the run's shape, its own scale (gate.py)
            return gate.optimizer(shaped(1.0, cfg.head_only_steps), cfg.gate_sparsity, total_steps)
        if label == lora.TRAINABLE or (label != lora.LORA_B and not cfg.head_only_steps):
            return same
        return adamw(cfg.lr * (cfg.loraplus_lr_ratio if label == lora.LORA_B else 1.0), cfg.head_only_steps)

    transforms = {label: transform(label) for label in sorted(set(label_of.values()))}
    return optax.chain(
        optax.clip_by_global_norm(cfg.max_grad_norm),
        optax.multi_transform(transforms, label_of),
    )
