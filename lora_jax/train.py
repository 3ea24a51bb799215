"""``fit``: the training loop, and the few things only the loop needs.

What the loop calls lives beside it, one job per module: ``prepare`` (data, base, adapters),
``optim`` (the optimizer), ``train_step`` and ``eval_step`` (the jitted steps), ``rundir`` (the
output directory and resume checks), ``checkpoint`` (Orbax), ``adapter`` (the saved adapters) and
``report`` (report.json and report.md).
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
from dataclasses import dataclass, field
from pathlib import Path

import jax

from . import adaptive, gate, lora_init, packing, parallel, rundir
from . import data as data_lib
from .config import TrainConfig
from .quant import QUANTIZED
from .eval_step import evaluate, make_eval_step
from .files import write_json
from .optim import make_optimizer
from .profiling import stage
from .report import describe_counts
from .prepare import Setup, init_state, setup, steps_per_epoch, total_steps
from .rundir import RunError  # noqa: F401  (raised by fit; callers catch it from here)
from .train_step import PerShape, TrainState, make_train_step, model_inputs

log = logging.getLogger(__name__)

# A loss this many times its first value (or 1, if that is smaller) has left training for good: a
# classifier starts near ln(labels), and --lr 1e12 reached 7e11 with every number still finite.
LOSS_BOUND = 100.0


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


@dataclass
class StepTimer:
    """Step times, with each batch shape's first step left out (it includes warm-up), and what they processed."""

    times: list[float] = field(default_factory=list)
    examples: int = 0
    tokens: int = 0
    seen: set = field(default_factory=set)

    def add(self, shape: tuple, seconds: float, examples: int, tokens: int) -> None:
        if shape in self.seen:
            self.times.append(seconds)
            self.examples += examples
            self.tokens += tokens
        self.seen.add(shape)

    def rate(self, amount: int) -> float | None:
        """``amount`` per second of timed steps (None before any)."""
        return amount / sum(self.times) if self.times else None


def _check_loss(loss: float, first: float, step: int, lr: float) -> None:
    if not math.isfinite(loss):
        raise TrainingDiverged(f"loss became {loss} at step {step}; try a lower --lr (now {lr})")
    if loss > LOSS_BOUND * max(first, 1.0):
        raise TrainingDiverged(f"loss {loss:.3g} at step {step} is over {LOSS_BOUND:g}x this run's first "
                               f"({first:.3g}); try a lower --lr (now {lr})")


def _start(cfg: TrainConfig, out: Path, *, overwrite: bool, resume: bool) -> Setup:
    """Check the output directory (before anything slow), load everything, then create the directory."""
    if resume:
        rundir.check_resumable(out, cfg)
    else:  # create nothing yet. One process probes the (shared) directory.
        parallel.on_main_process(lambda: rundir.check_output_dir(out, overwrite), RunError)
    s = setup(cfg)
    if not resume and parallel.is_main_process():
        rundir.prepare_output_dir(out, overwrite)
        write_json(out / "config.json", cfg.to_dict())
    parallel.barrier("lora_jax.output_dir")
    if steps_per_epoch(s) == 0:
        raise data_lib.DataError(f"{len(s.train)} training examples are fewer than one batch of {cfg.batch_size}")
    return s


def _batcher(s: Setup, mesh) -> packing.Batcher:
    if s.batcher.batching == "packed" and mesh.devices.size > 1:
        # A packed batch's rows hold a varying number of examples: it cannot be split evenly over devices.
        log.info("packed batches run on one device; on %d: the same random batches, one example per row",
                 mesh.devices.size)
        return packing.Batcher("random", s.buckets)
    return s.batcher


def _restore(mngr, state: TrainState, out: Path, n_steps: int) -> tuple[TrainState, int, list, dict]:
    """The newest intact checkpoint's (state, step, eval history, best metrics); the log cut back to it."""
    from . import checkpoint

    restored = checkpoint.restore_latest(mngr, state)
    if restored is None:
        raise RunError(f"--resume: no intact checkpoint in {out / 'checkpoints'}")
    state, meta = restored
    step = int(meta["step"])
    log.info("resumed from step %d of %d", step, n_steps)
    if parallel.is_main_process():
        rundir.truncate_log(out / "metrics.jsonl", step)
    return state, step, meta["history"], meta["best"]


