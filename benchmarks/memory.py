#!/usr/bin/env python
"""Where a training process's memory goes: resident memory (RSS) against time, lora-jax beside PyTorch + peft.

Each cell (framework x method) is one training run in a process of its own: `scripts/train.py` or
`benchmarks/train_torch.py` with the same task, model, batch size, length and steps. A thread samples the
process's RSS (`/proc/PID/status`, VmRSS) every `--interval` seconds, and the run's stage marks (the
`lora_jax.stages` logger: data read, parameters loaded, tokenized, each compilation, the train loop,
evaluation, checkpoints, adapters) place each sample in a stage. The peak is the kernel's high-water
mark of the process (`ru_maxrss`, from each run's report.json), which sampling can miss by a few MiB.

Writes results/NAME/memory.json, memory.md (per stage: RSS at its start and its largest sample, per
framework) and memory.png (RSS against time, stages marked).

    python benchmarks/memory.py --task rte --max-steps 60 --name memory/rte-quick
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import common
from common import ROOT, SHARED

# Run a script as __main__ with the stage marks on (DEBUG on lora_jax.stages; the rest as the script sets it).
DRIVER = ("import logging, runpy, sys; logging.basicConfig(level=logging.ERROR, format='%(message)s'); "
          "logging.getLogger('lora_jax.stages').setLevel(logging.DEBUG); sys.argv = sys.argv[1:]; "
          "runpy.run_path(sys.argv[0], run_name='__main__')")
FRAMEWORKS = {"jax": ROOT / "scripts" / "train.py", "torch": ROOT / "benchmarks" / "train_torch.py"}


def rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def run_cell(cmd: list[str], interval: float, env: dict) -> dict:
    """Run ``cmd``; return its RSS samples [(t, bytes)], stage marks [(t, name)], return code, error tail."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    samples, marks, errors = [], [], []

    def sample():
        while proc.poll() is None:
            r = rss_bytes(proc.pid)
            if r is not None:
                samples.append((time.perf_counter() - t0, r))
            time.sleep(interval)

    def read_stderr():
        for line in proc.stderr:
            if line.startswith("stage: "):
                marks.append((time.perf_counter() - t0, line[len("stage: "):].strip()))
            else:
                errors.append(line)

    threads = [threading.Thread(target=sample, daemon=True), threading.Thread(target=read_stderr, daemon=True)]
    for t in threads:
        t.start()
    proc.stdout.read()
    proc.wait()
    for t in threads:
        t.join()
    return {"samples": samples, "marks": marks, "returncode": proc.returncode, "stderr_tail": "".join(errors[-5:])}


def segments(marks: list) -> list[tuple[float, float, str]]:
    """(start, end, stage) from the marks: each stage lasts until the next mark; before the first, "start"
    (the interpreter and the imports). Every compilation is one stage, "compile"."""
    named = [(0.0, "start"), *((t, "compile" if n.startswith("compile") else n) for t, n in marks)]
    return [(t, t_next, n) for (t, n), (t_next, _) in zip(named, [*named[1:], (float("inf"), "")])]


def stages(samples: list, marks: list) -> list[dict]:
    """Per stage name, in order of first appearance: when it first starts, its seconds in all, the RSS
    where it first starts and its largest sample (MiB)."""
    out: dict[str, dict] = {}
    for t, t_next, name in segments(marks):
        inside = [r for ts, r in samples if t <= ts < t_next]
        before = [r for ts, r in samples if ts < t]
        at_start = (before or inside or [0])[-1 if before else 0]
        s = out.setdefault(name, {"stage": name, "t": round(t, 2), "seconds": 0.0,
                                  "rss_start_mib": round(at_start / 2**20), "rss_max_mib": 0})
        end = min(t_next, samples[-1][0]) if samples else t
        s["seconds"] = round(s["seconds"] + max(0.0, end - t), 2)
        s["rss_max_mib"] = max(s["rss_max_mib"], round(max(inside, default=at_start) / 2**20))
    return list(out.values())


