"""Data-aware LoRA initialisations, PiSSA and OLoRA, as peft computes them.

Both take A and B from the pretrained kernel itself, so s·A0·B0 ≠ 0 at step 0. The frozen base becomes
the residual W_res = W - s·A0·B0, and the model at step 0 is still the pretrained one (to float32
rounding). Per target kernel K ``(d_in, d_out)`` (ours is torch's W transposed), with scale s and rank r:

* ``pissa`` (Meng et al., 2024): K = U S Vᵀ; A0 = U_r √(S_r / s), B0 = √(S_r / s) V_rᵀ, so s·A0·B0 is K's
  best rank-r part and the residual holds the rest.
* ``olora`` (Büyükakyüz, 2024): Kᵀ = Q R (torch's W = Q R); A0 = R_rᵀ, B0 = Q_rᵀ (the first r columns
  of Q, rows of R): orthonormal B0; the residual is W - s·Q_r R_r.

A trained adapter (A, B) on the residual is the plain adapter ([A, A0], [B; -B0]) of rank 2r on the
*original* base: s·(A B - A0 B0) = (W_res + s A B) - W. That is what gets saved and exported
(:func:`plain_equivalent`), never the residual.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from . import lora
from . import tree as tree_lib

DATA_AWARE = ("pissa", "olora")


def _factors(kernel: np.ndarray, how: str, rank: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    k = np.asarray(kernel, np.float64).reshape(-1, np.shape(kernel)[-1])
    if how == "pissa":
        u, s, vt = np.linalg.svd(k, full_matrices=False)
        root = np.sqrt(s[:rank] / scale)
        return u[:, :rank] * root, root[:, None] * vt[:rank]
    q, r = np.linalg.qr(k.T)
    return r[:rank].T, q[:, :rank].T


def init(params: lora.Params, cfg: lora.LoraConfig) -> lora.Adapters:
    """{path: {"a": A0 (d_in, r), "b": B0 (r, d_out)}} (float32) for every target of ``cfg``, whose
    ``init_a`` is one of DATA_AWARE. Deterministic: no key."""
    if cfg.init_a not in DATA_AWARE:
        raise lora.LoraError(f"{cfg.init_a!r} is not a data-aware initialisation ({', '.join(DATA_AWARE)})")
    flat = tree_lib.flatten(params)
    out = {}
    for path in lora.target_paths(params, cfg):
        d_in, d_out = int(np.prod(np.shape(flat[path])[:-1])), int(np.shape(flat[path])[-1])
        if cfg.rank > min(d_in, d_out):
            raise lora.LoraError(f"LoRA rank {cfg.rank} exceeds min(d_in, d_out) = {min(d_in, d_out)} of {path}")
        a, b = _factors(np.asarray(flat[path]), cfg.init_a, cfg.rank, cfg.scale)
        out[path] = {"a": a.astype(np.float32), "b": b.astype(np.float32)}
    return out


def residual(params: lora.Params, initial: lora.Adapters, cfg: lora.LoraConfig) -> lora.Params:
    """The frozen base of a data-aware run: W - s·A0·B0 at each target (``lora.merge`` of -B0)."""
    return lora.merge(params, {p: {"a": f["a"], "b": -f["b"]} for p, f in initial.items()}, cfg)


def plain_equivalent(trained: dict, initial: lora.Adapters, cfg: lora.LoraConfig) -> tuple[dict, lora.LoraConfig]:
    """Trained flat leaves (``lora/<path>/{a,b}`` on the residual, and the head) as a plain adapter of rank
    2r on the original base, with the same scale: (leaves, its LoraConfig)."""
    out = {k: v for k, v in trained.items() if not tree_lib.is_adapter(k)}
    for path, f0 in initial.items():
        a, b = (np.asarray(trained[tree_lib.adapter_key(path, x)], np.float32) for x in ("a", "b"))
        out[tree_lib.adapter_key(path, "a")] = np.concatenate([a, f0["a"]], axis=1)
        out[tree_lib.adapter_key(path, "b")] = np.concatenate([b, -f0["b"]], axis=0)
    rank = 2 * cfg.rank
    alpha = cfg.scale * (math.sqrt(rank) if cfg.rslora else rank)
    return out, dataclasses.replace(cfg, rank=rank, alpha=alpha)
