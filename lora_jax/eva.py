"""Ranks chosen from the data (EVA-style; Paischer et al., 2024): ``--lora-rank auto``.

Before the first step, the rows x (N, d_in) that reach each target kernel over the first batches
of epoch 0 give its input covariance C = Σ (x - x̄)ᵀ(x - x̄) / N (d_in, d_in): the principal components
of its inputs, as EVA's incremental PCA finds them. (Uncentered, the top component is the rows' mean,
which holds most of the "variance" and, as A's first direction, gave x @ A a large constant part: on
SST-2 the run with LoRA+ stalled at the majority class, results/rank-baseline/.)

- **Ranks.** A component's share of its matrix's input variance, λ_i / Σ λ, is its score. The
  budget, ``rank`` components per target on average, goes to the highest scores across every target
  at once, at most ``rho · rank`` per matrix (peft's EVA uses rho = 2). A matrix that wins no
  component gets no adapter.
- **Factors.** A starts at the top eigenvectors (d_in, r_i); B = 0, so ΔW = 0 and the model at step 0
  is the pretrained one. Column i is scaled so that x @ a_i has the variance a random kaiming column's
  gives in expectation, tr C / (3 d_in), instead of λ_i: with unit-norm columns x @ A's std was a median
  5.6x kaiming's, up to 40x, on MiniLM's SST-2 inputs (results/rank-baseline/eva-scale/), which multiplied
  B's effective rate on top of LoRA+'s 16x and left SST-2 runs slow or stuck (results/rank-baseline/). The directions come from the data,
  the step sizes stay those the default recipe was measured with.
- **Scale.** alpha / rank of the budget's rank for every matrix (peft's ``alpha_pattern`` keeps it
  when exported), so a matrix's update does not shrink as it gains components.

Shapes are fixed before the step is compiled. What is saved is plain LoRA with per-matrix ranks
(peft's ``rank_pattern``). The statistics are taken by :class:`InputProbe` kernels standing in the
tree (the model knows nothing of them); the run's data loop lives in ``prepare.eva_init``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from .compiler import dense

RHO = 2.0  # a matrix's rank is at most RHO x the budget's mean rank
INIT_BATCHES = 8  # batches of epoch 0 whose inputs set the ranks and A


class EvaError(ValueError):
    """Statistics that cannot set ranks (no rows, or a budget that fits no matrix)."""


@dataclass
class InputProbe:
    """A kernel that computes ``x @ w`` and hands ``(path, (Σ xᵀx, Σ x, N))`` to ``sink`` on the host.

    Rows whose ``mask`` entry is 0 (padding) are left out when x has the mask's leading shape (the
    last layer's rows of first tokens only are all real). ``sink`` runs through an ordered
    ``jax.debug.callback``, so the sums arrive in the order the batches ran.
    """

    w: jax.Array
    mask: jax.Array | None
    path: str
    sink: Callable[[str, np.ndarray], None]
    # It lives inside one traced function only (prepare.eva_init), so it need not be a pytree.
    shape = property(lambda self: self.w.shape)
    dtype = property(lambda self: self.w.dtype)

    def astype(self, dtype) -> "InputProbe":
        return self  # the statistics are taken in float32 whatever the compute dtype

    def __rmatmul__(self, x: jax.Array) -> jax.Array:
        rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
        keep = jnp.ones((rows.shape[0], 1), jnp.float32)
        if self.mask is not None and self.mask.shape == x.shape[:-1]:
            keep = self.mask.reshape(-1, 1).astype(jnp.float32)
        real = rows * keep
        gram = jnp.matmul(real.T, real, precision=jax.lax.Precision.HIGHEST)
        sink, path = self.sink, self.path  # the callback holds these, not the probe's traced arrays
        # float32 on the host: roberta-base's FFN-output inputs give 3072² sums, 36 MiB each.
        jax.debug.callback(lambda *m: sink(path, tuple(np.asarray(v, np.float32) for v in m)),
                           gram, real.sum(0), keep.sum(), ordered=True)
        return (rows @ dense(self.w)).astype(x.dtype).reshape(*x.shape[:-1], self.w.shape[-1])


def covariance(second: np.ndarray, first: np.ndarray, n: float) -> np.ndarray:
    """The covariance (d_in, d_in) of rows from their sums: Σ xᵀx (d_in, d_in), Σ x (d_in,) and their count."""
    if not n > 0:
        raise EvaError("no input reached a target kernel (every row was padding)")
    mean = np.asarray(first, np.float64) / n
    return np.asarray(second, np.float64) / n - np.outer(mean, mean)


def components(cov: np.ndarray, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """The top ``cap`` eigenpairs of a covariance (d_in, d_in): (shares (k,), vectors (d_in, k)).

    Shares are eigenvalues over their sum, descending, and all positive (a direction the inputs never
    vary along carries nothing, so fewer than ``cap`` may come back); the vectors are orthonormal columns."""
    vals, vecs = np.linalg.eigh(np.asarray(cov, np.float64))
    vals, vecs = np.clip(vals[::-1], 0, None), vecs[:, ::-1]
    total = vals.sum()
    if not total > 0:
        raise EvaError("no input reached a target kernel (every row was padding)")
    k = min(cap, int(np.count_nonzero(vals > total * 1e-12)))
    return vals[:k] / total, vecs[:, :k]


def kaiming_scaled(shares: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """A (d_in, k) from unit directions and their variance shares: column i times 1 / sqrt(3 d_in share_i).

    Then Var(x @ a_i) = λ_i |a_i|² = tr C / (3 d_in), what a column uniform in ±1/sqrt(d_in) (kaiming's
    bound, lora.init's A) gives in expectation."""
    return vectors / np.sqrt(3 * vectors.shape[0] * shares)[None, :]


def allocate(shares: dict[str, np.ndarray], budget: int) -> dict[str, int]:
    """Ranks per path: the ``budget`` largest shares over every path (each path's list is descending,
    so each rank is a prefix of its path's components). Ties go to the earlier path."""
    pool = sorted(((float(s), i, n) for i, p in enumerate(shares) for n, s in enumerate(shares[p])),
                  key=lambda t: (-t[0], t[1], t[2]))[:budget]
    ranks = {p: 0 for p in shares}
    paths = list(shares)
    for _, i, _ in pool:
        ranks[paths[i]] += 1
    return ranks


def init(covs: dict[str, np.ndarray], d_out: dict[str, int], rank: int, rho: float = RHO
         ) -> tuple[dict[str, dict[str, jax.Array]], dict[str, int]]:
    """Adapters from input covariances: ``({path: {"a": (d_in, r_i), "b": zeros (r_i, d_out)}}, {path: r_i})``.

    The budget is ``rank x len(covs)`` components, each matrix capped at ``rho x rank`` and at
    min(d_in, d_out). Paths that receive rank 0 are in the ranks but not in the adapters."""
    if rank < 1:
        raise EvaError(f"the rank budget must be >= 1 per matrix, got {rank}")
    comps = {p: components(c, min(int(rho * rank), c.shape[0], d_out[p])) for p, c in covs.items()}
    ranks = allocate({p: s for p, (s, _) in comps.items()}, rank * len(covs))
    adapters = {p: {"a": jnp.asarray(kaiming_scaled(comps[p][0][:r], comps[p][1][:, :r]), jnp.float32), "b": jnp.zeros((r, d_out[p]), jnp.float32)}
                for p, r in ranks.items() if r}
    return adapters, ranks
