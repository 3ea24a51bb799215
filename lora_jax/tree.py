"""The one owner of the parameter-tree conventions: paths, the ``params/`` and ``lora/`` keys, the head.

* A nested dict of arrays (Flax Linen ``params``) is named leaf by leaf by ``/``-joined paths,
  e.g. ``encoder/layer/0/attention/self/query/kernel`` (:func:`flatten`, :func:`unflatten`).
* The tree that training, checkpoints and counts work on is ``{"params": base, "lora": adapters}``.
  Flattened, its keys are ``params/<path>`` for a base parameter and ``lora/<kernel path>/<factor>``
  for an adapter factor (``a``, ``b``; AdaLoRA's ``p``, ``lam``, ``q``).
* The task head is every parameter under ``classifier/`` (BERT: one Dense; RoBERTa: ``dense`` and
  ``out_proj``); BERT's ``pooler/`` is pretrained, but a checkpoint without a head may lack it.

Every module asks here instead of spelling these strings itself.
"""

from __future__ import annotations

from typing import Any

PARAMS, ADAPTERS = "params", "lora"
HEAD = "classifier"
# The head's last projection (BERT, RoBERTa): its width is the number of labels.
HEAD_OUTPUT_KERNELS = ("classifier/kernel", "classifier/out_proj/kernel")
HEAD_OUTPUT = (*HEAD_OUTPUT_KERNELS, "classifier/bias", "classifier/out_proj/bias")
# The token embedding table (vocabulary x hidden): most of a base's weights outside its kernels.
WORD_EMBEDDINGS = "embeddings/word_embeddings/embedding"
# What a checkpoint may lack and still be a base: the head, and BERT's pooler.
NEW_FOR_TASK = ("classifier/", "pooler/")


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> ``{"a/b/c": leaf}`` (insertion order kept)."""
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, path + "/"))
        else:
            flat[path] = value
    return flat


def unflatten(flat: dict[str, Any]) -> dict:
    """Inverse of :func:`flatten`."""
    tree: dict = {}
    for path, value in flat.items():
        *parents, name = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[name] = value
    return tree


def param_key(path: str) -> str:
    """The flat key of base parameter ``path``: ``params/<path>``."""
    return f"{PARAMS}/{path}"


def adapter_key(path: str, factor: str) -> str:
    """The flat key of ``factor`` of the adapter on kernel ``path``: ``lora/<path>/<factor>``."""
    return f"{ADAPTERS}/{path}/{factor}"


def is_param(key: str) -> bool:
    return key.startswith(PARAMS + "/")


def is_adapter(key: str) -> bool:
    return key.startswith(ADAPTERS + "/")


def param_path(key: str) -> str:
    """``params/<path>`` -> ``<path>``."""
    return key[len(PARAMS) + 1:]


def adapter_path(key: str) -> tuple[str, str]:
    """``lora/<path>/<factor>`` -> (``<path>``, ``<factor>``)."""
    path, _, factor = key[len(ADAPTERS) + 1:].rpartition("/")
    return path, factor


def base_keys(params: dict) -> dict[str, Any]:
    """A model's parameter tree as flat ``params/<path>`` keys (the form of training's ``frozen``)."""
    return {param_key(p): v for p, v in flatten(params).items()}


def adapters_only(flat: dict[str, Any]) -> dict[str, Any]:
    """The adapter factors of a flat tree."""
    return {k: v for k, v in flat.items() if is_adapter(k)}


def base_only(flat: dict[str, Any]) -> dict[str, Any]:
    """The base parameters of a flat tree (for a saved adapter: its head)."""
    return {k: v for k, v in flat.items() if is_param(k)}


def is_head(path: str) -> bool:
    """A path (without ``params/``) in the task head."""
    return path.startswith(HEAD + "/")


def is_new_for_task(path: str) -> bool:
    """A path a pretrained checkpoint may lack: the head, or BERT's pooler."""
    return path.startswith(NEW_FOR_TASK)
