"""Measurements that reports share: memory, timings, versions, device.

JAX is imported inside the functions that use it: the PyTorch reference (benchmarks/train_torch.py)
uses the rest, and its memory must not include JAX's.
"""

from __future__ import annotations

import datetime as _dt
import logging
import platform
import re
import resource
import statistics
import sys
from importlib import metadata



_stages = logging.getLogger("lora_jax.stages")


def stage(name: str) -> None:
    """Mark a moment of a run: a DEBUG line ``stage: NAME`` on the ``lora_jax.stages`` logger, silent
    unless someone listens (benchmarks/memory.py draws them on its memory timeline)."""
    _stages.debug("stage: %s", name)


def peak_rss_bytes() -> int:
    """The process's peak resident set size (Linux reports ru_maxrss in KiB)."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(kib) * (1 if sys.platform == "darwin" else 1024)


def device_bytes(stat: str = "peak_bytes_in_use") -> int | None:
    """``memory_stats()[stat]`` of device 0 (``peak_bytes_in_use``, ``bytes_in_use``, ...), where
    the backend has it (GPU/TPU); None on CPU."""
    import jax

    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # CPU backends raise or return None depending on the version
        return None
    return int(stats[stat]) if stats and stat in stats else None


def peak_device_bytes() -> int | None:
    """The allocator's peak on device 0 over the whole process so far (GPU/TPU; None on CPU)."""
    return device_bytes("peak_bytes_in_use")


def compiled_memory(compiled) -> dict[str, int] | None:
    """XLA's memory analysis of a compiled function: argument, output, temp and alias bytes."""
    try:
        m = compiled.memory_analysis()
    except Exception:
        return None
    if m is None:
        return None
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
              "alias_size_in_bytes", "generated_code_size_in_bytes")
    out = {f.removesuffix("_size_in_bytes") + "_bytes": int(getattr(m, f, 0)) for f in fields}
    # Donated arguments alias outputs: count them once.
    out["total_bytes"] = out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
    return out


_HLO_SHAPE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\w+\[([\d,]*)\]")
_HLO_DOT = re.compile(r"=\s*\w+\[([\d,]*)\]\S*\s+dot\(%?([\w.\-]+),.*?lhs_contracting_dims=\{([\d,]*)\}")
_HLO_BATCHED = re.compile(r"lhs_batch_dims=\{\d")


def _dims(text: str) -> list[int]:
    return [int(d) for d in text.split(",") if d]


def matmul_flops(compiled) -> dict[str, int] | None:
    """FLOPs of every dot in a compiled XLA executable's optimised HLO, fused or not: 2 x (elements of
    the dot's output) x (the product of its contracting sizes). ``{"total": ..., "batched": ...}``,
    batched being the dots with batch dimensions (in an encoder: attention's scores and context).

    Counts what XLA runs after its optimisations (dead code gone, recomputation added), on the same
    basis as ``torch.utils.flop_counter`` for PyTorch's matmuls; XLA's own ``cost_analysis()`` also
    counts elementwise work. Assumes no dot sits in a loop body (our step has none: the layers are
    unrolled). None when the executable has no HLO text."""
    try:
        text = compiled.as_text()
    except Exception:
        return None
    if not text:
        return None
    lines = text.splitlines()
    shapes = {}  # instruction name -> dims; names are unique within an HLO module
    for line in lines:
        m = _HLO_SHAPE.match(line)
        if m:
            shapes[m.group(1)] = _dims(m.group(2))
    counts = {"total": 0, "batched": 0}
    for line in lines:
        m = _HLO_DOT.search(line)
        if not m:
            continue
        out, lhs, contracting = _dims(m.group(1)), m.group(2), _dims(m.group(3))
        flops = 2
        for d in out:
            flops *= d
        for d in contracting:
            flops *= shapes[lhs][d]
        counts["total"] += flops
        if _HLO_BATCHED.search(line):
            counts["batched"] += flops
    return counts


def saved_for_backward_bytes(f, primal, *rest) -> int:
    """Bytes of the arrays JAX's autodiff keeps from the forward pass for the backward pass of
    ``f(primal, *rest)`` with respect to ``primal``: the residuals of ``jax.vjp``, found by tracing
    (nothing runs), the arguments themselves (weights, batch) not counted. This is the program
    JAX hands to XLA; XLA's fusion may store less."""
    import jax
    from jax.extend.core import Var

    def residuals(primal, *rest):
        return jax.tree.leaves(jax.vjp(lambda p: f(p, *rest), primal)[1])

    jaxpr = jax.make_jaxpr(residuals)(primal, *rest).jaxpr
    # A conversion to the same dtype (a weak type made strong) is the same buffer: look through it.
    same = {e.outvars[0]: e.invars[0] for e in jaxpr.eqns if e.primitive.name == "convert_element_type"
            and isinstance(e.invars[0], Var) and e.invars[0].aval.dtype == e.outvars[0].aval.dtype}
    given = set(jaxpr.invars) | set(jaxpr.constvars)
    # A residual is a variable (not a literal) that the trace produced; each counted once.
    kept = {same.get(v, v) for v in jaxpr.outvars if isinstance(v, Var)} - given
    return sum(v.aval.size * v.aval.dtype.itemsize for v in kept)


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def versions(*packages: str) -> dict[str, str]:
    names = packages or ("lora-jax", "jax", "jaxlib", "flax", "optax", "numpy", "transformers", "tokenizers")
    out = {"python": platform.python_version()}
    for p in names:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "not installed"
    return out


def device_info() -> dict[str, str | int]:
    import jax

    d = jax.devices()[0]
    return {
        "platform": d.platform,
        "device_kind": d.device_kind,
        "device_count": jax.device_count(),
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
    }


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def time_train_step(step, state, frozen, batch, *, warmup: int, steps: int):
    """Compile ``step`` for these inputs, run ``warmup + steps`` steps.

    Returns (compile seconds, timed step seconds, the compiled executable).

    Each timed step ends when its loss is ready (``block_until_ready``).
    """
    compiled, compile_s = compile_step(step, state, frozen, batch)
    return compile_s, time_steps(compiled, state, frozen, batch, warmup=warmup, steps=steps), compiled


def compile_step(step, *args):
    """Compile the jitted ``step`` for these arguments ahead of time: (executable, seconds)."""
    import time

    t0 = time.perf_counter()
    compiled = step.lower(*args).compile()
    return compiled, time.perf_counter() - t0


def time_steps(compiled, state, frozen, batch, *, warmup: int, steps: int) -> list[float]:
    """Run a compiled train step ``warmup + steps`` times; the seconds of the last ``steps``, each
    ending when its loss is ready (``block_until_ready``)."""
    import time

    import jax

    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        state, m = compiled(state, frozen, batch)
        jax.block_until_ready(m["loss"])
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times
