"""Adaptive rank (AdaLoRA, Zhang et al., ICLR 2023): a global rank budget moved by importance.

Conventions
-----------
* Each target kernel W ``(d_in, d_out)`` gets an SVD-form update
  ΔW = scale · P · diag(λ) · Q with P ``(d_in, r)``, λ ``(r,)``, Q ``(r, d_out)``,
  r the initial rank, scale = alpha / r. λ starts at zero, so ΔW = 0 at init;
  P and Q start N(0, 0.02²) as in the paper and peft, orthonormal, or as the top
  singular vectors of the task gradient ∂L/∂W on the first batches
  (:func:`gradient_directions`).
* The adapters live in the same ``{"params", "lora"}`` tree as LoRA's, as
  ``{path: {"p", "lam", "q"}}``: labels, partition, checkpoints and counts are
  unchanged. :func:`as_lora` turns them into LoRA's ``{"a": P·diag(λ), "b": Q}``,
  so the model runs through ``lora.apply`` (merged or factored) untouched.
* Pruning is a mask on λ: shapes never change and the train step compiles once.
  The allocator runs inside the jitted step (:func:`allocate`), driven by the
  step counter: nobody calls it by hand.

Schedule (T total steps, t_i warm-up, t_f final, b_0 = r · n, b_T = target · n
for n target matrices): the budget is b_0 for t <= t_i, falls on a cubic to b_T
at t = T - t_f, and stays there. Between t_i and T - t_f, every ``interval``
steps the triplets with the lowest importance are masked down to the budget;
in between, masked λ may grow back (as in the paper). From T - t_f on, the last
mask is applied at every step.

Importance of a parameter: s = Ī · Ū with Ī the EMA (β1) of |θ · ∂L/∂θ| and Ū
the EMA (β2) of its deviation |I − Ī|. A triplet i's score is s(λ_i) plus the
means of s over P[:, i] and over Q[i, :].
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from . import lora
from . import tree as tree_lib

SVD_FACTORS = ("p", "lam", "q")


class AdaptiveError(ValueError):
    """Adaptive-rank options that cannot work."""


@dataclass(frozen=True)
class AdaLoraConfig:
    """The adaptive-rank schedule and regulariser; steps are optimizer steps.

    Attributes:
      init_rank: r, the rank every target matrix starts with (its maximum).
      target_rank: the average rank per matrix the budget falls to (may be fractional).
      total_steps: length of the run (T).
      warmup_steps: t_i, steps at full budget before pruning starts.
      final_steps: t_f, steps at the final budget with the mask fixed.
      interval: steps between reallocations (ΔT).
      beta1, beta2: EMA factors of importance and of its uncertainty.
      orth_reg: weight of the orthogonality regulariser (mean over matrices of
        ‖PᵀP − I‖²_F + ‖QQᵀ − I‖²_F).
    """

    init_rank: int
    target_rank: float
    total_steps: int
    warmup_steps: int
    final_steps: int
    interval: int = 10
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg: float = 0.1

    def __post_init__(self):
        if not isinstance(self.init_rank, int) or self.init_rank <= 0:
            raise AdaptiveError(f"--adalora-init-rank must be a positive integer, got {self.init_rank!r}")
        if not 0 < self.target_rank <= self.init_rank:
            raise AdaptiveError(f"--adalora-target-rank {self.target_rank} must be in (0, init rank "
                                f"{self.init_rank}]: the budget can only fall")
        if self.interval <= 0:
            raise AdaptiveError(f"--adalora-interval must be > 0, got {self.interval}")
        if self.warmup_steps < 0 or self.final_steps < 0:
            raise AdaptiveError("--adalora-warmup-steps and --adalora-final-steps must be >= 0")
        if self.warmup_steps + self.final_steps >= self.total_steps:
            raise AdaptiveError(
                f"--adalora-warmup-steps {self.warmup_steps} + --adalora-final-steps {self.final_steps} "
                f"leave no steps to prune in a run of {self.total_steps} steps")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise AdaptiveError(f"--adalora-{name} must be in [0, 1), got {getattr(self, name)}")
        if self.orth_reg < 0:
            raise AdaptiveError(f"--adalora-orth-reg must be >= 0, got {self.orth_reg}")

    def budget(self, step, n_matrices: int):
        """Total rank allowed after ``step`` steps (a traced or plain int; cubic decay)."""
        b0 = self.init_rank * n_matrices
        bt = int(round(self.target_rank * n_matrices))
        span = self.total_steps - self.warmup_steps - self.final_steps
        frac = jnp.clip((step - self.warmup_steps) / span, 0.0, 1.0)
        return jnp.round(bt + (b0 - bt) * (1.0 - frac) ** 3).astype(jnp.int32)


# ----------------------------------------------------------------------------- adapters


def is_svd(adapters: dict) -> bool:
    return bool(adapters) and "lam" in next(iter(adapters.values()))


def init(params: dict, targets: tuple[str, ...], rank: int, key: jax.Array, how: str = "gaussian") -> dict:
    """``{path: {"p": (d_in, r), "lam": (r,) zeros, "q": (r, d_out)}}`` for every target kernel.

    ``how``: "gaussian" draws P and Q from N(0, 0.02²) (the paper's and peft's choice);
    "orthogonal" gives P orthonormal columns and Q orthonormal rows, the point the
    orthogonality regulariser pulls towards, so λ alone sets each triplet's size.
    """
    if how not in ("gaussian", "orthogonal"):
        raise AdaptiveError(f"--adalora-init must be gaussian or orthogonal, got {how!r}")
    flat = tree_lib.flatten(params)
    paths = lora.target_paths(params, lora.LoraConfig(rank=rank, targets=targets))
    out = {}
    for i, path in enumerate(paths):
        d_in, d_out = int(np.prod(np.shape(flat[path])[:-1])), int(np.shape(flat[path])[-1])
        if rank > min(d_in, d_out):
            raise AdaptiveError(f"initial rank {rank} exceeds min(d_in, d_out) = {min(d_in, d_out)} of {path}")
        kp, kq = jax.random.split(jax.random.fold_in(key, i))
        p = jax.random.normal(kp, (d_in, rank), jnp.float32)
        q = jax.random.normal(kq, (d_out, rank), jnp.float32)
        if how == "orthogonal":
            p, q = jnp.linalg.qr(p)[0], jnp.linalg.qr(q)[0]
        else:
            p, q = 0.02 * p, 0.02 * q
        out[path] = {"p": p, "lam": jnp.zeros((rank,), jnp.float32), "q": q.T}
    return out


def gradient_directions(grads: dict[str, np.ndarray], rank: int) -> dict[str, dict[str, np.ndarray]]:
    """``{path: {"p": U[:, :r], "q": Vᵀ[:r]}}``: each gradient's top-``rank`` singular vectors.

    ``grads[path]`` is ∂L/∂W of a target kernel, reshaped ``(d_in, d_out)``. With P and Q
    set to these (λ still 0, so ΔW = 0), the first gradient of λ_i is scale · σ_i: every
    triplet starts on a direction the task loss moves along, where random P and Q give λ
    a random projection of ∂L/∂W (about ‖∂L/∂W‖ / √(d_in·d_out)) and leave AdaLoRA at
    the starting line for hundreds of steps (results/adaptive/probe-150-steps).
    """
    out = {}
    for path, g in grads.items():
        u, _, vt = np.linalg.svd(np.asarray(g, np.float64), full_matrices=False)
        out[path] = {"p": u[:, :rank].astype(np.float32), "q": vt[:rank].astype(np.float32)}
    return out


def as_lora(adapters: dict) -> dict:
    """SVD-form adapters as LoRA's ``{"a": P·diag(λ) (d_in, r), "b": Q (r, d_out)}`` (same scale)."""
    return {path: {"a": ad["p"] * ad["lam"][None, :], "b": ad["q"]} for path, ad in adapters.items()}


