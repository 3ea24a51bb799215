"""lora-jax: LoRA fine-tuning of BERT/RoBERTa encoders in JAX/Flax.

Public API: the LoRA transform (``lora``), the encoder (``model``), checkpoint
loading (``weights``), and ``fit`` for GLUE fine-tuning.
"""

from . import lora
from .config import TrainConfig
from .lora import LoraConfig
from .model import ModelConfig, forward
from .weights import from_pretrained

__all__ = ["lora", "LoraConfig", "ModelConfig", "TrainConfig", "forward", "from_pretrained", "fit"]


def fit(cfg, **kwargs):
    """See :func:`lora_jax.train.fit` (imported lazily: it pulls in optax and tokenizers)."""
    from .train import fit as _fit

    return _fit(cfg, **kwargs)
