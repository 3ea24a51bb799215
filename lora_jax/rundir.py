"""The run directory: which directories are ours to write or replace, and what a resume may trust.

A run directory is marked by ``MARKER`` when a run creates it. ``--overwrite`` replaces only a
directory so marked (or one that an older lora-jax wrote: its ``config.json`` is a run config), so
that it can never empty a model directory or anything else it did not create. Every check here runs
before the slow part of a run (loading the model, compiling), and a failed check writes nothing.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from .config import LEGACY_VALUES, TrainConfig
from .files import check_writable, write_text

log = logging.getLogger(__name__)

MARKER = ".lora-jax-run"
RUN_FILES = ("report.json", "report.md", "metrics.jsonl", "config.json")
RUN_DIRS = ("checkpoints", "adapter", "peft_adapter", "adaptive")


class RunError(RuntimeError):
    """A run that cannot start (e.g. an output directory holding another run)."""


def _is_run_config(saved) -> bool:
    """A parsed ``config.json`` that a lora-jax run wrote (a model's has ``model_type`` instead)."""
    return isinstance(saved, dict) and {"task", "method", "output_dir"} <= saved.keys() and "model_type" not in saved


def _read_json(file: Path):
    return json.loads(file.read_text(encoding="utf-8"))


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` is a directory that a lora-jax run created."""
    if (path / MARKER).is_file():
        return True
    try:
        return _is_run_config(_read_json(path / "config.json"))
    except (OSError, ValueError):
        return False


def _check_writable(path: Path) -> None:
    """Create ``path`` and a file in it, then remove what was created: proof that the run can write
    there, before anything expensive, leaving nothing behind."""
    created = []
    probe = path
    while not probe.exists():
        created.append(probe)
        probe = probe.parent
    if not probe.is_dir():
        raise RunError(f"--output-dir {path}: {probe} is a file, not a directory")
    try:
        for d in reversed(created):
            d.mkdir()
        check_writable(path)
    except OSError as e:
        raise RunError(f"--output-dir {path}: cannot write there ({e.strerror or e})") from None
    finally:
        for d in created:
            try:
                d.rmdir()
            except OSError:
                pass


def check_output_dir(path: Path, overwrite: bool) -> None:
    """Refuse a directory that holds a run (unless ``overwrite``), one that holds anything else, or
    one that cannot be written."""
    if path.exists() and not path.is_dir():
        raise RunError(f"--output-dir {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()):
        if not is_run_dir(path):
            shown = ", ".join(sorted(p.name for p in path.iterdir())[:4])
            raise RunError(f"--output-dir {path} holds files that are not a lora-jax run ({shown}, ...): choose "
                           "another directory (--overwrite replaces only lora-jax runs)")
        held = [m for m in RUN_FILES + RUN_DIRS if (path / m).exists()]
        if held and not overwrite:
            raise RunError(f"--output-dir {path} already holds a run ({', '.join(held)}); "
                           "pass --overwrite or choose another")
    _check_writable(path)


def prepare_output_dir(path: Path, overwrite: bool) -> None:
    """Create and mark the directory; with ``overwrite``, remove the previous run's files first."""
    check_output_dir(path, overwrite)
    path.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for m in RUN_FILES:
            (path / m).unlink(missing_ok=True)
        for d in RUN_DIRS:
            shutil.rmtree(path / d, ignore_errors=True)
    write_text(path / MARKER, "A lora-jax run directory: `lora-jax train --overwrite` may replace it.\n")


def saved_config(out: Path) -> dict:
    """The config a run in ``out`` was started with (for --resume)."""
    file = out / "config.json"
    if not file.is_file():
        raise RunError(f"--resume: {out} holds no run to resume (no config.json)")
    try:
        saved = _read_json(file)
    except (OSError, ValueError) as e:
        raise RunError(f"--resume: {file} is unreadable ({type(e).__name__}); start the run again with "
                       "--overwrite") from None
    if not _is_run_config(saved):
        raise RunError(f"--resume: {file} is not a lora-jax run config")
    return saved


def truncate_log(path: Path, last_step: int) -> None:
    """Keep the log lines up to ``last_step``: a killed run may have logged past its last checkpoint,
    or died half-way through writing a line (that partial line is dropped too)."""
    if not path.exists():
        return
    kept, partial = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
            step = rec["step"]
        except (ValueError, TypeError, KeyError):
            partial += bool(line.strip())
            continue
        if step <= last_step:
            kept.append(line)
    if partial:
        log.warning("%s: dropped %d unreadable line(s), from a write that was cut off", path, partial)
    write_text(path, "".join(line + "\n" for line in kept))


def check_resumable(out: Path, cfg: TrainConfig) -> None:
    """``--resume`` continues a run only with the flags it was started with."""
    # A field the run's config lacks (written by an older lora-jax) had its default value then.
    saved = {**TrainConfig().to_dict(), **LEGACY_VALUES, **saved_config(out)}
    diffs = [f"{k} (run: {saved.get(k)!r}, now: {v!r})" for k, v in cfg.to_dict().items() if saved.get(k) != v]
    if diffs:
        raise RunError(f"--resume: flags differ from the run in {out}: " + "; ".join(diffs))