def orthogonality(adapters: dict) -> jax.Array:
    """Mean over matrices of ‖PᵀP − I‖²_F + ‖QQᵀ − I‖²_F."""
    terms = []
    for ad in adapters.values():
        p, q = ad["p"], ad["q"]
        eye = jnp.eye(p.shape[1], dtype=p.dtype)
        terms.append(jnp.sum(jnp.square(p.T @ p - eye)) + jnp.sum(jnp.square(q @ q.T - eye)))
    return jnp.mean(jnp.stack(terms))


# ----------------------------------------------------------------------------- allocator


def svd_keys(trainable: dict) -> dict[str, dict[str, str]]:
    """``{matrix path: {"p": flat key, "lam": ..., "q": ...}}`` from the flat trainable dict."""
    out: dict[str, dict[str, str]] = {}
    for key in tree_lib.adapters_only(trainable):
        path, factor = tree_lib.adapter_path(key)
        if factor in SVD_FACTORS:
            out.setdefault(path, {})[factor] = key
    return out


def init_state(trainable: dict) -> dict:
    """Allocator state: EMAs of importance and uncertainty per SVD factor, and the rank mask per matrix."""
    keys = svd_keys(trainable)
    zeros = {k: jnp.zeros_like(trainable[k]) for ks in keys.values() for k in ks.values()}
    return {
        "ipt": zeros,
        "unc": {k: jnp.zeros_like(v) for k, v in zeros.items()},
        "mask": {path: jnp.ones_like(trainable[ks["lam"]]) for path, ks in keys.items()},
    }


