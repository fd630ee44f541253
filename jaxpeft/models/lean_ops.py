"""LayerNorm and GELU whose backward passes keep only their (compute-dtype) input.

Autodiff of the plain formulas keeps what the forward pass happened to compute: for Flax's
``LayerNorm`` three float32 ``[..., H]`` temporaries, for exact GELU four ``[..., 4H]`` tensors
(``x``, ``erfc``, ``exp``, the product). At BERT-base sizes that is most of what a BitFit step
writes to and reads back from memory. These versions write the backward pass by hand
(``jax.custom_vjp``) and keep the input as it came (bfloat16 under mixed precision) plus, for
LayerNorm, one float32 mean and reciprocal standard deviation per row. The arithmetic is float32
in both directions; outputs are cast back to the input's dtype (or ``out_dtype``).

``LayerNorm`` is a drop-in for ``flax.linen.LayerNorm`` over the last axis: same param names
(``scale``, ``bias``), shapes, initialisers and float32 params, so checkpoints and masks do not
change.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.scipy.special import erf

Array = jax.Array

_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_TANH_C = math.sqrt(2.0 / math.pi)

# How exact GELU computes erf in float32:
#   xla    jax.lax.erf. XLA's GPU code is a rational function p(x) / q(x) (Eigen's interpolant,
#          xla/codegen/intrinsic/erf.cc) with an IEEE division, which makes the GELU fusions of a
#          BERT step partly arithmetic-bound.
#   rsqrt  the same rational function with the division done as ``p * rsqrt(q) ** 2``: ``q >= 1``
#          on the whole interval, and a GPU's reciprocal square root is one hardware instruction
#          (about 2 float32 ulps), against a division's dozen. Within a few float32 ulps of
#          ``xla`` (so bf16 results differ in rare last-bit roundings).
ERF_IMPLS = ("xla", "rsqrt")
# XLA's coefficients: odd numerator (x^1 .. x^9) and even denominator (x^0 .. x^12), in Horner
# order from the highest power; beyond |x| = _ERF_CLAMP, erf is +-1 to within half a float32 ulp
_ERF_P = (0.00022905065861350646, 0.0034082910107109506, 0.050955695062380861, 0.18520832239976145,
          1.128379143519084)
_ERF_Q = (-1.1791602954361697e-7, 0.000023547966471313185, 0.0010179625278914885, 0.014070470171167667,
          0.11098505178285362, 0.49746925110067538, 1.0)
_ERF_CLAMP = 3.832506856900711


def erf_rsqrt(x: Array) -> Array:
    """float32 ``erf`` as XLA computes it, with the division replaced by a squared ``rsqrt``.

    Inputs are clamped to +-``_ERF_CLAMP``, where the rational function is +-1 to within float32
    rounding, so the denominator stays in [1, 20] and its reciprocal square root is well defined."""
    x = jnp.clip(x.astype(jnp.float32), -_ERF_CLAMP, _ERF_CLAMP)
    x2 = x * x
    p = jnp.full_like(x2, _ERF_P[0])
    for c in _ERF_P[1:]:
        p = p * x2 + c
    q = jnp.full_like(x2, _ERF_Q[0])
    for c in _ERF_Q[1:]:
        q = q * x2 + c
    r = jax.lax.rsqrt(q)
    return x * p * r * r


def _erf(impl: str):
    if impl not in ERF_IMPLS:
        raise ValueError(f"erf_impl must be one of {ERF_IMPLS}, got {impl!r}")
    return erf if impl == "xla" else erf_rsqrt


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm(x: Array, scale: Array, bias: Array, eps: float, out_dtype: Any) -> Array:
    """``(x - mean) / sqrt(var + eps) * scale + bias`` over the last axis, stats in float32."""
    return _layer_norm_fwd(x, scale, bias, eps, out_dtype)[0]


def _layer_norm_fwd(x, scale, bias, eps, out_dtype):
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    xc = xf - mean
    rstd = jax.lax.rsqrt(jnp.mean(xc * xc, axis=-1, keepdims=True) + eps)
    y = xc * rstd * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(out_dtype), (x, mean, rstd, scale, bias)


def _layer_norm_bwd(eps, out_dtype, res, dy):
    x, mean, rstd, scale, bias = res
    xhat = (x.astype(jnp.float32) - mean) * rstd
    dyf = dy.astype(jnp.float32)
    g = dyf * scale.astype(jnp.float32)
    dx = rstd * (g - jnp.mean(g, axis=-1, keepdims=True)
                 - xhat * jnp.mean(g * xhat, axis=-1, keepdims=True))
    lead = tuple(range(x.ndim - 1))
    dscale = jnp.sum(dyf * xhat, axis=lead).astype(scale.dtype)
    dbias = jnp.sum(dyf, axis=lead).astype(bias.dtype)
    return dx.astype(x.dtype), dscale, dbias


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def gelu(x: Array, approximate: bool = False, erf_impl: str = "xla") -> Array:
    """GELU (exact erf form, or the tanh approximation), computed in float32; ``erf_impl`` is one
    of ``ERF_IMPLS``."""
    return _gelu_fwd(x, approximate, erf_impl)[0]


def _gelu_fwd(x, approximate, erf_impl):
    xf = x.astype(jnp.float32)
    if approximate:
        y = 0.5 * xf * (1.0 + jnp.tanh(_TANH_C * (xf + 0.044715 * xf ** 3)))
    else:
        y = 0.5 * xf * (1.0 + _erf(erf_impl)(xf * _SQRT_HALF))
    return y.astype(x.dtype), x


def _gelu_bwd(approximate, erf_impl, x, dy):
    xf = x.astype(jnp.float32)
    if approximate:
        t = jnp.tanh(_TANH_C * (xf + 0.044715 * xf ** 3))
        d = 0.5 * (1.0 + t) + 0.5 * xf * (1.0 - t * t) * _TANH_C * (1.0 + 3 * 0.044715 * xf * xf)
    else:
        d = 0.5 * (1.0 + _erf(erf_impl)(xf * _SQRT_HALF)) + xf * _INV_SQRT_2PI * jnp.exp(-0.5 * xf * xf)
    return ((dy.astype(jnp.float32) * d).astype(x.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


class LayerNorm(nn.Module):
    """``flax.linen.LayerNorm`` over the last axis (same params), with :func:`layer_norm`'s backward."""

    epsilon: float = 1e-6
    dtype: Any = None          # output dtype; None: the input's
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)
        out_dtype = jnp.dtype(self.dtype) if self.dtype is not None else x.dtype
        return layer_norm(x, scale, bias, self.epsilon, out_dtype)
