"""Weight-only quantization of frozen ``[in, out]`` matmul kernels (the QLoRA-style frozen base).

A frozen kernel is stored as int8 codes with one absmax scale per output channel, or as NF4 codes
(the 16-level NormalFloat of QLoRA, Dettmers et al. 2023) with one absmax scale per block of 64
consecutive values along ``in``, packed two codes per ``uint8``. :func:`matmul` dequantizes inside
the jitted step and dots in the compute dtype, so no float copy of the weight lives between steps.
Its gradient w.r.t. ``x`` keeps only the stored codes and scales as residuals and dequantizes again
in the backward pass, behind an optimization barrier as ``jax.checkpoint`` does (XLA's GPU pipeline
expands barriers after scheduling; XLA:CPU expands them before its last CSE, which merges the
forward and backward dequantizations again there).

Library choice (measured with qwix 0.1.8 and aqtp 0.9.0 on jax 0.10.2, CPU): ``qwix.quantize`` does
both schemes and ``qwix.dot`` gives exact ``x @ dequantize(W)`` and its ``jax.grad`` w.r.t. ``x``
under ``jax.jit``, but under ``jax.grad`` it saves the dequantized weight as residuals (two
``[in, out]`` bfloat16 arrays a kernel, int8 or NF4): a float copy of every frozen kernel from the
forward to the backward pass, so the VJP here is our own. Its NF4 codes are ``jnp.uint4``, which
XLA:CPU does pack (RSS) but which ``nbytes``, ``on_device_size_in_bytes`` and host numpy copies
count at a byte each, so the codes are packed into ``uint8`` explicitly: the same bytes on every
backend. aqtp has no NF4; qwix stays a test-only cross-check (same codebook, same NF4 values).

>>> import jax.numpy as jnp
>>> w = jnp.linspace(-1.0, 1.0, 128 * 4, dtype=jnp.float32).reshape(128, 4)
>>> q = quantize(w, "nf4")
>>> q.codes.shape, q.codes.dtype, q.scale.shape
((64, 4), dtype('uint8'), (2, 4))
>>> nbytes(q) * 8 / w.size   # 4 bits a weight plus one float32 scale per 64
4.5
>>> bool(jnp.abs(dequantize(quantize(w, "int8")) - w).max() <= 0.5 / 127)   # half a step
True
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft.masks import path_str

__all__ = ["BASE_DTYPES", "FORMATS", "NF4_CODEBOOK", "QuantizedKernel", "dequantize", "matmul",
           "nbytes", "quantize", "quantize_tree", "split", "stored_shape"]

Array = jax.Array

#: The formats :func:`quantize` stores.
FORMATS = ("int8", "nf4")
#: Every ``--base_dtype`` :func:`quantize_tree` accepts: a cast or a quantized format.
BASE_DTYPES = ("float32", "bfloat16") + FORMATS

#: NormalFloat4: QLoRA (arXiv:2305.14314) appendix E, as bitsandbytes hard-codes it in
#: ``bitsandbytes/functional.py:get_4bit_type("nf4")``. Code ``k`` stands for ``NF4_CODEBOOK[k]``.
NF4_CODEBOOK = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)
# the nearest level: code = number of midpoints below the value (bitsandbytes quantizes the same way)
_NF4_MIDPOINTS = ((NF4_CODEBOOK[1:] + NF4_CODEBOOK[:-1]) / 2).tolist()
_INT8_MAX = 127.0


@functools.partial(jax.tree_util.register_dataclass, data_fields=["codes", "scale"],
                   meta_fields=["format", "block"])
@dataclasses.dataclass(frozen=True)
class QuantizedKernel:
    """A quantized ``[in, out]`` kernel; a pytree whose leaves are ``codes`` and ``scale``.

    Attributes:
        codes: ``int8 [in, out]`` (int8), or ``uint8 [in // 2, out]`` (nf4): rows ``2i`` and
            ``2i + 1`` in the high and low nibble of row ``i`` (bitsandbytes' nibble order).
        scale: ``float32 [1, out]``, the step ``absmax / 127`` of each output channel (int8), or
            ``float32 [in // block, out]``, the absmax of each block along ``in`` (nf4).
        format: ``"int8"`` or ``"nf4"`` (static).
        block: values per scale along ``in`` for nf4 (static; unused by int8).
    """

    codes: Any
    scale: Any
    format: str
    block: int = 64

    @property
    def shape(self) -> tuple[int, int]:
        """The ``[in, out]`` shape of the kernel this stands for."""
        rows, cols = self.codes.shape
        return (rows * 2 if self.format == "nf4" else rows, cols)


def quantize(kernel: Array, dtype: str, block: int = 64) -> QuantizedKernel:
    """Quantizes a 2-D float kernel weight-only.

    Args:
        kernel: the ``[in, out]`` float array.
        dtype: ``"int8"`` (symmetric, one absmax scale per output channel) or ``"nf4"`` (NF4
            codes, one absmax scale per ``block`` consecutive values along ``in``).
        block: the nf4 block length; even and dividing ``in``.

    Returns:
        The :class:`QuantizedKernel`.

    Raises:
        ValueError: an unknown format, a kernel that is not 2-D float, or a block that does not fit.
    """
    if dtype not in FORMATS:
        raise ValueError(f"unknown quantized format {dtype!r}; choose from {FORMATS}")
    if getattr(kernel, "ndim", None) != 2 or not jnp.issubdtype(kernel.dtype, jnp.floating):
        raise ValueError(f"quantize takes a 2-D float kernel, got {getattr(kernel, 'shape', None)} "
                         f"{getattr(kernel, 'dtype', type(kernel))}")
    if dtype == "nf4" and (block < 2 or block % 2 or kernel.shape[0] % block):
        raise ValueError(f"nf4 needs an even block dividing in={kernel.shape[0]}, got block={block}")
    codes, scale = _quantize(kernel, dtype, block)
    return QuantizedKernel(codes, scale, dtype, block)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _quantize(kernel: Array, fmt: str, block: int) -> tuple[Array, Array]:
    w = kernel.astype(jnp.float32)
    if fmt == "int8":
        scale = jnp.max(jnp.abs(w), axis=0, keepdims=True) / _INT8_MAX
        codes = jnp.clip(jnp.round(w / jnp.where(scale > 0, scale, 1.0)), -_INT8_MAX, _INT8_MAX)
        return codes.astype(jnp.int8), scale
    n_in, n_out = w.shape
    blocks = w.reshape(n_in // block, block, n_out)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    v = blocks / jnp.where(absmax > 0, absmax, 1.0)[:, None, :]
    codes = sum((v > m).astype(jnp.uint8) for m in _NF4_MIDPOINTS).reshape(n_in // 2, 2, n_out)
    return (codes[:, 0] << 4) | codes[:, 1], absmax


def dequantize(q: QuantizedKernel, dtype: Any = jnp.float32) -> Array:
    """The ``[in, out]`` kernel ``q`` stands for: codes times scales in float32, then cast.

    Args:
        q: the quantized kernel.
        dtype: the dtype of the result.

    Returns:
        The dequantized array.
    """
    if q.format == "int8":
        w = q.codes.astype(jnp.float32) * q.scale
    else:
        n_in, n_out = q.shape
        idx = jnp.stack([q.codes >> 4, q.codes & 0xF], axis=1).reshape(n_in // q.block, q.block, n_out)
        levels = jnp.asarray(NF4_CODEBOOK).at[idx].get(mode="promise_in_bounds")   # 4-bit: 0..15
        w = (levels * q.scale[:, None, :]).reshape(n_in, n_out)
    return w.astype(dtype)


def _dot(x: Array, w: Array) -> Array:
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def matmul(x: Array, kernel: Array | QuantizedKernel, compute_dtype: Any = jnp.float32) -> Array:
    """``x @ kernel`` in ``compute_dtype``, for a float kernel or a :class:`QuantizedKernel`.

    A quantized kernel is dequantized inside the computation (XLA may fuse it into the dot's
    operand). Its gradient w.r.t. ``x`` is exact for the dequantized weight; the kernel is frozen,
    so its codes and scale get zero cotangents.

    Args:
        x: ``[..., in]``.
        kernel: ``[in, out]`` float array, or its quantized form.
        compute_dtype: the dtype of both dot operands and of the result.

    Returns:
        ``[..., out]`` in ``compute_dtype``.
    """
    dt = jnp.dtype(compute_dtype)
    if isinstance(kernel, QuantizedKernel):
        return _qmatmul(kernel.format, kernel.block, dt, x.astype(dt), kernel.codes, kernel.scale)
    return _dot(x.astype(dt), kernel.astype(dt))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _qmatmul(fmt, block, dt, x, codes, scale):
    return _dot(x, dequantize(QuantizedKernel(codes, scale, fmt, block), dt))


def _qmatmul_fwd(fmt, block, dt, x, codes, scale):
    # residuals: the stored codes and scales (already held as params), never the float weight
    return _qmatmul(fmt, block, dt, x, codes, scale), (codes, scale)


def _qmatmul_bwd(fmt, block, dt, res, g):
    # the barrier ties the dequantization to the cotangent: without it XLA merges it with the forward
    # pass's (same inputs) and keeps that float weight alive until the backward pass
    codes, scale, g = jax.lax.optimization_barrier((*res, g))
    w = dequantize(QuantizedKernel(codes, scale, fmt, block), dt)
    dx = jax.lax.dot_general(g.astype(dt), w, (((g.ndim - 1,), (1,)), ((), ())))
    return dx, np.zeros(codes.shape, jax.dtypes.float0), jnp.zeros_like(scale)


_qmatmul.defvjp(_qmatmul_fwd, _qmatmul_bwd)


def quantize_tree(params: Any, dtype: str, predicate: Callable[[str, Any], bool],
                  block: int = 64) -> Any:
    """Stores the kernels ``predicate`` selects in ``dtype``; leaves every other leaf as it is.

    Args:
        params: a params pytree (nested dicts; holes such as ``None`` or ``optax.MaskedNode``).
        dtype: one of :data:`BASE_DTYPES`; ``"float32"``/``"bfloat16"`` cast instead of quantizing.
        predicate: ``predicate(path, leaf)`` with the ``/``-joined key path (``masks.path_str``);
            only 2-D float leaves it accepts change.
        block: the nf4 block length.

    Returns:
        The tree with the selected leaves cast or replaced by :class:`QuantizedKernel`.

    Raises:
        ValueError: an unknown dtype, or a selected kernel whose ``in`` the nf4 block does not divide.
    """
    if dtype not in BASE_DTYPES:
        raise ValueError(f"unknown base dtype {dtype!r}; choose from {BASE_DTYPES}")

    def convert(keypath, x):
        path = path_str(keypath)
        if isinstance(x, QuantizedKernel) or getattr(x, "ndim", None) != 2:
            return x
        if not jnp.issubdtype(x.dtype, jnp.floating) or not predicate(path, x):
            return x
        if dtype in FORMATS:
            if dtype == "nf4" and x.shape[0] % block:
                raise ValueError(f"{path}: nf4 block {block} does not divide in={x.shape[0]}")
            return quantize(x, dtype, block)
        return jnp.asarray(x, dtype)

    return jax.tree_util.tree_map_with_path(convert, params, is_leaf=_is_quantized)


def _is_quantized(x: Any) -> bool:
    return isinstance(x, QuantizedKernel)


def nbytes(tree: Any, device: Any = None) -> int:
    """Bytes the arrays of a pytree hold: one copy of each array, or what one device holds.

    Sub-byte dtypes (``jnp.uint4``) count one byte per element, as ``jax`` reports them; the
    formats here use none.

    Args:
        tree: any pytree (quantized kernels count their codes and scales).
        device: a ``jax.Device`` to count only the shards on it (a replicated array counts whole
            on every device); ``None`` counts each array once.

    Returns:
        The byte count.
    """
    total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        if device is not None:
            total += sum(s.data.nbytes for s in leaf.addressable_shards if s.device == device)
        elif hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            total += int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
    return total


def stored_shape(shape: tuple[int, ...], dtype: str, block: int = 64) -> Any:
    """What a ``shape`` float kernel becomes stored as ``dtype`` (no arrays made): a
    ``jax.ShapeDtypeStruct``, or a :class:`QuantizedKernel` of them for a quantized format.

    >>> q = stored_shape((128, 4), "nf4")
    >>> q.codes.shape, q.scale.shape, str(stored_shape((128, 4), "bfloat16").dtype)
    ((64, 4), (2, 4), 'bfloat16')
    """
    if dtype not in FORMATS:
        return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))
    return jax.eval_shape(lambda k: quantize(k, dtype, block), jax.ShapeDtypeStruct(tuple(shape), jnp.float32))


def split(params: Any, mask: Any) -> tuple[Any, Any]:
    """``masks.split`` for a params tree whose quantized kernels stand where ``mask`` has one
    boolean (a mask computed on the float shapes of the tree): ``(trainable, frozen)``, the other
    part's leaves replaced by ``optax.MaskedNode()``."""
    import optax

    t = jax.tree_util.tree_map(lambda m, x: x if m else optax.MaskedNode(), mask, params)
    f = jax.tree_util.tree_map(lambda m, x: optax.MaskedNode() if m else x, mask, params)
    return t, f
