"""A Flax (Linen) BERT / RoBERTa encoder with a sequence-classification head.

The model knows nothing of LoRA: every projection is ``x @ kernel + bias``, so
a kernel may be a plain array or any object that implements ``__rmatmul__``
(see ``lora.LoraKernel``).

Parameter names follow Hugging Face's Flax models without the ``bert/`` or
``roberta/`` prefix, e.g. ``encoder/layer/0/attention/self/query/kernel``.
Kernels are ``(d_in, d_out)``.

Shapes: B = batch, T = sequence length, H = hidden size, N = heads, D = H / N.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import flax.linen as nn
from functools import partial

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from .dropout import Dropout, dropout

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

# "full", "dots" and "qkv" wrap each whole layer in jax.checkpoint: "full" keeps only the layer's
# input, "dots" also every matmul output, "qkv" also the query, key and value projections and the
# attention dropout mask, so the backward pass recomputes the attention, its output projection,
# the LayerNorms and the FFN's first matmul (with LoRA those weights are frozen: the FFN input is
# not needed for any gradient, only its width-4H output, which this recomputes instead of keeping).
# "attention" recomputes only the attention scores and probabilities (SelfAttention), "cheap"
# those and the FFN activation (Intermediate): what costs no dense matmul to recompute; everything
# else is stored as without remat.
LAYER_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "qkv": jax.checkpoint_policies.save_only_these_names("qkv", "attention_keep"),
}
REMAT_POLICIES = ("none", "attention", "cheap", *LAYER_REMAT_POLICIES)


def _normal(cfg: ModelConfig):
    return nn.initializers.normal(stddev=cfg.initializer_range)


def cast_matmul(rows: jax.Array, w: jax.Array) -> jax.Array:
    """``rows @ w`` in the dtype of ``rows``: (N, d_in) @ (d_in, d_out) -> (N, d_out).

    A ``w`` stored in another dtype (a bfloat16 frozen base under float32 compute) is cast inside
    a ``jax.checkpoint``, so the backward pass casts it again instead of keeping the cast copy
    from the forward pass. Without it, autodiff keeps a compute-dtype copy of every such weight
    alive from its use in the forward pass to the backward pass, all of them at once at the
    peak, and storing the base in bfloat16 saves little of the step's memory. The recomputation
    is one cast per weight; the values are the same either way.
    """
    if w.dtype == rows.dtype:
        return rows @ w
    return _cast_then_matmul(rows, w)


@jax.checkpoint
def _cast_then_matmul(rows, w):
    return rows @ w.astype(rows.dtype)


class Dense(nn.Module):
    """``y = x @ kernel + bias`` with kernel ``(d_in, features)``; matmul in the compute dtype."""

    features: int
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", _normal(self.cfg), (x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        dt = DTYPES[self.cfg.dtype]
        x = x.astype(dt)
        if isinstance(kernel, jax.Array):
            # Rows as one 2-D matrix: (batch, seq, d_in) @ (d_in, f) makes the weight gradients
            # dots with two contracting dimensions, which XLA's CPU backend runs in a slow generic
            # loop instead of its matmul library (2x slower steps for LoRA on every linear layer).
            y = cast_matmul(x.reshape(-1, x.shape[-1]), kernel).reshape(*x.shape[:-1], self.features)
        else:
            # A kernel object (lora.LoraKernel, serve's per-example kernels) sees the batch layout
            # (per-example adapters need it) and picks its own.
            y = x @ kernel.astype(dt)
        return y + bias.astype(dt)


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _normalize(x: jax.Array, eps: float) -> jax.Array:
    """(x - mean) / sqrt(var + eps) over the last axis, float32."""
    return _normalize_fwd(x, eps)[0]


def _normalize_fwd(x, eps):
    mean = x.mean(-1, keepdims=True)
    centered = x - mean
    rstd = jax.lax.rsqrt(jnp.square(centered).mean(-1, keepdims=True) + eps)
    y = centered * rstd
    return y, (y, rstd)


def _normalize_bwd(eps, res, g):
    # The textbook LayerNorm gradient: two row means instead of the five reductions and
    # intermediates that autodiff of the forward produces (XLA's CPU reductions are slow).
    y, rstd = res
    return (rstd * (g - g.mean(-1, keepdims=True) - y * (g * y).mean(-1, keepdims=True)),)


_normalize.defvjp(_normalize_fwd, _normalize_bwd)


class LayerNorm(nn.Module):
    """LayerNorm with float32 statistics, output in the compute dtype."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        h = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (h,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (h,), jnp.float32)
        y = _normalize(x.astype(jnp.float32), self.cfg.layer_norm_eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(DTYPES[self.cfg.dtype])


class Embeddings(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, input_ids, token_type_ids, attention_mask, position_ids=None, *, deterministic):
        """``position_ids`` (B, T), 0 at each example's first token: given for packed rows, where positions
        restart at every example; by default they count from each row's start."""
        cfg = self.cfg
        if position_ids is not None:
            real = attention_mask > 0
            position_ids = (jnp.where(real, position_ids + cfg.pad_token_id + 1, cfg.pad_token_id)
                            if cfg.model_type == "roberta" else position_ids)
        elif cfg.model_type == "roberta":
            # fairseq convention: positions count real tokens from pad_token_id + 1; pads sit at pad_token_id.
            not_pad = (input_ids != cfg.pad_token_id).astype(jnp.int32)
            position_ids = jnp.cumsum(not_pad, axis=1) * not_pad + cfg.pad_token_id
        else:
            position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        embed = lambda n, name: nn.Embed(n, cfg.hidden_size, embedding_init=_normal(cfg), name=name)
        x = (
            embed(cfg.vocab_size, "word_embeddings")(input_ids)
            + embed(cfg.max_position_embeddings, "position_embeddings")(position_ids)
            + embed(cfg.type_vocab_size, "token_type_embeddings")(token_type_ids)
        )
        x = LayerNorm(cfg, name="LayerNorm")(x)
        return Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)


