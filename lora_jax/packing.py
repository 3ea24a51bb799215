"""Packed batches: a random batch's examples laid end to end in a few rows.

A batch drawn at random holds short and long examples; padded to its longest it is mostly
padding (SST-2, batch 32: 73% of the token slots). Sorting examples by length before batching
removes the padding but makes each batch a biased sample wherever length goes with the label.
Packing keeps the random batch and drops the padding: its ``batch_size`` examples are placed,
first-fit by decreasing length, into rows of ``row_len`` tokens, and the number of rows is
rounded up to one of a few row counts (one compiled step each). The row length and the counts are
fitted to the training set (``Batcher.for_training``).

The model reads a packed batch through three arrays (see ``model.EncoderForClassification``):
``attention_mask`` holds each token's example number within its row (1, 2, ...; 0 for
padding), so attention is block-diagonal; ``position_ids`` restart at 0 with each example; and
``first_index`` gives each example's first token as a flat index into rows x ``row_len``, where
the head reads it. Logits, labels and the loss keep one entry per example, in the batch's order,
so the optimizer and resuming are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .batching import bucket_for, collate, fit_buckets, train_order
from .batching import padding_share as data_padding_share
from .data import Encoded


def first_fit(lengths: np.ndarray, row_len: int) -> list[list[int]]:
    """Positions into ``lengths`` grouped into rows of at most ``row_len`` tokens, first-fit decreasing
    (at most 11/9 of the optimal row count plus one). Every length must be <= ``row_len``."""
    if len(lengths) and int(np.max(lengths)) > row_len:
        raise ValueError(f"an example of {int(np.max(lengths))} tokens does not fit a row of {row_len}")
    rows: list[list[int]] = []
    free: list[int] = []
    for i in np.argsort(-np.asarray(lengths), kind="stable"):
        n = int(lengths[i])
        for r, room in enumerate(free):
            if n <= room:
                rows[r].append(int(i))
                free[r] -= n
                break
        else:
            rows.append([int(i)])
            free.append(row_len - n)
    return rows


def row_lengths(lengths: np.ndarray, max_seq_len: int) -> tuple[int, ...]:
    """Candidate packed row lengths for a training set: its longest example rounded up to a multiple of 8,
    and ``max_seq_len`` (longer rows pack some sets tighter, shorter ones cost less attention per token)."""
    longest = int(min(np.max(lengths), max_seq_len)) if len(lengths) else max_seq_len
    return tuple(sorted({min(-(-longest // 8) * 8, max_seq_len), max_seq_len}))


def row_buckets(lengths: np.ndarray, batches: list[np.ndarray], row_len: int, num_buckets: int,
                batch_size: int) -> tuple[int, ...]:
    """At most ``num_buckets`` row counts that pad ``batches`` (an epoch's order) least, plus
    ``batch_size`` (one example per row: always enough). ``num_buckets`` 0: ``batch_size`` alone."""
    if num_buckets == 0:
        return (batch_size,)
    counts = np.array([len(first_fit(lengths[b], row_len)) for b in batches], np.int64)
    return tuple(sorted({*fit_buckets(counts, num_buckets), batch_size}))


def pack(data: Encoded, idx: np.ndarray, row_len: int, row_counts: tuple[int, ...]) -> dict[str, np.ndarray]:
    """The examples ``idx`` packed into R rows of ``row_len`` tokens, R the smallest of ``row_counts`` that
    holds them. Returns ``input_ids``, ``token_type_ids``, ``attention_mask`` (example number in its row),
    ``position_ids``: (R, row_len); ``first_index``, ``labels``, ``example_mask``: (len(idx),)."""
    lengths = np.minimum(np.fromiter((len(data.ids[i]) for i in idx), np.int64, len(idx)), row_len)
    rows = first_fit(lengths, row_len)
    n_rows = bucket_for(len(rows), row_counts)  # row_counts end at batch_size: one example a row fits
    input_ids = np.full((n_rows, row_len), data.pad_id, np.int32)
    type_ids = np.zeros((n_rows, row_len), np.int32)
    segment = np.zeros((n_rows, row_len), np.int32)
    positions = np.zeros((n_rows, row_len), np.int32)
    first = np.zeros(len(idx), np.int32)
    for r, members in enumerate(rows):
        start = 0
        for number, j in enumerate(members, start=1):
            i, n = idx[j], int(lengths[j])
            input_ids[r, start:start + n] = data.ids[i][:n]
            type_ids[r, start:start + n] = data.type_ids[i][:n]
            segment[r, start:start + n] = number
            positions[r, start:start + n] = np.arange(n)
            first[j] = r * row_len + start
            start += n
    return {
        "input_ids": input_ids,
        "attention_mask": segment,
        "token_type_ids": type_ids,
        "position_ids": positions,
        "first_index": first,
        "labels": data.labels[idx],
        "example_mask": np.ones(len(idx), bool),
    }


def padding_share(lengths: np.ndarray, batches: list[np.ndarray], row_len: int, row_counts: tuple[int, ...]) -> float:
    """Fraction of token slots that are padding when ``batches`` are packed."""
    real = slots = 0
    for b in batches:
        n = len(first_fit(lengths[b], row_len))
        real += int(np.minimum(lengths[b], row_len).sum())
        slots += bucket_for(n, row_counts) * row_len
    return 1.0 - real / max(slots, 1)


@dataclass(frozen=True)
class Batcher:
    """How a run lays out its training batches: ``batching`` is one of ``data.BATCHINGS``.

    "packed": random batches, packed (``row_len``, ``row_counts``); "random": the same batches, one
    example per row, padded to a length bucket; "by-length": length-grouped batches, one example per
    row (the behaviour before packing). ``buckets`` are the sequence-length buckets of unpacked rows.
    """

    batching: str
    buckets: tuple[int, ...]
    row_len: int = 0
    row_counts: tuple[int, ...] = ()

    @classmethod
    def for_training(cls, batching: str, lengths: np.ndarray, buckets: tuple[int, ...], *, batch_size: int,
                     max_seq_len: int, num_buckets: int, seed: int, epochs: int = 1) -> "Batcher":
        """The row length and the row counts are fitted to epoch 0's batches (the later epochs' differ little).
        One more row count holds the fullest batch of the run's ``epochs`` epochs: without it, a later
        epoch's batch that needs a row more than epoch 0's fullest would take the ``batch_size`` rows of
        the fallback, and set the process's memory peak (RTE: 32 rows instead of 22, results/memory/)."""
        if batching != "packed":
            return cls(batching, buckets)
        first_epoch = train_order(lengths, batch_size, seed=seed, epoch=0, batching="random")
        later = [b for e in range(1, epochs) for b in train_order(lengths, batch_size, seed=seed, epoch=e,
                                                                  batching="random")]
        # The candidate row length that pads epoch 0 least (SST-2 at 128: rows of 72, 8% padding against
        # 14% in rows of 128; MRPC: rows of 128, 8% against 14% in rows of 104, results/batching/).
        candidates = []
        for n in row_lengths(lengths, max_seq_len):
            counts = row_buckets(lengths, first_epoch, n, num_buckets, batch_size)
            fitted = [c for c in counts if c != batch_size]  # none with --num-buckets 0: one shape, by choice
            fullest = max((len(first_fit(lengths[b], n)) for b in later), default=0)
            if fitted and max(fitted) < fullest < batch_size:
                counts = tuple(sorted({*counts, fullest}))
            candidates.append(cls(batching, buckets, n, counts))
        return min(candidates, key=lambda b: b.padding_share(lengths, first_epoch))

    def order(self, lengths: np.ndarray, batch_size: int, *, seed: int, epoch: int) -> list[np.ndarray]:
        return train_order(lengths, batch_size, seed=seed, epoch=epoch, batching=self.batching)

    def batch(self, data: Encoded, idx: np.ndarray, batch_size: int, rows: slice | None = None) -> dict[str, np.ndarray]:
        if self.batching == "packed":
            return pack(data, idx, self.row_len, self.row_counts)
        return collate(data, idx, self.buckets, batch_size, rows=rows)

    def padding_share(self, lengths: np.ndarray, batches: list[np.ndarray]) -> float:
        if self.batching == "packed":
            return padding_share(lengths, batches, self.row_len, self.row_counts)
        return data_padding_share(lengths, batches, self.buckets)

    def describe(self) -> dict:
        out = {"batching": self.batching, "buckets": list(self.buckets)}
        if self.batching == "packed":
            out.update(row_len=self.row_len, row_counts=list(self.row_counts))
        return out
