"""The host allocator of a training process: fewer glibc malloc arenas.

glibc gives each thread that allocates an arena of its own, up to 8 per core. XLA:CPU's worker threads,
Orbax's and the tokenizer's each keep the memory they free in their own arena, where the main thread's next
large buffer cannot reuse it, so the process's resident peak grows by what each thread once held. Two arenas
keep that memory reusable: RTE, MiniLM, LoRA r = 8, batch 16, 3 epochs, peak RSS 1,793 -> 1,634 MiB, the same step
time (results/memory/README.md, rte-arenas).

A process-wide setting, so only the command-line entry points call it, never the library on import. It
changes nothing where the C library is not glibc, or where the user set ``MALLOC_ARENA_MAX`` (glibc read
that when the process started).
"""

from __future__ import annotations

import ctypes
import os

M_ARENA_MAX = -8  # glibc's <malloc.h>
ARENAS = 2


def _glibc():
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None
    except OSError:
        return None


def limit_malloc_arenas(n: int = ARENAS) -> int | None:
    """Cap glibc's malloc arenas at ``n`` for every thread that allocates from now on: call it before the
    threads start (before JAX's backend, Orbax or the tokenizer run). Returns the cap in force afterwards:
    ``n``; the user's ``MALLOC_ARENA_MAX`` where set (left alone); None off glibc."""
    user = os.environ.get("MALLOC_ARENA_MAX")
    if user:
        return int(user) if user.isdigit() else None
    libc = _glibc()
    if libc is None or libc.mallopt(M_ARENA_MAX, n) != 1:
        return None
    return n


def arena_count() -> int | None:
    """The number of malloc arenas the process holds now (glibc's ``malloc_info``), None off glibc."""
    import tempfile

    libc = _glibc()
    if libc is None:
        return None
    libc.fopen.restype = ctypes.c_void_p
    libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    with tempfile.NamedTemporaryFile(suffix=".xml") as f:
        fp = libc.fopen(f.name.encode(), b"w")
        if not fp:
            return None
        libc.malloc_info(0, fp)
        libc.fclose(fp)
        return f.read().decode().count("<heap nr=")
