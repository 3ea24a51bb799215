"""A run's report: ``report.json`` (everything) and ``report.md`` (what a reader wants first)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from .files import save_figure, write_json, write_text
from .lora import FROZEN, LORA, TRAINABLE
from .metrics import is_trivial, trivial_warning

log = logging.getLogger(__name__)


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


def _base_storage(param_dtype: str) -> str:
    if param_dtype in ("int8", "nf4"):
        how = "absmax per output channel" if param_dtype == "int8" else "4-bit NormalFloat, blocks of 64"
        return f"{param_dtype} matrix kernels ({how}), word embeddings bfloat16, the rest float32"
    return param_dtype


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
            lines += ["", f"**{trivial_warning(split, r['metrics'][split]['final']['values'], r.get('config'))}**"]
    mem = r["memory"]
    comp = mem["train_step_compiled"] or {}
    arenas = "" if mem.get("malloc_arenas") is None else f" ({mem['malloc_arenas']} malloc arenas at the end)"
    lines += [
        "",
        "## Cost",
        "",
        "| | |",
        "|---|---|",
        f"| trainable parameters | {r['trainable_params']:,} (LoRA {r['lora_params']:,}, head {r['head_params']:,}) |",
        f"| total parameters | {r['total_params']:,} |",
        f"| frozen base stored as | {_base_storage(c.get('param_dtype', 'float32'))} |",
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
        f"| peak RSS | {_mib(mem['peak_rss_bytes'])}{arenas} |",
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
    lines += _rank_lines(r.get("ranks_from_data"))
    lines += [
        "## Config",
        "",
        "```json",
        json.dumps(c, indent=1),
        "```",
        "",
    ]
    return "\n".join(lines)


def build(*, cfg, s, command: str | None, step: int, resume: bool, history: list[dict], best: dict,
          trained: dict, sizes: tuple[int | None, int | None], ada_report: dict | None, timer, compiled_steps,
          batcher, used_batches: list, mesh, wall: float) -> dict:
    """``report.json``'s content: the run's metrics, costs and provenance.

    ``s``: the run's ``prepare.Setup``; ``trained``: the saved adapter's flat leaves; ``sizes``: the
    adapter's and the peft adapter's bytes; ``timer``: ``train.StepTimer``; ``compiled_steps``: the
    ``train_step.PerShape`` that ran the steps.
    """
    import dataclasses

    import jax

    from . import host_memory, metrics, parallel, profiling
    from . import tree as tree_lib
    from .prepare import steps_per_epoch

    final = history[-1]["eval"] if history else {}
    compiled = compiled_steps.largest()
    lora_saved = sum(int(np.size(v)) for v in tree_lib.adapters_only(trained).values())
    return {
        "command": command,
        "task": cfg.task,
        "method": cfg.method,
        "model": cfg.model,
        "metrics": {
            split: {"final": {"step": step, "values": final[split]}, "best": best[split]}
            for split in final
        },
        "primary_metric": f"{s.task.dev_splits[0]}/{s.task.primary}",
        # What the saved adapter holds (for AdaLoRA: at the final ranks); and what was trained.
        "trainable_params": lora_saved + s.counts["trainable"],
        "lora_params": lora_saved,
        "lora_params_during_training": s.counts["lora"],
        "head_params": s.counts["trainable"],
        "total_params": s.counts["total"],
        "adapter_bytes": sizes[0],
        "peft_adapter_bytes": sizes[1],
        # What a fully fine-tuned copy of the model weighs in float32 (4 bytes a parameter).
        "full_model_fp32_bytes": 4 * (s.counts["total"] - s.counts["lora"]),
        "steps": step,
        "resumed": resume,
        "epochs_run": round(step / steps_per_epoch(s), 3),
        "train_examples": len(s.train),
        "eval_examples": {k: len(v) for k, v in s.dev.items()},
        "parallel": parallel.describe(mesh),
        "adaptive": ada_report,
        # eva: --lora-rank is the mean budget; gate: every matrix's starting (maximum) rank.
        "ranks_from_data": ({"allocation": cfg.rank_allocation,
                             ("start_rank" if cfg.rank_allocation == "gate" else "mean_budget"): s.lcfg.rank,
                             "matrices": len(s.ranks), "total_rank": sum(s.ranks.values()), "ranks": s.ranks}
                            if s.ranks else None),
        "train_examples_per_sec": timer.rate(timer.examples),
        "train_tokens_per_sec": timer.rate(timer.tokens),
        "step_time_median_s": profiling.median(timer.times),
        "timed_steps": len(timer.times),
        "compile_time_s": compiled_steps.compile_seconds,
        "compilations": compiled_steps.count,
        "compile_cache": jax.config.jax_compilation_cache_dir,  # None: every step compiled afresh
        "buckets": list(s.buckets),
        "batching": batcher.describe(),
        "padding_share": batcher.padding_share(s.train.lengths, used_batches) if used_batches else None,
        "trivial": {split: metrics.is_trivial(values) for split, values in final.items()},
        "memory": {
            "peak_device_bytes": profiling.peak_device_bytes(),
            "train_step_compiled": profiling.compiled_memory(compiled) if compiled is not None else None,
            "peak_rss_bytes": profiling.peak_rss_bytes(),
            "malloc_arenas": host_memory.arena_count(),  # 2 under the CLI (host_memory); None off glibc
        },
        "wall_time_s": wall,
        "load_report": {"source": s.load_report.source, "initialised": s.load_report.missing,
                        "unused": s.load_report.unused},
        "config": cfg.to_dict(),
        "model_config": dataclasses.asdict(s.mcfg),
        "versions": profiling.versions(),
        "device": profiling.device_info(),
        "date": profiling.now(),
    }


def warn_if_trivial(report: dict) -> None:
    """One warning line per dev split whose final predictions are trivial (``metrics.is_trivial``)."""
    for split, m in report["metrics"].items():
        if is_trivial(m["final"]["values"]):
            log.warning(trivial_warning(split, m["final"]["values"], report.get("config")))


def _rank_lines(chosen: dict | None) -> list[str]:
    """report.md's table of the ranks chosen from the data (``--lora-rank auto``): layers x matrices."""
    if not chosen:
        return []
    from .adaptive import rank_table

    layers, names, grid = rank_table(chosen["ranks"])
    how = (f"{chosen['matrices']} matrices started at rank {chosen['start_rank']} with a gate per component; "
           f"{chosen['total_rank']} components were left open (a mean of "
           f"{chosen['total_rank'] / max(chosen['matrices'], 1):.2f} per matrix)."
           if chosen["allocation"] == "gate" else
           f"{chosen['matrices']} matrices share a total rank of {chosen['total_rank']} (a mean of "
           f"{chosen['mean_budget']}), each from its inputs over the first batches.")
    lines = ["## Ranks chosen from the data", "", f"`--rank-allocation {chosen['allocation']}`: {how} The adapter "
             "is saved at these ranks (peft: `rank_pattern`); 0 is no adapter.", "",
             "| layer | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for layer, row in zip(layers, grid):
        lines.append(f"| {layer} | " + " | ".join("" if np.isnan(v) else str(int(v)) for v in row) + " |")
    return lines + [""]


def write_report(out: Path, report: dict) -> None:
    write_json(out / "report.json", report)
    write_text(out / "report.md", markdown(report))


def adaptive_outputs(out: Path, ada, ranks: dict[str, int]) -> dict:
    """``adaptive/ranks.json``, the rank heatmap and the budget curve of an AdaLoRA run (``ada``: its
    ``adaptive.AdaLoraConfig``; ``ranks``: final rank per matrix); returns the report's summary."""
    import matplotlib

    from .adaptive import rank_table

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = out / "adaptive"
    d.mkdir(exist_ok=True)
    summary = {
        "init_rank": ada.init_rank, "target_rank": ada.target_rank, "matrices": len(ranks),
        "final_total_rank": sum(ranks.values()), "final_mean_rank": sum(ranks.values()) / max(len(ranks), 1),
        "pruned_to_zero": sum(r == 0 for r in ranks.values()),
        "schedule": {"total_steps": ada.total_steps, "warmup_steps": ada.warmup_steps,
                     "final_steps": ada.final_steps, "interval": ada.interval},
        "beta1": ada.beta1, "beta2": ada.beta2, "orth_reg": ada.orth_reg,
    }
    write_json(d / "ranks.json", {**summary, "ranks": ranks})
    layers, names, grid = rank_table(ranks)
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 0.45 * len(layers) + 1.5))
    im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=ada.init_rank, aspect="auto")
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(layers)), layers)
    ax.set_xlabel("matrix")
    ax.set_ylabel("layer")
    for (i, j), r in np.ndenumerate(grid):
        if not np.isnan(r):
            ax.text(j, i, int(r), ha="center", va="center", color="w" if r < ada.init_rank / 2 else "k")
    fig.colorbar(im, ax=ax, label="final rank")
    ax.set_title(f"AdaLoRA final ranks (start {ada.init_rank}, target mean {ada.target_rank:g})")
    fig.tight_layout()
    save_figure(fig, d / "ranks.png", dpi=120)
    plt.close(fig)
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    recs = [r for r in recs if "budget" in r]
    if recs:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([r["step"] for r in recs], [r["budget"] for r in recs], label="budget")
        ax.plot([r["step"] for r in recs], [r["rank"] for r in recs], label="total rank in use", ls="--")
        ax.set_xlabel("step")
        ax.set_ylabel("total rank")
        ax.legend()
        fig.tight_layout()
        save_figure(fig, d / "budget.png", dpi=120)
        plt.close(fig)
    return {**summary, "files": ["adaptive/ranks.json", "adaptive/ranks.png", "adaptive/budget.png"]}


def describe_counts(counts: dict[str, int]) -> str:
    """One line from ``lora.count``'s result: what trains and how much of it."""
    trained = counts[LORA] + counts[TRAINABLE]
    return (
        f"LoRA parameters: {counts[LORA]:,} | trained base parameters (head): {counts[TRAINABLE]:,} | "
        f"frozen: {counts[FROZEN]:,} | trained: {trained:,} of {counts['total']:,} "
        f"({100 * trained / max(counts['total'], 1):.3f}%)"
    )