def allocate(cfg: AdaLoraConfig, aux: dict, trainable: dict, grads: dict, step: jax.Array) -> tuple[dict, dict, dict]:
    """One allocator step, inside the jitted train step; ``step`` counts steps done (1 after the first).

    Returns (new allocator state, trainable with λ masked, {"budget", "rank"}).
    """
    keys = svd_keys(trainable)
    paths = list(keys)
    n = len(paths)
    t_prune_end = cfg.total_steps - cfg.final_steps
    pruning = (step > cfg.warmup_steps) & (step <= t_prune_end)

    ipt, unc = {}, {}
    for k in aux["ipt"]:
        s = jnp.abs(trainable[k] * grads[k])
        ipt[k] = cfg.beta1 * aux["ipt"][k] + (1 - cfg.beta1) * s
        unc[k] = cfg.beta2 * aux["unc"][k] + (1 - cfg.beta2) * jnp.abs(s - ipt[k])
    score = {k: ipt[k] * unc[k] for k in ipt}
    triplet = jnp.stack([
        score[keys[p]["lam"]] + jnp.mean(score[keys[p]["p"]], axis=0) + jnp.mean(score[keys[p]["q"]], axis=1)
        for p in paths
    ])  # (n, r)
    budget = cfg.budget(step, n)
    # Keep the `budget` highest-scoring triplets over all matrices (ties broken by position).
    order = jnp.argsort(jnp.argsort(triplet.reshape(-1)))
    fresh = (order >= triplet.size - budget).astype(jnp.float32).reshape(triplet.shape)
    realloc = pruning & ((step % cfg.interval == 0) | (step == t_prune_end))
    old = jnp.stack([aux["mask"][p] for p in paths])
    mask = jnp.where(realloc, fresh, old)
    # Mask λ when reallocating and at every step of the final phase; in between, pruned λ may regrow.
    apply_mask = realloc | (step > t_prune_end)
    out = dict(trainable)
    for i, p in enumerate(paths):
        k = keys[p]["lam"]
        out[k] = jnp.where(apply_mask, trainable[k] * mask[i], trainable[k])
    # Before pruning starts the EMAs still run, so the first reallocation has history to go on.
    new_aux = {"ipt": ipt, "unc": unc, "mask": {p: mask[i] for i, p in enumerate(paths)}}
    rank = jnp.sum(mask)
    return new_aux, out, {"budget": jnp.where(step > cfg.warmup_steps, budget, cfg.init_rank * n), "rank": rank}


