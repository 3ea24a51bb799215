"""GLUE tasks -> tokenized examples (``Encoded``); ``batching`` makes batches of them.

Sources: the Hub (``datasets.load_dataset("nyu-mll/glue", task)``) or a
directory in the classic GLUE TSV layout (``DIR/RTE/train.tsv`` ...). TSV files
are parsed with ``csv.QUOTE_NONE`` (fields may start with a quote) and
``utf-8-sig`` (MRPC starts with a BOM); columns are read by header name, except
CoLA, which has no header.
"""

from __future__ import annotations

import csv
import logging
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
    """The checkpoint's tokenizer (``tokenize.load``: the ``tokenizers`` library, no torch); DataError if none."""
    from . import tokenize

    try:
        return tokenize.load(path)
    except tokenize.TokenizerError as e:
        raise DataError(str(e)) from None


def encode(tokenizer, examples: Examples, max_seq_len: int) -> Encoded:
    """Ragged ids and type ids, truncated to ``max_seq_len`` (longest text first); no padding here."""
    ids, type_ids = tokenizer.encode(examples.texts, max_seq_len)
    return Encoded(ids, type_ids, examples.labels, int(tokenizer.pad_token_id))
