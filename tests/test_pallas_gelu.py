"""The feed-forward bias + GELU kernels (jaxpeft.models.pallas_gelu), run by Pallas's interpreter on
the CPU, against the unfused layers (the biased matmul's add and lean_ops.gelu, itself tested
against jax.nn.gelu): outputs and gradients, exact and tanh GELU, bf16; erf against jax.lax.erf;
the batch sharded over four CPU devices. The whole model with the kernels against the model
without, in the train loss: tests/test_compute_options.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cpu_devices

from jaxpeft.models import lean_ops
from jaxpeft.models import pallas_gelu as pg
from jaxpeft.models import pallas_norm as pn
from jaxpeft.models.bert import BertConfig

SMALL = pn.Tuning(block_rows=4, num_warps=4, block_rows_bwd=2, rows_bwd=4, num_warps_bwd=4)


def test_erf_is_within_a_few_float32_ulps_of_jax():
    x = jnp.linspace(-7.0, 7.0, 40001, dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(pg.erf(x)), np.asarray(jax.lax.erf(x)), atol=1e-6, rtol=0)


@pytest.mark.parametrize("b,t,n,approximate", [
    (2, 8, 32, False),
    (3, 10, 40, False),      # rows and columns not multiples of the blocks
    (2, 6, 24, True),
])
def test_matches_the_unfused_layers(b, t, n, approximate):
    r = np.random.default_rng(n)
    x = jnp.asarray(2 * r.normal(size=(b, t, n)), jnp.float32)
    bias = jnp.asarray(r.normal(size=n), jnp.float32)
    dy = jnp.asarray(r.normal(size=(b, t, n)), jnp.float32)
    ours = lambda x, bb: pg.bias_gelu(x, bb, approximate=approximate, tuning=SMALL)   # noqa: E731
    theirs = lambda x, bb: lean_ops.gelu(x + bb, approximate)                          # noqa: E731
    np.testing.assert_allclose(np.asarray(ours(x, bias)), np.asarray(theirs(x, bias)), atol=2e-6)
    g = jax.grad(lambda x, bb: jnp.sum(ours(x, bb) * dy), (0, 1))(x, bias)
    w = jax.grad(lambda x, bb: jnp.sum(theirs(x, bb) * dy), (0, 1))(x, bias)
    for a, c in zip(g, w):
        assert a.shape == c.shape and a.dtype == c.dtype
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=2e-5, rtol=1e-5)
    # the bias gradient is the sum of the input gradient over the batch and the sequence
    np.testing.assert_allclose(np.asarray(g[1]), np.asarray(g[0]).sum((0, 1)), atol=2e-5)


def test_bfloat16_and_what_the_backward_pass_keeps():
    from jax._src.ad_checkpoint import saved_residuals

    r = np.random.default_rng(1)
    x = jnp.asarray(2 * r.normal(size=(2, 16, 64)), jnp.bfloat16)
    bias = jnp.asarray(r.normal(size=64), jnp.float32)
    got = np.asarray(pg.bias_gelu(x, bias, tuning=SMALL), np.float32)
    want = np.asarray(lean_ops.gelu(x + bias.astype(jnp.bfloat16), False), np.float32)
    assert np.abs(got - want).max() <= 2 ** -7 * np.abs(want).max() and (got == want).mean() > 0.95
    res = saved_residuals(lambda x: jnp.sum(pg.bias_gelu(x, bias, tuning=SMALL)), x)
    shapes = [tuple(a[0].shape) for a in res]
    assert shapes.count((2, 16, 64)) == 1, shapes      # only the matmul's output
    with pytest.raises(ValueError, match="bias_gelu wants"):
        pg.bias_gelu(x, bias[:8])
    with pytest.raises(ValueError, match="computes GELU"):
        BertConfig(activation_impl="pallas", hidden_act="relu")


def test_batch_sharded_over_four_devices_gives_the_same_gradients():
    code = """
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import NamedSharding, PartitionSpec as P
        from jaxpeft.models import pallas_gelu as pg, pallas_norm as pn
        mesh = jax.make_mesh((2, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
        r = np.random.default_rng(0)
        x, dy = (jnp.asarray(r.normal(size=(8, 4, 24)), jnp.float32) for _ in range(2))
        bias = jnp.asarray(r.normal(size=24), jnp.float32)
        tun = pn.Tuning(2, 4, 2, 4, 4)
        g = jax.jit(jax.value_and_grad(lambda x, b, d: jnp.sum(pg.bias_gelu(x, b, tuning=tun) * d), (0, 1)))
        want = g(x, bias, dy)
        rows, rep = NamedSharding(mesh, P(("data", "fsdp"))), NamedSharding(mesh, P())
        args = (jax.device_put(x, rows), jax.device_put(bias, rep), jax.device_put(dy, rows))
        assert "all-gather" not in g.lower(*args).compile().as_text(), "gathered"
        got = g(*args)
        err = rel_err(got, want)
        assert err < 2e-5, err
        print("same", err)
    """
    cpu_devices.run(code)