def final_ranks(aux: dict) -> dict[str, int]:
    """Rank of each matrix at the end: the number of unmasked triplets."""
    return {p: int(np.asarray(m).sum()) for p, m in aux["mask"].items()}


# ----------------------------------------------------------------------------- truncation and export


def truncate(trainable: dict, aux: dict, scale: float) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Plain LoRA leaves of the final ranks: ``a = scale · P[:, keep] · diag(λ[keep])``, ``b = Q[keep]``
    (so ΔW = a @ b with scale 1); matrices left with rank 0 are dropped. Head leaves pass through.

    Returns (trainable leaves in LoRA form, rank per kept matrix).
    """
    keys = svd_keys(trainable)
    svd = {k for ks in keys.values() for k in ks.values()}
    out = {k: np.asarray(v) for k, v in trainable.items() if k not in svd}
    ranks = {}
    for path, ks in keys.items():
        keep = np.flatnonzero(np.asarray(aux["mask"][path]) > 0)
        lam = np.asarray(trainable[ks["lam"]])
        if keep.size == 0:
            continue
        p, q = np.asarray(trainable[ks["p"]]), np.asarray(trainable[ks["q"]])
        out[tree_lib.adapter_key(path, "a")] = (scale * p[:, keep] * lam[keep][None, :]).astype(np.float32)
        out[tree_lib.adapter_key(path, "b")] = q[keep].astype(np.float32)
        ranks[path] = int(keep.size)
    return out, ranks


def truncated_config(lcfg: lora.LoraConfig, ranks: dict[str, int]) -> lora.LoraConfig:
    """The LoRA config of a truncated adapter: targets are the kept matrices, scale 1 (alpha = rank)."""
    r = max(ranks.values()) if ranks else 1
    return lora.LoraConfig(rank=r, alpha=float(r), dropout=lcfg.dropout, init_a=lcfg.init_a,
                           targets=tuple(re.escape(p) for p in sorted(ranks)), trainable=lcfg.trainable)


def rank_table(ranks: dict[str, int]) -> tuple[list[str], list[str], np.ndarray]:
    """(layer labels, matrix labels, ranks[layer, matrix]) from per-path ranks, for the heatmap."""
    cells = {}
    for path, r in ranks.items():
        m = re.search(r"layer/(\d+)/(.+)/kernel$", path)
        layer, name = (int(m.group(1)), m.group(2)) if m else (-1, path)
        name = {"attention/self/query": "q", "attention/self/key": "k", "attention/self/value": "v",
                "attention/output/dense": "o", "intermediate/dense": "ffn in",
                "output/dense": "ffn out"}.get(name, name)
        cells[(layer, name)] = r
    layers = sorted({l for l, _ in cells})
    order = ["q", "k", "v", "o", "ffn in", "ffn out"]
    names = sorted({n for _, n in cells}, key=lambda n: (order.index(n) if n in order else len(order), n))
    grid = np.full((len(layers), len(names)), np.nan)
    for (l, n), r in cells.items():
        grid[layers.index(l), names.index(n)] = r
    return [str(l) for l in layers], names, grid


def default_steps(total_steps: int, warmup: int | None, final: int | None,
                  warmup_frac: float, final_frac: float) -> tuple[int, int]:
    """t_i and t_f: the given step counts, or these shares of the run (rounded down)."""
    return (int(math.floor(warmup_frac * total_steps)) if warmup is None else warmup,
            int(math.floor(final_frac * total_steps)) if final is None else final)
