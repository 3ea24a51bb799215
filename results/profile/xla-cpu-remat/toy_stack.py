"""A stack of 8 residual MLP blocks (x + gelu(x @ W) @ W.T, rows 2048, width 512 -> 2048): XLA CPU memory
analysis of the gradient with every activation kept, with jax.checkpoint per block, and with a
hand-written recomputation that waits for the incoming gradient (custom_vjp, optimization barrier over
the residuals and the cotangent). The last column is the largest gradient difference from the first."""
import jax, jax.numpy as jnp, numpy as np
from functools import partial
L, N, H = 8, 2048, 512
def layer(w, x):
    h = x @ w
    a = jax.nn.gelu(h, approximate=False)
    return x + a @ w.T

def make(mode):
    def f(ws, x):
        for i in range(L):
            if mode == "none":
                x = layer(ws[i], x)
            elif mode == "ckpt":
                x = jax.checkpoint(layer)(ws[i], x)
            elif mode == "gated":
                x = gated(ws[i], x)
        return (x ** 2).sum()
    return f

@jax.custom_vjp
def gated(w, x):
    return layer(w, x)
def gated_fwd(w, x):
    return layer(w, x), (w, x)
def gated_bwd(res, g):
    w, x, g = jax.lax.optimization_barrier((*res, g))  # recompute only once the cotangent exists
    _, vjp = jax.vjp(layer, w, x)
    return vjp(g)
gated.defvjp(gated_fwd, gated_bwd)

ws = jnp.ones((L, H, 4 * H)) * 0.01
x = jnp.ones((N, H))
ref = None
for mode in ("none", "ckpt", "gated"):
    c = jax.jit(jax.grad(make(mode), argnums=1)).lower(ws, x).compile()
    m = c.memory_analysis()
    g = c(ws, x)
    ref = g if ref is None else ref
    print(mode, f"temp {m.temp_size_in_bytes/2**20:.1f} MiB", float(jnp.abs(g - ref).max()))
