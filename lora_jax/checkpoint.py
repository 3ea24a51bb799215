"""Training checkpoints with Orbax: what trains, never the frozen base.

A checkpoint at step N holds the train state (LoRA factors, head, optimizer
state, step, PRNG key) and JSON metadata (format version, data position, eval
history, base model and its architecture hash, LoRA config, task, labels).
Orbax writes each step into a temporary directory and renames it when
complete, so a write killed half-way leaves the previous checkpoint usable.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import jax

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


def save(mngr, step: int, state: Any, meta: dict) -> None:
    ocp = _ocp()
    meta = {**meta, "format_version": FORMAT_VERSION, "step": int(step)}
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
    return jax.tree.unflatten(treedef, leaves), meta


def restore_latest(mngr, template: Any) -> tuple[Any, dict] | None:
    """The newest intact checkpoint, or None if there is none.

    A damaged checkpoint is reported and moved aside to ``<step>.damaged`` (kept
    for inspection, out of the way of the step that will be saved again).
    """
    mngr.reload()
    found = None
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
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
