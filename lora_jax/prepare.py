"""Everything a run derives from its config before the first step: data, base, adapters, batcher."""

from __future__ import annotations

import logging
import math
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import adaptive, eva, gate, lora, lora_init, packing, quant, weights
from . import batching
from . import data as data_lib
from . import tree as tree_lib
from .config import TrainConfig
from .model import ModelConfig, forward
from .profiling import stage
from .train_step import TrainState, model_inputs, new_state, task_loss

log = logging.getLogger(__name__)


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
    # PiSSA / OLoRA: the adapters at step 0, {path: {"a", "b"}} (the frozen base is W minus their product);
    # saving turns the trained ones into a plain adapter on the original base (lora_init.plain_equivalent).
    initial: dict = dataclasses.field(default_factory=dict)
    # --lora-rank auto: the rank each target received, {path: r} (0: no adapter); {} with fixed ranks.
    ranks: dict = dataclasses.field(default_factory=dict)


def split_for_training(params: dict, lcfg: lora.LoraConfig, key: jax.Array, *, svd: bool = False,
                       svd_init: str = "gaussian", adapters: dict | None = None):
    """Add fresh adapters (or ``adapters``), label, and split: (trainable, frozen, label of each trainable
    path, counts).

    Trained leaves are float32 masters whatever the base dtype. ``svd``: AdaLoRA's
    P·diag(λ)·Q adapters of rank ``lcfg.rank`` instead of LoRA's A·B.
    """
    tree = {tree_lib.PARAMS: params}
    if lcfg.targets:
        tree[tree_lib.ADAPTERS] = (adapters if adapters is not None
                                   else adaptive.init(params, lcfg.targets, lcfg.rank, key, svd_init) if svd
                                   else lora.init(params, lcfg, key))
    label_tree = lora.labels(tree, lcfg)
    trainable, frozen = lora.partition(tree, label_tree)
    # Copies: the train state is donated, and must not take the caller's arrays with it.
    trainable = {p: jnp.array(v, jnp.float32, copy=True) for p, v in trainable.items()}
    flat_labels = tree_lib.flatten(label_tree)
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
    mine, theirs = set(tree_lib.adapters_only(trainable)), set(tree_lib.adapters_only(leaves))
    if lora.is_dora(tree_lib.adapters_only(trainable)) != lora.is_dora(tree_lib.adapters_only(leaves)):
        raise adapter_lib.AdapterError(f"--init-adapter {adapter_dir}: one of it and this run is DoRA "
                                       "(--dora), the other not")
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
    head = tree_lib.base_only(s.trainable)
    kernels = {p: s.frozen[tree_lib.param_key(p)] for p in keys}
    rest = {k: v for k, v in s.frozen.items() if tree_lib.param_path(k) not in kernels}

    @jax.jit
    def grad(kernels, rest, head, batch):
        def loss(kernels):
            params = lora.combine(rest, head, {tree_lib.param_key(p): w for p, w in kernels.items()})[tree_lib.PARAMS]
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


def input_covariances(s: Setup, n_batches: int = eva.INIT_BATCHES) -> dict[str, np.ndarray]:
    """Each adapted kernel's input covariance (d_in, d_in) over the first ``n_batches`` batches of epoch 0.

    The pretrained base, the head at its init, no dropout, padding left out (eva.InputProbe); keyed by
    kernel path, as ``s``'s adapters are."""
    paths = sorted({tree_lib.adapter_path(k)[0] for k in s.trainable if tree_lib.is_adapter(k)})
    head = tree_lib.base_only(s.trainable)
    mcfg = dataclasses.replace(s.mcfg, remat="none")  # statistics only: nothing to recompute
    sums: dict[str, tuple] = {}  # path -> (Σ xᵀx, Σ x, N) over the batches

    def sink(path: str, moments: tuple) -> None:
        sums[path] = tuple(m + t for m, t in zip(moments, sums[path])) if path in sums else moments

    @jax.jit
    def statistics(frozen, head, batch):
        mask = batch["attention_mask"] > 0
        probes = {tree_lib.param_key(p): eva.InputProbe(frozen[tree_lib.param_key(p)], mask, p, sink) for p in paths}
        params = lora.combine(frozen, head, probes)[tree_lib.PARAMS]
        return forward(mcfg, params, batch, train=False, hidden=False)["logits"]

    for idx in s.batcher.order(s.train.lengths, s.cfg.batch_size, seed=s.cfg.seed, epoch=0)[:n_batches]:
        jax.block_until_ready(statistics(s.frozen, head, model_inputs(s.batcher.batch(s.train, idx, s.cfg.batch_size))))
    jax.effects_barrier()  # every callback has delivered its sum
    if not sums:
        raise eva.EvaError(f"--lora-rank auto takes its statistics from training batches: {len(s.train)} examples "
                           f"make none of --batch-size {s.cfg.batch_size}")
    return {p: eva.covariance(*sums[p]) for p in paths}


