"""A Flax (Linen) BERT / RoBERTa encoder with a sequence-classification head.

The model knows nothing of LoRA: every projection is ``x @ kernel + bias``, so
a kernel may be a plain array or any object that implements ``__rmatmul__``
(see ``lora.LoraKernel``). How that arithmetic is laid out for XLA (2-D matmul
rows, casts inside checkpoints, remat policies, gradient gates) is ``compiler``'s
business; the model calls it by name.

Parameter names follow Hugging Face's Flax models without the ``bert/`` or
``roberta/`` prefix, e.g. ``encoder/layer/0/attention/self/query/kernel``.
Kernels are ``(d_in, d_out)``.

Shapes: B = batch, T = sequence length, H = hidden size, N = heads, D = H / N.
"""

from __future__ import annotations

from typing import NamedTuple

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from . import compiler
from .compiler import LAYER_REMAT_POLICIES
from .dropout import Dropout, dropout
from .model_config import ACTIVATIONS, DTYPES, SUPPORTED_MODEL_TYPES, ConfigError, ModelConfig  # noqa: F401

def _normal(cfg: ModelConfig):
    return nn.initializers.normal(stddev=cfg.initializer_range)


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
        # A kernel object (lora.LoraKernel, serve's per-example kernels) sees the batch layout
        # (per-example adapters need it) and picks its own.
        y = compiler.matmul_rows(x, kernel) if isinstance(kernel, jax.Array) else x @ kernel.astype(dt)
        return y + bias.astype(dt)


class LayerNorm(nn.Module):
    """LayerNorm with float32 statistics, output in the compute dtype."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        h = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (h,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (h,), jnp.float32)
        y = compiler.normalize(x.astype(jnp.float32), self.cfg.layer_norm_eps)
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
        attend = compiler.remat_attention(partial(_attend, rate=rate), cfg.remat)
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
        act = compiler.remat_activation(ACTIVATIONS[self.cfg.hidden_act], self.cfg.remat)
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
                x = compiler.unfused_gradient(layer(x, mask, deterministic))
            return x
        # static_argnums counts the module as argument 0: `deterministic` is a Python bool.
        block = nn.remat(Layer, policy=LAYER_REMAT_POLICIES[self.cfg.remat], static_argnums=(3,))
        call = compiler.gated_layer(deterministic=deterministic, rows=x.shape[:2])
        for i in range(self.cfg.num_hidden_layers):
            x = call(block(self.cfg, first_only=self.first_only and i == last, name=str(i)), x, mask)
        return x


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