def thin(samples: list, points: int = 1500) -> list:
    """At most ``points`` samples for the record and the plot: the largest of each run of consecutive
    samples, so that no peak is lost."""
    step = -(-len(samples) // points) or 1
    return [max(samples[i:i + step], key=lambda s: s[1]) for i in range(0, len(samples), step)]


def markdown(record: dict) -> str:
    lines = common.header(f"Process memory of a training run, {record['task']}: lora-jax and PyTorch + peft",
                          date=record["date"], command=record["command"], device=record["device"])
    lines += [record["protocol"], "",
              "| cell | peak RSS (ru_maxrss) | largest sample | wall | dev metric | vs PyTorch, same method |",
              "|---|---:|---:|---:|---:|---:|"]
    for name, c in record["cells"].items():
        ratio = c.get("peak_vs_torch")
        lines.append(f"| {name} | {c['peak_rss_mib']:,} MiB | {c['max_sample_mib']:,} MiB | {c['wall_s']:.0f} s | "
                     f"{c['metric']:.4f} | {'-' if ratio is None else f'{ratio:.2f}x'} |")
    lines += ["", "Per stage: RSS where the stage first starts and its largest sample (MiB). A stage lasts until "
              "the next one starts (`compile`: every compilation of the train step; `start`: the interpreter and "
              "the imports). See memory.png for the timeline.", ""]
    for name, c in record["cells"].items():
        lines += [f"**{name}**", "", "| stage | first starts at | seconds in all | RSS at first start | largest |",
                  "|---|---:|---:|---:|---:|"]
        lines += [f"| {s['stage']} | {s['t']:.1f} s | {s['seconds']:.1f} | {s['rss_start_mib']:,} | "
                  f"{s['rss_max_mib']:,} |" for s in c["stages"]]
        lines.append("")
    return "\n".join(lines)


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lora_jax.files import save_figure

    fig, axes = plt.subplots(len(record["cells"]), 1, figsize=(10, 2.6 * len(record["cells"])), sharex=True,
                             squeeze=False)
    top = max(c["peak_rss_mib"] for c in record["cells"].values()) * 1.1
    for ax, (name, c) in zip(axes[:, 0], record["cells"].items()):
        t, r = zip(*c["samples"]) if c["samples"] else ((), ())
        ax.plot(t, [x / 2**20 for x in r], color="C0" if name.startswith("jax") else "C1", lw=1.2)
        ax.axhline(c["peak_rss_mib"], color="grey", lw=0.6, ls=":")
        labelled, last, level = set(), -1e9, 0
        span = max(t for t, _ in c["samples"]) if c["samples"] else 1.0
        for t, _, stage in segments(c["marks"])[1:]:
            ax.axvline(t, color="k", lw=0.4, alpha=0.3 if stage in labelled else 0.6)
            if stage not in labelled:  # the first of each: compilations and evaluations repeat
                level = (level + 1) % 3 if t - last < 0.03 * span else 0  # stagger labels that would overlap
                ax.text(t, top * (0.98 - 0.3 * level), stage, rotation=90, va="top", ha="right", fontsize=6)
                labelled.add(stage)
                last = t
        ax.set_ylim(0, top)
        ax.set_ylabel("RSS (MiB)")
        ax.set_title(f"{name}: peak {c['peak_rss_mib']:,} MiB", fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("seconds since the process started")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--name", required=True, help="results/NAME/ gets memory.json, memory.md, memory.png")
    p.add_argument("--task", default="rte")
    p.add_argument("--methods", default="lora,full", help="lora and/or full")
    p.add_argument("--frameworks", default="jax,torch", help="jax and/or torch")
    p.add_argument("--model", default=str(SHARED / "models" / "all-MiniLM-L6-v2"))
    p.add_argument("--data-dir", default=str(SHARED / "data" / "glue"))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-seq-len", type=int, default=128)
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--max-steps", type=int, help="stop after this many steps (overrides --epochs)")
    p.add_argument("--interval", type=float, default=0.05, help="seconds between RSS samples")
    p.add_argument("--jax-flags", default="", help="more flags for the lora-jax cells, e.g. --jax-flags=--num-buckets=4")
    p.add_argument("--runs", help="run directories (default runs/memory-NAME)")
    p.add_argument("--results", help="default results/NAME")
    args = p.parse_args()
    methods = common.names(args.methods, ("lora", "full"), "--methods")
    frameworks = common.names(args.frameworks, tuple(FRAMEWORKS), "--frameworks")
    if args.interval <= 0:
        raise common.fail(f"--interval must be > 0, got {args.interval}")
    runs = Path(args.runs or ROOT / "runs" / f"memory-{args.name.replace('/', '-')}")
    results = Path(args.results or ROOT / "results" / args.name)
    length = ["--max-steps", str(args.max_steps)] if args.max_steps else ["--epochs", str(args.epochs)]
    jax_flags = shlex.split(args.jax_flags)
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "benchmarks"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cells = {}
    for method in methods:
        for fw in frameworks:
            name = f"{fw} {method}"
            out = runs / f"{fw}-{method}"
            flags = ["--task", args.task, "--model", args.model, "--data-dir", args.data_dir, "--method", method,
                     "--batch-size", str(args.batch_size), "--max-seq-len", str(args.max_seq_len), *length,
                     "--output-dir", str(out), "--overwrite", "--no-progress"]
            if method == "full":
                flags += ["--lr", "5e-5"]
            if fw == "jax":
                flags += jax_flags
            print(f"{name} ...", file=sys.stderr, flush=True)
            res = run_cell([sys.executable, "-c", DRIVER, str(FRAMEWORKS[fw]), *flags], args.interval, env)
            if res["returncode"] != 0:
                print(f"error: {name} failed (exit {res['returncode']}): {res['stderr_tail'].strip()}", file=sys.stderr)
                return 1
            report = common.report_of(out)
            split, metric = report["primary_metric"].split("/")
            cells[name] = {
                "command": " ".join(["python", str(FRAMEWORKS[fw].relative_to(ROOT)), *flags]),
                "peak_rss_mib": round(report["memory"]["peak_rss_bytes"] / 2**20),
                "max_sample_mib": round(max((r for _, r in res["samples"]), default=0) / 2**20),
                "wall_s": res["samples"][-1][0] if res["samples"] else 0.0,
                "metric": report["metrics"][split]["final"]["values"][metric],
                "stages": stages(res["samples"], res["marks"]),
                "marks": [(round(t, 3), n) for t, n in res["marks"]],
                "samples": [(round(t, 3), r) for t, r in thin(res["samples"])],
            }
            print(f"  peak {cells[name]['peak_rss_mib']:,} MiB", file=sys.stderr, flush=True)
    for method in methods:
        jax_cell, torch_cell = cells.get(f"jax {method}"), cells.get(f"torch {method}")
        if jax_cell and torch_cell:
            jax_cell["peak_vs_torch"] = jax_cell["peak_rss_mib"] / torch_cell["peak_rss_mib"]
    from lora_jax import profiling

    steps = f"{args.max_steps} steps" if args.max_steps else f"{args.epochs:g} epochs"
    record = {
        "task": args.task, "command": common.command(__file__), "code": common.code_version(),
        "date": profiling.now(), "device": f"CPU, {os.cpu_count()} cores",
        "protocol": f"{Path(args.model).name}, batch {args.batch_size}, max length {args.max_seq_len}, {steps}; "
                    f"LoRA r = 8 on q, v (each framework's defaults otherwise); full fine-tuning at lr 5e-5. lora-jax "
                    "trains on packed random batches, PyTorch on the same random batches padded to their longest."
                    + (f" lora-jax's cells also had `{args.jax_flags}`." if jax_flags else ""),
        "cells": cells,
    }
    results.mkdir(parents=True, exist_ok=True)
    from lora_jax.files import write_json, write_text

    write_json(results / "memory.json", record)
    write_text(results / "memory.md", markdown(record) + "\n")
    plot(record, results / "memory.png")
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
