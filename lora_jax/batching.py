"""How examples become batches: the training order, length buckets, padded batches, padding shares.

Every batch has a static shape: unpacked batches are padded to the smallest of a few bucket lengths
that fits their longest example (``bucket_lengths``), so the train step compiles once per bucket and
little compute goes to padding. ``packing`` lays random batches end to end in rows instead.
"""

from __future__ import annotations

import math

import numpy as np

from .data import Encoded, DataError


def bucket_lengths(max_seq_len: int, num_buckets: int, lengths: np.ndarray | None = None) -> tuple[int, ...]:
    """At most ``num_buckets`` padded lengths, plus ``max_seq_len``, sorted.

    With ``lengths`` (the training set's): the lengths that pad those examples
    least (`fit_buckets`), so a short-sentence task (SST-2: median 10 tokens)
    gets its buckets where its examples are. Without: evenly spaced up to
    ``max_seq_len``, multiples of 8 where possible. ``max_seq_len`` is always
    the last bucket (compiled only if a batch needs it).
    """
    if lengths is not None and len(lengths):
        return tuple(sorted({*fit_buckets(np.minimum(lengths, max_seq_len), num_buckets), max_seq_len}))
    round8 = lambda n: min(max(math.ceil(n / 8) * 8, 8), max_seq_len)
    return tuple(sorted({round8(max_seq_len * i / num_buckets) for i in range(1, num_buckets + 1)} | {max_seq_len}))


def fit_buckets(lengths: np.ndarray, num_buckets: int) -> tuple[int, ...]:
    """The ``num_buckets`` lengths that minimise the token slots of ``lengths`` padded to them.

    Each example is padded to the smallest bucket that holds it, so the
    longest length is a bucket. Exact, by dynamic programming over the distinct
    lengths ``v`` (an optimal bucket sits on one of them): the fewest slots for
    the examples up to ``v[j]`` with ``k`` buckets, the last at ``v[j]``, is
    ``cost_k[j] = min over i < j of cost_{k-1}[i] + v[j] * #(v[i] < length <= v[j])``.
    Each step is one (distinct, distinct) array: milliseconds at 512 distinct lengths.

    Batches are padded to their longest example (``collate``), so they pad a
    little more than this counts; ``train_order``'s length-sorted batches
    ("by-length") keep the difference small (SST-2, batch 32, 16 buckets: 8.9% of
    the slots are padding, ``results/epoch/padding-by-buckets.md``).
    """
    values, counts = np.unique(np.asarray(lengths, np.int64), return_counts=True)
    if len(values) <= num_buckets:
        return tuple(int(v) for v in values)
    n = len(values)
    upto = np.concatenate([[0], np.cumsum(counts)])  # upto[j]: examples shorter than values[j]
    earlier = np.triu(np.ones((n, n), bool), 1)  # [i, j]: i < j
    unreachable = np.iinfo(np.int64).max // 4  # fewer lengths than buckets so far; never chosen at the end
    cost = values * upto[1:]  # one bucket, at values[j]
    best_prev = []
    for _ in range(num_buckets - 1):
        total = cost[:, None] + values[None, :] * (upto[None, 1:] - upto[1:, None])
        total = np.where(earlier, total, unreachable)
        prev = total.argmin(0)
        cost = total[prev, np.arange(n)]
        best_prev.append(prev)
    j = n - 1
    out = [values[j]]
    for prev in reversed(best_prev):
        j = prev[j]
        out.append(values[j])
    return tuple(sorted(int(v) for v in out))


def bucket_for(length: int, buckets: tuple[int, ...]) -> int:
    for b in buckets:
        if length <= b:
            return b
    return buckets[-1]


BATCHINGS = ("packed", "random", "by-length")


def train_order(lengths: np.ndarray, batch_size: int, *, seed: int, epoch: int, batching: str = "random",
                group: int = 64) -> list[np.ndarray]:
    """Batches of indices for one epoch; a pure function of (seed, epoch).

    "random" (and "packed", which packs the same batches): a shuffle cut into batches, so a batch's
    composition does not depend on length. "by-length": after the shuffle, sort by length inside
    windows of ``group`` batches, so each batch holds similar lengths (less padding) while the batch
    order stays random; where length goes with the label such a batch is a biased sample
    (Hugging Face's ``group_by_length``). The last ``len % batch_size`` examples of the shuffle are
    dropped (they change every epoch).
    """
    n = len(lengths)
    if n < batch_size:
        raise DataError(f"{n} training examples are fewer than one batch of {batch_size}")
    if batching not in BATCHINGS:
        raise ValueError(f"unknown batching {batching!r}; choose from {', '.join(BATCHINGS)}")
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(n)[: n - n % batch_size]
    window = (group if batching == "by-length" else 1) * batch_size
    batches = []
    for start in range(0, len(perm), window):
        chunk = perm[start : start + window]
        if batching == "by-length":
            chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


def eval_order(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """All examples, sorted by length, in batches (the last may be short)."""
    idx = np.argsort(lengths, kind="stable")
    return [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]


def collate(data: Encoded, idx: np.ndarray, buckets: tuple[int, ...], batch_size: int,
            rows: slice | None = None) -> dict[str, np.ndarray]:
    """Pad the examples ``idx`` to their bucket length; a short batch is filled to ``batch_size``
    with copies of its first example, marked 0 in ``example_mask`` (keeps shapes static).

    ``rows`` builds only those rows of the batch (one process's share in a
    multi-process run); the length is still the whole batch's bucket, so every
    process agrees on the shape.
    """
    real = len(idx)
    full = np.concatenate([idx, np.repeat(idx[:1], batch_size - real)]) if real < batch_size else idx
    t = bucket_for(int(max(len(data.ids[i]) for i in full)), buckets)
    example_mask = np.arange(batch_size) < real
    if rows is not None:
        full, example_mask = full[rows], example_mask[rows]
        batch_size = len(full)
    input_ids = np.full((batch_size, t), data.pad_id, np.int32)
    type_ids = np.zeros((batch_size, t), np.int32)
    mask = np.zeros((batch_size, t), np.int32)
    for row, i in enumerate(full):
        n = len(data.ids[i])
        input_ids[row, :n] = data.ids[i]
        type_ids[row, :n] = data.type_ids[i]
        mask[row, :n] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "token_type_ids": type_ids,
        "labels": data.labels[full],
        "example_mask": example_mask,
    }


def padding_share(lengths: np.ndarray, batches: list[np.ndarray], buckets: tuple[int, ...]) -> float:
    """Fraction of token slots that are padding under this batching."""
    real = padded = 0
    for b in batches:
        ls = lengths[b]
        real += int(ls.sum())
        padded += bucket_for(int(ls.max()), buckets) * len(b)
    return 1.0 - real / max(padded, 1)
