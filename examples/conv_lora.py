#!/usr/bin/env python
"""LoRA on a convolutional net, as a user would do it: the same tree transform as for the encoders.

A small ResNet (Flax linen, GroupNorm) is pretrained on scikit-learn's handwritten digits 0-4, then adapted
to digits 5-9 with a new head, three ways, for the same number of steps:

* head only: the pretrained body frozen, a new head trained;
* LoRA: rank-r adapters on every conv and dense kernel of the body (a conv kernel (kh, kw, c_in, c_out)
  is the matrix (kh·kw·c_in, c_out)), plus the new head; the body frozen;
* full fine-tuning: everything trains.

The LoRA part is `lora.init` (B = 0, so the adapted model starts as the pretrained one), `lora.labels`
feeding `optax.multi_transform`, and `lora.merge` for the forward pass, which works with any Flax model.
Writes results/conv/conv.json and conv.md: test accuracy (median over seeds), trained parameters and
seconds per method, and checks that the frozen parameters are bit-identical after training.

    python examples/conv_lora.py --out results/conv
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lora_jax import lora
from lora_jax import tree as tree_lib

ROOT = Path(__file__).resolve().parents[1]


class Block(nn.Module):
    features: int
    stride: int = 1

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.GroupNorm(num_groups=4, name="norm1")(nn.Conv(self.features, (3, 3), self.stride, name="conv1")(x)))
        h = nn.GroupNorm(num_groups=4, name="norm2")(nn.Conv(self.features, (3, 3), name="conv2")(h))
        if x.shape[-1] != self.features or self.stride != 1:
            x = nn.Conv(self.features, (1, 1), self.stride, name="shortcut")(x)
        return nn.relu(x + h)


class ResNet(nn.Module):
    """8x8x1 images -> logits: a 3x3 stem, three residual blocks (16, 16, 32 channels), pooling, a dense layer
    and the head."""

    num_classes: int

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Conv(16, (3, 3), name="stem")(x))
        h = Block(16, name="block1")(h)
        h = Block(16, name="block2")(h)
        h = Block(32, 2, name="block3")(h)
        h = nn.relu(nn.Dense(64, name="dense")(h.mean(axis=(1, 2))))
        return nn.Dense(self.num_classes, name="head")(h)


def digits(seed: int = 0):
    """scikit-learn's 8x8 digits, scaled to [0, 1]: {"pre": 0-4, "new": 5-9 relabelled 0-4}, each split
    70/30 into (train, test) of (images (n, 8, 8, 1), labels (n,))."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x, y = (d.images / 16.0).astype(np.float32)[..., None], d.target
    out = {}
    for name, keep in (("pre", y < 5), ("new", y >= 5)):
        xtr, xte, ytr, yte = train_test_split(x[keep], y[keep] % 5, test_size=0.3, random_state=seed,
                                              stratify=y[keep])
        out[name] = ((xtr, ytr), (xte, yte))
    return out


METHODS = {
    # What trains besides the new head: nothing, rank-r adapters on every body kernel, or everything.
    "head only": lambda r: lora.LoraConfig(targets=(), trainable=("head/.*",)),
    "LoRA": lambda r: lora.LoraConfig(rank=r, alpha=2.0 * r, targets=(r"(stem|block\d/\w+|dense)/kernel",),
                                      trainable=("head/.*",)),
    "full fine-tuning": lambda r: lora.full_finetuning(),
}


def train(model, tree, cfg: lora.LoraConfig, data, *, steps: int, lr: float, batch: int, seed: int):
    """Adam on what ``cfg`` trains for ``steps`` steps: the final tree, and seconds taken (compilation included)."""
    trainable, frozen = lora.partition(tree, lora.labels(tree, cfg))
    flat_labels = tree_lib.flatten(lora.labels(tree, cfg))
    opt = optax.multi_transform({"lora": optax.adam(lr), "trainable": optax.adam(lr)},
                                {k: flat_labels[k] for k in trainable})
    state = opt.init(trainable)

    @jax.jit
    def step(trainable, state, x, y):
        def loss_fn(t):
            full = lora.combine(t, frozen)
            params = lora.merge(full[tree_lib.PARAMS], full.get(tree_lib.ADAPTERS, {}), cfg)
            return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": params}, x), y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, state = opt.update(grads, state, trainable)
        return optax.apply_updates(trainable, updates), state, loss

    (x, y), rng = data, np.random.default_rng(seed)
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = rng.choice(len(x), batch, replace=False)
        trainable, state, loss = step(trainable, state, x[idx], y[idx])
    jax.block_until_ready(loss)
    return lora.combine(trainable, frozen), time.perf_counter() - t0


def accuracy(model, tree, cfg, data) -> float:
    params = lora.merge(tree[tree_lib.PARAMS], tree.get(tree_lib.ADAPTERS, {}), cfg)
    x, y = data
    return float((np.asarray(model.apply({"params": params}, x)).argmax(-1) == y).mean())


