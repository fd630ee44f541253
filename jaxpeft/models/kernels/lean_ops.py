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


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def gelu(x: Array, approximate: bool = False) -> Array:
    """GELU (exact erf form, or the tanh approximation), computed in float32."""
    return _gelu_fwd(x, approximate)[0]


def _gelu_fwd(x, approximate):
    xf = x.astype(jnp.float32)
    if approximate:
        y = 0.5 * xf * (1.0 + jnp.tanh(_TANH_C * (xf + 0.044715 * xf ** 3)))
    else:
        y = 0.5 * xf * (1.0 + erf(xf * _SQRT_HALF))
    return y.astype(x.dtype), x


def _gelu_bwd(approximate, x, dy):
    xf = x.astype(jnp.float32)
    if approximate:
        t = jnp.tanh(_TANH_C * (xf + 0.044715 * xf ** 3))
        d = 0.5 * (1.0 + t) + 0.5 * xf * (1.0 - t * t) * _TANH_C * (1.0 + 3 * 0.044715 * xf * xf)
    else:
        d = 0.5 * (1.0 + erf(xf * _SQRT_HALF)) + xf * _INV_SQRT_2PI * jnp.exp(-0.5 * xf * xf)
    return ((dy.astype(jnp.float32) * d).astype(x.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


class LayerNorm(nn.Module):
    """``flax.linen.LayerNorm`` over the last axis (same params), with :func:`layer_norm`'s backward."""

    epsilon: float = 1e-6
    dtype: Any = None          # output dtype; None: the input's
    param_dtype: Any = jnp.float32
    use_bias: bool = True      # False: no ``bias`` param (ModernBERT's norms)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), self.param_dtype)
        bias = (self.param("bias", nn.initializers.zeros, (features,), self.param_dtype) if self.use_bias
                else jnp.zeros((features,), self.param_dtype))
        out_dtype = jnp.dtype(self.dtype) if self.dtype is not None else x.dtype
        return layer_norm(x, scale, bias, self.epsilon, out_dtype)
