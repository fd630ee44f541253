"""A BERT sublayer's output as one Pallas (Triton) kernel each way: bias, dropout, residual, LayerNorm.

Every BERT sublayer ends in ``LayerNorm(dropout(x @ W + b) + residual)``. Left to XLA on a GPU,
the forward pass of that is three kernels (the bias/dropout/residual add, the LayerNorm statistics,
the normalisation) and the backward pass two more that each recompute the LayerNorm backward (one
for the residual's gradient, one for the projection's), plus reductions for the parameter
gradients: each reads the ``[B, T, H]`` tensors again. Here each direction is one kernel over
blocks of whole rows:

- forward: reads the projection's output (without its bias) and the residual, writes the output,
  the sum before the LayerNorm (bf16, kept for the backward pass, as ``lean_ops.layer_norm`` keeps
  it) and one float32 mean and reciprocal standard deviation per row;
- backward: reads the two gradients of the output (see below), the kept sum and the statistics,
  writes the residual's gradient and the projection output's gradient, and sums the gradients of
  the LayerNorm scale and bias and of the projection bias per block of rows (summed over the
  blocks outside, a few MB).

The dropout mask is :mod:`jaxpeft.models.kernels.hash_dropout`'s, recomputed from the two seed words and
each element's position in both kernels: the same mask ``hash_dropout`` draws for the same seed,
and nothing of it is written to memory. Two rows share each hash word (its low and high 16
bits), and with blocks of two rows (the default) the kernels hash each word once for both: the
hash, a few dozen integer operations per word, was about a fifth of their time. Positions are
global (each row's index comes in as an input), so under a sharded ``jit``, where each device runs
the kernels on its own rows, the mask is the unsharded one.

The output is returned twice, as two arrays: one for the next sublayer's projection and one for
the next residual connection. Autodiff then hands the backward kernel the two gradients
separately and the kernel adds them itself, instead of a separate pass adding them first.

The arithmetic and roundings are those of the unfused layers (``nn.Dense`` in the compute dtype,
``hash_dropout``, ``lean_ops.layer_norm``), so outputs and gradients match them (tests).
The kernels compile for NVIDIA GPUs only; the CPU tests run them in Pallas's interpreter.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxpeft.models.kernels import hash_dropout, lean_ops
from jaxpeft.models.kernels.pallas_common import CompilerParams, batch_parallel, interpret, pow2

Array = jax.Array

# lowbias32's multipliers as int32 (two's complement): int32 multiply, xor and logical shifts give
# the same bits as hash_dropout's uint32 arithmetic, with constants Triton takes as int32
_M1 = np.int32(0x7FEB352D)
_M2 = np.int32(0x846CA68B - 2 ** 32)


def _mix(h):
    srl = jax.lax.shift_right_logical
    h = h ^ srl(h, np.int32(16))
    h = h * _M1
    h = h ^ srl(h, np.int32(15))
    h = h * _M2
    return h ^ srl(h, np.int32(16))


def _keep(row_ids, cols, n, seed0, seed1, threshold, pair):
    """hash_dropout.keep_mask at rows ``row_ids`` (flat row index in the whole [B*T, H] array) and
    columns ``cols``: rows ``2p`` and ``2p + 1`` share word ``p * n + j`` (low and high 16 bits).
    With ``pair`` the rows are one such pair, so each word is hashed once for both."""
    srl = jax.lax.shift_right_logical
    odd = (row_ids & 1) == 1
    thr = np.int32(threshold)
    if pair:
        first = jnp.sum(jnp.where(jnp.arange(row_ids.shape[0]) == 0, row_ids, 0))
        w = _mix(_mix((srl(first, np.int32(1)) * np.int32(n) + cols) ^ seed0) + seed1)
        lo, hi = (w & np.int32(0xFFFF)) >= thr, srl(w, np.int32(16)) >= thr
        return jnp.where(odd[:, None], hi[None, :], lo[None, :])
    idx = srl(row_ids, np.int32(1))[:, None] * np.int32(n) + cols[None, :]
    w = _mix(_mix(idx ^ seed0) + seed1)
    return jnp.where(odd[:, None], srl(w, np.int32(16)), w & np.int32(0xFFFF)) >= thr


def _seed_words(seed_ref):
    s = seed_ref[...]
    lane = jnp.arange(2)
    return jnp.sum(jnp.where(lane == 0, s, 0)), jnp.sum(jnp.where(lane == 1, s, 0))


def _fwd_kernel(h_ref, res_ref, rows_ref, bias_ref, scale_ref, lnb_ref, seed_ref,
                y_ref, s_ref, mean_ref, rstd_ref, *, t, n, rate, eps):
    bm, hp = h_ref.shape
    f32 = jnp.float32
    start = pl.program_id(1) * bm
    row_ok = (start + jnp.arange(bm)) < t
    cols = jnp.arange(hp)
    col_ok = cols < n
    ok = row_ok[:, None] & col_ok[None, :]
    dt = h_ref.dtype
    bias = plgpu.load(bias_ref, mask=col_ok, other=0.0).astype(f32)
    h = plgpu.load(h_ref, mask=ok, other=0.0)
    hb = (h.astype(f32) + bias[None, :]).astype(dt)              # nn.Dense's add, in its dtype
    if rate > 0.0:
        seed0, seed1 = _seed_words(seed_ref)
        rows = plgpu.load(rows_ref, mask=row_ok, other=0)
        keep = _keep(rows, cols, n, seed0, seed1, hash_dropout._threshold(rate), bm == 2 and t % 2 == 0)
        hb = jnp.where(keep, hb.astype(f32) * f32(1.0 / hash_dropout.keep_prob(rate)), 0.0).astype(dt)
    res = plgpu.load(res_ref, mask=ok, other=0.0)
    s = (hb.astype(f32) + res.astype(f32)).astype(dt)
    sf = jnp.where(ok, s.astype(f32), 0.0)
    mean = jnp.sum(sf, axis=1) / n
    xc = jnp.where(ok, sf - mean[:, None], 0.0)
    rstd = jax.lax.rsqrt(jnp.sum(xc * xc, axis=1) / n + eps)
    scale = plgpu.load(scale_ref, mask=col_ok, other=0.0).astype(f32)
    lnb = plgpu.load(lnb_ref, mask=col_ok, other=0.0).astype(f32)
    y = xc * rstd[:, None] * scale[None, :] + lnb[None, :]
    plgpu.store(y_ref, y.astype(y_ref.dtype), mask=ok)
    plgpu.store(s_ref, s, mask=ok)
    plgpu.store(mean_ref, mean, mask=row_ok)
    plgpu.store(rstd_ref, rstd, mask=row_ok)


def _bwd_kernel(dya_ref, dyb_ref, s_ref, mean_ref, rstd_ref, rows_ref, scale_ref, seed_ref,
                dres_ref, dh_ref, part_ref, *, t, n, rate, block_rows):
    rp, hp = s_ref.shape
    f32 = jnp.float32
    cols = jnp.arange(hp)
    col_ok = cols < n
    scale = plgpu.load(scale_ref, mask=col_ok, other=0.0).astype(f32)
    if rate > 0.0:
        seed0, seed1 = _seed_words(seed_ref)
    base = pl.program_id(1) * rp

    def body(i, acc):
        r = pl.ds(i * block_rows, block_rows)
        row_ok = (base + i * block_rows + jnp.arange(block_rows)) < t
        ok = row_ok[:, None] & col_ok[None, :]
        dy = (plgpu.load(dya_ref.at[r, :], mask=ok, other=0.0).astype(f32)
              + plgpu.load(dyb_ref.at[r, :], mask=ok, other=0.0).astype(f32))
        s = plgpu.load(s_ref.at[r, :], mask=ok, other=0.0).astype(f32)
        mean = plgpu.load(mean_ref.at[r], mask=row_ok, other=0.0)
        rstd = plgpu.load(rstd_ref.at[r], mask=row_ok, other=0.0)
        xhat = jnp.where(ok, (s - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * scale[None, :]
        mg = jnp.sum(g, axis=1) / n
        mgx = jnp.sum(g * xhat, axis=1) / n
        dx = rstd[:, None] * (g - mg[:, None] - xhat * mgx[:, None])
        dres = dx.astype(dres_ref.dtype)
        if rate > 0.0:
            rows = plgpu.load(rows_ref.at[r], mask=row_ok, other=0)
            keep = _keep(rows, cols, n, seed0, seed1, hash_dropout._threshold(rate), block_rows == 2 and t % 2 == 0)
            dh = jnp.where(keep, dres.astype(f32) * f32(1.0 / hash_dropout.keep_prob(rate)), 0.0)
        else:
            dh = dres.astype(f32)
        dh = dh.astype(dh_ref.dtype)
        plgpu.store(dres_ref.at[r, :], dres, mask=ok)
        plgpu.store(dh_ref.at[r, :], dh, mask=ok)
        return (acc[0] + jnp.sum(dy * xhat, axis=0), acc[1] + jnp.sum(dy, axis=0),
                acc[2] + jnp.sum(jnp.where(ok, dh.astype(f32), 0.0), axis=0))

    zero = jnp.zeros((hp,), f32)
    acc = jax.lax.fori_loop(0, rp // block_rows, body, (zero, zero, zero))
    # this program's partial sums of the LayerNorm scale's, its bias's and the projection bias's
    # gradients, as three rows of one output (one reduction over the programs outside, not three)
    for k, a in enumerate(acc):
        plgpu.store(part_ref.at[np.int32(k), :], a, mask=col_ok)


@dataclasses.dataclass(frozen=True)
class Tuning:
    """Launch parameters: rows per forward program and its warps; rows per backward loop step,
    rows per backward program (whose parameter-gradient partial sums it writes once) and warps.

    The defaults were the fastest of three in the BERT-base BitFit step (seq 128, batch 256) on an
    H200: 8,504 seq/s, against 8,417 for ``4:4:4:64:4`` and 8,124 for ``8:8:8:64:8`` (XLA's
    fusions: 7,872) in the same process, 2026-12-01 (in the git history of docs/benchmarks.md)."""

    block_rows: int = 2
    num_warps: int = 4
    block_rows_bwd: int = 2
    rows_bwd: int = 32
    num_warps_bwd: int = 4
    stages_bwd: int = 1     # Triton's software pipelining of the backward loop (1: none)


def _fwd_call(rate, eps, tuning, h, res, rows, bias, scale, lnb, seed):
    b, t, n = h.shape
    hp = pow2(n)
    bm = min(tuning.block_rows, pow2(t))
    big = pl.BlockSpec((None, bm, hp), lambda i, j: (i, j, 0))
    row = pl.BlockSpec((None, bm), lambda i, j: (i, j))
    vec = pl.BlockSpec((hp,), lambda i, j: (0,))
    two = pl.BlockSpec((2,), lambda i, j: (0,))
    kernel = functools.partial(_fwd_kernel, t=t, n=n, rate=rate, eps=eps)
    return tuple(pl.pallas_call(
        kernel,
        grid=(b, pl.cdiv(t, bm)),
        in_specs=[big, big, row, vec, vec, vec, two],
        out_specs=[big, big, row, row],
        out_shape=[jax.ShapeDtypeStruct(h.shape, h.dtype), jax.ShapeDtypeStruct(h.shape, h.dtype),
                   jax.ShapeDtypeStruct((b, t), jnp.float32), jax.ShapeDtypeStruct((b, t), jnp.float32)],
        compiler_params=CompilerParams(num_warps=tuning.num_warps, num_stages=1),
        interpret=interpret(),
        name="add_norm_fwd",
    )(h, res, rows, bias, scale, lnb, seed))


def _bwd_call(rate, tuning, dya, dyb, s, mean, rstd, rows, scale, seed):
    b, t, n = s.shape
    hp = pow2(n)
    rp = min(tuning.rows_bwd, pow2(t))
    bm = min(tuning.block_rows_bwd, rp)
    g = pl.cdiv(t, rp)
    big = pl.BlockSpec((None, rp, hp), lambda i, j: (i, j, 0))
    row = pl.BlockSpec((None, rp), lambda i, j: (i, j))
    vec = pl.BlockSpec((hp,), lambda i, j: (0,))
    two = pl.BlockSpec((2,), lambda i, j: (0,))
    part = pl.BlockSpec((None, None, 3, hp), lambda i, j: (i, j, 0, 0))
    kernel = functools.partial(_bwd_kernel, t=t, n=n, rate=rate, block_rows=bm)
    return tuple(pl.pallas_call(
        kernel,
        grid=(b, g),
        in_specs=[big, big, big, row, row, row, vec, two],
        out_specs=[big, big, part],
        out_shape=[jax.ShapeDtypeStruct(s.shape, s.dtype)] * 2
        + [jax.ShapeDtypeStruct((b, g, 3, n), jnp.float32)],
        compiler_params=CompilerParams(num_warps=tuning.num_warps_bwd, num_stages=tuning.stages_bwd),
        interpret=interpret(),
        name="add_norm_bwd",
    )(dya, dyb, s, mean, rstd, rows, scale, seed))


_BATCHED_FWD = (True, True, True, False, False, False, False)
_BATCHED_BWD = (True, True, True, True, True, True, False, False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _add_norm(h, bias, residual, scale, ln_bias, rows, seed, rate, eps, tuning):
    y = _forward(h, bias, residual, scale, ln_bias, rows, seed, rate, eps, tuning)[0][0]
    return y, y


def _forward(h, bias, residual, scale, ln_bias, rows, seed, rate, eps, tuning):
    args = [h, residual, rows, bias.astype(h.dtype), scale, ln_bias, seed]
    y, s, mean, rstd = batch_parallel(functools.partial(_fwd_call, rate, eps, tuning), _BATCHED_FWD, args)
    return (y, y), (s, mean, rstd, rows, scale, seed, bias, ln_bias)


def _backward(rate, eps, tuning, res, cts):
    s, mean, rstd, rows, scale, seed, bias, ln_bias = res
    dya, dyb = cts
    args = [dya.astype(s.dtype), dyb.astype(s.dtype), s, mean, rstd, rows, scale, seed]
    dres, dh, parts = batch_parallel(functools.partial(_bwd_call, rate, tuning), _BATCHED_BWD, args)
    dscale, dlnb, dbias = parts.sum((0, 1))
    return (dh, dbias.astype(bias.dtype), dres, dscale.astype(scale.dtype), dlnb.astype(ln_bias.dtype),
            None, None)


_add_norm.defvjp(_forward, _backward)


def dropout_add_norm(h: Array, bias: Array, residual: Array, scale: Array, ln_bias: Array,
                     seed: Array | None, *, rate: float, eps: float,
                     tuning: Tuning = Tuning()) -> tuple[Array, Array]:
    """``LayerNorm(hash_dropout(h + bias, seed, rate) + residual)`` over the last axis.

    Args:
      h: ``[B, T, H]``, the sublayer's projection output without its bias (compute dtype).
      bias: ``[H]``, the projection's bias (cast to ``h``'s dtype, as ``nn.Dense`` does).
      residual: ``[B, T, H]``, the sublayer's input.
      scale, ln_bias: ``[H]``, the LayerNorm's params.
      seed: two uint32 words (``hash_dropout``'s); ``None`` with ``rate == 0`` (no dropout).
      rate: dropout rate (0: none).
      eps: the LayerNorm's epsilon.

    Returns:
      The output twice (same values, in ``h``'s dtype): use the first for the next projection and
      the second for the next residual connection, so the backward kernel gets both gradients.
    """
    if h.ndim != 3 or residual.shape != h.shape:
        raise ValueError(f"h and residual must be the same [B, T, H], got {h.shape} and {residual.shape}")
    b, t, n = h.shape
    for name, v in (("bias", bias), ("scale", scale), ("ln_bias", ln_bias)):
        if v.shape != (n,):
            raise ValueError(f"{name} must be [{n}], got {v.shape}")
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
    if rate > 0.0 and seed is None:
        raise ValueError("dropout needs a seed (two uint32 words)")
    seed = jnp.zeros((2,), jnp.int32) if seed is None else \
        jax.lax.bitcast_convert_type(jnp.asarray(seed, jnp.uint32), jnp.int32)
    return _add_norm_call(h, bias, residual.astype(h.dtype), scale, ln_bias, seed, float(rate), float(eps), tuning)


@functools.partial(jax.jit, static_argnums=(6, 7, 8))
def _add_norm_call(h, bias, residual, scale, ln_bias, seed, rate, eps, tuning):
    """The kernels behind a jit of their own: the model calls them with the same shapes in every
    layer, and JAX traces and lowers one jitted function once per shape, so the Triton kernels are
    lowered once per shape, not once per layer (lowering a Pallas kernel takes a tenth of a second,
    and a BERT step has dozens of calls)."""
    b, t, _ = h.shape
    rows = jnp.arange(b * t, dtype=jnp.int32).reshape(b, t)
    return _add_norm(h, bias, residual, scale, ln_bias, rows, seed, rate, eps, tuning)


def reference(h: Array, bias: Array, residual: Array, scale: Array, ln_bias: Array,
              seed: Array | None, *, rate: float, eps: float) -> Array:
    """The same output from the unfused layers (``hash_dropout`` and ``lean_ops.layer_norm``)."""
    x = h + bias.astype(h.dtype)
    if rate > 0.0:
        x = hash_dropout.hash_dropout(x, seed, rate)
    return lean_ops.layer_norm(x + residual.astype(h.dtype), scale, ln_bias, eps, h.dtype)
