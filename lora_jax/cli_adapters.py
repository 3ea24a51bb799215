"""``lora-jax export`` and ``lora-jax combine``: saved adapters into other forms."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from .cli_common import Parser, named_dirs, setup_logging, user_errors
from .config import ConfigValueError


def export_main(argv: list[str] | None = None) -> int:
    p = Parser(prog="lora-jax export",
               description="Write a saved adapter (ours or peft's) as a merged Hugging Face checkpoint that "
                           "transformers loads without LoRA code, and/or as a peft adapter directory.")
    p.add_argument("--adapter", required=True, help="adapter directory (OUTPUT_DIR/adapter of a run, or peft's)")
    p.add_argument("--merged", metavar="OUT", help="write W + ΔW and the head here (config.json + model.safetensors)")
    p.add_argument("--peft", metavar="OUT", help="write a peft LoRA adapter here, for PeftModel on the original base")
    p.add_argument("--model", help="base model (default: the one named in the adapter's metadata)")
    p.add_argument("--force-base", action="store_true",
                   help="use --model even if its weights are not the ones the adapter was trained on")
    p.add_argument("--overwrite", action="store_true", help="replace an output directory that exists")
    args = p.parse_args(argv)
    setup_logging(logging.WARNING)
    from .export import export_adapter

    try:
        written = export_adapter(args.adapter, merged=args.merged, peft=args.peft, model=args.model,
                                 force_base=args.force_base, overwrite=args.overwrite)
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for kind, out in written.items():
        print(f"{kind}: {out}")
    return 0


def _weights(text: str, n: int) -> list[float]:
    try:
        values = [float(w) for w in text.split(",")]
    except ValueError:
        raise ConfigValueError(f"--weights takes comma-separated numbers, got {text!r}") from None
    if len(values) != n:
        raise ConfigValueError(f"--weights has {len(values)} values for {n} adapters: give one per adapter")
    return values


def combine_main(argv: list[str] | None = None) -> int:
    from .combine import HOWS

    p = Parser(prog="lora-jax combine",
               description="One standard adapter from several adapters of the same base and task (peft's "
                           "add_weighted_adapter). cat: ΔW = Σ w_i ΔW_i exactly, rank Σ r_i; svd: its best "
                           "rank---rank approximation; linear: a weighted sum of the factors themselves (peft's "
                           "linear: the same rank, but not Σ w_i ΔW_i, whose cross terms A_i B_j remain).")
    p.add_argument("--adapter", action="append", required=True, metavar="NAME=DIR",
                   help="a lora-jax adapter directory under a name (repeat for each)")
    p.add_argument("--weights", help="comma-separated weights, one per --adapter, in order (default: all 1)")
    p.add_argument("--how", choices=HOWS, default="cat", help="default cat (the exact one)")
    p.add_argument("--rank", type=int, help="the rank of --how svd (default: the largest input rank)")
    p.add_argument("--head", metavar="NAME", help="whose task head to keep (default: the first adapter's)")
    p.add_argument("--out", required=True, help="the new adapter directory")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    setup_logging(logging.WARNING)
    from . import adapter as adapter_lib
    from .combine import combine
    from .export import check_output
    from .files import write_dir
    from .model import ModelConfig

    try:
        dirs = named_dirs(args.adapter)
        named = [(name, *adapter_lib.load(Path(d))) for name, d in dirs.items()]
        weights = _weights(args.weights, len(named)) if args.weights else [1.0] * len(named)
        out = Path(args.out)
        check_output(out, "--out", dirs.values(), args.overwrite)
        rank = args.rank
        if args.how == "svd" and rank is None:
            rank = max(adapter_lib.lora_config(m, n).rank for n, m, _ in named)
        meta, lcfg, leaves = combine(named, weights, args.how, rank=rank, head=args.head)
        mcfg = ModelConfig(**meta["model_config"])
        write_dir(out, lambda tmp: adapter_lib.export(
            tmp, leaves, mcfg=mcfg, lcfg=lcfg, base_model=meta["base_model"], task=meta["task"],
            label_names=tuple(meta["label_names"]), max_seq_len=meta.get("max_seq_len"),
            base_fingerprint=meta.get("base_fingerprint"), extra={"combined_from": meta["combined_from"]}),
            overwrite=args.overwrite)
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ranks = sorted({v.shape[1] for k, v in leaves.items() if k.endswith("/a")})
    print(f"{out}: {args.how} of {', '.join(n for n, _, _ in named)} (weights {', '.join(f'{w:g}' for w in weights)}), "
          f"rank {'-'.join(map(str, ranks[::max(1, len(ranks) - 1)]))}, head from {meta['combined_from']['head']}")
    return 0
