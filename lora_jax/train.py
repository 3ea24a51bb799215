"""Train state, optimizer, the jitted train and eval steps, and ``fit``.

Parameter flow: the model's parameters and the LoRA adapters form one tree
``{"params": ..., "lora": ...}``; ``lora.labels`` marks each leaf, and
``lora.partition`` splits it into a flat ``trainable`` dict (the LoRA factors
and the head, float32) and a flat ``frozen`` dict (the base, any dtype). Only
``trainable`` is differentiated, optimized (optax.multi_transform over the
same labels) and donated; ``frozen`` is passed unchanged into every step, so
it stays bit-identical and owns no optimizer state.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import data as data_lib
from . import adaptive, lora, metrics, packing, parallel, profiling, rundir, weights
from .config import LEGACY_VALUES, XLA_CPU_SCHEDULERS, TrainConfig
from .model import ModelConfig, forward
from .report import save_figure, write_text
from .rundir import RunError

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite, or grew past ``LOSS_BOUND`` times its first value."""


class Interrupted(Exception):
    """Ctrl-C during training; the message says where the last checkpoint is and how to go on."""


class _CtrlCAfterStep:
    """While training: the first Ctrl-C (SIGINT) is noted and acted on after the current step and its
    checkpoint, so that it never lands inside an Orbax write (whose threads then print tracebacks at
    exit); a second one interrupts at once. Outside the main thread, Ctrl-C is left as it is."""

    def __init__(self):
        self.pressed = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.pressed:
            raise KeyboardInterrupt
        self.pressed = True

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


# A loss this many times its first value (or 1, if that is smaller) has left training for good: a
# classifier starts near ln(labels), and --lr 1e12 reached 7e11 with every number still finite.
LOSS_BOUND = 100.0


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    trainable: dict[str, jax.Array]
    opt_state: Any
    rng: jax.Array
    aux: Any  # adaptive-rank allocator state ({} for LoRA and full fine-tuning)


# ----------------------------------------------------------------------------- optimizer


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
    ``head_only_steps`` holds the adapters' learning rate at 0 for those first steps.
    """

    def decay_mask(params):
        # Inside multi_transform the other label's leaves are empty MaskedNodes: map per entry.
        return {k: jax.tree.map(lambda _: not no_weight_decay(k), v) for k, v in params.items()}

    def adamw(lr: float, held: int = 0):
        sched = schedule(lr, total_steps - held, cfg.warmup_ratio)
        if held:
            sched = optax.join_schedules([optax.constant_schedule(0.0), sched], [held])
        return optax.adamw(sched, b1=0.9, b2=0.999, eps=1e-8, weight_decay=cfg.weight_decay, mask=decay_mask)

    if cfg.loraplus_lr_ratio != 1:
        label_of = lora.factor_labels(label_of)
    same = adamw(cfg.lr)

    def transform(label: str):
        if label == lora.TRAINABLE or (label != lora.LORA_B and not cfg.head_only_steps):
            return same
        return adamw(cfg.lr * (cfg.loraplus_lr_ratio if label == lora.LORA_B else 1.0), cfg.head_only_steps)

    transforms = {label: transform(label) for label in sorted(set(label_of.values()))}
    return optax.chain(
        optax.clip_by_global_norm(cfg.max_grad_norm),
        optax.multi_transform(transforms, label_of),
    )


# ----------------------------------------------------------------------------- steps


def task_loss(logits: jax.Array, labels: jax.Array, regression: bool) -> jax.Array:
    """Mean cross-entropy over classes, or mean squared error for regression (num_labels = 1)."""
    if regression:
        return jnp.mean(jnp.square(logits[:, 0] - labels.astype(jnp.float32)))
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def model_params(trainable: dict, frozen: dict, lcfg: lora.LoraConfig, *, mode: str, rng=None) -> dict:
    """The parameter tree the model runs with: base + head, with the adapters applied."""
    tree = lora.combine(frozen, trainable)
    adapters = tree.get("lora")
    if not adapters:
        return tree["params"]
    if adaptive.is_svd(adapters):
        adapters = adaptive.as_lora(adapters)
    return lora.apply(tree["params"], adapters, lcfg, mode=mode, rng=rng)


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
        reg = adaptive.orthogonality(lora.combine(trainable)["lora"])
        return loss + ada.orth_reg * reg, loss

    return loss_fn


def compiler_options(xla_scheduler: str) -> dict[str, str] | None:
    """The XLA options for a train step under ``xla_scheduler`` on this process's backend (None: XLA's own;
    other backends than the CPU ignore the choice)."""
    if xla_scheduler == "default" or jax.default_backend() != "cpu":
        return None
    return {"xla_cpu_scheduler_type": XLA_CPU_SCHEDULERS[xla_scheduler]}


def make_train_step(mcfg: ModelConfig, lcfg: lora.LoraConfig, optimizer, *, mode: str, regression: bool,
                    mesh=None, ada: adaptive.AdaLoraConfig | None = None, xla_scheduler: str = "default") -> Callable:
    """``step(state, frozen, batch) -> (state, {"loss", "grad_norm"})``, jitted with ``state`` donated.

    With ``ada`` (AdaLoRA) the loss adds the orthogonality regulariser, the
    allocator runs after the update (importance, budget, λ masks) and the
    metrics add "budget" and "rank" (total rank in use). "loss" is the task loss.

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
        new = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state, aux=aux)
        return new, out

    options = compiler_options(xla_scheduler)
    if mesh is None:
        return jax.jit(step, donate_argnums=0, compiler_options=options)
    return jax.jit(step, donate_argnums=0, out_shardings=parallel.replicated(mesh), compiler_options=options)


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
            t0 = time.perf_counter()
            self.compiled[key] = self.fn.lower(*args).compile()
            self.compile_seconds += time.perf_counter() - t0
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