class SelfAttention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, mask, *, deterministic, first_only=False):
        """x: (B, T, H); mask: an ``AttentionMask``. Returns (B, T, H), or with ``first_only`` the
        query rows alone (``first_tokens``): (B, 1, H), or (E, 1, H) for E packed examples."""
        cfg = self.cfg
        n, d = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
        split = lambda t: t.reshape(*t.shape[:2], n, d)
        q = split(checkpoint_name(Dense(cfg.hidden_size, cfg, name="query")(
            first_tokens(x, mask) if first_only else x), "qkv"))
        k = split(checkpoint_name(Dense(cfg.hidden_size, cfg, name="key")(x), "qkv"))
        v = split(checkpoint_name(Dense(cfg.hidden_size, cfg, name="value")(x), "qkv"))
        bias = mask.bias
        if first_only and mask.first is not None:
            # Each example's query reads its own row's keys and values, under its own row of the mask.
            rows, cols = jnp.divmod(mask.first, x.shape[1])
            k, v, bias = k[rows], v[rows], bias[rows, :, cols][:, :, None, :]
        rate = cfg.attention_probs_dropout_prob
        # Named Dropout_0, the name nn.Dropout had here before, so that the keys do not change.
        key = None if deterministic or rate == 0.0 else _DropoutKey(name="Dropout_0")()
        attend = partial(_attend, rate=rate)
        if cfg.remat in ("attention", "cheap"):
            # Keep only q, k, v and the 1-byte keep mask; the (B, heads, T, T) float scores and
            # probabilities (two copies with dropout) are recomputed in the backward pass.
            attend = jax.checkpoint(attend, policy=jax.checkpoint_policies.save_only_these_names("attention_keep"))
        return attend(q, k, v, bias, key).reshape(*q.shape[:2], cfg.hidden_size)


class AttentionMask(NamedTuple):
    """What each query may attend to. ``bias``: additive, 0 where allowed and the most negative float32
    where not; (B, 1, 1, T) for rows of one example each (padded keys masked), (B, 1, T, T) for packed
    rows (each example sees its own tokens only). ``first``: None for rows of one example, whose first
    token is column 0; for packed rows the (E,) flat indices into B·T of each example's first token."""

    bias: jax.Array
    first: jax.Array | None = None


def first_tokens(x: jax.Array, mask: AttentionMask) -> jax.Array:
    """The rows the head reads: (B, T, H) -> each example's first token, (B, 1, H), or (E, 1, H) packed."""
    if mask.first is None:
        return x[:, :1]
    return x.reshape(-1, x.shape[-1])[mask.first][:, None]


class _DropoutKey(nn.Module):
    """The key ``Dropout`` would draw at this module's path (the attention dropout runs
    outside Flax, inside ``jax.checkpoint``, and must drop what ``Dropout`` dropped)."""

    @nn.compact
    def __call__(self):
        return self.make_rng("dropout")