def _adapter_meta(cfg: TrainConfig, s: Setup) -> dict:
    """What every checkpoint records about the run beside its state."""
    return {"base_model": cfg.model, "architecture_hash": s.mcfg.architecture_hash(),
            "base_fingerprint": s.load_report.fingerprint, "lora": dataclasses.asdict(s.lcfg), "task": cfg.task,
            "label_names": list(s.task.label_names), "config": cfg.to_dict()}


def _log_line(step: int, epoch: int, loss: float, m: dict, shape: tuple) -> dict:
    return {"step": step, "epoch": epoch, "loss": loss, "grad_norm": float(parallel.to_host(m["grad_norm"])),
            **{k: int(parallel.to_host(m[k])) for k in ("budget", "rank") if k in m},
            "rows": shape[0], "seq_len": shape[1]}


def _save_adapters(out: Path, cfg: TrainConfig, s: Setup, state: TrainState, ada) -> tuple:
    """Write ``adapter/`` and ``peft_adapter/`` (process 0); AdaLoRA's at its final ranks, as plain LoRA
    factors. Returns (trained leaves as saved, (adapter bytes, peft bytes), AdaLoRA summary or None)."""
    from . import adapter as adapter_lib
    from .report import adaptive_outputs

    trained = {k: parallel.to_host(v) for k, v in state.trainable.items()}
    lcfg, ada_report, sizes = s.lcfg, None, (None, None)
    if s.initial:  # PiSSA / OLoRA: the same function on the original base, never on the residual
        trained, lcfg = lora_init.plain_equivalent(trained, s.initial, s.lcfg)
    if ada is not None:
        aux = jax.tree.map(parallel.to_host, state.aux)
        trained, ranks = adaptive.truncate(trained, aux, s.lcfg.scale)
        lcfg = adaptive.truncated_config(s.lcfg, ranks)
        if parallel.is_main_process():
            ada_report = adaptive_outputs(out, ada, adaptive.final_ranks(aux))
    elif cfg.rank_allocation == "gate" and s.lcfg.targets:  # closed gates are dropped; s.ranks for the report
        s.ranks = gate.final_ranks(trained)
        trained, ranks = adaptive.truncate(trained, gate.final_mask(trained), s.lcfg.scale)
        lcfg = adaptive.truncated_config(s.lcfg, ranks)
    if parallel.is_main_process():
        sizes = (adapter_lib.export(out / "adapter", trained, mcfg=s.mcfg, lcfg=lcfg, base_model=cfg.model,
                                    task=cfg.task, label_names=s.task.label_names, max_seq_len=cfg.max_seq_len,
                                    base_fingerprint=s.load_report.fingerprint,
                                    extra=({adapter_lib.BASE_QUANTIZATION: cfg.param_dtype}
                                           if cfg.param_dtype in QUANTIZED else None)),
                 adapter_lib.export_peft(out / "peft_adapter", trained, mcfg=s.mcfg, lcfg=lcfg, base_model=cfg.model)
                 if lcfg.targets else None)
    return trained, sizes, ada_report


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

    from . import checkpoint, report as report_lib

    t_start = time.perf_counter()
    out = Path(cfg.output_dir)
    cfg.validate()
    mesh = parallel.make_mesh() if mesh is None else mesh
    rows = parallel.local_rows(cfg.batch_size, mesh)  # fails early if the batch does not divide
    main = parallel.is_main_process()
    s = _start(cfg, out, overwrite=overwrite, resume=resume)
    stage("placing state")
    n_steps, spe = total_steps(s), steps_per_epoch(s)
    ada = cfg.adalora_config(n_steps) if cfg.method == "adalora" else None
    optimizer = make_optimizer(s.label_of, cfg, n_steps)
    state = parallel.place(init_state(s, optimizer), parallel.replicated(mesh))
    frozen = parallel.place(s.frozen, parallel.frozen_shardings(s.frozen, mesh))
    train_step = PerShape(make_train_step(s.mcfg, s.lcfg, optimizer, mode=cfg.forward_mode(),
                                          regression=s.task.is_regression, mesh=mesh, ada=ada,
                                          xla_scheduler=cfg.xla_scheduler, gated=cfg.rank_allocation == "gate"))
    eval_step = make_eval_step(s.mcfg, s.lcfg, mesh)
    batcher = _batcher(s, mesh)
    eval_every, save_every = cfg.eval_every or spe, cfg.save_every or spe
    log.info(describe_counts(s.counts))

    mngr = checkpoint.manager(out / "checkpoints", keep=cfg.keep_checkpoints)
    state, step, history, best = _restore(mngr, state, out, n_steps) if resume else (state, 0, [], {})
    meta_base = _adapter_meta(cfg, s)
    timer, used_batches, first_loss = StepTimer(), [], None
    saved_step = step if resume else None
    # Only process 0 logs; the others write to nowhere so the loop reads the same everywhere.
    metrics_file = open(out / "metrics.jsonl" if main else os.devnull, "a")
    bar = tqdm(total=n_steps, initial=step, desc=f"{cfg.task} {cfg.method}", disable=not (progress and main),
               unit="step")
    ctrl_c = _CtrlCAfterStep()

    def record(rec: dict) -> None:
        metrics_file.write(json.dumps(rec) + "\n")
        metrics_file.flush()

    stage("train steps")
    try:
        while step < n_steps:
            epoch, offset = divmod(step, spe)
            for idx in batcher.order(s.train.lengths, cfg.batch_size, seed=cfg.seed, epoch=epoch)[offset:]:
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
                step += 1
                timer.add(shape, time.perf_counter() - t0 - (train_step.compile_seconds - compiles_before),
                          cfg.batch_size, int(s.train.lengths[idx].sum()))
                first_loss = loss if first_loss is None else first_loss
                _check_loss(loss, first_loss, step, cfg.lr)
                if step % cfg.log_every == 0 or step == n_steps:
                    record(_log_line(step, epoch, loss, m, shape))
                    rate = timer.rate(timer.examples)
                    bar.set_postfix(loss=f"{loss:.4f}", ex_s="-" if rate is None else f"{rate:.1f}")
                bar.update(1)
                if step % eval_every == 0 or step == n_steps:
                    stage("evaluation")
                    res = evaluate(s.task, s.dev, s.buckets, eval_step, state.trainable, frozen, cfg.batch_size,
                                   mesh)
                    stage("train steps")
                    history.append({"step": step, "epoch": epoch, "eval": res})
                    record(history[-1])
                    for split, values in res.items():
                        if split not in best or values[s.task.primary] > best[split]["values"][s.task.primary]:
                            best[split] = {"step": step, "values": values}
                    if main:
                        bar.write(f"step {step}: " + ", ".join(
                            f"{sp}/{k}={v:.4f}" for sp, vals in res.items() for k, v in vals.items()))
                if step % save_every == 0 or step == n_steps:
                    stage("checkpoint")
                    checkpoint.save(mngr, step, state, {**meta_base, "history": history, "best": best,
                                                        "epoch": step // spe, "batch_in_epoch": step % spe})
                    saved_step = step
                    stage("train steps")
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

    stage("saving adapters")
    trained, sizes, ada_report = _save_adapters(out, cfg, s, state, ada)
    report = report_lib.build(cfg=cfg, s=s, command=command, step=step, resume=resume, history=history, best=best,
                              trained=trained, sizes=sizes, ada_report=ada_report, timer=timer,
                              compiled_steps=train_step, batcher=batcher, used_batches=used_batches, mesh=mesh,
                              wall=time.perf_counter() - t_start)
    if main:
        report_lib.write_report(out, report)
        report_lib.warn_if_trivial(report)
    parallel.barrier("lora_jax.fit_done")
    stage("done")
    return report, state