def output_widths(s: Setup) -> dict[str, int]:
    """d_out of each adapted kernel, keyed by kernel path (what ``eva.init`` takes beside the covariances)."""
    factors = (tree_lib.adapter_path(k) + (v,) for k, v in s.trainable.items() if tree_lib.is_adapter(k))
    return {path: v.shape[1] for path, factor, v in factors if factor == "b"}


def eva_init(s: Setup, n_batches: int = eva.INIT_BATCHES) -> None:
    """Replace ``s``'s adapters (rank ``lcfg.rank`` everywhere) by ranks and A chosen from the data (eva.py).

    The statistics are :func:`input_covariances`'. Labels, counts and ``s.ranks`` follow; DoRA's
    magnitudes are kept for the matrices that keep an adapter.
    """
    old = {k for k in s.trainable if tree_lib.is_adapter(k)}
    covs = input_covariances(s, n_batches)
    paths = list(covs)
    adapters, s.ranks = eva.init(covs, output_widths(s), s.lcfg.rank)
    trainable = {k: v for k, v in s.trainable.items() if k not in old}
    for p, ad in adapters.items():
        if s.lcfg.dora:
            ad = {**ad, lora.MAGNITUDE: s.trainable[tree_lib.adapter_key(p, lora.MAGNITUDE)]}
        trainable.update({tree_lib.adapter_key(p, f): v for f, v in ad.items()})
    n_lora = sum(int(np.size(v)) for k, v in trainable.items() if tree_lib.is_adapter(k))
    s.counts = {**s.counts, lora.LORA: n_lora, "total": s.counts["total"] - s.counts[lora.LORA] + n_lora}
    s.label_of = {k: lora.LORA if tree_lib.is_adapter(k) else s.label_of[k] for k in trainable}
    s.trainable = trainable
    log.info("ranks from the data over %d batches: %d matrices, total rank %d (%s)", n_batches, len(paths),
             sum(s.ranks.values()), " ".join(str(r) for r in s.ranks.values()))


def initial_trainable(cfg: TrainConfig, model_dir: Path, mcfg: ModelConfig):
    """The pretrained base with this run's fresh head and adapters, split for training.

    Returns (load report, trainable, frozen, label of each trainable path, counts, initial adapters of a
    data-aware init or {}). The random values depend on ``cfg.seed`` alone, so another framework can
    start from exactly these (``scripts/train_torch.py --same-init``). With ``--lora-init pissa|olora``
    the frozen base is the residual W - s·A0·B0 (``lora_init``).
    """
    k_head, k_lora = jax.random.split(jax.random.key(cfg.seed))
    quantized = cfg.param_dtype in quant.QUANTIZED  # quantized once split: only frozen leaves are
    params, report = weights.load_params(model_dir, mcfg, key=k_head,
                                         param_dtype="float32" if quantized else cfg.param_dtype)
    lcfg, initial, initial_gated = cfg.lora_config(), {}, {}
    if cfg.method == "lora" and lcfg.init_a in lora_init.DATA_AWARE:
        initial = lora_init.init(params, lcfg)
        params = lora_init.residual(params, initial, lcfg)
    if cfg.rank_allocation == "gate" and lcfg.targets:  # LoRA's A and B, with a gate per component
        initial_gated = gate.init(lora.init(params, lcfg, k_lora))
    # --adalora-init gradient starts from orthonormal P, Q; setup replaces them once the data is in.
    svd_init = "orthogonal" if cfg.adalora_init == "gradient" else cfg.adalora_init
    trainable, frozen, label_of, counts = split_for_training(params, lcfg, k_lora, svd=cfg.method == "adalora",
                                                             svd_init=svd_init,
                                                             adapters=initial or initial_gated or None)
    del params
    if quantized:
        frozen = quant.store(frozen, cfg.param_dtype)
    return report, trainable, frozen, label_of, counts, initial