def _attend(q, k, v, bias, key, *, rate):
    """Scaled dot-product attention. q: (B, Tq, heads, d); k, v: (B, T, heads, d); bias: (B, 1, 1 or Tq, T)
    additive;
    key: the dropout key, or None for no dropout. Returns q's shape."""
    # Scale q (T·H values) rather than the scores (T·T·heads): the same product, a smaller pass.
    scores = jnp.einsum("bqnd,bknd->bnqk", q * (1.0 / q.shape[-1] ** 0.5), k)
    # Softmax in float32: bfloat16 logits lose the small differences that matter here.
    probs = jax.nn.softmax(scores.astype(jnp.float32) + bias, axis=-1).astype(q.dtype)
    # The mask named for the "qkv", "attention" and "cheap" policies, which keep it.
    probs = dropout(probs, rate, key, mask_name="attention_keep")
    return jnp.einsum("bnqk,bknd->bqnd", probs, v)


class DenseOutput(nn.Module):
    """HF's ``*Output`` block: LayerNorm(residual + dropout(dense(x)))."""

    features: int
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, residual, *, deterministic):
        h = Dense(self.features, self.cfg, name="dense")(x)
        h = Dropout(self.cfg.hidden_dropout_prob)(h, deterministic=deterministic)
        return LayerNorm(self.cfg, name="LayerNorm")(h + residual)


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, mask, *, deterministic, first_only=False):
        h = SelfAttention(self.cfg, name="self")(x, mask, deterministic=deterministic, first_only=first_only)
        residual = first_tokens(x, mask) if first_only else x
        return DenseOutput(self.cfg.hidden_size, self.cfg, name="output")(h, residual, deterministic=deterministic)


