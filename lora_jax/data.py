"""GLUE tasks -> tokenized, length-bucketed numpy batches.

Sources: the Hub (``datasets.load_dataset("nyu-mll/glue", task)``) or a
directory in the classic GLUE TSV layout (``DIR/RTE/train.tsv`` ...). TSV files
are parsed with ``csv.QUOTE_NONE`` (fields may start with a quote) and
``utf-8-sig`` (MRPC starts with a BOM); columns are read by header name, except
CoLA, which has no header.

Batches are padded to the smallest of a few bucket lengths that fits their
longest sequence: the train step compiles once per bucket, and little compute
goes to padding.
"""

from __future__ import annotations

import csv
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Missing, malformed or empty task data."""


@dataclass(frozen=True)
class Task:
    name: str
    dir: str  # folder in the GLUE TSV layout
    text_columns: tuple[str, ...]  # TSV header names (CoLA: positions)
    label_column: str
    tsv_labels: tuple[str, ...]  # label strings in the TSV files, in class-index order
    label_names: tuple[str, ...]  # human-readable names, same order (HF datasets' order)
    hub_columns: tuple[str, ...]
    dev_splits: tuple[str, ...] = ("dev",)
    metrics: tuple[str, ...] = ("accuracy",)
    primary: str = "accuracy"
    header: bool = True

    @property
    def is_regression(self) -> bool:
        return not self.tsv_labels

    @property
    def num_labels(self) -> int:
        return 1 if self.is_regression else len(self.tsv_labels)


_BIN = ("0", "1")
TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("cola", "CoLA", ("3",), "1", _BIN, ("unacceptable", "acceptable"), ("sentence",),
             metrics=("matthews", "accuracy"), primary="matthews", header=False),
        Task("sst2", "SST-2", ("sentence",), "label", _BIN, ("negative", "positive"), ("sentence",)),
        Task("mrpc", "MRPC", ("#1 String", "#2 String"), "Quality", _BIN, ("not_equivalent", "equivalent"),
             ("sentence1", "sentence2"), metrics=("accuracy", "f1")),
        Task("stsb", "STS-B", ("sentence1", "sentence2"), "score", (), (), ("sentence1", "sentence2"),
             metrics=("pearson", "spearman"), primary="pearson"),
        Task("qqp", "QQP", ("question1", "question2"), "is_duplicate", _BIN, ("not_duplicate", "duplicate"),
             ("question1", "question2"), metrics=("accuracy", "f1")),
        Task("mnli", "MNLI", ("sentence1", "sentence2"), "gold_label", ("entailment", "neutral", "contradiction"),
             ("entailment", "neutral", "contradiction"), ("premise", "hypothesis"),
             dev_splits=("dev_matched", "dev_mismatched")),
        Task("qnli", "QNLI", ("question", "sentence"), "label", ("entailment", "not_entailment"),
             ("entailment", "not_entailment"), ("question", "sentence")),
        Task("rte", "RTE", ("sentence1", "sentence2"), "label", ("entailment", "not_entailment"),
             ("entailment", "not_entailment"), ("sentence1", "sentence2")),
        Task("wnli", "WNLI", ("sentence1", "sentence2"), "label", _BIN, ("not_entailment", "entailment"),
             ("sentence1", "sentence2")),
    ]
}
_HUB_SPLITS = {"train": "train", "dev": "validation", "dev_matched": "validation_matched",
               "dev_mismatched": "validation_mismatched"}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name]


@dataclass
class Examples:
    """Raw examples of one split: texts (one or two lists) and labels (int64 or float32)."""

    texts: tuple[list[str], ...]
    labels: np.ndarray
    source: str

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: int | None) -> "Examples":
        if n is None or n >= len(self):
            return self
        return Examples(tuple(t[:n] for t in self.texts), self.labels[:n], self.source)


# ----------------------------------------------------------------------------- reading


def _text_lines(file: Path):
    """The lines of a UTF-8 text file; one that cannot be read, or is not UTF-8, is a DataError."""
    try:
        with open(file, encoding="utf-8-sig", newline="") as f:
            yield from f
    except UnicodeDecodeError as e:
        raise DataError(f"{file} is not UTF-8 text (it holds the byte 0x{e.object[e.start]:02x})") from None
    except OSError as e:
        raise DataError(f"cannot read {file}: {e.strerror or e}") from None


def read_tsv(task: Task, file: Path) -> Examples:
    """One GLUE TSV file. Errors name the file and line."""
    if not file.is_file():
        raise DataError(f"{file} not found (task {task.name}; expected the GLUE TSV layout)")
    csv.field_size_limit(sys.maxsize)
    texts: tuple[list[str], ...] = tuple([] for _ in task.text_columns)
    labels = []
    label_index = {s: i for i, s in enumerate(task.tsv_labels)}
    reader = csv.reader(_text_lines(file), delimiter="\t", quoting=csv.QUOTE_NONE)
    if task.header:
        header = next(reader, None)
        if header is None:
            raise DataError(f"{file} is empty")
        missing = [c for c in (*task.text_columns, task.label_column) if c not in header]
        if missing:
            raise DataError(f"{file}: header lacks column(s) {', '.join(map(repr, missing))}")
        cols = [header.index(c) for c in task.text_columns]
        label_col = header.index(task.label_column)
        width = len(header)
    else:
        cols = [int(c) for c in task.text_columns]
        label_col = int(task.label_column)
        width = None
    for row in reader:
        line = reader.line_num
        if not row:
            continue
        if width is None:
            width = len(row)
        if len(row) != width:
            raise DataError(f"{file}:{line}: {len(row)} columns, expected {width}")
        raw = row[label_col]
        if task.is_regression:
            try:
                labels.append(float(raw))
            except ValueError:
                raise DataError(f"{file}:{line}: label {raw!r} is not a number") from None
        else:
            if raw not in label_index:
                raise DataError(
                    f"{file}:{line}: label {raw!r} is not one of {', '.join(task.tsv_labels)}"
                )
            labels.append(label_index[raw])
        for out, c in zip(texts, cols):
            out.append(row[c])
    if not labels:
        raise DataError(f"{file} holds no examples")
    dtype = np.float32 if task.is_regression else np.int64
    return Examples(texts, np.asarray(labels, dtype), str(file))


def _tsv_file(task: Task, data_dir: Path, split: str) -> Path:
    folder = data_dir / task.dir
    candidates = [folder / f"{split}.tsv"]
    if task.name == "mnli" and split == "dev_matched":
        # ../shared ships a 4-column reconstruction under this name (see its MANIFEST.md).
        candidates.append(folder / "dev_matched_reconstructed.tsv")
    for c in candidates:
        if c.is_file():
            return c
    raise DataError(f"{candidates[0]} not found (task {task.name}, split {split}; expected the GLUE TSV layout)")


def read_hub(task: Task, split: str) -> Examples:
    """One split from the Hub through ``datasets`` (its cache; HF_DATASETS_OFFLINE is respected)."""
    try:
        import datasets

        ds = datasets.load_dataset("nyu-mll/glue", task.name, split=_HUB_SPLITS[split])
    except Exception as e:  # network / cache failures surface in many classes
        raise DataError(
            f"could not load GLUE {task.name} ({split}) from the Hugging Face Hub ({type(e).__name__}); "
            "pass --data-dir DIR with the GLUE TSV files"
        ) from None
    texts = tuple(list(ds[c]) for c in task.hub_columns)
    labels = np.asarray(ds["label"], np.float32 if task.is_regression else np.int64)
    if len(labels) == 0:
        raise DataError(f"GLUE {task.name} {split} from the Hub is empty")
    if not task.is_regression and (labels.min() < 0 or labels.max() >= task.num_labels):
        raise DataError(f"GLUE {task.name} {split} from the Hub has labels outside 0..{task.num_labels - 1}")
    return Examples(texts, labels, f"hub:nyu-mll/glue/{task.name}/{split}")


def load_split(task: Task, split: str, data_dir: str | None = None, file: str | None = None) -> Examples:
    """``split`` is "train" or one of ``task.dev_splits``; ``file`` overrides the location."""
    if file is not None:
        return read_tsv(task, Path(file))
    if data_dir is not None:
        d = Path(data_dir)
        if not d.is_dir():
            raise DataError(f"--data-dir {data_dir} is not a directory")
        return read_tsv(task, _tsv_file(task, d, split))
    return read_hub(task, split)


def load_dev(task: Task, data_dir: str | None, dev_file: str | None = None,
             limit: int | None = None) -> dict[str, Examples]:
    """Every dev split of ``task`` ({"dev": ...}; MNLI: matched and mismatched).

    ``dev_file`` replaces the first split. A missing later split (MNLI
    mismatched, absent from ../shared) is skipped with a warning.
    """
    out = {}
    for i, split in enumerate(task.dev_splits):
        try:
            if dev_file is not None and i == 0:
                out[split] = load_split(task, split, file=dev_file)
            else:
                out[split] = load_split(task, split, data_dir)
        except DataError:
            if i == 0:
                raise
            log.warning("no %s split for %s: evaluating on %s only", split, task.name, task.dev_splits[0])
            continue
        out[split] = out[split].head(limit)
    return out


# ----------------------------------------------------------------------------- tokenizing


@dataclass
class Encoded:
    """Tokenized examples: ragged token ids, ragged type ids, labels."""

    ids: list[np.ndarray]
    type_ids: list[np.ndarray]
    labels: np.ndarray
    pad_id: int

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.ids), np.int64, len(self.ids))

    def __len__(self) -> int:
        return len(self.ids)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise DataError(f"cannot load a tokenizer from {path}: {type(e).__name__}: {e}") from None


def encode(tokenizer, examples: Examples, max_seq_len: int) -> Encoded:
    # Padding off and truncation explicit: MiniLM's tokenizer.json turns on fixed padding to 128.
    enc = tokenizer(
        *examples.texts, truncation=True, max_length=max_seq_len, padding=False,
        return_token_type_ids=True, return_attention_mask=False,
    )
    ids = [np.asarray(x, np.int32) for x in enc["input_ids"]]
    type_ids = [np.asarray(x, np.int32) for x in enc["token_type_ids"]]
    return Encoded(ids, type_ids, examples.labels, int(tokenizer.pad_token_id))


# ----------------------------------------------------------------------------- batching


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
