"""lora-jax: LoRA fine-tuning of BERT/RoBERTa encoders in JAX/Flax.

Public API: the LoRA transform (``lora``), the encoder (``model``), checkpoint
loading (``weights``), and ``fit`` for GLUE fine-tuning.

Each name is imported on first use (PEP 562): ``from lora_jax import data`` loads no JAX, so the
PyTorch reference that reads our data measures its own memory, not JAX's.
"""

from __future__ import annotations

import importlib

__all__ = ["lora", "LoraConfig", "ModelConfig", "TrainConfig", "forward", "from_pretrained", "fit"]

_FROM = {"LoraConfig": "lora", "ModelConfig": "model", "forward": "model", "TrainConfig": "config",
         "from_pretrained": "weights", "fit": "train"}


def __getattr__(name: str):
    if name in _FROM:
        return getattr(importlib.import_module(f".{_FROM[name]}", __name__), name)
    if name == "lora":
        return importlib.import_module(".lora", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
