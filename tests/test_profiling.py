import jax.numpy as jnp

from lora_jax.profiling import saved_for_backward_bytes


def test_saved_for_backward_counts_residuals_not_arguments():
    x, w = jnp.ones(1000), jnp.full(1000, 2.0)
    # d/dx sum(x * w) = w: an argument, nothing new is kept.
    assert saved_for_backward_bytes(lambda p, w: (p * w).sum(), x, w) == 0
    # d/dx sum(sin(x * w)) = w cos(x * w): cos(x * w) is computed in the forward pass and kept.
    assert saved_for_backward_bytes(lambda p, w: jnp.sin(p * w).sum(), x, w) == 1000 * 4


def test_matmul_flops_counts_the_dots_xla_runs():
    import jax

    from lora_jax.profiling import matmul_flops

    def f(x, w, q, k):
        return jnp.tanh(x @ w).sum() + jnp.einsum("bhtd,bhsd->bhts", q, k).sum()

    args = (jnp.ones((64, 32)), jnp.ones((32, 48)), jnp.ones((2, 3, 8, 4)), jnp.ones((2, 3, 8, 4)))
    compiled = jax.jit(jax.grad(f, argnums=(1, 2))).lower(*args).compile()
    # x @ w forward (tanh' needs it) and its weight gradient; the gradient of q . k alone. The
    # forward q . k only feeds a sum whose gradient does not need it: XLA drops it, and so do we.
    assert matmul_flops(compiled) == {"total": 2 * (2 * 64 * 32 * 48) + 2 * (2 * 3 * 8 * 8 * 4),
                                      "batched": 2 * (2 * 3 * 8 * 8 * 4)}
    assert matmul_flops(jax.jit(lambda x: x + 1).lower(jnp.ones(3)).compile()) == {"total": 0, "batched": 0}