# ----------------------------------------------------------------------------- setup


@dataclass
class Setup:
    """Everything a run derives from its config before the first step."""

    cfg: TrainConfig
    task: data_lib.Task
    mcfg: ModelConfig
    lcfg: lora.LoraConfig
    frozen: dict[str, jax.Array]
    trainable: dict[str, jax.Array]
    label_of: dict[str, str]
    counts: dict[str, int]
    load_report: weights.LoadReport
    tokenizer: Any
    train: data_lib.Encoded
    dev: dict[str, data_lib.Encoded]
    buckets: tuple[int, ...]
    model_dir: Path
    batcher: packing.Batcher


def split_for_training(params: dict, lcfg: lora.LoraConfig, key: jax.Array, *, svd: bool = False,
                       svd_init: str = "gaussian"):
    """Add fresh adapters, label, and split: (trainable, frozen, label of each trainable path, counts).

    Trained leaves are float32 masters whatever the base dtype. ``svd``: AdaLoRA's
    P·diag(λ)·Q adapters of rank ``lcfg.rank`` instead of LoRA's A·B.
    """
    tree = {"params": params}
    if lcfg.targets:
        tree["lora"] = (adaptive.init(params, lcfg.targets, lcfg.rank, key, svd_init) if svd
                        else lora.init(params, lcfg, key))
    label_tree = lora.labels(tree, lcfg)
    trainable, frozen = lora.partition(tree, label_tree)
    # Copies: the train state is donated, and must not take the caller's arrays with it.
    trainable = {p: jnp.array(v, jnp.float32, copy=True) for p, v in trainable.items()}
    flat_labels = lora.flatten(label_tree)
    return trainable, frozen, {p: flat_labels[p] for p in trainable}, lora.count(tree, label_tree)


