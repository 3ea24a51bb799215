"""Dev metrics from a saved adapter: the base named in its metadata (or ``model``) plus the adapter."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from . import adapter as adapter_lib
from . import batching
from . import data as data_lib
from . import lora, weights
from . import tree as tree_lib
from .config import MIN_SEQ_LEN
from .eval_step import evaluate, make_eval_step

log = logging.getLogger(__name__)


def load_for_eval(adapter_dir: str, *, model: str | None = None, peft: bool = False, num_labels: int | None = None,
                  force_base: bool = False):
    """(model config, LoRA config, trained leaves, frozen leaves, base id, metadata) for an adapter.

    A base whose architecture hash or shapes disagree with the adapter is an AdapterError; so is one
    of the same architecture with other weights than the adapter was trained on, unless ``force_base``
    (lora-jax adapters only: peft's record no fingerprint).
    """
    directory = Path(adapter_dir)
    if peft:
        if not (directory / adapter_lib.PEFT_CONFIG).is_file():
            raise adapter_lib.AdapterError(f"{directory} has no {adapter_lib.PEFT_CONFIG}: not a peft adapter directory")
        meta = adapter_lib.read_json(directory / adapter_lib.PEFT_CONFIG)
        if meta.get("format") == adapter_lib.FORMAT:
            raise adapter_lib.AdapterError(f"{directory} is a lora-jax adapter, not a peft one: drop --peft")
        base = model or meta.get("base_model_name_or_path")
        if not base:
            raise adapter_lib.AdapterError(f"{directory} names no base model: pass --model")
        model_dir = weights.resolve(base)
        mcfg = weights.read_config(model_dir, num_labels=num_labels or 2)
        params, _ = weights.load_params(model_dir, mcfg)
        lcfg, trained = adapter_lib.import_peft(directory, params, mcfg)
        head = [v for k, v in trained.items() if tree_lib.param_path(k) in tree_lib.HEAD_OUTPUT_KERNELS]
        if head and head[0].shape[-1] != mcfg.num_labels:  # the head decides the label count
            mcfg = weights.read_config(model_dir, num_labels=int(head[0].shape[-1]))
            params, _ = weights.load_params(model_dir, mcfg)
    else:
        meta, trained = adapter_lib.load(directory)
        base = model or meta["base_model"]
        model_dir = weights.resolve(base)
        mcfg = weights.read_config(model_dir, num_labels=meta["model_config"]["num_labels"])
        if mcfg.architecture_hash() != meta["architecture_hash"]:
            raise adapter_lib.AdapterError(
                f"base model {base} (architecture {mcfg.architecture_hash()}) is not the architecture the adapter "
                f"in {directory} was trained on ({meta['architecture_hash']}, {meta['base_model']})"
            )
        params, report = weights.load_params(model_dir, mcfg)
        adapter_lib.check_base(meta, report.fingerprint, base, f"the adapter in {directory}", force=force_base)
        params = adapter_lib.base_as_trained(params, meta)
        lcfg = adapter_lib.lora_config(meta)
        adapter_lib.check_fits(trained, params, str(directory))
    frozen = {k: v for k, v in tree_lib.base_keys(params).items() if k not in trained}
    trained = {k: np.asarray(v, np.float32) for k, v in trained.items()}
    return mcfg, lcfg, trained, frozen, str(model_dir), meta


def evaluate_adapter(adapter_dir: str, *, task: str | None = None, data_dir: str | None = None,
                     dev_file: str | None = None, model: str | None = None, peft: bool = False,
                     batch_size: int = 32, max_seq_len: int | None = None, max_eval_examples: int | None = None,
                     force_base: bool = False) -> dict:
    """Metrics per dev split of the adapter's task (or ``task``: for a lora-jax adapter, it must be the
    adapter's own; a peft adapter names none)."""
    task_name = task
    num_labels = None
    if task_name is not None:
        num_labels = data_lib.get_task(task_name).num_labels
        trained_on = None if peft else adapter_lib.read_meta(Path(adapter_dir))["task"]
        if trained_on not in (None, task_name):  # checked before the slow part
            raise adapter_lib.AdapterError(f"the adapter in {adapter_dir} was trained on {trained_on}, not "
                                           f"{task_name}: its labels would mean something else")
    if max_eval_examples is not None and max_eval_examples <= 0:
        raise data_lib.DataError(f"--max-eval-examples must be > 0, got {max_eval_examples}")
    if max_seq_len is not None and max_seq_len < MIN_SEQ_LEN:
        raise data_lib.DataError(f"--max-seq-len must be >= {MIN_SEQ_LEN}, got {max_seq_len}")
    mcfg, lcfg, trained, frozen, model_dir, meta = load_for_eval(adapter_dir, model=model, peft=peft,
                                                                  num_labels=num_labels, force_base=force_base)
    task_name = task_name or meta.get("task")
    if task_name is None:
        raise data_lib.DataError("the adapter names no task: pass --task")
    t = data_lib.get_task(task_name)
    if t.num_labels != mcfg.num_labels:
        raise adapter_lib.AdapterError(
            f"task {t.name} has {t.num_labels} labels but the adapter's head has {mcfg.num_labels}")
    if max_seq_len is None:
        max_seq_len = meta.get("max_seq_len") or min(128, mcfg.max_positions)
    if max_seq_len > mcfg.max_positions:
        raise data_lib.DataError(f"--max-seq-len {max_seq_len} exceeds the model's maximum of {mcfg.max_positions}")
    tokenizer = data_lib.load_tokenizer(model_dir)
    dev = {s: data_lib.encode(tokenizer, e, max_seq_len)
           for s, e in data_lib.load_dev(t, data_dir, dev_file, max_eval_examples).items()}
    buckets = batching.bucket_lengths(max_seq_len, 4)
    return evaluate(t, dev, buckets, make_eval_step(mcfg, lcfg), trained, frozen, batch_size)
