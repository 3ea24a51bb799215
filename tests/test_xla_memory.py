"""What XLA allocates for a LoRA train step under the layer remat policies (XLA's compiled memory
analysis, not what JAX hands it): the levers of results/profile/xla-cpu-remat/; and what it computes
(the compiled program's size per layer). Each compiles models of up to 8 layers: the slow tier's."""

import re

import jax
import numpy as np
import pytest

from lora_jax import lora, quant
from lora_jax.config import ConfigValueError, TrainConfig
from lora_jax.model import ModelConfig, init_params
from lora_jax.config import XLA_CPU_SCHEDULERS
from lora_jax.prepare import split_for_training
from lora_jax.train_step import compiler_options, make_loss_fn

B, T, H = 8, 128, 32
ACTIVATION = B * T * H * 4  # bytes of one float32 (B, T, H) array


def compiled_lora_grad(layers: int, remat: str, *, dropout: float = 0.0, scheduler: str = "default",
                       hidden: int = H, base: str = "float32"):
    """The compiled LoRA gradient (r = 4 on q, v) of a tiny BERT; ``base`` int8 or nf4 quantizes its frozen kernels."""
    cfg = ModelConfig(vocab_size=64, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                      intermediate_size=4 * hidden, max_position_embeddings=T + 2, num_labels=2, remat=remat,
                      hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    lcfg = lora.LoraConfig(rank=4, alpha=4, targets=lora.TARGET_PRESETS["qv"])
    trainable, frozen, _, _ = split_for_training(init_params(cfg, jax.random.key(0)), lcfg, jax.random.key(1))
    if base != "float32":
        frozen = quant.store(frozen, base)
    rng = np.random.default_rng(0)
    batch = {"input_ids": rng.integers(3, 64, (B, T)).astype(np.int32), "attention_mask": np.ones((B, T), np.int32),
             "token_type_ids": np.zeros((B, T), np.int32), "labels": rng.integers(0, 2, B).astype(np.int32)}
    loss = make_loss_fn(cfg, lcfg, mode="factored", regression=False)
    grad = jax.grad(lambda t, f, b: loss(t, f, b, jax.random.key(2))[0])
    return jax.jit(grad, compiler_options=compiler_options(scheduler)).lower(trainable, frozen, batch).compile()


def lora_grad_temp_bytes(layers: int, remat: str, **kw) -> int:
    return compiled_lora_grad(layers, remat, **kw).memory_analysis().temp_size_in_bytes


def lora_grad_instructions(layers: int, remat: str, **kw) -> int:
    """Instructions in the compiled program, those inside fusions included."""
    text = compiled_lora_grad(layers, remat, **kw).as_text()
    return sum(1 for line in text.splitlines() if re.match(r"\s+(ROOT )?%\S+ = ", line))


@pytest.mark.slow
def test_full_remat_keeps_about_one_activation_per_layer():
    # With every layer recomputed, a layer more should cost about its saved input. Before the
    # gradient passed between layers went through an unfusable identity (compiler._gated_backward),
    # XLA's CPU fusion copied the residual gradient's elementwise chain into its consumers and each
    # extra layer cost 8.25 activations here.
    per_layer = (lora_grad_temp_bytes(8, "full") - lora_grad_temp_bytes(4, "full")) / 4
    assert per_layer < 2 * ACTIVATION, per_layer / ACTIVATION


@pytest.mark.slow
def test_full_remat_with_the_memory_scheduler_keeps_about_one_activation_per_layer():
    # The LoRA factors' gradient dots (small outputs, (B·T, H) inputs) had no consumer before the end
    # of the program, and XLA:CPU's memory-optimised scheduler ran them there, keeping two (B·T, H)
    # arrays per layer alive to the end: 2.28 activations per layer here, 880 instead of 751 MiB for
    # roberta-base's LoRA step. compiler._gated_backward now ties them into the gradient it hands down.
    per_layer = (lora_grad_temp_bytes(8, "full", scheduler="memory")
                 - lora_grad_temp_bytes(4, "full", scheduler="memory")) / 4
    assert per_layer < 1.5 * ACTIVATION, per_layer / ACTIVATION


@pytest.mark.slow
@pytest.mark.skipif(jax.default_backend() != "cpu", reason="an XLA:CPU option; other backends ignore it")
def test_memory_scheduler_lowers_full_remat_with_dropout():
    # With dropout, XLA:CPU's default scheduler prepares the recomputation's random-bit counters
    # early and holds them to the backward pass; its memory-optimised scheduler does not.
    default = lora_grad_temp_bytes(4, "full", dropout=0.1)
    memory = lora_grad_temp_bytes(4, "full", dropout=0.1, scheduler="memory")
    assert memory < 0.75 * default, (memory, default)


def test_scheduler_options():
    assert compiler_options("default") is None
    expected = {"xla_cpu_scheduler_type": XLA_CPU_SCHEDULERS["memory"]} if jax.default_backend() == "cpu" else None
    assert compiler_options("memory") == expected
    with pytest.raises(ConfigValueError, match="--xla-scheduler"):
        TrainConfig(task="rte", xla_scheduler="fast").validate()


@pytest.mark.slow
def test_each_layer_adds_the_same_work_without_layer_remat():
    # The default policy keeps layers whole. Before the gradient passed between them went through an
    # unfusable identity (compiler.unfused_gradient), XLA's CPU fusion copied the residual gradient's
    # elementwise chain into each consumer, deeper for the first layers: here a layer cost 2,556
    # instructions from 2 to 4 layers and 3,275 from 4 to 8 (1.28x); roberta-base's LoRA step with
    # --remat cheap took 6.15 s, then 4.85 s (results/bench/roberta-b16-s128-cpu-{dropout16,gate}.md).
    two, four, eight = (lora_grad_instructions(n, "cheap", dropout=0.1) for n in (2, 4, 8))
    first, then = (four - two) / 2, (eight - four) / 4
    assert then <= 1.02 * first, (first, then)


@pytest.mark.slow
@pytest.mark.parametrize("base", quant.QUANTIZED)
def test_a_quantized_base_holds_no_dequantized_kernels(base):
    # compiler.quantized_matmul: each dequantization waits for the rows it multiplies. Without that, XLA:CPU
    # dequantized kernels ahead of their use and held them (at roberta-base shape 532 against 262 MiB of
    # temporaries). One layer's kernels in float32 is the slack.
    kw = dict(layers=8, remat="full", scheduler="memory", hidden=64)
    layer_kernels = 4 * (4 * 64 * 64 + 2 * 64 * 256)
    temps = lora_grad_temp_bytes(base=base, **kw)
    assert temps <= lora_grad_temp_bytes(**kw) + layer_kernels, (temps, lora_grad_temp_bytes(**kw))
