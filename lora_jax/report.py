"""A run's report: ``report.json`` (everything) and ``report.md`` (what a reader wants first)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .metrics import trivial_warning


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically (a temporary file, then a rename): a kill leaves the old file whole."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def check_writable(directory: Path) -> None:
    """Create and remove a file in ``directory``: proof, before any work, that outputs can land there.
    Raises OSError (missing directory, no permission, read-only mount, /proc)."""
    fd, probe = tempfile.mkstemp(dir=directory, prefix=".write-check-")
    os.close(fd)
    os.unlink(probe)


def save_figure(fig, path: Path, dpi: int = 110) -> None:
    """Write a matplotlib figure atomically (a temporary file, then a rename)."""
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=dpi)
    os.replace(tmp, path)


def _mib(n: int | None) -> str:
    return "unmeasured" if n is None else f"{n / 2**20:,.1f} MiB"


def _kib(n: int | None) -> str:
    return "none" if n is None else f"{n / 2**10:,.1f} KiB"


def _pct(x: float | None) -> str:
    return "unmeasured" if x is None else f"{100 * x:.1f}%"


def _num(x, fmt: str) -> str:
    return "unmeasured" if x is None else format(x, fmt)


def _layout(r: dict) -> str:
    b = r.get("batching") or {"batching": "by-length"}
    if b["batching"] == "packed":
        return f"packed random batches: rows of {b['row_len']} tokens, row counts {b['row_counts']}"
    return f"{b['batching']} batches, length buckets {r['buckets']}"


def markdown(r: dict) -> str:
    c = r["config"]
    lines = [
        f"# {r['task']} · {r['method']} · {r['model']}",
        "",
        f"{r['date']} on {r['device']['platform']} ({r['device']['device_kind']}), "
        f"jax {r['versions'].get('jax')}, flax {r['versions'].get('flax')}",
        "",
        f"Command: `{r['command']}`" if r.get("command") else "Command: (called from Python)",
        "",
        "## Dev metrics",
        "",
        "| split | metric | final | best | best at step |",
        "|---|---|---:|---:|---:|",
    ]
    for split, m in r["metrics"].items():
        for name, value in m["final"]["values"].items():
            lines.append(f"| {split} | {name} | {value:.4f} | {m['best']['values'][name]:.4f} | {m['best']['step']} |")
    for split, trivial in (r.get("trivial") or {}).items():
        if trivial:
            lines += ["", f"**{trivial_warning(split, r['metrics'][split]['final']['values'])}**"]
    mem = r["memory"]
    comp = mem["train_step_compiled"] or {}
    lines += [
        "",
        "## Cost",
        "",
        "| | |",
        "|---|---|",
        f"| trainable parameters | {r['trainable_params']:,} (LoRA {r['lora_params']:,}, head {r['head_params']:,}) |",
        f"| total parameters | {r['total_params']:,} |",
        f"| adapter on disk | {_kib(r.get('adapter_bytes'))} (peft format: {_kib(r.get('peft_adapter_bytes'))}); "
        f"a full fp32 copy of the model: {_mib(r.get('full_model_fp32_bytes'))} |",
        f"| steps | {r['steps']} ({r['epochs_run']} epochs of {r['train_examples']:,} examples) |",
        f"| examples/s | {_num(r['train_examples_per_sec'], ',.1f')} |",
        f"| real tokens/s | {_num(r['train_tokens_per_sec'], ',.0f')} |",
        f"| median step time | {_num(r['step_time_median_s'], '.4f')} s |",
        f"| compile time | {r['compile_time_s']:.1f} s ({r['compilations']} compilations, {_layout(r)}) |",
        f"| padding share | {_pct(r['padding_share'])} |",
        f"| peak device memory | {_mib(mem['peak_device_bytes'])} |",
        f"| train step, XLA memory analysis (largest bucket) | args {_mib(comp.get('argument_bytes'))}, "
        f"temp {_mib(comp.get('temp_bytes'))}, output {_mib(comp.get('output_bytes'))} |",
        f"| peak RSS | {_mib(mem['peak_rss_bytes'])} |",
        f"| wall time | {r['wall_time_s']:.1f} s |",
        "",
    ]
    ada = r.get("adaptive")
    if ada:
        sch = ada["schedule"]
        lines += [
            "## Adaptive rank (AdaLoRA)",
            "",
            f"{ada['matrices']} matrices started at rank {ada['init_rank']} "
            f"({r['lora_params_during_training']:,} LoRA parameters trained); the budget fell to a mean of "
            f"{ada['target_rank']:g} (warm-up {sch['warmup_steps']} steps, final {sch['final_steps']}, "
            f"reallocation every {sch['interval']}). Final total rank {ada['final_total_rank']} "
            f"(mean {ada['final_mean_rank']:.2f}); {ada['pruned_to_zero']} matrices pruned to rank 0. "
            "The adapter is saved at these ranks. Per matrix: `adaptive/ranks.json`; plots: "
            "`adaptive/ranks.png`, `adaptive/budget.png`.",
            "",
        ]
    lines += [
        "## Config",
        "",
        "```json",
        json.dumps(c, indent=1),
        "```",
        "",
    ]
    return "\n".join(lines)


def write_report(out: Path, report: dict) -> None:
    write_text(out / "report.json", json.dumps(report, indent=2, default=str) + "\n")
    write_text(out / "report.md", markdown(report))