def warm_start(trainable: dict, adapter_dir: str, mcfg: ModelConfig, lcfg: lora.LoraConfig,
               base_fingerprint: str = "") -> dict:
    """``trainable`` with its LoRA factors replaced by those of a saved adapter (the head is kept fresh).

    Raises AdapterError if the adapter was trained on another architecture or other base weights
    (``base_fingerprint``: this run's), or its factors do not match this run's targets and rank.
    """
    from . import adapter as adapter_lib

    meta, leaves = adapter_lib.load(Path(adapter_dir))
    if meta.get("architecture_hash") != mcfg.architecture_hash():
        raise adapter_lib.AdapterError(f"--init-adapter {adapter_dir} was trained on another architecture "
                                       f"({meta.get('base_model')})")
    if base_fingerprint:
        adapter_lib.check_base(meta, base_fingerprint, "this run's --model", f"--init-adapter {adapter_dir}",
                               force_flag=None)
    if not math.isclose(adapter_lib.lora_config(meta).scale, lcfg.scale):
        raise adapter_lib.AdapterError(f"--init-adapter {adapter_dir} has LoRA scale "
                                       f"{adapter_lib.lora_config(meta).scale:g}, this run {lcfg.scale:g}: "
                                       "use the same --lora-rank and --lora-alpha")
    mine = {k for k in trainable if k.startswith("lora/")}
    theirs = {k for k in leaves if k.startswith("lora/")}
    if mine != theirs:
        raise adapter_lib.AdapterError(f"--init-adapter {adapter_dir} adapts other matrices than --targets here "
                                       f"({len(theirs) // 2} vs {len(mine) // 2})")
    out = dict(trainable)
    for k in mine:
        if tuple(leaves[k].shape) != tuple(trainable[k].shape):
            raise adapter_lib.AdapterError(f"--init-adapter {adapter_dir}: {k} has shape {tuple(leaves[k].shape)}, "
                                           f"this run's is {tuple(trainable[k].shape)} (another rank?)")
        out[k] = jnp.array(leaves[k], jnp.float32)
    log.info("LoRA factors initialised from %s (%s)", adapter_dir, meta.get("task"))
    return out


def gradient_init(s: Setup, n_batches: int) -> dict[str, jax.Array]:
    """``s.trainable`` with AdaLoRA's P and Q set from the task gradient (``--adalora-init gradient``).

    ∂L/∂W of every target kernel is summed over the first ``n_batches`` batches of
    epoch 0's order (no dropout, the head at its init, W the pretrained base), and
    each P, Q become its top singular vectors (``adaptive.gradient_directions``).
    λ stays 0, so ΔW = 0 and the run starts from the pretrained model as before.
    """
    cfg = s.cfg
    keys = adaptive.svd_keys(s.trainable)
    head = {k: v for k, v in s.trainable.items() if not k.startswith("lora/")}
    kernels = {p: s.frozen[f"params/{p}"] for p in keys}
    rest = {k: v for k, v in s.frozen.items() if k[len("params/"):] not in kernels}

    @jax.jit
    def grad(kernels, rest, head, batch):
        def loss(kernels):
            params = lora.combine(rest, head, {f"params/{p}": w for p, w in kernels.items()})["params"]
            logits = forward(s.mcfg, params, batch, train=False, hidden=False)["logits"]
            return task_loss(logits, batch["labels"], s.task.is_regression)
        return jax.tree.map(lambda g: g.astype(jnp.float32), jax.grad(loss)(kernels))  # a bf16 base too

    total = None
    for idx in s.batcher.order(s.train.lengths, cfg.batch_size, seed=cfg.seed, epoch=0)[:n_batches]:
        g = grad(kernels, rest, head, model_inputs(s.batcher.batch(s.train, idx, cfg.batch_size)))
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    mats = {p: np.asarray(g, np.float32).reshape(-1, g.shape[-1]) for p, g in total.items()}
    out = dict(s.trainable)
    for p, d in adaptive.gradient_directions(mats, s.lcfg.rank).items():
        out[keys[p]["p"]], out[keys[p]["q"]] = jnp.asarray(d["p"]), jnp.asarray(d["q"])
    log.info("AdaLoRA P, Q from the task gradient of %d matrices over %d batches", len(mats), n_batches)
    return out


