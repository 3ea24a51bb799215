"""Several adapters of one base and task made into one standard adapter (peft's ``add_weighted_adapter``).

With weights w_i and each adapter's ΔW_i = s_i · A_i @ B_i (A ``(d_in, r_i)``, B ``(r_i, d_out)``), per
adapted kernel:

* ``cat``: A = [w_1 s_1 A_1, w_2 s_2 A_2, ...], B = [B_1; B_2; ...], rank Σ r_i. ΔW = Σ w_i ΔW_i exactly.
* ``svd``: the best rank-``rank`` approximation of Σ w_i ΔW_i (truncated SVD: A = U, B = S V^T).
  Exact when ``rank`` >= the rank of the sum.
* ``linear``: A = Σ ±√|w_i s_i| A_i, B = Σ √|w_i s_i| B_i (the sign on A): the factors themselves are
  summed, which keeps the rank but is *not* Σ w_i ΔW_i for several adapters (the cross terms A_i B_j
  remain); for one adapter it is w ΔW. peft's definition; every adapter needs the same kernels and ranks.

The result has scale 1 (alpha = rank, no rsLoRA), like peft's. A kernel adapted in only some of the
adapters takes the others' ΔW as 0. Parameters trained in full (the task head) come from one
adapter, ``head``: heads trained apart are not aligned, so no average of them is taken.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from . import adapter as adapter_lib
from . import lora
from . import tree as tree_lib

HOWS = ("linear", "cat", "svd")


class CombineError(ValueError):
    """Adapters that cannot be combined, or a bad weight, method or rank."""


def factors(trained: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{kernel path: (A, B)} of an adapter's flat leaves."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tree_lib.adapters_only(trained).items():
        path, factor = tree_lib.adapter_path(key)
        out.setdefault(path, {})[factor] = np.asarray(value, np.float64)
    if any(lora.MAGNITUDE in f for f in out.values()):
        raise CombineError("a DoRA adapter does not combine: its kernel is m·(W + ΔW) normalised per column, "
                           "so weighted ΔWs do not add; export it merged instead")
    bad = [p for p, f in out.items() if set(f) != {"a", "b"}]
    if bad:
        raise CombineError(f"{bad[0]} holds factors {sorted(out[bad[0]])}, not a and b: only plain LoRA "
                           "adapters combine")
    return {p: (f["a"], f["b"]) for p, f in out.items()}


def combine_factors(adapters: Sequence[dict[str, tuple[np.ndarray, np.ndarray]]], scales: Sequence[float],
                    weights: Sequence[float], how: str, rank: int | None = None
                    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{kernel path: (A, B)} at scale 1 from each adapter's {path: (A, B)}, its scale and weight."""
    if how not in HOWS:
        raise CombineError(f"--how must be one of {', '.join(HOWS)}, got {how!r}")
    if not adapters or len(weights) != len(adapters) or len(scales) != len(adapters):
        raise CombineError(f"{len(weights)} weights for {len(adapters)} adapters: give one weight per adapter")
    if not all(math.isfinite(w) for w in weights):
        raise CombineError(f"the weights must be finite numbers, got {list(weights)}")
    if how == "svd" and (rank is None or rank <= 0):
        raise CombineError(f"--how svd needs --rank > 0, got {rank}")
    paths = sorted(set().union(*adapters))
    if how == "linear":
        shapes = [{p: f[0].shape for p, f in ad.items()} for ad in adapters]
        if any(s != shapes[0] for s in shapes):
            raise CombineError("--how linear needs every adapter on the same kernels at the same rank; "
                               "these differ: use --how cat or --how svd")
    out = {}
    for path in paths:
        present = [(ad[path], s, w) for ad, s, w in zip(adapters, scales, weights) if path in ad]
        if how == "cat":
            out[path] = (np.concatenate([w * s * a for (a, _), s, w in present], axis=1),
                         np.concatenate([b for (_, b), _, _ in present], axis=0))
        elif how == "linear":
            out[path] = (sum(math.copysign(math.sqrt(abs(w * s)), w * s) * a for (a, _), s, w in present),
                         sum(math.sqrt(abs(w * s)) * b for (_, b), s, w in present))
        else:
            delta = sum(w * s * (a @ b) for (a, b), s, w in present)
            if rank > min(delta.shape):
                raise CombineError(f"--rank {rank} exceeds {path}'s largest possible rank {min(delta.shape)}")
            u, sv, vt = np.linalg.svd(delta, full_matrices=False)
            out[path] = (u[:, :rank], sv[:rank, None] * vt[:rank])
    return out


def combine(named: Sequence[tuple[str, dict, dict[str, np.ndarray]]], weights: Sequence[float], how: str,
            *, rank: int | None = None, head: str | None = None) -> tuple[dict, lora.LoraConfig, dict[str, np.ndarray]]:
    """(metadata, LoRA config, flat leaves) of the combination of adapters given as (name, metadata,
    leaves). They must share the base (architecture and weights) and the task; ``head`` names the one
    whose fully trained parameters are kept (default: the first)."""
    if len(named) < 1:
        raise CombineError("give at least one --adapter NAME=DIR")
    names = [n for n, _, _ in named]
    first = named[0][1]
    for name, meta, _ in named[1:]:
        for field, what in (("architecture_hash", "architecture"), ("base_fingerprint", "base weights"),
                            ("task", "task")):
            if meta.get(field) != first.get(field) and None not in (meta.get(field), first.get(field)):
                raise CombineError(f"adapter {name!r} has another {what} ({meta.get(field)}) than "
                                   f"{names[0]!r} ({first.get(field)}): only adapters of one base and task combine")
    head = head or names[0]
    if head not in names:
        raise CombineError(f"--head {head!r} is not one of the adapters ({', '.join(names)})")
    cfgs = [adapter_lib.lora_config(meta, name) for name, meta, _ in named]
    combined = combine_factors([factors(t) for _, _, t in named], [c.scale for c in cfgs], weights, how, rank)
    if not combined:
        raise CombineError("the adapters hold no LoRA factors (full fine-tuning runs?): nothing to combine")
    new_rank = max(a.shape[1] for a, _ in combined.values())
    targets = tuple(dict.fromkeys(t for c in cfgs for t in c.targets))
    lcfg = dataclasses.replace(cfgs[0], rank=new_rank, alpha=float(new_rank), rslora=False, targets=targets)
    leaves = {k: v for k, v in next(t for n, _, t in named if n == head).items() if tree_lib.is_param(k)}
    for path, (a, b) in combined.items():
        leaves[tree_lib.adapter_key(path, "a")] = a.astype(np.float32)
        leaves[tree_lib.adapter_key(path, "b")] = b.astype(np.float32)
    meta = {**first, "combined_from": {"adapters": names, "weights": list(weights), "how": how, "head": head}}
    return meta, lcfg, leaves
