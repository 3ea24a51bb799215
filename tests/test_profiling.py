import jax.numpy as jnp

from lora_jax.profiling import saved_for_backward_bytes


def test_saved_for_backward_counts_residuals_not_arguments():
    x, w = jnp.ones(1000), jnp.full(1000, 2.0)
    # d/dx sum(x * w) = w: an argument, nothing new is kept.
    assert saved_for_backward_bytes(lambda p, w: (p * w).sum(), x, w) == 0
    # d/dx sum(sin(x * w)) = w cos(x * w): cos(x * w) is computed in the forward pass and kept.
    assert saved_for_backward_bytes(lambda p, w: jnp.sin(p * w).sum(), x, w) == 1000 * 4