def initial_trainable(cfg: TrainConfig, model_dir: Path, mcfg: ModelConfig):
    """The pretrained base with this run's fresh head and adapters, split for training.

    Returns (load report, trainable, frozen, label of each trainable path, counts). The
    random values depend on ``cfg.seed`` alone, so another framework can start from
    exactly these (``scripts/train_torch.py --same-init``).
    """
    k_head, k_lora = jax.random.split(jax.random.key(cfg.seed))
    params, report = weights.load_params(model_dir, mcfg, key=k_head, param_dtype=cfg.param_dtype)
    # --adalora-init gradient starts from orthonormal P, Q; setup replaces them once the data is in.
    svd_init = "orthogonal" if cfg.adalora_init == "gradient" else cfg.adalora_init
    return report, *split_for_training(params, cfg.lora_config(), k_lora, svd=cfg.method == "adalora",
                                       svd_init=svd_init)


def setup(cfg: TrainConfig) -> Setup:
    cfg.validate()
    task = data_lib.get_task(cfg.task)
    model_dir = weights.resolve(cfg.model)
    mcfg = weights.read_config(model_dir, num_labels=task.num_labels, dtype=cfg.compute_dtype, remat=cfg.remat)
    if cfg.max_seq_len > mcfg.max_positions:
        raise data_lib.DataError(
            f"--max-seq-len {cfg.max_seq_len} exceeds the model's maximum of {mcfg.max_positions} positions"
        )
    train_ex = data_lib.load_split(task, "train", cfg.data_dir).head(cfg.max_train_examples)
    dev_ex = data_lib.load_dev(task, cfg.data_dir, cfg.dev_file, cfg.max_eval_examples)

    report, trainable, frozen, label_of, counts = initial_trainable(cfg, model_dir, mcfg)
    log.info(report.summary())
    lcfg = cfg.lora_config()
    if cfg.init_adapter:
        trainable = warm_start(trainable, cfg.init_adapter, mcfg, lcfg, report.fingerprint)

    tokenizer = data_lib.load_tokenizer(str(model_dir))
    train = data_lib.encode(tokenizer, train_ex, cfg.max_seq_len)
    dev = {s: data_lib.encode(tokenizer, e, cfg.max_seq_len) for s, e in dev_ex.items()}
    # --num-buckets 0: one static shape, every batch padded to --max-seq-len (the usual JAX recipe,
    # kept as the baseline that length buckets are measured against).
    buckets = ((cfg.max_seq_len,) if cfg.num_buckets == 0
               else data_lib.bucket_lengths(cfg.max_seq_len, cfg.num_buckets, train.lengths))
    batcher = (packing.Batcher.for_training(cfg.batching, train.lengths, buckets, batch_size=cfg.batch_size,
                                            max_seq_len=cfg.max_seq_len, num_buckets=cfg.num_buckets, seed=cfg.seed)
               if len(train) >= cfg.batch_size else packing.Batcher(cfg.batching, buckets))  # fit says why not
    s = Setup(cfg, task, mcfg, lcfg, frozen, trainable, label_of, counts, report, tokenizer,
              train, dev, buckets, model_dir, batcher)
    if cfg.method == "adalora" and cfg.adalora_init == "gradient" and lcfg.targets:
        s.trainable = gradient_init(s, cfg.adalora_init_batches)
    return s


def init_state(s: Setup, optimizer) -> TrainState:
    return new_state(s.trainable, optimizer, s.cfg.seed, adalora=s.cfg.method == "adalora")


def new_state(trainable: dict, optimizer, seed: int, *, adalora: bool = False) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        trainable=trainable,
        opt_state=optimizer.init(trainable),
        rng=jax.random.key_data(jax.random.key(seed + 1)),
        aux=adaptive.init_state(trainable) if adalora else {},
    )


# ----------------------------------------------------------------------------- evaluation


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
        for idx in data_lib.eval_order(enc.lengths, batch_size):
            batch = data_lib.collate(enc, idx, buckets, batch_size, rows=rows)
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
            if mesh is not None:
                inputs = parallel.put_batch(inputs, mesh)
            logits = parallel.to_host(eval_fn(trainable, frozen, inputs))[: len(idx)]
            preds[idx] = metrics.predictions_from_logits(logits, task.is_regression)
        results[split] = {**metrics.compute(task.metrics, preds, enc.labels),
                          **metrics.spread(preds, enc.labels, task.is_regression)}
    return results


