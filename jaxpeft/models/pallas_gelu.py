"""The feed-forward block's bias and GELU as one Pallas (Triton) kernel each way.

``gelu(x @ W + b)`` with the activation left to XLA writes the bias-added ``[B, T, 4H]`` tensor
as the activation's saved input, next to the matmul's own output, and its backward pass (the
GELU derivative and the bias gradient's column sum, in one reduction fusion) ran at about 70% of
the memory bandwidth on an H200. Here:

- forward: reads the matmul's output (without the bias) and writes only the activation; the
  backward pass keeps the matmul's output, which exists anyway, so nothing of ``[B, T, 4H]`` is
  written for it;
- backward: reads the activation's gradient and the matmul's output, writes the gradient of the
  matmul's output and sums the bias gradient per block of rows (summed over the blocks outside).

The arithmetic and roundings are those of ``nn.Dense`` in the compute dtype followed by
``lean_ops.gelu``: the bias is added in the compute dtype, the GELU and its derivative are
float32. Exact GELU needs ``erf``, which Pallas's Triton lowering does not provide, so it is the
rational approximation XLA and Eigen use for float32 (to a few float32 ulps of ``jax.lax.erf``).
Off GPU the kernels run in Pallas's interpreter.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxpeft.models.pallas_common import CompilerParams, batch_parallel, interpret, pow2
from jaxpeft.models.pallas_norm import Tuning

# rows x 1024 columns per forward program; the backward as pallas_norm's (rows per loop step, rows
# per program, warps)
DEFAULT_TUNING = Tuning(block_rows=8, num_warps=4, block_rows_bwd=4, rows_bwd=32, num_warps_bwd=4)

Array = jax.Array

_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_TANH_C = math.sqrt(2.0 / math.pi)
# float32 erf as a rational function of x (odd numerator, even denominator) on [-4, 4], outside
# of which erf is +-1 in float32: the coefficients of Eigen's generic_fast_erf_float
_ALPHA = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
          -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_BETA = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
         -1.42647390514189e-02)


def erf(x: Array) -> Array:
    """float32 erf from basic arithmetic (usable inside a Triton kernel)."""
    x = jnp.clip(x, -4.0, 4.0)
    x2 = x * x
    p = jnp.full_like(x2, _ALPHA[0])
    for c in _ALPHA[1:]:
        p = p * x2 + c
    q = jnp.full_like(x2, _BETA[0])
    for c in _BETA[1:]:
        q = q * x2 + c
    return x * p / q


def _gelu_and_grad(h, approximate, grad):
    if approximate:
        t = jnp.tanh(_TANH_C * (h + 0.044715 * h * h * h))
        if grad:
            return 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * _TANH_C * (1.0 + 3 * 0.044715 * h * h)
        return 0.5 * h * (1.0 + t)
    e = erf(h * _SQRT_HALF)
    if grad:
        return 0.5 * (1.0 + e) + h * _INV_SQRT_2PI * jnp.exp(-0.5 * h * h)
    return 0.5 * h * (1.0 + e)


def _bias_added(x_ref, bias_ref, rows, ok, col_ok):
    """The bias-added pre-activation, rounded to the input dtype as ``nn.Dense``'s add is."""
    x = plgpu.load(x_ref.at[rows, :], mask=ok, other=0.0)
    b = plgpu.load(bias_ref, mask=col_ok, other=0.0).astype(jnp.float32)
    return (x.astype(jnp.float32) + b[None, :]).astype(x.dtype).astype(jnp.float32)


def _fwd_kernel(x_ref, bias_ref, y_ref, *, t, n, approximate):
    bm, bc = x_ref.shape
    row_ok = pl.program_id(1) * bm + jnp.arange(bm) < t
    col_ok = pl.program_id(2) * bc + jnp.arange(bc) < n
    ok = row_ok[:, None] & col_ok[None, :]
    h = _bias_added(x_ref, bias_ref, slice(None), ok, col_ok)
    plgpu.store(y_ref, _gelu_and_grad(h, approximate, False).astype(y_ref.dtype), mask=ok)