def setup(cfg: TrainConfig) -> Setup:
    cfg.validate()
    task = data_lib.get_task(cfg.task)
    model_dir = weights.resolve(cfg.model)
    mcfg = weights.read_config(model_dir, num_labels=task.num_labels, dtype=cfg.compute_dtype, remat=cfg.remat)
    if cfg.max_seq_len > mcfg.max_positions:
        raise data_lib.DataError(
            f"--max-seq-len {cfg.max_seq_len} exceeds the model's maximum of {mcfg.max_positions} positions"
        )
    stage("reading data")
    train_ex = data_lib.load_split(task, "train", cfg.data_dir).head(cfg.max_train_examples)
    dev_ex = data_lib.load_dev(task, cfg.data_dir, cfg.dev_file, cfg.max_eval_examples)
    stage("loading parameters")
    report, trainable, frozen, label_of, counts, initial = initial_trainable(cfg, model_dir, mcfg)
    log.info(report.summary())
    lcfg = cfg.lora_config()
    if cfg.init_adapter:
        trainable = warm_start(trainable, cfg.init_adapter, mcfg, lcfg, report.fingerprint)

    stage("tokenizing")
    tokenizer = data_lib.load_tokenizer(str(model_dir))
    train = data_lib.encode(tokenizer, train_ex, cfg.max_seq_len)
    dev = {s: data_lib.encode(tokenizer, e, cfg.max_seq_len) for s, e in dev_ex.items()}
    stage("batching")
    # --num-buckets 0: one static shape, every batch padded to --max-seq-len (the usual JAX recipe,
    # kept as the baseline that length buckets are measured against).
    buckets = ((cfg.max_seq_len,) if cfg.num_buckets == 0
               else batching.bucket_lengths(cfg.max_seq_len, cfg.num_buckets, train.lengths))
    epochs = math.ceil(planned_steps(cfg, len(train)) / max(1, len(train) // cfg.batch_size))  # that it reaches
    batcher = (packing.Batcher.for_training(cfg.batching, train.lengths, buckets, batch_size=cfg.batch_size,
                                            max_seq_len=cfg.max_seq_len, num_buckets=cfg.num_buckets, seed=cfg.seed,
                                            epochs=epochs)
               if len(train) >= cfg.batch_size else packing.Batcher(cfg.batching, buckets))  # fit says why not
    s = Setup(cfg, task, mcfg, lcfg, frozen, trainable, label_of, counts, report, tokenizer,
              train, dev, buckets, model_dir, batcher, initial)
    if cfg.method == "adalora" and cfg.adalora_init == "gradient" and lcfg.targets:
        s.trainable = gradient_init(s, cfg.adalora_init_batches)
    if cfg.rank_allocation == "eva" and lcfg.targets:
        eva_init(s)
    return s


def init_state(s: Setup, optimizer) -> TrainState:
    return new_state(s.trainable, optimizer, s.cfg.seed, adalora=s.cfg.method == "adalora")


def steps_per_epoch(s: Setup) -> int:
    return len(s.train) // s.cfg.batch_size


def planned_steps(cfg: TrainConfig, n_train: int) -> int:
    """The run's length in steps: ``--max-steps``, else ``--epochs`` of ``n_train // batch_size`` steps."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * (n_train // cfg.batch_size)))


def total_steps(s: Setup) -> int:
    return planned_steps(s.cfg, len(s.train))