def run(steps: int, pre_steps: int, seeds: list[int], rank: int, batch: int) -> dict:
    data = digits()
    model = ResNet(num_classes=5)
    base = model.init(jax.random.key(0), data["pre"][0][0][:1])["params"]
    # Pretraining on digits 0-4: everything trains.
    pre, pre_s = train(model, {tree_lib.PARAMS: base}, lora.full_finetuning(), data["pre"][0], steps=pre_steps,
                       lr=3e-3, batch=batch, seed=0)
    pretrained = pre[tree_lib.PARAMS]
    out = {"pretraining": {"steps": pre_steps, "seconds": pre_s,
                           "accuracy_0_4": accuracy(model, pre, lora.full_finetuning(), data["pre"][1])},
           "methods": {}}
    lrs = {"head only": 1e-2, "LoRA": 3e-3, "full fine-tuning": 1e-3}
    for name, make in METHODS.items():
        cfg, runs = make(rank), []
        for seed in seeds:
            key = jax.random.key(100 + seed)
            # A new head for digits 5-9; the body is the pretrained one.
            head = model.init(key, data["new"][0][0][:1])["params"]["head"]
            params = {**pretrained, "head": head}
            tree = {tree_lib.PARAMS: params}
            if cfg.targets:
                tree[tree_lib.ADAPTERS] = lora.init(params, cfg, jax.random.fold_in(key, 1))
            counts = lora.count(tree, lora.labels(tree, cfg))
            trained, seconds = train(model, tree, cfg, data["new"][0], steps=steps, lr=lrs[name], batch=batch,
                                     seed=seed)
            frozen_paths = [k for k, v in tree_lib.flatten(lora.labels(tree, cfg)).items() if v == lora.FROZEN]
            before, after = tree_lib.flatten(tree), tree_lib.flatten(trained)
            runs.append({"seed": seed, "accuracy_5_9": accuracy(model, trained, cfg, data["new"][1]),
                         "seconds": seconds, "trained_params": counts[lora.LORA] + counts[lora.TRAINABLE],
                         "total_params": counts["total"],
                         "frozen": len(frozen_paths),
                         "frozen_unchanged": all(np.array_equal(before[k], after[k]) for k in frozen_paths)})
        out["methods"][name] = {"lr": lrs[name], "runs": runs,
                                "median_accuracy": statistics.median(r["accuracy_5_9"] for r in runs),
                                "median_seconds": statistics.median(r["seconds"] for r in runs),
                                "trained_params": runs[0]["trained_params"], "total_params": runs[0]["total_params"]}
    return out


def frozen(runs: list[dict]) -> str:
    if not runs[0]["frozen"]:
        return "- (none frozen)"
    return "yes" if all(r["frozen_unchanged"] for r in runs) else "NO"


def markdown(record: dict) -> str:
    p = record["pretraining"]
    lines = [f"# LoRA on a conv net: digits 0-4 -> 5-9 ({record['date']})", "",
             f"Command: `{record['command']}`  ", f"Code: {record['code']}  ", f"Device: {record['device']}  ", "",
             f"A ResNet of {record['methods']['full fine-tuning']['total_params']:,} parameters, pretrained for "
             f"{p['steps']} steps on digits 0-4 (test accuracy {p['accuracy_0_4']:.4f}), then adapted to digits 5-9 "
             f"with a new head for {record['steps']} steps of batch {record['batch']}, seeds {record['seeds']}. "
             f"LoRA: rank {record['rank']} on every conv and dense kernel of the body.", "",
             "| method | test accuracy, digits 5-9 (median) | min-max | trained parameters | seconds (median) | "
             "frozen parameters bit-identical |", "|---|---:|---:|---:|---:|---|"]
    for name, m in record["methods"].items():
        accs = [r["accuracy_5_9"] for r in m["runs"]]
        lines.append(f"| {name} | {m['median_accuracy']:.4f} | {min(accs):.4f}-{max(accs):.4f} | "
                     f"{m['trained_params']:,} ({100 * m['trained_params'] / m['total_params']:.1f}%) | "
                     f"{m['median_seconds']:.1f} | {frozen(m['runs'])} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300, help="adaptation steps per method")
    p.add_argument("--pre-steps", type=int, default=600, help="pretraining steps on digits 0-4")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--rank", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--out", default=str(ROOT / "results" / "conv"))
    args = p.parse_args()
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        print(f"error: --seeds must be comma-separated integers, got {args.seeds!r}", file=sys.stderr)
        return 2
    for flag in ("steps", "pre_steps", "rank", "batch"):
        if getattr(args, flag) <= 0:
            print(f"error: --{flag.replace('_', '-')} must be > 0, got {getattr(args, flag)}", file=sys.stderr)
            return 2
    if not seeds:
        print("error: --seeds names no seed", file=sys.stderr)
        return 2
    import datetime
    import shlex
    import subprocess

    from lora_jax.files import write_json, write_text

    record = run(args.steps, args.pre_steps, seeds, args.rank, args.batch)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    record.update(steps=args.steps, batch=args.batch, seeds=seeds, rank=args.rank,
                  command=shlex.join(["python", "examples/conv_lora.py", *sys.argv[1:]]), code=commit or "unknown",
                  device=f"{jax.devices()[0].platform} ({os.cpu_count()} cores)",
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "conv.json", record)
    write_text(out / "conv.md", markdown(record))
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
