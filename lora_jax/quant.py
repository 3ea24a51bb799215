"""A quantized frozen base (``--param-dtype int8|nf4``), stored through qwix and dequantized where it is used.

* ``int8``: one absmax scale per output channel (a kernel ``(d_in, d_out)`` has ``d_out`` scales).
* ``nf4``: QLoRA's 4-bit NormalFloat (Dettmers et al., 2023): one absmax scale per block of 64 inputs of
  each output column, each value the nearest of 16 levels placed at normal quantiles. (QLoRA also
  quantizes the scales themselves; not done here: they are 1/64 of the codes' count, in float32.)

The 4-bit codes are stored one per byte, as uint8: with jax 0.10.2 on the CPU, a 4-bit array made by
one program cannot be passed to an ahead-of-time compiled one (the executable asks for the packed layout,
the array reports the unpacked one, and the call is refused), so nf4 stores as many bytes as int8 here;
its gain over int8 is accuracy at the same storage, not memory. The product converts the codes back to
qwix's uint4 inside the program.

Which leaves: the frozen matrix kernels (``.../kernel``, 2-D) whose input width the block divides; the
task head trains, so it is never frozen here. The word embedding table, most of what is left (147 MiB of
roberta-base's float32 arguments), is stored in bfloat16: its rows are added to the float32 position
embeddings, which promotes them to float32 exactly, so the run computes what a float32 table holding the
same rounded values computes. Every other frozen leaf stays float32 (in bfloat16 the three embeddings
would be summed in bfloat16, in the run only). So evaluation and export, which rebuild the base in float32
(:func:`round_trip`), give the run's own numbers. LoRA factors, the head and the optimizer state stay
float32.

A stored kernel is a :class:`QuantizedKernel`: it stands in the parameter tree where the model computes
``x @ kernel`` and dequantizes inside a ``jax.checkpoint`` (``compiler.cast_matmul``), so the backward
pass dequantizes again instead of keeping a float copy of every kernel. Merging, evaluation, serving and
export take ``dequantize`` of the same codes: the numbers the run trained against.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

QUANTIZED = ("int8", "nf4")
NF4_BLOCK = 64  # QLoRA's block size


def _how(kind: str) -> dict:
    """qwix's quantize arguments for a kernel (d_in, d_out)."""
    if kind == "int8":
        return {"qtype": jnp.int8, "channelwise_axes": (1,)}
    if kind == "nf4":
        return {"qtype": "nf4", "channelwise_axes": (1,), "tiled_axes": {0: NF4_BLOCK}}
    raise ValueError(f"quantization must be one of {', '.join(QUANTIZED)}, got {kind!r}")


@jax.tree_util.register_pytree_node_class
@dataclass
class QuantizedKernel:
    """A frozen kernel ``(d_in, d_out)`` stored as qwix codes and scales; dequantizes to float32.

    ``astype`` keeps it stored (the model casts kernels to its compute dtype before ``@``); the product
    dequantizes, once in the forward pass and again in the backward (``compiler.cast_matmul``).
    """

    q: object  # qwix.QArray: qvalue (d_in, d_out) first, so Flax's shape check sees the kernel's shape

    def tree_flatten(self):
        return (self.q,), None

    @classmethod
    def tree_unflatten(cls, _, children):
        return cls(*children)

    @property
    def shape(self):
        return self.q.qvalue.shape

    @property
    def dtype(self):
        return jnp.dtype(jnp.float32)

    def astype(self, dtype) -> "QuantizedKernel":
        return self

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        import qwix

        return qwix.dequantize(self.q).astype(dtype)  # qwix reads nf4 codes from uint8 as from uint4

    def __rmatmul__(self, x: jax.Array) -> jax.Array:
        from .compiler import matmul_rows

        return matmul_rows(x, self)


def quantize_kernel(w, kind: str) -> QuantizedKernel:
    """``w`` (d_in, d_out), any float dtype, quantized from its float32 values."""
    import qwix

    q = qwix.quantize(jnp.asarray(w, jnp.float32), **_how(kind))
    if q.qvalue.dtype == jnp.uint4:  # one code per byte: see the module docstring
        q = dataclasses.replace(q, qvalue=q.qvalue.astype(jnp.uint8))
    return QuantizedKernel(q)


def quantizable(path: str, leaf, kind: str) -> bool:
    """A matrix kernel that ``kind`` can store (nf4: its input width a multiple of the block)."""
    shape = np.shape(leaf)
    return (path.endswith("/kernel") and len(shape) == 2
            and (kind != "nf4" or shape[0] % NF4_BLOCK == 0))


def _storer(kind: str):
    """``stored(path, leaf)``: a frozen leaf as ``kind`` stores it (one rule for :func:`store` and
    :func:`round_trip`): a quantizable kernel's codes, the word embeddings in bfloat16, any other leaf as is."""
    from . import tree as tree_lib

    _how(kind)  # an unknown kind fails before any work
    quantize = jax.jit(lambda w: quantize_kernel(w, kind))

    def stored(path: str, leaf):
        if quantizable(path, leaf, kind):
            return quantize(leaf)
        return jnp.asarray(leaf, jnp.bfloat16) if path == tree_lib.WORD_EMBEDDINGS else leaf

    return stored


def store(frozen: dict, kind: str) -> dict:
    """The flat frozen dict (``params/<path>`` keys), each leaf as ``kind`` stores it. One leaf at a time: the
    float32 copy of a kernel goes as its codes come."""
    from . import tree as tree_lib

    stored = _storer(kind)
    return {key: stored(tree_lib.param_path(key), frozen.pop(key)) for key in list(frozen)}


def round_trip(params: dict, kind: str) -> dict:
    """A nested parameter tree as a quantized run saw it, in float32: every leaf outside the head as ``kind``
    stores it (:func:`store`), then read back (a kernel's codes dequantized, the bfloat16 word embeddings
    widened). Evaluation, serving and export of an adapter trained on a quantized base use this, so that
    their numbers are the run's."""
    from . import tree as tree_lib
    from .compiler import dense

    stored = _storer(kind)
    return tree_lib.unflatten({path: leaf if tree_lib.is_head(path) else dense(stored(path, leaf), leaf.dtype)
                               for path, leaf in tree_lib.flatten(params).items()})
