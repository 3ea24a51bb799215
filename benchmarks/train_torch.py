#!/usr/bin/env python
"""The outside reference: the same fine-tuning in PyTorch `transformers` (+ peft for LoRA).

Same checkpoint, same tokenizer and examples (lora_jax.data reads and encodes
them), the same batches in the same order (lora_jax.data.train_order of the same
seed), padded per batch to its longest example as `DataCollatorWithPadding`
would, the same optimizer (AdamW, no decay on biases and LayerNorm, global-norm
clipping, linear warm-up and decay) and the same metrics. What cannot be the
same: the random initialisation of the head and of LoRA's A, and dropout masks.

Writes report.json with the keys lora-jax's report uses (metrics, trainable
parameters, adapter size, examples/s, step time, peak RSS, wall time), so that
benchmarks/grid.py summarises both frameworks alike.

    python benchmarks/train_torch.py --task mrpc --method lora --targets qv --lora-rank 8 --max-steps 100 --output-dir runs/torch-mrpc
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from common import ROOT

# peft module names for our target presets (BERT / RoBERTa layer names).
PEFT_TARGETS = {
    "qv": ["query", "value"],
    "qkvo": ["query", "key", "value", "attention.output.dense"],
    "all": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
}
# --lora-init -> peft's init_lora_weights (pissa: the exact SVD, as lora-jax computes it).
PEFT_INITS = {"kaiming": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}
# lora-jax's default LoRA+ ratio for --method lora (config.DEFAULT_LORAPLUS_RATIO; importing the config would
# import JAX into this PyTorch process, so the value is repeated and tests/test_grid.py keeps the two equal).
DEFAULT_LORAPLUS_RATIO = 16.0


def _orth(model):
    """Mean over AdaLoRA matrices of ||P^T P - I||_F^2 + ||Q Q^T - I||_F^2 (lora-jax's regulariser)."""
    import torch

    terms = []
    for name, p in model.named_parameters():
        if "lora_A" in name or "lora_B" in name:
            m = p if "lora_A" in name else p.T  # A: (r, in) rows = our P columns; B: (out, r)
            eye = torch.eye(m.shape[0], device=m.device)
            terms.append(((m @ m.T - eye) ** 2).sum())
    return torch.stack(terms).sum() / (len(terms) / 2)


def load_same_init(model, args, num_labels: int) -> None:
    """Overwrite the head (and LoRA's A, B) with lora-jax's initial values for this seed and settings.

    With it the two frameworks start from identical trainable values, and with dropout off
    (a model config whose dropout probabilities are 0) they should follow the same loss
    curve up to float rounding: the check that both implement the same training. Every
    lora-jax trainable leaf must land on exactly one trainable torch parameter of the same
    shape, and every trainable torch parameter must be covered.
    """
    import torch

    from lora_jax import prepare
    from lora_jax import weights
    from lora_jax.config import TrainConfig

    cfg = TrainConfig(task=args.task, model=args.model, data_dir=args.data_dir, method=args.method,
                      targets=args.targets, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                      lora_dropout=args.lora_dropout, seed=args.seed, max_seq_len=args.max_seq_len)
    model_dir = weights.resolve(args.model)
    mcfg = weights.read_config(model_dir, num_labels=num_labels)
    _, trainable, *_ = prepare.initial_trainable(cfg, model_dir, mcfg)

    def ours(torch_name: str) -> str:
        # peft's names -> the plain module names our paths map to
        name = torch_name.removeprefix("base_model.model.").replace(".modules_to_save.default", "")
        name = name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
        return name.removeprefix(mcfg.model_type + ".")

    params = {ours(n): p for n, p in model.named_parameters() if p.requires_grad}
    done = set()
    with torch.no_grad():
        for key, value in trainable.items():
            kind, _, path = key.partition("/")
            value = np.asarray(value, np.float32)
            if kind == "lora":
                kernel, factor = path.rsplit("/", 1)
                name, transpose = f"{kernel.rsplit('/', 1)[0].replace('/', '.')}.lora_{factor.upper()}.weight", True
            else:
                name, transpose = weights.flax_to_torch_name(path)
            value = value.T if transpose else value
            if name not in params or tuple(params[name].shape) != value.shape:
                raise SystemExit(f"error: --same-init: lora-jax's {key} {value.shape} has no torch counterpart")
            params[name].copy_(torch.from_numpy(np.ascontiguousarray(value)))
            done.add(name)
    if set(params) - done:
        raise SystemExit(f"error: --same-init: torch parameters without a lora-jax value: "
                         f"{sorted(set(params) - done)[:3]}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--data-dir")
    p.add_argument("--method", choices=("lora", "full", "adalora"), default="lora")
    p.add_argument("--targets", choices=tuple(PEFT_TARGETS), default="qv")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=8.0)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--rslora", action="store_true", help="peft's use_rslora: scale alpha / sqrt(r)")
    p.add_argument("--lora-init", choices=tuple(PEFT_INITS), default="kaiming",
                   help="peft's init_lora_weights: kaiming (True), gaussian, pissa or olora")
    p.add_argument("--dora", action="store_true", help="peft's use_dora")
    p.add_argument("--loraplus-lr-ratio", type=float,
                   help="LoRA+ through peft's create_loraplus_optimizer (which also gives every 1-D trainable "
                        "parameter, biases included, B's learning rate, and no weight decay); default 16 for "
                        "--method lora as in lora-jax, 1 (plain AdamW) otherwise")
    p.add_argument("--batching", choices=("random", "by-length"), default="random",
                   help="random: a shuffle cut into batches (lora-jax's packed and random batches hold the same "
                        "examples); by-length: lora-jax's length-grouped batches")
    # peft's AdaLoRA; schedule defaults as in lora-jax (warm-up 10%, final 25% of the run).
    p.add_argument("--adalora-init-rank", type=int, default=12)
    p.add_argument("--adalora-target-rank", type=float, default=8)
    p.add_argument("--adalora-interval", type=int, default=10)
    p.add_argument("--adalora-orth-reg", type=float, default=0.1)
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup-ratio", type=float, default=0.06)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--max-seq-len", type=int, default=128)
    p.add_argument("--max-train-examples", type=int)
    p.add_argument("--num-buckets", type=int, help="0: pad every training batch to --max-seq-len (the static-shape "
                   "baseline); otherwise accepted for benchmarks/grid.py and unused: each batch is padded to its "
                   "own longest example")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--same-init", action="store_true", help="start the head (and LoRA's A, B) from lora-jax's "
                   "initial values for this seed, instead of torch's own random ones (lora and full)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--save-every", type=int, help="write OUTPUT_DIR/checkpoint.pt every N steps (LoRA and full "
                   "fine-tuning): the trained parameters, optimizer, schedule, RNG and timing so far")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint.pt")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()

    from lora_jax import batching

    from lora_jax import data as data_lib
    from lora_jax import metrics, profiling
    from lora_jax.files import write_text

    out = Path(args.output_dir)
    ckpt_file = out / "checkpoint.pt"
    if args.resume and args.method == "adalora":
        print("error: --resume is not supported for --method adalora (peft's allocator state is not saved)",
              file=sys.stderr)
        return 2
    if args.same_init and (args.lora_init in ("pissa", "olora") or args.dora):
        print("error: --same-init starts from lora-jax's kaiming or gaussian factors, not pissa, olora or DoRA's",
              file=sys.stderr)
        return 2
    if args.same_init and args.method == "adalora":
        print("error: --same-init supports --method lora and full (AdaLoRA's P, Q differ in layout from peft's)",
              file=sys.stderr)
        return 2
    if args.loraplus_lr_ratio is None:
        args.loraplus_lr_ratio = DEFAULT_LORAPLUS_RATIO if args.method == "lora" else 1.0
    if not args.loraplus_lr_ratio > 0 or (args.loraplus_lr_ratio != 1 and args.method != "lora"):
        print(f"error: --loraplus-lr-ratio must be > 0, and 1 unless --method lora; got {args.loraplus_lr_ratio}",
              file=sys.stderr)
        return 2
    if args.save_every is not None and args.save_every < 1:
        print(f"error: --save-every must be >= 1, got {args.save_every}", file=sys.stderr)
        return 2
    if args.resume and not (ckpt_file.is_file() and (out / "checkpoint.json").is_file()):
        print(f"error: --resume: no checkpoint at {ckpt_file}", file=sys.stderr)
        return 2
    if (out / "report.json").exists() and not (args.overwrite or args.resume):
        print(f"error: {out} already holds a run; pass --overwrite", file=sys.stderr)
        return 2
    # What a checkpoint must agree on to be continued: everything but where it is written and how it ran.
    run_args = {k: v for k, v in vars(args).items() if k not in ("output_dir", "overwrite", "resume", "no_progress",
                                                                  "save_every")}
    if args.resume:
        try:
            saved_args = json.loads((out / "checkpoint.json").read_text())["args"]
        except (ValueError, KeyError, TypeError) as e:
            print(f"error: --resume: {out / 'checkpoint.json'} is damaged ({type(e).__name__}); start the run "
                  "again with --overwrite", file=sys.stderr)
            return 2
        if saved_args != run_args:
            diff = sorted(k for k in run_args if saved_args.get(k) != run_args[k])
            print(f"error: --resume: {ckpt_file} was written with other settings ({', '.join(diff)})",
                  file=sys.stderr)
            return 2
    try:
        task = data_lib.get_task(args.task)
        profiling.stage("reading data")
        train_ex = data_lib.load_split(task, "train", args.data_dir).head(args.max_train_examples)
        dev_ex = data_lib.load_dev(task, args.data_dir)
    except data_lib.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    profiling.stage("importing torch")
    import torch
    import transformers
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    profiling.stage("tokenizing")
    tokenizer = data_lib.load_tokenizer(args.model)
    train = data_lib.encode(tokenizer, train_ex, args.max_seq_len)
    dev = {s: data_lib.encode(tokenizer, e, args.max_seq_len) for s, e in dev_ex.items()}
    profiling.stage("loading parameters")
    # float32 whatever the checkpoint stores (transformers 5 would otherwise keep a float16 file's dtype),
    # as lora-jax trains.
    model = transformers.AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=task.num_labels,
                                                                            dtype=torch.float32)
    spe = len(train) // args.batch_size
    n_steps = args.max_steps or max(1, math.ceil(args.epochs * spe))
    if args.method == "adalora":
        import peft

        model = peft.get_peft_model(model, peft.AdaLoraConfig(
            task_type="SEQ_CLS", init_r=args.adalora_init_rank, target_r=int(args.adalora_target_rank),
            lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, target_modules=PEFT_TARGETS[args.targets],
            tinit=n_steps // 10, tfinal=n_steps // 4, deltaT=args.adalora_interval, beta1=0.85, beta2=0.85,
            orth_reg_weight=args.adalora_orth_reg, total_step=n_steps))
    if args.method == "lora":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(
            task_type="SEQ_CLS", r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
            target_modules=PEFT_TARGETS[args.targets], use_rslora=args.rslora,
            init_lora_weights=PEFT_INITS[args.lora_init], use_dora=args.dora))
    if args.same_init:
        load_same_init(model, args, task.num_labels)
    profiling.stage("placing state")
    # A GPU when torch sees one (the CPU wheel never does); the clock stops after loss.item(), which waits.
    dev_type = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(dev_type)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for _, p in trainable)
    decay = [p for n, p in trainable if not (n.endswith("bias") or "LayerNorm" in n)]
    no_decay = [p for n, p in trainable if n.endswith("bias") or "LayerNorm" in n]
    if args.loraplus_lr_ratio != 1:
        from peft.optimizers import create_loraplus_optimizer

        opt = create_loraplus_optimizer(model, torch.optim.AdamW, lr=args.lr, loraplus_lr_ratio=args.loraplus_lr_ratio,
                                        weight_decay=args.weight_decay, betas=(0.9, 0.999), eps=1e-8)
    else:
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
    warmup = round(args.warmup_ratio * n_steps)
    sched = transformers.get_linear_schedule_with_warmup(opt, warmup, n_steps)

    def tensors(enc, idx, pad_to=None):
        # Dynamic padding: to this batch's longest example (DataCollatorWithPadding's rule).
        t = pad_to or max(len(enc.ids[i]) for i in idx)
        ids = np.full((len(idx), t), enc.pad_id, np.int64)
        mask = np.zeros((len(idx), t), np.int64)
        types = np.zeros((len(idx), t), np.int64)
        for row, i in enumerate(idx):
            n = len(enc.ids[i])
            ids[row, :n], mask[row, :n], types[row, :n] = enc.ids[i], 1, enc.type_ids[i]
        batch = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
        if model.config.model_type != "roberta":
            batch["token_type_ids"] = torch.from_numpy(types)
        return {k: v.to(dev_type) for k, v in batch.items()}

    step, times, examples, tokens = 0, [], 0, 0
    log = []
    resumed = False
    if args.resume:
        # weights_only: tensors, numbers, strings and containers, never pickled code (a copied run
        # directory cannot run anything); the RNG states are byte tensors.
        try:
            ckpt = torch.load(ckpt_file, weights_only=True, map_location=dev_type)
        except Exception as e:  # noqa: BLE001 - any failure to read it is the same one line
            print(f"error: --resume: {ckpt_file} is unreadable or holds more than weights "
                  f"({type(e).__name__}); start the run again with --overwrite", file=sys.stderr)
            return 2
        named = dict(trainable)
        with torch.no_grad():
            for name, value in ckpt["trainable"].items():
                named[name].copy_(value)
        opt.load_state_dict(ckpt["opt"])
        sched.load_state_dict(ckpt["sched"])
        torch.set_rng_state(ckpt["rng"].cpu())
        if dev_type == "cuda" and "cuda_rng" in ckpt:  # the GPU's dropout draws from its own generator
            torch.cuda.set_rng_state(ckpt["cuda_rng"].cpu())
        step, times, examples, tokens, log = (ckpt[k] for k in ("step", "times", "examples", "tokens", "log"))
        resumed = True
    else:  # --overwrite: an old run's checkpoint must not be resumed into this one
        for f in (ckpt_file, out / "checkpoint.json"):
            f.unlink(missing_ok=True)

    def save_checkpoint() -> None:
        profiling.stage("checkpoint")
        # Atomic: a kill while writing leaves the previous checkpoint whole.
        tmp = out / "checkpoint.pt.tmp"
        torch.save({"args": run_args, "step": step, "trainable": {n: q.detach().clone() for n, q in trainable},
                    "opt": opt.state_dict(), "sched": sched.state_dict(), "rng": torch.get_rng_state(),
                    **({"cuda_rng": torch.cuda.get_rng_state()} if dev_type == "cuda" else {}),
                    "times": times, "examples": examples, "tokens": tokens, "log": log}, tmp)
        os.replace(tmp, ckpt_file)
        # The settings, readable before torch and the model load (checked first by --resume).
        write_text(out / "checkpoint.json", json.dumps({"args": run_args, "step": step}) + "\n")

    out.mkdir(parents=True, exist_ok=True)
    first_step = step
    model.train()
    profiling.stage("train steps")
    bar = tqdm(total=n_steps, initial=step, desc=f"torch {args.task} {args.method}", disable=args.no_progress,
               unit="step")
    while step < n_steps:
        epoch = step // spe
        for idx in batching.train_order(train.lengths, args.batch_size, seed=args.seed, epoch=epoch,
                                        batching=args.batching)[step % spe:]:
            if step >= n_steps:
                break
            batch = tensors(train, idx, args.max_seq_len if args.num_buckets == 0 else None)
            labels = torch.from_numpy(np.asarray(train.labels[idx])).to(dev_type)
            t0 = time.perf_counter()
            logits = model(**batch).logits
            if task.is_regression:
                loss = torch.nn.functional.mse_loss(logits[:, 0], labels.float())
            else:
                loss = torch.nn.functional.cross_entropy(logits, labels.long())
            task_loss = loss
            if args.method == "adalora":
                # peft adds its orthogonality term inside the model's own loss only; add it here.
                loss = loss + args.adalora_orth_reg * _orth(model)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for _, p in trainable], args.max_grad_norm)
            opt.step()
            if args.method == "adalora":
                model.base_model.update_and_allocate(step + 1)  # by hand, as peft requires
            sched.step()
            opt.zero_grad(set_to_none=True)
            value = task_loss.item()
            dt = time.perf_counter() - t0
            step += 1
            if step > first_step + 1:  # this process's first step is warm-up (allocations)
                times.append(dt)
                examples += len(idx)
                tokens += int(batch["attention_mask"].sum())
            if not math.isfinite(value):
                print(f"error: training diverged: loss {value} at step {step}", file=sys.stderr)
                return 1
            log.append({"step": step, "loss": value})
            if args.save_every and step % args.save_every == 0 and step < n_steps:
                save_checkpoint()
                profiling.stage("train steps")
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}")
    bar.close()

    model.eval()
    profiling.stage("evaluation")
    results = {}
    with torch.no_grad():
        for split, enc in dev.items():
            preds = np.zeros(len(enc), np.float32 if task.is_regression else np.int64)
            for idx in batching.eval_order(enc.lengths, 64):
                logits = model(**tensors(enc, idx)).logits.float().cpu().numpy()
                preds[idx] = metrics.predictions_from_logits(logits, task.is_regression)
            results[split] = {**metrics.compute(task.metrics, preds, enc.labels),
                              **metrics.spread(preds, enc.labels, task.is_regression)}

    out.mkdir(parents=True, exist_ok=True)
    profiling.stage("saving adapters")
    saved = out / ("adapter" if args.method == "lora" else "model")
    shutil.rmtree(saved, ignore_errors=True)
    model.save_pretrained(saved)
    adapter_bytes = sum(f.stat().st_size for f in saved.rglob("*") if f.is_file())
    n_total = sum(p.numel() for p in model.parameters())
    report = {
        "framework": "torch",
        "command": " ".join(["python", *sys.argv]),
        "task": args.task,
        "method": args.method,
        "loraplus_lr_ratio": args.loraplus_lr_ratio,
        "model": args.model,
        "metrics": {s: {"final": {"step": step, "values": v}} for s, v in results.items()},
        "primary_metric": f"{task.dev_splits[0]}/{task.primary}",
        "trainable_params": n_trainable,
        "total_params": n_total,
        "adapter_bytes": adapter_bytes,
        "steps": step,
        "train_examples": len(train),
        "train_examples_per_sec": examples / sum(times) if times else None,
        "train_tokens_per_sec": tokens / sum(times) if times else None,
        "step_time_median_s": float(np.median(times)) if times else None,
        "memory": {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                   "peak_device_bytes": torch.cuda.max_memory_allocated() if dev_type == "cuda" else None},
        "wall_time_s": time.perf_counter() - t_start,  # of this process (a resumed run: since the resume)
        "resumed": resumed,
        "config": vars(args),
        "versions": {**profiling.versions("torch", "transformers", "peft"), "jax": None},
        "device": {"platform": "gpu" if dev_type == "cuda" else "cpu",
                   "device_kind": torch.cuda.get_device_name() if dev_type == "cuda" else platform.machine(),
                   "host": platform.node(), "torch_threads": torch.get_num_threads()},
        "date": profiling.now(),
    }
    write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    for f in (ckpt_file, out / "checkpoint.json"):  # the run is complete: its trained model is saved above
        f.unlink(missing_ok=True)
    profiling.stage("done")
    primary = report["primary_metric"].split("/")
    print(f"{args.task} torch {args.method}: {report['primary_metric']} {results[primary[0]][primary[1]]:.4f}; "
          f"report: {out}/report.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
