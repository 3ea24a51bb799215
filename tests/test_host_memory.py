"""The training command caps glibc's malloc arenas (lora_jax/host_memory.py): threads that allocate at once
share two arenas instead of one each, and the user's MALLOC_ARENA_MAX wins. Each case runs in a fresh
process: the cap applies to arenas created after it, and the test process has made its own already."""

import json
import os
import subprocess
import sys

import pytest

from lora_jax import host_memory

from .conftest import ROOT

pytestmark = pytest.mark.skipif(host_memory.arena_count() is None, reason="the C library is not glibc")

# Eight threads, all alive at once, each allocating: without a cap glibc gives each its own arena.
THREADS = """
import json, sys, threading
from lora_jax import host_memory
cap = host_memory.limit_malloc_arenas() if sys.argv[1] == "cap" else None
barrier = threading.Barrier(8)
def work():
    barrier.wait()
    held = [bytearray(100_000) for _ in range(20)]
    barrier.wait()
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps({"cap": cap, "arenas": host_memory.arena_count()}))
"""


def _threads(mode: str, **env) -> dict:
    proc = subprocess.run([sys.executable, "-c", THREADS, mode], capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in {**os.environ, **env}.items() if v is not None})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_users_setting_is_returned_and_not_overridden(monkeypatch):
    """In process, no threads started: glibc read MALLOC_ARENA_MAX at start-up, so the function only reports it."""
    monkeypatch.setenv("MALLOC_ARENA_MAX", "5")
    assert host_memory.limit_malloc_arenas() == 5
    monkeypatch.setenv("MALLOC_ARENA_MAX", "many")  # glibc ignores what is not a number; so do we
    assert host_memory.limit_malloc_arenas() is None


def test_this_process_reports_its_arenas():
    """malloc_info's XML is parsed: a process that has run Python holds at least the main arena."""
    assert host_memory.arena_count() >= 1


@pytest.mark.slow
def test_the_cap_holds_threads_to_two_arenas():
    assert _threads("none", MALLOC_ARENA_MAX=None)["arenas"] > host_memory.ARENAS  # what the cap prevents
    assert _threads("cap", MALLOC_ARENA_MAX=None) == {"cap": host_memory.ARENAS, "arenas": host_memory.ARENAS}


@pytest.mark.slow
def test_the_users_malloc_arena_max_is_left_alone():
    assert _threads("cap", MALLOC_ARENA_MAX="5") == {"cap": 5, "arenas": 5}


@pytest.mark.slow
def test_a_training_run_reports_its_arenas(tiny_bert_dir, glue_dir, tmp_path):
    """The command sets the cap before JAX, Orbax and the tokenizer start their threads."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--task", "rte", "--model", str(tiny_bert_dir),
                           "--data-dir", str(glue_dir), "--preset", "tiny", "--max-steps", "2",
                           "--output-dir", str(out), "--no-progress"],
                          capture_output=True, text=True, timeout=600,
                          env={k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert 1 <= report["memory"]["malloc_arenas"] <= host_memory.ARENAS
    assert "malloc arenas at the end" in (out / "report.md").read_text()
