"""Training checkpoints with Orbax: what trains, never the frozen base.

A checkpoint at step N holds the train state (LoRA factors, head, optimizer
state, step, PRNG key) and JSON metadata (format version, data position, eval
history, base model and its architecture hash, LoRA config, task, labels).
Orbax writes each step into a temporary directory and renames it when
complete, so a write killed half-way leaves the previous checkpoint usable.
The metadata also holds a checksum of every saved array, checked on restore:
damage that leaves the files readable (a flipped byte inside an array) is
caught too, and the step is set aside like an unreadable one.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or of an unknown format."""


class NewerFormatError(CheckpointError):
    """A checkpoint written by a newer lora-jax: never skipped silently."""


def _ocp():
    import orbax.checkpoint as ocp

    return ocp


def manager(directory: Path, keep: int = 2):
    """An Orbax CheckpointManager keeping the newest ``keep`` steps (synchronous saves)."""
    ocp = _ocp()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False, create=True)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def checksums(state: Any) -> dict[str, str]:
    """{tree path: BLAKE2 digest of the array's dtype, shape and bytes} for every leaf of ``state``
    (typed PRNG keys by their key data; arrays replicated over processes by this process's copy)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        arr = np.asarray(leaf if getattr(leaf, "is_fully_addressable", True) else leaf.addressable_data(0))
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{arr.dtype.str}{arr.shape}".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
        out[jax.tree_util.keystr(path)] = h.hexdigest()
    return out


def save(mngr, step: int, state: Any, meta: dict) -> None:
    ocp = _ocp()
    meta = {**meta, "format_version": FORMAT_VERSION, "step": int(step), "checksums": checksums(state)}
    mngr.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
              force=True)
    mngr.wait_until_finished()


def restore(mngr, step: int, template: Any) -> tuple[Any, dict]:
    """The state at ``step``, shaped like ``template``, and its metadata.

    Raises CheckpointError naming the checkpoint if it is corrupted, truncated,
    does not fit the template, or comes from a newer format version.
    """
    ocp = _ocp()
    where = Path(mngr.directory) / str(step)
    try:
        meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as e:
        raise CheckpointError(f"checkpoint {where} is unreadable: {type(e).__name__}: {e}") from None
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise NewerFormatError(
            f"checkpoint {where} has format version {version!r}; this lora-jax reads up to {FORMAT_VERSION}: upgrade it"
        )
    abstract = jax.tree.map(_ocp().utils.to_shape_dtype_struct, template)
    try:
        out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    except Exception as e:
        raise CheckpointError(f"checkpoint {where} is corrupted or truncated: {type(e).__name__}: {e}") from None
    leaves = jax.tree.leaves(out.state)
    treedef = jax.tree.structure(template)
    if len(leaves) != treedef.num_leaves:
        raise CheckpointError(f"checkpoint {where} does not match this run's train state")
    for got, want in zip(leaves, jax.tree.leaves(template)):
        if got.shape != want.shape:
            raise CheckpointError(f"checkpoint {where} does not match this run's train state "
                                  f"(a tensor of shape {got.shape} where {want.shape} is expected)")
    # Orbax hands optax's named tuples back as plain tuples: rebuild the template's structure.
    state = jax.tree.unflatten(treedef, leaves)
    saved = meta.get("checksums")  # absent in checkpoints of lora-jax before 2026-12-06: not checked
    if saved is not None:
        bad = [k for k, v in checksums(state).items() if saved.get(k) != v]
        if bad:
            raise CheckpointError(f"checkpoint {where} fails its checksum ({len(bad)} arrays differ from what was "
                                  f"saved, first {bad[0]}): its files were changed after saving")
    return state, meta


@contextlib.contextmanager
def _quiet_library_errors():
    """While a step is tried: Orbax and its asyncio tasks log every failure of a damaged file with a
    traceback (dozens for one step); ``restore`` turns the failure into one CheckpointError instead."""
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio", "orbax", "tensorstore")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def restore_latest(mngr, template: Any) -> tuple[Any, dict] | None:
    """The newest intact checkpoint, or None if there is none.

    A damaged checkpoint is reported and moved aside to ``<step>.damaged`` (kept
    for inspection, out of the way of the step that will be saved again).
    """
    mngr.reload()
    found = None
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            with _quiet_library_errors():
                found = restore(mngr, step, template)
            break
        except NewerFormatError:
            raise
        except CheckpointError as e:
            log.warning("%s; trying an older one", e)
            where = Path(mngr.directory) / str(step)
            where.rename(where.with_name(f"{step}.damaged-{int(time.time())}"))
    mngr.reload()
    return found
