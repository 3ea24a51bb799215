"""Data parallelism with JAX's own machinery: one mesh, sharded batches, ``jax.distributed``.

One code path for every topology. The mesh has two axes over all devices of
all processes: ``data`` and ``fsdp`` (size 1 unless ``--fsdp N``). Conventions:

- The global batch (B rows, what the user asked for) is split over every
  device of the mesh, ``data`` and ``fsdp`` together: B / num_devices rows each.
  Each process builds only its own rows (B / num_processes), in order, so row r
  of the global batch lives on process r // (B / num_processes).
- The train state (LoRA factors, head, optimizer state, step, PRNG key) is
  replicated. XLA inserts the gradient all-reduce; nothing here sums by hand.
- The frozen base is replicated, or with ``fsdp > 1`` each leaf is split over
  the ``fsdp`` axis along its largest dimension that divides (leaves with no
  such dimension stay replicated); XLA gathers them where they are used.

On a laptop this is a mesh of one device and every placement is a no-op.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger(__name__)

AXES = ("data", "fsdp")


class ParallelError(ValueError):
    """A topology that cannot work (a batch that does not divide, an fsdp size that does not fit)."""


@dataclass(frozen=True)
class DistributedConfig:
    """How to join a multi-process run; all None and ``auto`` False: a single process.

    ``auto`` lets ``jax.distributed.initialize`` detect the cluster (SLURM,
    Open MPI, Kubernetes, Cloud TPU); the environment variable
    ``JAX_COORDINATOR_ADDRESS`` is honoured by JAX itself.
    """

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    auto: bool = False

    @property
    def wanted(self) -> bool:
        return (self.auto or self.coordinator_address is not None or self.num_processes is not None
                or self.process_id is not None or "JAX_COORDINATOR_ADDRESS" in os.environ)


def initialize(dist: DistributedConfig) -> None:
    """Join the multi-process run described by ``dist`` (no-op for a single process).

    Must run before anything touches a JAX device. On CPU the collectives go
    through gloo (JAX's default CPU implementation).
    """
    if not dist.wanted:
        return
    if dist.num_processes is not None and dist.num_processes < 1:
        raise ParallelError(f"--num-processes must be >= 1, got {dist.num_processes}")
    if dist.process_id is not None and dist.num_processes is not None \
            and not 0 <= dist.process_id < dist.num_processes:
        raise ParallelError(f"--process-id must be in [0, {dist.num_processes}), got {dist.process_id}")
    try:
        jax.distributed.initialize(dist.coordinator_address, dist.num_processes, dist.process_id)
    except (ValueError, RuntimeError) as e:
        # JAX's own message names what is missing (e.g. no cluster detected, coordinator unreachable).
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ParallelError(f"jax.distributed.initialize failed: {first}") from None
    log.info("process %d of %d; %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())


def is_main_process() -> bool:
    """Process 0 writes reports, logs and exported adapters; all processes take part in checkpoints."""
    return jax.process_index() == 0


def make_mesh(fsdp: int = 1, devices=None) -> Mesh:
    """A (data, fsdp) mesh over ``devices`` (default: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    if fsdp < 1:
        raise ParallelError(f"--fsdp must be >= 1, got {fsdp}")
    if len(devices) % fsdp:
        raise ParallelError(f"--fsdp {fsdp} does not divide the {len(devices)} devices")
    return Mesh(np.array(devices).reshape(len(devices) // fsdp, fsdp), AXES)


def describe(mesh: Mesh) -> dict:
    return {"devices": int(mesh.devices.size), "processes": jax.process_count(),
            "mesh": {a: int(n) for a, n in mesh.shape.items()}, "platform": mesh.devices.flat[0].platform}


def local_batch_size(global_batch: int, mesh: Mesh, flag: str = "--batch-size") -> int:
    """Rows this process feeds per step; raises ParallelError if ``global_batch`` does not split evenly."""
    n = int(mesh.devices.size)
    if global_batch % n:
        processes = jax.process_count()
        where = f"{n} devices" + (f" ({processes} processes)" if processes > 1 else "")
        raise ParallelError(f"{flag} {global_batch} does not divide over {where}: use a multiple of {n}")
    return global_batch // jax.process_count()


def local_rows(global_batch: int, mesh: Mesh) -> slice:
    """The rows of each global batch that this process builds."""
    n = local_batch_size(global_batch, mesh)
    return slice(jax.process_index() * n, (jax.process_index() + 1) * n)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis over every device of the mesh."""
    return NamedSharding(mesh, P(AXES))


def put_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Global arrays from this process's rows (``local``: leading axis = local batch)."""
    sharding = batch_sharding(mesh)
    out = {}
    for k, v in local.items():
        global_shape = (v.shape[0] * jax.process_count(), *v.shape[1:])
        out[k] = jax.make_array_from_process_local_data(sharding, v, global_shape)
    return out


def _fsdp_spec(shape: tuple[int, ...], n: int) -> P:
    """Split the largest dimension that ``n`` divides over ``fsdp``; replicate if none does."""
    if n > 1:
        for d in sorted(range(len(shape)), key=lambda i: -shape[i]):
            if shape[d] % n == 0:
                return P(*([None] * d), "fsdp")
    return P()


def frozen_shardings(frozen: dict[str, jax.Array], mesh: Mesh) -> dict[str, NamedSharding]:
    """Per leaf of the frozen base: replicated, or split over ``fsdp`` when the mesh has that axis > 1."""
    n = int(mesh.shape["fsdp"])
    return {k: NamedSharding(mesh, _fsdp_spec(tuple(v.shape), n)) for k, v in frozen.items()}


def place(tree, shardings):
    """Put host-identical values (the same on every process) onto global shardings.

    ``shardings`` is one sharding for all leaves or a matching tree. Built from
    callbacks so that it works across processes, where each one holds only its
    own devices' pieces.
    """
    if jax.process_count() == 1:
        # One process owns every device: a plain transfer (a no-op for arrays already in place).
        return jax.device_put(tree, shardings)
    leaves, treedef = jax.tree.flatten(tree)
    shards = [shardings] * len(leaves) if isinstance(shardings, NamedSharding) else treedef.flatten_up_to(shardings)
    out = []
    for x, s in zip(leaves, shards):
        host = np.asarray(jax.device_get(x))
        out.append(jax.make_array_from_callback(host.shape, s, lambda idx, h=host: h[idx]))
    return jax.tree.unflatten(treedef, out)


def to_host(x: jax.Array) -> np.ndarray:
    """The value of a replicated global array, readable on every process."""
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(x.addressable_data(0))


def barrier(name: str) -> None:
    """Wait for every process (no-op for one)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def on_main_process(check: Callable[[], None], error: type[Exception]) -> None:
    """Run ``check`` on process 0 alone; if it raises ``error``, every process raises it, with process
    0's message. For checks that write probes into a shared directory: run in several processes at
    once, one process's probe is another's stray file."""
    message = ""
    if is_main_process():
        try:
            check()
        except error as e:
            message = str(e) or type(e).__name__
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        raw = message.encode()[:4096]
        buf = np.zeros(4096, np.uint8)
        buf[: len(raw)] = np.frombuffer(raw, np.uint8)
        message = bytes(np.asarray(multihost_utils.broadcast_one_to_all(buf))).rstrip(b"\0").decode(errors="replace")
    if message:
        raise error(message)

