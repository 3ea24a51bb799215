"""Command line: flags -> TrainConfig (defaults < preset < flags) -> fit().

Bad input ends with one line naming the problem and exit status 2; a
diverged run with status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import sys
from pathlib import Path

from .config import (AUTO_ALLOCATION, METHODS, PARAM_DTYPES, RANK_ALLOCATIONS, XLA_SCHEDULERS, ConfigValueError,
                     TrainConfig, preset)
from .batching import BATCHINGS
from .cli_common import Parser, check_writable_file, named_dirs, setup_logging, user_errors
from .files import write_text
from . import host_memory


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="lora-jax train",
        description="Fine-tune a BERT/RoBERTa encoder on a GLUE task with LoRA or in full, "
        "evaluate on dev, and write report.json / report.md.",
    )
    d = TrainConfig()
    a = p.add_argument
    a("--task", required=True, help="cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte or wnli")
    a("--model", help=f"Hub id or local checkpoint directory (default {d.model})")
    a("--data-dir", help="GLUE TSV directory (DIR/RTE/train.tsv ...); default: the Hub via `datasets`")
    a("--dev-file", help="a TSV file to evaluate on instead of the default dev split")
    a("--method", choices=METHODS, help=f"default {d.method}")
    a("--preset", choices=("paper", "tiny"), help="paper: the LoRA paper's per-task hyperparameters; tiny: tests")
    a("--lora-rank", type=_rank, help=f"r of every target (default {d.lora_rank}); or auto: ranks chosen per "
      f"matrix from the data, {d.lora_rank} on average (--rank-allocation {AUTO_ALLOCATION})")
    a("--rank-allocation", choices=RANK_ALLOCATIONS,
      help="fixed: --lora-rank for every target (default); eva: --lora-rank is the mean budget, and each matrix's "
           "rank and A come from the principal components of its inputs over the first batches (EVA-style); "
           "gate: --lora-rank is each matrix's maximum, and a gate per component, pruned by a proximal L1 step, "
           "keeps the components the task needs (SoRA-style)")
    a("--gate-sparsity", type=float, help=f"--rank-allocation gate: how steadily the task must push a component's "
      f"gate to keep it, 0 (keep all) to 2 (default {d.gate_sparsity:g}: an unpushed gate closes by the end)")
    a("--lora-alpha", type=float, help=f"default {d.lora_alpha}")
    a("--lora-dropout", type=float, help=f"default {d.lora_dropout}")
    a("--targets", help="qv, qkvo, all, or comma-separated regexes over parameter paths (default qv)")
    a("--lora-init", choices=("kaiming", "gaussian", "pissa", "olora"),
      help="kaiming (default) or gaussian A with B = 0; or pissa (A, B from the top-r singular vectors of each "
           "kernel) or olora (from its QR decomposition), which train on the residual base W - s·A·B and save "
           "a plain rank-2r adapter for the original base")
    a("--rslora", action="store_const", const=True, help="scale by alpha/sqrt(r) instead of alpha/r")
    a("--dora", action="store_const", const=True,
      help="DoRA: also train a magnitude per output column; the adapted kernel is m·(W + sAB)/||W + sAB|| "
           "(column norms, constant in the backward pass, as peft's use_dora)")
    a("--lora-forward", choices=("auto", "factored", "merged"),
      help="how the train step applies LoRA: merged W + sAB (auto's choice: faster) or factored "
           "x@W + s(x@A)@B (auto's choice with --lora-dropout or a bfloat16 --param-dtype)")
    ada = p.add_argument_group(
        "adaptive rank (--method adalora)",
        "AdaLoRA: every target starts at the initial rank; a global budget falls on a cubic schedule to the "
        "target mean rank, moved between matrices by importance. Use --targets all to let it move between "
        "matrix types. --lora-alpha sets the scale alpha / initial rank.")
    ada.add_argument("--adalora-init-rank", type=int, help=f"default {d.adalora_init_rank}")
    ada.add_argument("--adalora-target-rank", type=float, help=f"mean final rank (default {d.adalora_target_rank:g})")
    ada.add_argument("--adalora-warmup-steps", type=int, help="steps before pruning starts (default: --adalora-warmup-frac)")
    ada.add_argument("--adalora-final-steps", type=int, help="steps at the final budget (default: --adalora-final-frac)")
    ada.add_argument("--adalora-warmup-frac", type=float,
                     help=f"share of the run before pruning starts, without --adalora-warmup-steps "
                          f"(default {d.adalora_warmup_frac:g})")
    ada.add_argument("--adalora-final-frac", type=float,
                     help=f"share of the run at the final budget, without --adalora-final-steps "
                          f"(default {d.adalora_final_frac:g})")
    ada.add_argument("--adalora-interval", type=int, help=f"steps between reallocations (default {d.adalora_interval})")
    ada.add_argument("--adalora-beta1", type=float, help=f"importance EMA (default {d.adalora_beta1})")
    ada.add_argument("--adalora-beta2", type=float, help=f"uncertainty EMA (default {d.adalora_beta2})")
    ada.add_argument("--adalora-orth-reg", type=float, help=f"orthogonality weight (default {d.adalora_orth_reg})")
    ada.add_argument("--adalora-init", choices=("gaussian", "orthogonal", "gradient"),
                     help="P and Q: N(0, 0.02^2) as in the paper (default), orthonormal, or the top singular "
                          "vectors of the task gradient dL/dW on the first batches (λ stays 0, so ΔW = 0)")
    ada.add_argument("--adalora-init-batches", type=int,
                     help=f"batches averaged for --adalora-init gradient (default {d.adalora_init_batches})")
    a("--init-adapter", help="start the LoRA factors from this lora-jax adapter directory (same base, "
                             "targets and rank; the head starts fresh): the paper's MNLI warm start")
    a("--epochs", type=float, help=f"default {d.epochs}")
    a("--max-steps", type=int, help="stop after this many steps (overrides --epochs)")
    a("--batch-size", type=int, help=f"default {d.batch_size}")
    a("--lr", type=float, help=f"default {d.lr}")
    a("--warmup-ratio", type=float, help=f"default {d.warmup_ratio}")
    a("--weight-decay", type=float, help=f"default {d.weight_decay}")
    a("--max-grad-norm", type=float, help=f"default {d.max_grad_norm}")
    a("--max-seq-len", type=int, help=f"default {d.max_seq_len}")
    a("--num-buckets", type=int, help=f"row-count buckets of packed batches, length buckets of unpacked ones "
      f"(default {d.num_buckets}; 0 pads every training batch to --max-seq-len, one static shape). More buckets "
      "pad less, and each compiles a step that stays in memory (RTE, MiniLM, packed: 4 buckets 8.5%% padding, "
      "8 buckets 6.7%% and 4 more compilations)")
    a("--batching", choices=BATCHINGS,
      help="packed (default): random batches, each packed end to end into few rows (block-diagonal attention); "
           "random: the same batches, one example per row; by-length: batches of similar lengths, which are "
           "biased samples where length goes with the label (the behaviour before packing)")
    a("--group-by-length", dest="batching", action="store_const", const="by-length",
      help="the same as --batching by-length")
    a("--loraplus-lr-ratio", type=float,
      help="LoRA+: B's learning rate is this many times --lr, A's is --lr (default 16 for --method lora, as the "
           "LoRA+ paper uses; it left the trivial plateau where plain LoRA stayed on it, results/robust-lora/). "
           "1 is plain LoRA, the LoRA paper's recipe (--preset paper sets it)")
    a("--head-only-steps", type=int,
      help="train the head alone for the first N steps (the adapters' learning rate is 0), then both: linear "
           "probing, then fine-tuning (default 0)")
    a("--max-train-examples", type=int, help="use only the first N training examples")
    a("--max-eval-examples", type=int, help="use only the first N dev examples")
    a("--param-dtype", choices=PARAM_DTYPES,
      help="how the frozen base is stored (default float32): bfloat16, or its matrix kernels quantized with qwix: "
           "int8 (absmax per output channel) or nf4 (QLoRA's 4-bit NormalFloat, blocks of 64), dequantized where "
           "used. LoRA factors, head and optimizer state stay float32")
    a("--compute-dtype", choices=("float32", "bfloat16"), help="matmul dtype (default float32)")
    a("--remat", choices=("none", "attention", "cheap", "qkv", "full", "dots"),
      help="recompute activations in the backward pass: attention = the attention probabilities, cheap = "
      "those and the FFN activation, qkv / full / dots = each whole layer, saving q, k, v / nothing / the "
      "matmul outputs (default cheap; none keeps every activation)")
    a("--xla-scheduler", choices=XLA_SCHEDULERS,
      help="XLA:CPU's instruction scheduler for the train step; memory: its memory-optimised one, which with "
      "--remat full or qkv lowers the CPU step's peak (results/bench/); no effect on GPU (default default)")
    a("--seed", type=int, help=f"default {d.seed}")
    a("--eval-every", type=int, help="evaluate every N steps (default: every epoch)")
    a("--save-every", type=int, help="checkpoint every N steps (default: every epoch, and at the end)")
    a("--keep-checkpoints", type=int, help="how many checkpoints to keep (default 2)")
    a("--resume", action="store_true", help="continue from the newest intact checkpoint in --output-dir")
    a("--log-every", type=int, help=f"log every N steps (default {d.log_every})")
    a("--output-dir", help=f"default {d.output_dir}")
    a("--overwrite", action="store_true", help="replace a run already in --output-dir")
    a("--no-progress", action="store_true", help="no progress bar")
    a("--compile-cache", metavar="DIR", default=os.environ.get("LORA_JAX_COMPILE_CACHE"),
      help="keep compiled steps in DIR (JAX's persistent compilation cache): a later run with the same shapes, "
      "settings and versions loads them instead of compiling again (default: $LORA_JAX_COMPILE_CACHE, else off)")
    g = p.add_argument_group(
        "devices and processes",
        "--batch-size is the global batch, split over every device of every process. Multi-process runs start "
        "one process per host (or per GPU) with the same flags; JAX's cluster detection (SLURM, Open MPI, "
        "Kubernetes) or the three flags below say how they find each other.")
    g.add_argument("--fsdp", type=int, default=1,
                   help="shard the frozen base over N devices (a second mesh axis) instead of replicating it")
    g.add_argument("--distributed", action="store_true",
                   help="join a multi-process run, detecting the cluster (jax.distributed.initialize())")
    g.add_argument("--coordinator-address", help="HOST:PORT of process 0 (or env JAX_COORDINATOR_ADDRESS)")
    g.add_argument("--num-processes", type=int, help="number of processes in the run")
    g.add_argument("--process-id", type=int, help="this process's index, 0 .. num-processes - 1")
    return p


def _rank(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a positive integer or auto, got {text!r}") from None


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values: dict = {}
    if args.preset:
        values.update(preset(args.preset, args.task))
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values.update({k: v for k, v in vars(args).items() if k in fields and v is not None})
    if values.get("lora_rank") == "auto":  # the mean budget stays the default rank
        del values["lora_rank"]
        if values.setdefault("rank_allocation", AUTO_ALLOCATION) == "fixed":
            raise ConfigValueError("--lora-rank auto chooses the ranks: not with --rank-allocation fixed")
    return TrainConfig(**values)


def enable_compile_cache(directory: str | None) -> None:
    """Point JAX's persistent compilation cache at ``directory`` (None: leave it off). Every
    compilation is stored; JAX keys entries by the program, the compiler options, the device
    and the versions, so a stale entry is never loaded."""
    if not directory:
        return
    import jax

    path = Path(directory).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigValueError(f"--compile-cache {directory}: cannot create it ({e.strerror})") from None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def train_main(argv: list[str] | None = None) -> int:
    host_memory.limit_malloc_arenas()  # before any thread allocates: XLA's, Orbax's, the tokenizer's
    args = build_parser().parse_args(argv)
    setup_logging(logging.INFO)
    from . import parallel
    from .train import Interrupted, TrainingDiverged, fit

    try:
        cfg = config_from_args(args)
        enable_compile_cache(args.compile_cache)
        parallel.initialize(parallel.DistributedConfig(args.coordinator_address, args.num_processes,
                                                       args.process_id, auto=args.distributed))
        if not parallel.is_main_process():
            logging.getLogger("lora_jax").setLevel(logging.WARNING)  # one voice: process 0's
        report, _ = fit(cfg, overwrite=args.overwrite, resume=args.resume, progress=not args.no_progress,
                        command=shlex.join(["python", *sys.argv]) if argv is None else None,
                        mesh=parallel.make_mesh(args.fsdp))
    except TrainingDiverged as e:
        print(f"error: training diverged: {e}", file=sys.stderr)
        return 1
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        out = args.output_dir or TrainConfig().output_dir
        print(f"interrupted outside the training loop; if {out}/checkpoints exists, the same command with --resume "
              "continues from its newest step", file=sys.stderr)
        return 130
    if not parallel.is_main_process():
        return 0
    primary = report["primary_metric"]
    split, name = primary.split("/")
    m = report["metrics"][split]
    print(f"{report['task']} {report['method']}: {primary} final {m['final']['values'][name]:.4f}, "
          f"best {m['best']['values'][name]:.4f} (step {m['best']['step']}); report: {cfg.output_dir}/report.md")
    return 0


def evaluate_main(argv: list[str] | None = None) -> int:
    p = Parser(prog="lora-jax evaluate",
                                description="Dev metrics of a saved adapter on its base model.")
    p.add_argument("--adapter", required=True, help="adapter directory (OUTPUT_DIR/adapter of a run, or peft's)")
    p.add_argument("--peft", action="store_true", help="the directory holds a Hugging Face peft LoRA adapter")
    p.add_argument("--task", help="default: the adapter's task")
    p.add_argument("--model", help="base model (default: the one named in the adapter's metadata)")
    p.add_argument("--data-dir", help="GLUE TSV directory; default: the Hub via `datasets`")
    p.add_argument("--dev-file", help="a TSV file to evaluate on instead of the default dev split")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-seq-len", type=int, help="default: the training run's")
    p.add_argument("--max-eval-examples", type=int)
    p.add_argument("--force-base", action="store_true",
                   help="use --model even if its weights are not the ones the adapter was trained on")
    args = p.parse_args(argv)
    setup_logging(logging.WARNING)
    from .evaluate import evaluate_adapter

    try:
        if args.batch_size <= 0:
            raise ConfigValueError(f"--batch-size must be > 0, got {args.batch_size}")
        results = evaluate_adapter(args.adapter, task=args.task, data_dir=args.data_dir, dev_file=args.dev_file,
                                   model=args.model, peft=args.peft, batch_size=args.batch_size,
                                   max_seq_len=args.max_seq_len, max_eval_examples=args.max_eval_examples,
                                   force_base=args.force_base)
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for split, values in results.items():
        print(f"{split}: " + ", ".join(f"{k}={v:.4f}" for k, v in values.items()))
    return 0


def predict_main(argv: list[str] | None = None) -> int:
    p = Parser(
        prog="lora-jax predict",
        description="Predictions from one base and several adapters. Each input line is JSON: "
        '{"adapter": NAME, "text": "..."} or {"adapter": NAME, "text": "...", "text_pair": "..."}. '
        "Each output line holds the prediction, or an error for that line alone.")
    p.add_argument("--adapter", action="append", required=True, metavar="NAME=DIR",
                   help="an adapter directory under a name (repeat for several)")
    p.add_argument("--input", required=True, help="JSONL file, or - for standard input")
    p.add_argument("--output", help="JSONL file (default: standard output)")
    p.add_argument("--model", help="base model (default: the one named by the first adapter)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--force-base", action="store_true",
                   help="use the base even where its weights are not the ones an adapter was trained on")
    args = p.parse_args(argv)
    setup_logging(logging.WARNING)
    from .serve import PredictError, Predictor

    try:
        named = named_dirs(args.adapter)
        if args.batch_size <= 0:
            raise ConfigValueError(f"--batch-size must be > 0, got {args.batch_size}")
        if args.input == "-":
            raw = sys.stdin.buffer.read()
        else:
            try:
                raw = Path(args.input).read_bytes()
            except OSError as e:
                raise ConfigValueError(f"cannot read --input {args.input}: {e.strerror}") from None
        if args.output:
            check_writable_file(Path(args.output), "--output")  # before any prediction is computed
        predictor = Predictor(named, model=args.model, batch_size=args.batch_size, force_base=args.force_base)
    except (*user_errors(), PredictError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = predict_lines(predictor, raw.splitlines())
    text = "".join(json.dumps(r) + "\n" for r in results)
    if args.output:
        try:
            write_text(Path(args.output), text)
        except OSError as e:  # it was writable a moment ago; say so, and keep the answers
            sys.stdout.write(text)
            print(f"error: cannot write --output {args.output} ({e.strerror}); the answers went to standard "
                  "output instead", file=sys.stderr)
            return 2
    else:
        sys.stdout.write(text)
    failed = sum("error" in r for r in results)
    print(f"{len(results) - failed} of {len(results)} lines answered"
          + (f"; {failed} errors (see their lines)" if failed else ""), file=sys.stderr)
    return 0


def predict_lines(predictor, lines: list[str | bytes]) -> list[dict]:
    """Answer JSONL request lines (text, or bytes decoded here as UTF-8) in order; a bad line gets
    {"line", "error"} and the rest go on."""
    from .serve import PredictError

    results: list[dict | None] = [None] * len(lines)
    groups: dict[str, list[tuple[int, object]]] = {}
    for i, line in enumerate(lines):
        try:
            if isinstance(line, bytes):
                line = line.decode("utf-8-sig" if i == 0 else "utf-8")
            if not line.strip():
                raise PredictError("empty line")
            req = json.loads(line)
            if not isinstance(req, dict) or "adapter" not in req or "text" not in req:
                raise PredictError('a line is an object with "adapter" and "text" (and optionally "text_pair")')
            if not isinstance(req["text"], str) or not isinstance(req.get("text_pair", ""), str):
                raise PredictError('"text" and "text_pair" are strings')
            text = req["text"] if "text_pair" not in req else (req["text"], req["text_pair"])
            predictor.check(text, req["adapter"])
            groups.setdefault(req["adapter"], []).append((i, text))
        except UnicodeDecodeError:
            results[i] = {"line": i + 1, "error": "not UTF-8 text"}
        except json.JSONDecodeError as e:
            results[i] = {"line": i + 1, "error": f"not JSON: {e.msg}"}
        except PredictError as e:
            results[i] = {"line": i + 1, "error": str(e)}
    # All valid lines in mixed-adapter batches: one jitted call serves examples of different adapters.
    order = [(i, name, t) for name, items in groups.items() for i, t in items]
    preds = predictor.predict_mixed([t for _, _, t in order], [name for _, name, _ in order])
    for (i, name, _), pred in zip(order, preds):
        results[i] = {"line": i + 1, "adapter": name, **pred}
    return results  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    """``lora-jax train|evaluate|predict|export|combine ...``."""
    from .cli_adapters import combine_main, export_main

    commands = {"train": train_main, "evaluate": evaluate_main, "predict": predict_main, "export": export_main,
                "combine": combine_main}
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: lora-jax {{{','.join(commands)}}} [--help] ...")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in commands:
        print(f"error: unknown command {command!r}; available: {', '.join(commands)}", file=sys.stderr)
        return 2
    return commands[command](rest)


if __name__ == "__main__":
    sys.exit(main())