class Intermediate(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        act = ACTIVATIONS[self.cfg.hidden_act]
        if self.cfg.remat == "cheap":
            # Autodiff of the exact GELU keeps three (B, T, intermediate) arrays of its inner terms
            # besides its input; recomputing them from the input keeps the input alone.
            act = jax.checkpoint(act)
        return act(Dense(self.cfg.intermediate_size, self.cfg, name="dense")(x))


class Layer(nn.Module):
    """One post-LayerNorm transformer block, named as in HF: attention, intermediate, output.

    ``first_only``: the output at each example's first token alone, (B, 1, H) (packed: (E, 1, H)). Keys
    and values still come from every token, but the query, the attention's output, the FFN and the
    LayerNorms run on one row per example.
    """

    cfg: ModelConfig
    first_only: bool = False

    @nn.compact
    def __call__(self, x, mask, deterministic):
        h = Attention(self.cfg, name="attention")(x, mask, deterministic=deterministic, first_only=self.first_only)
        m = Intermediate(self.cfg, name="intermediate")(h)
        return DenseOutput(self.cfg.hidden_size, self.cfg, name="output")(m, h, deterministic=deterministic)


class LayerStack(nn.Module):
    """The layers, named ``0 .. L-1`` so paths read ``encoder/layer/<i>/...`` as in HF.

    ``first_only``: the last layer computes each example's first token alone (``Layer``), the only one
    a classification head reads; the output is then (B, 1, H), or (E, 1, H) for E packed examples.
    """

    cfg: ModelConfig
    first_only: bool = False

    @nn.compact
    def __call__(self, x, mask, *, deterministic):
        last = self.cfg.num_hidden_layers - 1
        if self.cfg.remat not in LAYER_REMAT_POLICIES:
            for i in range(self.cfg.num_hidden_layers):
                layer = Layer(self.cfg, first_only=self.first_only and i == last, name=str(i))
                x = _unfused_gradient(layer(x, mask, deterministic))
            return x
        # static_argnums counts the module as argument 0: `deterministic` is a Python bool.
        block = nn.remat(Layer, policy=LAYER_REMAT_POLICIES[self.cfg.remat], static_argnums=(3,))
        call = nn.custom_vjp(partial(_call_layer, deterministic=deterministic), forward_fn=partial(
            _layer_forward, deterministic=deterministic), backward_fn=partial(_gated_backward, rows=x.shape[:2]))
        for i in range(self.cfg.num_hidden_layers):
            x = call(block(self.cfg, first_only=self.first_only and i == last, name=str(i)), x, mask)
        return x


def _unfusable(d: jax.Array) -> jax.Array:
    """``d`` divided by (1 + 0 x itself): the same numbers (NaN where ``d`` is inf or NaN), but XLA's
    fusion counts a float divide as expensive and never copies it into several consumers."""
    return d / (1 + 0 * d)


@jax.custom_vjp
def _unfused_gradient(x):
    """The identity, with its gradient passed through ``_unfusable``. Between layers that are not
    rematerialised: without it XLA:CPU's fusion recomputed the residual stream's gradient chain
    (LayerNorm backward, dropout, adds) from the top layer down inside each consumer, so the first
    layers' backward fusions cost the most (80 ms each in a roberta-base LoRA step, profiled) and the
    step with --remat cheap took 6.15 s instead of 4.85 s (results/bench/roberta-b16-s128-cpu-gate.md)."""
    return x


_unfused_gradient.defvjp(lambda x: (x, None), lambda _, g: (_unfusable(g),))


# A rematerialised layer's recomputation depends only on what the forward pass saved (its input; with
# "qkv" also q, k, v), so a scheduler may run it early, in the forward pass, where its outputs then live
# as long as if they had been kept. XLA's CPU scheduler does: without the gate below "full" and "qkv"
# left the CPU step's memory exactly at --remat none's (results/profile/xla-cpu-remat/). The gate adds
# 0 x one element of the incoming gradient to those saved activations, a data dependence (an
# optimization barrier is not: XLA removes barriers before scheduling), so the recomputation waits for
# the gradient on every backend, at the cost of one elementwise pass over each. (A NaN or inf in that
# element reaches the recomputation, where the gradient is already NaN or inf.)
# The gradient a layer hands down is divided by (1 + 0 x itself), the same numbers: XLA's fusion
# counts a float divide as expensive and never copies one into several consumers. Without it, XLA's
# CPU fusion copied the cheap elementwise chain of the residual stream's gradient (LayerNorm backward
# and adds, layer after layer) into each consumer, and every layer's pieces of that chain stayed
# alive until the last layer's backward: MiniLM's LoRA step with "full", dropout off, 325 -> 223 MiB.
def _call_layer(layer, x, mask, *, deterministic):
    return layer(x, mask, deterministic)


def _layer_forward(layer, x, mask, *, deterministic):
    return nn.vjp(partial(_call_layer, deterministic=deterministic), layer, x, mask)


def _low_rank(w: jax.Array) -> bool:
    """A 2-D float array at least 8 times longer than wide: the shape of a low-rank factor."""
    return w.ndim == 2 and jnp.issubdtype(w.dtype, jnp.floating) and 8 * min(w.shape) <= max(w.shape)


def _gated_backward(vjp_fn, g, *, rows):
    """vjp_fn's saved values, the float ones of shape (B, T, ...), made to depend on ``g``; then vjp_fn(g),
    its (B, T, ...) float gradients passed through an identity XLA will not fuse into their consumers."""
    activation = lambda a: a.shape[:2] == rows and jnp.issubdtype(a.dtype, jnp.floating)
    saved, tree = jax.tree.flatten(vjp_fn)
    zero = 0 * g.reshape(-1)[0]
    saved = [s + zero.astype(s.dtype) if activation(s) else s for s in saved]
    grads = jax.tree.unflatten(tree, saved)(g)
    # Low-rank factors' gradients (LoRA's A and B, AdaLoRA's P and Q) tied into the gradient handed
    # down, so that their dots (small outputs from (B·T, ·) arrays, which nothing else waits for) run
    # now and free what they read. Not other parameters': a frozen weight's gradient is dead code that
    # XLA drops, and tying it in would compute it (tried: 1.3x the step time).
    factors = [w for w in jax.tree.leaves(grads) if _low_rank(w)]
    tie = sum((0 * w.reshape(-1)[0] for w in factors), start=jnp.zeros((), g.dtype))
    return jax.tree.map(lambda d: _unfusable(d + tie.astype(d.dtype)) if activation(d) else d, grads)


class Encoder(nn.Module):
    cfg: ModelConfig
    first_only: bool = False

    @nn.compact
    def __call__(self, x, mask, *, deterministic):
        return LayerStack(self.cfg, first_only=self.first_only, name="layer")(x, mask, deterministic=deterministic)


class RobertaHead(nn.Module):
    """RoBERTa's head on the first token: dropout, dense, tanh, dropout, out_proj."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, first, *, deterministic):
        cfg = self.cfg
        rate = cfg.classifier_dropout if cfg.classifier_dropout is not None else cfg.hidden_dropout_prob
        drop = lambda t: Dropout(rate)(t, deterministic=deterministic)
        h = jnp.tanh(Dense(cfg.hidden_size, cfg, name="dense")(drop(first)))
        return Dense(cfg.num_labels, cfg, name="out_proj")(drop(h))


class Pooler(nn.Module):
    """BERT's pooler: tanh(dense(first token))."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, first):
        return jnp.tanh(Dense(self.cfg.hidden_size, self.cfg, name="dense")(first))


class EncoderForClassification(nn.Module):
    """BERT or RoBERTa encoder + sequence-classification (or regression, num_labels = 1) head.

    Top-level parameters: ``embeddings``, ``encoder``, ``pooler`` (BERT only),
    ``classifier`` (BERT: one Dense; RoBERTa: ``dense`` + ``out_proj``).
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None, position_ids=None, first_index=None, *,
                 deterministic=True, hidden=True):
        """input_ids, attention_mask, token_type_ids: (B, T) int. Returns dict with
        ``logits`` (B, num_labels) float32 and ``hidden`` (B, T, H) in the compute dtype.

        Packed rows (``packing``), several examples end to end in each row: ``attention_mask`` holds
        each token's example number within its row (1, 2, ...; 0 for padding), ``position_ids`` (B, T)
        restart at 0 with every example, and ``first_index`` (E,) gives each example's first token as a
        flat index into B·T. ``logits`` are then (E, num_labels), one row per example, in that order.

        ``hidden=False``: ``logits`` alone, and the last layer computes only the first token's row,
        the one the head reads (its keys and values still see every token): the same logits for
        about 1 - 5/(6L) of the encoder's work (MiniLM, 6 layers: 0.86; roberta-base: 0.93).
        """
        cfg = self.cfg
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = Embeddings(cfg, name="embeddings")(input_ids, token_type_ids, attention_mask, position_ids,
                                               deterministic=deterministic)
        if first_index is None:
            allowed = attention_mask[:, None, None, :] > 0  # (B, 1, 1, T): padded keys masked, as HF does
        else:  # (B, 1, T, T): block-diagonal, each token sees the tokens of its own example
            seg = attention_mask
            allowed = ((seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0))[:, None]
        mask = AttentionMask(jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32), first_index)
        states = Encoder(cfg, first_only=not hidden, name="encoder")(x, mask, deterministic=deterministic)
        first = (first_tokens(states, mask) if hidden else states)[:, 0]
        if cfg.model_type == "roberta":
            logits = RobertaHead(cfg, name="classifier")(first, deterministic=deterministic)
        else:
            rate = cfg.classifier_dropout if cfg.classifier_dropout is not None else cfg.hidden_dropout_prob
            pooled = Dropout(rate)(Pooler(cfg, name="pooler")(first), deterministic=deterministic)
            logits = Dense(cfg.num_labels, cfg, name="classifier")(pooled)
        return {"logits": logits.astype(jnp.float32), **({"hidden": states} if hidden else {})}


def build(cfg: ModelConfig) -> EncoderForClassification:
    return EncoderForClassification(cfg)


def dummy_batch(batch_size: int = 1, seq_len: int = 8) -> dict[str, jax.Array]:
    ids = jnp.full((batch_size, seq_len), 5, jnp.int32)
    return {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "token_type_ids": jnp.zeros_like(ids)}


def init_params(cfg: ModelConfig, key: jax.Array) -> dict:
    """Random parameters with HF's initialisation (normal(0, initializer_range), zero bias, unit LN)."""
    return build(cfg).init(key, **dummy_batch())["params"]


def param_shapes(cfg: ModelConfig) -> dict:
    """The parameter tree as ``jax.ShapeDtypeStruct`` leaves, without allocating."""
    return jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))


def forward(
    cfg: ModelConfig,
    params: dict,
    batch: dict[str, jax.Array],
    *,
    train: bool = False,
    rng: jax.Array | None = None,
    hidden: bool = True,
) -> dict[str, jax.Array]:
    """Pure forward pass: ``params`` -> {"logits": (B, num_labels), "hidden": (B, T, H)}.

    ``train=True`` turns dropout on and needs ``rng``. ``hidden=False``: {"logits"} alone, with
    less work (see ``EncoderForClassification``); training, evaluation and serving use it.
    """
    if train and rng is None:
        raise ValueError("forward(train=True) needs an rng for dropout")
    return build(cfg).apply(
        {"params": params},
        batch["input_ids"],
        batch["attention_mask"],
        batch.get("token_type_ids"),
        batch.get("position_ids"),
        batch.get("first_index"),
        deterministic=not train,
        hidden=hidden,
        rngs={"dropout": rng} if train else {},
    )
