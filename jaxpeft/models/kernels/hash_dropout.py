"""Dropout whose mask is a keyed hash of each element's position, fused into the kernels that use it.

``flax.linen.Dropout`` draws a random array the size of its input (``jax.random.bits``: one
kernel that writes it), compares it in a second kernel, and autodiff keeps the boolean mask for the
backward pass, which reads it again. Here the mask comes from a 32-bit integer hash of the
position: ``mix(mix(i ^ seed0) + seed1)``, where ``mix`` is "lowbias32" by C. Wellons (a bijection)
and ``seed0, seed1`` are 32 random bits each drawn per call from the ``dropout`` RNG stream. One
hash word serves two elements: seen as rows of its last axis (``n`` wide), element ``(r, j)`` of
the array uses word ``(r // 2) * n + j``, its low 16 bits in even rows and its high 16 bits in odd
rows. A kernel that handles two rows at a time (``pallas_norm``) hashes once per column for both.

The hash is a handful of integer operations on an iota, so XLA fuses it into the kernel that
applies the mask: no random array is written and read back. The backward pass
(``jax.custom_vjp``) needs only the two seed words and hashes again. XLA may still find the
backward's hash equal to the forward's and keep the boolean mask instead (one byte per element); in
the BERT-base step on GPU it does. Forcing the second hash (an ``optimization_barrier`` on the
seed in the backward pass) measured 2% slower there and saved only 1% of the step's memory.

The rate is exact to 2**-16 (``threshold = round(rate * 2**16)``: 0.1 drops 6,554 of 65,536), kept
elements are scaled by ``1 / keep_prob`` in float32 before the cast back, and the mask depends only
on the seed and the element's position in the (global) array, so a sharded array gets the same mask
as an unsharded one. Masks of arrays with 2**33 elements or more repeat.
"""

from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def _mix(h: Array) -> Array:
    """lowbias32: a bijective avalanche hash on uint32."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x7FEB352D)
    h = h ^ (h >> 15)
    h = h * jnp.uint32(0x846CA68B)
    return h ^ (h >> 16)


def _threshold(rate: float) -> int:
    """The 16-bit threshold: an element is kept when its 16 random bits are at least this."""
    return min(int(round(rate * 2 ** 16)), 2 ** 16 - 1)


def keep_prob(rate: float) -> float:
    """The exact probability that an element is kept for ``rate`` (``1 - rate`` to within 2**-16)."""
    return 1.0 - _threshold(rate) / 2 ** 16


def element_hash(seed: Array, shape: tuple[int, ...]) -> Array:
    """The uint32 hash of every position of an array of ``shape`` under ``seed`` (2 uint32 words)."""
    idx = jnp.zeros(shape, jnp.uint32)
    for d, n in enumerate(shape):  # row-major flat index, modulo 2**32
        idx = idx * jnp.uint32(n) + jax.lax.broadcasted_iota(jnp.uint32, shape, d)
    return _mix(_mix(idx ^ seed[0]) + seed[1])


def element_bits(seed: Array, shape: tuple[int, ...]) -> Array:
    """Each element's 16 random bits (uint32 in ``[0, 2**16)``): the low (even rows) or high (odd
    rows) half of the word its pair of rows shares (module docstring)."""
    shape = tuple(shape) or (1,)
    row = jnp.zeros(shape, jnp.uint32)
    for d, n in enumerate(shape[:-1]):  # row-major flat row index, modulo 2**32
        row = row * jnp.uint32(n) + jax.lax.broadcasted_iota(jnp.uint32, shape, d)
    col = jax.lax.broadcasted_iota(jnp.uint32, shape, len(shape) - 1)
    idx = (row >> 1) * jnp.uint32(shape[-1]) + col
    words = _mix(_mix(idx ^ seed[0]) + seed[1])
    return (words >> ((row & 1) * 16)) & jnp.uint32(0xFFFF)


def keep_mask(seed: Array, shape: tuple[int, ...], rate: float) -> Array:
    """Which elements ``hash_dropout(x, seed, rate)`` keeps, for ``x`` of ``shape``."""
    return (element_bits(seed, shape) >= jnp.uint32(_threshold(rate))).reshape(shape)


def _apply(x: Array, seed: Array, rate: float) -> Array:
    scale = jnp.float32(1.0 / keep_prob(rate))
    return jnp.where(keep_mask(seed, x.shape, rate), x.astype(jnp.float32) * scale, 0.0).astype(x.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def hash_dropout(x: Array, seed: Array, rate: float) -> Array:
    """Inverted dropout of ``x`` with the mask :func:`keep_mask` (``seed``: 2 uint32 words)."""
    return _apply(x, seed, rate)


def _fwd(x, seed, rate):
    return _apply(x, seed, rate), seed


def _bwd(rate, seed, g):
    return _apply(g, seed, rate), np.zeros(seed.shape, dtype=jax.dtypes.float0)


hash_dropout.defvjp(_fwd, _bwd)


class HashDropoutSeed(nn.Module):
    """The two seed words :class:`HashDropout` draws, for kernels that apply the mask themselves
    (a module of the same name in the same place draws the same words)."""

    rng_collection: str = "dropout"

    @nn.compact
    def __call__(self) -> Array:
        return jax.random.bits(self.make_rng(self.rng_collection), (2,), jnp.uint32)


class HashDropout(nn.Module):
    """Drop-in for ``flax.linen.Dropout`` (same ``rate``, ``deterministic`` and ``dropout`` RNG
    stream) whose mask is :func:`keep_mask` of two seed words drawn from that stream."""

    rate: float
    rng_collection: str = "dropout"

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        if deterministic or self.rate == 0.0:
            return x
        if self.rate >= 1.0:
            return jnp.zeros_like(x)
        seed = jax.random.bits(self.make_rng(self.rng_collection), (2,), jnp.uint32)
        return hash_dropout(x, seed, self.rate)
