"""LayerNorm and GELU with hand-written backward passes against Flax's LayerNorm and jax.nn.gelu
differentiated by JAX (values, input and param gradients), and what they keep for the backward."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals

from jaxpeft.models.kernels import lean_ops

TOL = {jnp.float32: dict(rtol=2e-5, atol=2e-5), jnp.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _inputs(dtype, shape=(3, 5, 48)):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x = (2.0 * jax.random.normal(k1, shape) + 0.5).astype(dtype)
    dy = jax.random.normal(k2, shape).astype(dtype)
    return x, dy, k3


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_layer_norm_matches_flax(dtype):
    x, dy, k = _inputs(dtype)
    ref = nn.LayerNorm(epsilon=1e-12, dtype=dtype, param_dtype=jnp.float32)
    ours = lean_ops.LayerNorm(epsilon=1e-12, dtype=dtype, param_dtype=jnp.float32)
    params = ref.init(k, x)
    assert jax.tree.structure(params) == jax.tree.structure(ours.init(k, x))
    ka, kb = jax.random.split(k)   # non-trivial scale and bias
    params = {"params": {"scale": 1 + 0.3 * jax.random.normal(ka, (48,)),
                         "bias": 0.2 * jax.random.normal(kb, (48,))}}
    y0, vjp0 = jax.vjp(lambda p, x: ref.apply(p, x), params, x)
    y1, vjp1 = jax.vjp(lambda p, x: ours.apply(p, x), params, x)
    assert y1.dtype == y0.dtype == dtype
    np.testing.assert_allclose(np.asarray(y1, np.float32), np.asarray(y0, np.float32), **TOL[dtype])
    (gp0, gx0), (gp1, gx1) = vjp0(dy), vjp1(dy)
    assert gx1.dtype == dtype
    np.testing.assert_allclose(np.asarray(gx1, np.float32), np.asarray(gx0, np.float32), **TOL[dtype])
    for name in ("scale", "bias"):   # summed over 15 rows: compare relative to their size
        a, b = np.asarray(gp0["params"][name]), np.asarray(gp1["params"][name])
        np.testing.assert_allclose(b, a, rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] * 15)


@pytest.mark.parametrize("approximate", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gelu_matches_jax(approximate, dtype):
    x, dy, _ = _inputs(dtype)
    y0, vjp0 = jax.vjp(lambda x: jax.nn.gelu(x.astype(jnp.float32), approximate=approximate), x)
    y1, vjp1 = jax.vjp(lambda x: lean_ops.gelu(x, approximate), x)
    assert y1.dtype == dtype
    np.testing.assert_allclose(np.asarray(y1, np.float32), np.asarray(y0), **TOL[dtype])
    (g0,), (g1,) = vjp0(dy.astype(jnp.float32)), vjp1(dy)
    np.testing.assert_allclose(np.asarray(g1, np.float32), np.asarray(g0), **TOL[dtype])


def test_gelu_derivative_at_known_points():
    """d/dx GELU(x) = Phi(x) + x phi(x): 0.5 at 0, Phi(1) + phi(1) at 1 (exact form)."""
    g = jax.grad(lambda x: lean_ops.gelu(x, False))
    np.testing.assert_allclose(g(jnp.float32(0.0)), 0.5, rtol=1e-6)
    np.testing.assert_allclose(g(jnp.float32(1.0)), 0.8413447 + 0.2419707, rtol=1e-5)


def test_backward_keeps_only_the_compute_dtype_input():
    """Under bf16 the residuals are the bf16 input plus per-row float32 statistics: no float32
    tensor of the input's full size (Flax's LayerNorm keeps three)."""
    x, _, k = _inputs(jnp.bfloat16, (4, 16, 64))

    def big_f32(f, p):
        res = saved_residuals(lambda x: f(p, x).astype(jnp.float32).sum(), x)
        return [a for a, _ in res if a.dtype == jnp.float32 and a.size >= x.size]

    flax_ln = nn.LayerNorm(dtype=jnp.bfloat16)
    lean_ln = lean_ops.LayerNorm(dtype=jnp.bfloat16)
    assert big_f32(flax_ln.apply, flax_ln.init(k, x))            # the reference keeps some
    assert not big_f32(lean_ln.apply, lean_ln.init(k, x))
    res = saved_residuals(lambda x: lean_ops.gelu(x, False).astype(jnp.float32).sum(), x)
    assert [(a.shape, a.dtype) for a, _ in res if a.size >= x.size] == [(x.shape, jnp.bfloat16)]
