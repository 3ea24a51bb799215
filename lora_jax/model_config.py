"""The encoder's architecture, read from a Hugging Face ``config.json``: a frozen dataclass."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal

import jax
import jax.numpy as jnp

from .compiler import REMAT_POLICIES

SUPPORTED_MODEL_TYPES = ("bert", "roberta")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class ConfigError(ValueError):
    """A model configuration we cannot build."""


@dataclass(frozen=True)
class ModelConfig:
    """The architecture, read from a Hugging Face ``config.json``.

    ``dtype`` is the compute dtype (matmuls, activations); LayerNorm statistics
    and the softmax run in float32 whatever it is. ``remat`` recomputes activations
    in the backward pass instead of storing them: ``full`` / ``dots`` / ``qkv`` each whole layer
    (nothing saved / matmul outputs saved / q, k, v saved), ``attention`` only the attention scores and
    probabilities, the largest activations at sequence lengths above the head size,
    ``cheap`` those and the FFN activation (no dense matmul is recomputed).
    """

    model_type: Literal["bert", "roberta"] = "roberta"
    vocab_size: int = 50265
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    classifier_dropout: float | None = None
    max_position_embeddings: int = 514
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    initializer_range: float = 0.02
    num_labels: int = 2
    dtype: str = "float32"
    remat: str = "none"

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unsupported model_type {self.model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"unsupported hidden_act {self.hidden_act!r}; supported: {', '.join(ACTIVATIONS)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"unsupported dtype {self.dtype!r}; supported: {', '.join(DTYPES)}")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"unknown remat policy {self.remat!r}; choose from {', '.join(REMAT_POLICIES)}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.num_labels < 1:
            raise ConfigError(f"num_labels must be >= 1, got {self.num_labels}")

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides) -> "ModelConfig":
        """Build from a parsed Hugging Face ``config.json`` (unknown keys ignored)."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in hf.items() if k in names and v is not None}
        values.update(overrides)
        return cls(**values)

    def to_hf(self) -> dict[str, Any]:
        """The ``config.json`` fields transformers needs to rebuild this architecture."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("dtype", "remat", "num_labels")}
        out["architectures"] = [
            "RobertaForSequenceClassification" if self.model_type == "roberta" else "BertForSequenceClassification"
        ]
        out["id2label"] = {str(i): f"LABEL_{i}" for i in range(self.num_labels)}
        out["label2id"] = {f"LABEL_{i}": i for i in range(self.num_labels)}
        return out

    def architecture_hash(self) -> str:
        """A short hash of the fields that fix parameter shapes and semantics (not dtype/remat)."""
        keys = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size", "hidden_act", "max_position_embeddings", "type_vocab_size",
                "layer_norm_eps", "pad_token_id")
        blob = json.dumps({k: getattr(self, k) for k in keys}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def max_positions(self) -> int:
        """Longest sequence the position table allows (RoBERTa reserves pad_token_id + 1 slots)."""
        if self.model_type == "roberta":
            return self.max_position_embeddings - self.pad_token_id - 1
        return self.max_position_embeddings


ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # HF "gelu" is the exact erf form
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}