def _bwd_kernel(x_ref, bias_ref, dy_ref, dx_ref, dbias_ref, *, t, n, approximate, block_rows):
    rp, bc = x_ref.shape
    base = pl.program_id(1) * rp
    col_ok = pl.program_id(2) * bc + jnp.arange(bc) < n

    def body(i, acc):
        rows = pl.ds(i * block_rows, block_rows)
        row_ok = base + i * block_rows + jnp.arange(block_rows) < t
        ok = row_ok[:, None] & col_ok[None, :]
        h = _bias_added(x_ref, bias_ref, rows, ok, col_ok)
        dy = plgpu.load(dy_ref.at[rows, :], mask=ok, other=0.0).astype(jnp.float32)
        dx = (dy * _gelu_and_grad(h, approximate, True)).astype(dx_ref.dtype)
        plgpu.store(dx_ref.at[rows, :], dx, mask=ok)
        return acc + jnp.sum(jnp.where(ok, dx.astype(jnp.float32), 0.0), axis=0)

    acc = jax.lax.fori_loop(0, rp // block_rows, body, jnp.zeros((bc,), jnp.float32))
    plgpu.store(dbias_ref, acc, mask=col_ok)


def _col_block(n: int) -> int:
    return min(1024, pow2(n))


def _fwd_call(approximate, tuning, x, bias):
    b, t, n = x.shape
    bm, bc = min(tuning.block_rows, pow2(t)), _col_block(n)
    big = pl.BlockSpec((None, bm, bc), lambda i, j, k: (i, j, k))
    return (pl.pallas_call(
        functools.partial(_fwd_kernel, t=t, n=n, approximate=approximate),
        grid=(b, pl.cdiv(t, bm), pl.cdiv(n, bc)),
        in_specs=[big, pl.BlockSpec((bc,), lambda i, j, k: (k,))],
        out_specs=big,
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        compiler_params=CompilerParams(num_warps=tuning.num_warps, num_stages=1),
        interpret=interpret(),
        name="bias_gelu_fwd",
    )(x, bias),)


def _bwd_call(approximate, tuning, x, bias, dy):
    b, t, n = x.shape
    rp, bc = min(tuning.rows_bwd, pow2(t)), _col_block(n)
    bm = min(tuning.block_rows_bwd, rp)
    g = pl.cdiv(t, rp)
    big = pl.BlockSpec((None, rp, bc), lambda i, j, k: (i, j, k))
    return tuple(pl.pallas_call(
        functools.partial(_bwd_kernel, t=t, n=n, approximate=approximate, block_rows=bm),
        grid=(b, g, pl.cdiv(n, bc)),
        in_specs=[big, pl.BlockSpec((bc,), lambda i, j, k: (k,)), big],
        out_specs=[big, pl.BlockSpec((None, None, bc), lambda i, j, k: (i, j, k))],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((b, g, n), jnp.float32)],
        compiler_params=CompilerParams(num_warps=tuning.num_warps_bwd, num_stages=1),
        interpret=interpret(),
        name="bias_gelu_bwd",
    )(x, bias, dy))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _bias_gelu(x, bias, approximate, tuning):
    return _forward(x, bias, approximate, tuning)[0]


def _forward(x, bias, approximate, tuning):
    (y,) = batch_parallel(functools.partial(_fwd_call, approximate, tuning), (True, False),
                           [x, bias.astype(x.dtype)])
    # only the matmul's output is kept (it exists anyway) and the bias
    return y, (x, bias)


def _backward(approximate, tuning, res, dy):
    x, bias = res
    dx, dbias = batch_parallel(functools.partial(_bwd_call, approximate, tuning), (True, False, True),
                                [x, bias.astype(x.dtype), dy.astype(x.dtype)])
    return dx, dbias.sum((0, 1)).astype(bias.dtype)


_bias_gelu.defvjp(_forward, _backward)


def bias_gelu(x: Array, bias: Array, *, approximate: bool = False,
              tuning: Tuning = DEFAULT_TUNING) -> Array:
    """``gelu(x + bias)`` for ``x`` ``[B, T, N]`` (a matmul's output) and ``bias`` ``[N]``: the bias
    added in ``x``'s dtype, the GELU (exact, or the tanh approximation) in float32, the result in
    ``x``'s dtype. Its backward pass keeps only ``x`` and ``bias``."""
    if x.ndim != 3 or bias.shape != x.shape[-1:]:
        raise ValueError(f"bias_gelu wants x [B, T, N] and bias [N], got {x.shape} and {bias.shape}")
    return _bias_gelu(x, bias, bool(approximate), tuning)