# ----------------------------------------------------------------------------- fit


def steps_per_epoch(s: Setup) -> int:
    return len(s.train) // s.cfg.batch_size


def total_steps(s: Setup) -> int:
    if s.cfg.max_steps is not None:
        return s.cfg.max_steps
    return max(1, math.ceil(s.cfg.epochs * steps_per_epoch(s)))


def _write_json_atomic(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def _check_resumable(out: Path, cfg: TrainConfig) -> None:
    # A field the run's config lacks (written by an older lora-jax) had its default value then.
    saved = {**TrainConfig().to_dict(), **LEGACY_VALUES, **rundir.saved_config(out)}
    diffs = [f"{k} (run: {saved.get(k)!r}, now: {v!r})" for k, v in cfg.to_dict().items() if saved.get(k) != v]
    if diffs:
        raise RunError(f"--resume: flags differ from the run in {out}: " + "; ".join(diffs))


def _adaptive_outputs(out: Path, ada: adaptive.AdaLoraConfig, ranks: dict[str, int]) -> dict:
    """``adaptive/ranks.json``, the rank heatmap and the budget curve; returns the report's summary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = out / "adaptive"
    d.mkdir(exist_ok=True)
    summary = {
        "init_rank": ada.init_rank, "target_rank": ada.target_rank, "matrices": len(ranks),
        "final_total_rank": sum(ranks.values()), "final_mean_rank": sum(ranks.values()) / max(len(ranks), 1),
        "pruned_to_zero": sum(r == 0 for r in ranks.values()),
        "schedule": {"total_steps": ada.total_steps, "warmup_steps": ada.warmup_steps,
                     "final_steps": ada.final_steps, "interval": ada.interval},
        "beta1": ada.beta1, "beta2": ada.beta2, "orth_reg": ada.orth_reg,
    }
    _write_json_atomic(d / "ranks.json", {**summary, "ranks": ranks})
    layers, names, grid = adaptive.rank_table(ranks)
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 0.45 * len(layers) + 1.5))
    im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=ada.init_rank, aspect="auto")
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(layers)), layers)
    ax.set_xlabel("matrix")
    ax.set_ylabel("layer")
    for (i, j), r in np.ndenumerate(grid):
        if not np.isnan(r):
            ax.text(j, i, int(r), ha="center", va="center", color="w" if r < ada.init_rank / 2 else "k")
    fig.colorbar(im, ax=ax, label="final rank")
    ax.set_title(f"AdaLoRA final ranks (start {ada.init_rank}, target mean {ada.target_rank:g})")
    fig.tight_layout()
    save_figure(fig, d / "ranks.png", dpi=120)
    plt.close(fig)
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    recs = [r for r in recs if "budget" in r]
    if recs:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([r["step"] for r in recs], [r["budget"] for r in recs], label="budget")
        ax.plot([r["step"] for r in recs], [r["rank"] for r in recs], label="total rank in use", ls="--")
        ax.set_xlabel("step")
        ax.set_ylabel("total rank")
        ax.legend()
        fig.tight_layout()
        save_figure(fig, d / "budget.png", dpi=120)
        plt.close(fig)
    return {**summary, "files": ["adaptive/ranks.json", "adaptive/ranks.png", "adaptive/budget.png"]}


def fit(cfg: TrainConfig, *, overwrite: bool = False, resume: bool = False,
        progress: bool = True, command: str | None = None, mesh=None) -> tuple[dict, TrainState]:
    """Train, evaluate, checkpoint, and write to ``cfg.output_dir``: ``report.json``, ``report.md``,
    ``metrics.jsonl``, ``checkpoints/`` (Orbax), ``adapter/`` (lora-jax) and ``peft_adapter/`` (LoRA runs).

    ``resume=True`` continues from the newest intact checkpoint in the output
    directory; the flags must equal the run's. The result is the same as an
    uninterrupted run (bit-identical on CPU): the data order and dropout keys are
    functions of (seed, step). Returns the report and the final train state.
    Raises TrainingDiverged on a NaN/inf loss (files already written stay).

    ``mesh`` (default: every device, see ``parallel.make_mesh``) shards each
    global batch of ``cfg.batch_size`` rows over the devices; in a multi-process
    run every process calls ``fit`` and builds its own rows, process 0 writes the
    files and all of them write the checkpoints together (Orbax).
    """
    from tqdm.auto import tqdm

    from . import adapter as adapter_lib
    from . import checkpoint
    from .report import write_report

    t_start = time.perf_counter()
    out = Path(cfg.output_dir)
    cfg.validate()
    mesh = parallel.make_mesh() if mesh is None else mesh
    rows = parallel.local_rows(cfg.batch_size, mesh)  # fails early if the batch does not divide
    main = parallel.is_main_process()
    if resume:
        _check_resumable(out, cfg)
    else:  # fail before the slow part; create nothing yet. One process probes the (shared) directory.
        parallel.on_main_process(lambda: rundir.check_output_dir(out, overwrite), RunError)
    s = setup(cfg)
    if not resume and main:
        rundir.prepare_output_dir(out, overwrite)
        _write_json_atomic(out / "config.json", cfg.to_dict())
    parallel.barrier("lora_jax.output_dir")
    n_steps = total_steps(s)
    spe = steps_per_epoch(s)
    if spe == 0:
        raise data_lib.DataError(f"{len(s.train)} training examples are fewer than one batch of {cfg.batch_size}")
    ada = cfg.adalora_config(n_steps) if cfg.method == "adalora" else None
    optimizer = make_optimizer(s.label_of, cfg, n_steps)
    state = parallel.place(init_state(s, optimizer), parallel.replicated(mesh))
    frozen = parallel.place(s.frozen, parallel.frozen_shardings(s.frozen, mesh))
    train_step = PerShape(make_train_step(s.mcfg, s.lcfg, optimizer, mode=cfg.forward_mode(),
                                          regression=s.task.is_regression, mesh=mesh, ada=ada,
                                          xla_scheduler=cfg.xla_scheduler))
    eval_step = make_eval_step(s.mcfg, s.lcfg, mesh)
    batcher = s.batcher
    if batcher.batching == "packed" and mesh.devices.size > 1:
        # A packed batch's rows hold a varying number of examples: it cannot be split evenly over devices.
        log.info("packed batches run on one device; on %d: the same random batches, one example per row",
                 mesh.devices.size)
        batcher = packing.Batcher("random", s.buckets)
    eval_every = cfg.eval_every or spe
    save_every = cfg.save_every or spe
    log.info(lora.describe(s.counts))

    history: list[dict] = []
    best: dict[str, dict] = {}
    step = 0
    mngr = checkpoint.manager(out / "checkpoints", keep=cfg.keep_checkpoints)
    if resume:
        restored = checkpoint.restore_latest(mngr, state)
        if restored is None:
            raise RunError(f"--resume: no intact checkpoint in {out / 'checkpoints'}")
        state, meta = restored
        step, history, best = int(meta["step"]), meta["history"], meta["best"]
        log.info("resumed from step %d of %d", step, n_steps)
        if main:
            rundir.truncate_log(out / "metrics.jsonl", step)
    meta_base = {
        "base_model": cfg.model,
        "architecture_hash": s.mcfg.architecture_hash(),
        "base_fingerprint": s.load_report.fingerprint,
        "lora": dataclasses.asdict(s.lcfg),
        "task": cfg.task,
        "label_names": list(s.task.label_names),
        "config": cfg.to_dict(),
    }

    step_times: list[float] = []
    timed_examples = timed_tokens = 0
    seen_shapes: set = set()
    lengths = s.train.lengths
    used_batches = []
    # Only process 0 logs; the others write to nowhere so the loop reads the same everywhere.
    metrics_file = open(out / "metrics.jsonl" if main else os.devnull, "a")
    bar = tqdm(total=n_steps, initial=step, desc=f"{cfg.task} {cfg.method}", disable=not (progress and main),
               unit="step")
    primary_split = s.task.dev_splits[0]
    first_loss = None
    saved_step = step if resume else None
    ctrl_c = _CtrlCAfterStep()
    try:
        while step < n_steps:
            epoch, offset = divmod(step, spe)
            batches = batcher.order(lengths, cfg.batch_size, seed=cfg.seed, epoch=epoch)[offset:]
            for idx in batches:
                if step >= n_steps:
                    break
                batch = batcher.batch(s.train, idx, cfg.batch_size, rows=rows)
                used_batches.append(idx)
                t0 = time.perf_counter()
                inputs = parallel.put_batch(model_inputs(batch), mesh)
                shape = inputs["input_ids"].shape  # global (rows, length)
                compiles_before = train_step.compile_seconds
                state, m = train_step(state, frozen, inputs)
                loss = float(parallel.to_host(m["loss"]))  # blocks until the step is done
                dt = time.perf_counter() - t0 - (train_step.compile_seconds - compiles_before)
                step += 1
                if shape in seen_shapes:  # the first run of each shape is warm-up
                    step_times.append(dt)
                    timed_examples += cfg.batch_size
                    timed_tokens += int(lengths[idx].sum())
                seen_shapes.add(shape)
                if not math.isfinite(loss):
                    raise TrainingDiverged(
                        f"loss became {loss} at step {step}; try a lower --lr (now {cfg.lr})"
                    )
                first_loss = loss if first_loss is None else first_loss
                if loss > LOSS_BOUND * max(first_loss, 1.0):
                    raise TrainingDiverged(
                        f"loss {loss:.3g} at step {step} is over {LOSS_BOUND:g}x this run's first "
                        f"({first_loss:.3g}); try a lower --lr (now {cfg.lr})"
                    )
                if step % cfg.log_every == 0 or step == n_steps:
                    rec = {"step": step, "epoch": epoch, "loss": loss,
                           "grad_norm": float(parallel.to_host(m["grad_norm"])),
                           **{k: int(parallel.to_host(m[k])) for k in ("budget", "rank") if k in m},
                           "rows": shape[0], "seq_len": shape[1]}
                    metrics_file.write(json.dumps(rec) + "\n")
                    metrics_file.flush()
                    bar.set_postfix(loss=f"{loss:.4f}",
                                    ex_s=f"{timed_examples / sum(step_times):.1f}" if step_times else "-")
                bar.update(1)
                if step % eval_every == 0 or step == n_steps:
                    res = evaluate(s.task, s.dev, s.buckets, eval_step, state.trainable, frozen, cfg.batch_size,
                                   mesh)
                    rec = {"step": step, "epoch": epoch, "eval": res}
                    history.append(rec)
                    metrics_file.write(json.dumps(rec) + "\n")
                    metrics_file.flush()
                    for split, values in res.items():
                        if split not in best or values[s.task.primary] > best[split]["values"][s.task.primary]:
                            best[split] = {"step": step, "values": values}
                    if main:
                        bar.write(f"step {step}: " + ", ".join(
                            f"{sp}/{k}={v:.4f}" for sp, vals in res.items() for k, v in vals.items()))
                if step % save_every == 0 or step == n_steps:
                    checkpoint.save(mngr, step, state, {**meta_base, "history": history, "best": best,
                                                        "epoch": step // spe, "batch_in_epoch": step % spe})
                    saved_step = step
                if ctrl_c.pressed:
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        where = (f"the last checkpoint is step {saved_step} in {out / 'checkpoints'}: the same command with "
                 "--resume (instead of --overwrite) continues from it" if saved_step is not None else
                 "no checkpoint was saved yet: run the command again")
        raise Interrupted(f"stopped at step {step} of {n_steps}; {where}") from None
    finally:
        ctrl_c.restore()
        bar.close()
        metrics_file.close()
        mngr.close()

    trained = {k: parallel.to_host(v) for k, v in state.trainable.items()}
    export_lcfg, ada_report = s.lcfg, None
    if ada is not None:
        # The adapter is saved at its final ranks, as plain LoRA factors (mergeable, peft-exportable).
        aux = jax.tree.map(parallel.to_host, state.aux)
        trained, ranks = adaptive.truncate(trained, aux, s.lcfg.scale)
        export_lcfg = adaptive.truncated_config(s.lcfg, ranks)
        if main:
            ada_report = _adaptive_outputs(out, ada, adaptive.final_ranks(aux))
    adapter_bytes = peft_bytes = None
    if main:
        adapter_bytes = adapter_lib.export(out / "adapter", trained, mcfg=s.mcfg, lcfg=export_lcfg,
                                           base_model=cfg.model,
                                           task=cfg.task, label_names=s.task.label_names,
                                           max_seq_len=cfg.max_seq_len,
                                           base_fingerprint=s.load_report.fingerprint)
    if main and export_lcfg.targets:
        peft_bytes = adapter_lib.export_peft(out / "peft_adapter", trained, mcfg=s.mcfg, lcfg=export_lcfg,
                                             base_model=cfg.model)
    wall = time.perf_counter() - t_start
    lora_saved = sum(int(np.size(v)) for k, v in trained.items() if k.startswith("lora/"))
    final = history[-1]["eval"] if history else {}
    compiled = train_step.largest()
    report = {
        "command": command,
        "task": cfg.task,
        "method": cfg.method,
        "model": cfg.model,
        "metrics": {
            split: {"final": {"step": step, "values": final[split]}, "best": best[split]}
            for split in final
        },
        "primary_metric": f"{primary_split}/{s.task.primary}",
        # What the saved adapter holds (for AdaLoRA: at the final ranks); and what was trained.
        "trainable_params": lora_saved + s.counts["trainable"],
        "lora_params": lora_saved,
        "lora_params_during_training": s.counts["lora"],
        "head_params": s.counts["trainable"],
        "total_params": s.counts["total"],
        "adapter_bytes": adapter_bytes,
        "peft_adapter_bytes": peft_bytes,
        # What a fully fine-tuned copy of the model weighs in float32 (4 bytes a parameter).
        "full_model_fp32_bytes": 4 * (s.counts["total"] - s.counts["lora"]),
        "steps": step,
        "resumed": resume,
        "epochs_run": round(step / spe, 3),
        "train_examples": len(s.train),
        "eval_examples": {k: len(v) for k, v in s.dev.items()},
        "parallel": parallel.describe(mesh),
        "adaptive": ada_report,
        "train_examples_per_sec": timed_examples / sum(step_times) if step_times else None,
        "train_tokens_per_sec": timed_tokens / sum(step_times) if step_times else None,
        "step_time_median_s": profiling.median(step_times),
        "timed_steps": len(step_times),
        "compile_time_s": train_step.compile_seconds,
        "compilations": train_step.count,
        "compile_cache": jax.config.jax_compilation_cache_dir,  # None: every step compiled afresh
        "buckets": list(s.buckets),
        "batching": batcher.describe(),
        "padding_share": batcher.padding_share(lengths, used_batches) if used_batches else None,
        "trivial": {split: metrics.is_trivial(values) for split, values in final.items()},
        "memory": {
            "peak_device_bytes": profiling.peak_device_bytes(),
            "train_step_compiled": profiling.compiled_memory(compiled) if compiled is not None else None,
            "peak_rss_bytes": profiling.peak_rss_bytes(),
        },
        "wall_time_s": wall,
        "load_report": {"source": s.load_report.source, "initialised": s.load_report.missing,
                        "unused": s.load_report.unused},
        "config": cfg.to_dict(),
        "model_config": dataclasses.asdict(s.mcfg),
        "versions": profiling.versions(),
        "device": profiling.device_info(),
        "date": profiling.now(),
    }
    if main:
        write_report(out, report)
        for split, values in final.items():
            if metrics.is_trivial(values):
                log.warning(metrics.trivial_warning(split, values))
    parallel.barrier("lora_jax.fit_done")
    return report, state
