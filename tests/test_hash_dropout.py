"""Hashed dropout masks (jaxpeft.models.kernels.hash_dropout): the rate, the scale, independence of the
mask across positions and seeds (binomial and chi-square tests from scipy), a backward pass that
recomputes the forward's mask and keeps nothing the size of the input, the same mask on a sharded
array, and the model with hashed masks against the same model differentiated by autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals
from scipy import stats

import cpu_devices

from jaxpeft.compute import EXACT
from jaxpeft.errors import UserError
from jaxpeft.models.kernels import hash_dropout as hd
from jaxpeft.models.bert import BertConfig
from jaxpeft.models.loading import init_params

from model_helpers import classifier

SHAPE = (32, 128, 96)   # 393,216 elements
SEED = jnp.array([0x1234567, 0x89ABCDE], jnp.uint32)


def _keep(seed, rate, shape=SHAPE):
    return np.asarray(hd.keep_mask(seed, shape, rate))


def _z(p_hat, p, n):
    return (p_hat - p) / np.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("rate", [0.1, 0.25, 0.5, 0.9])
def test_rate_and_scale(rate):
    x = jnp.full(SHAPE, 3.0, jnp.float32)
    y = np.asarray(hd.hash_dropout(x, SEED, rate))
    keep = hd.keep_prob(rate)
    assert abs(keep - (1 - rate)) <= 2 ** -17      # 16-bit threshold, rounded
    assert abs(_z((y != 0).mean(), keep, y.size)) < 5
    np.testing.assert_allclose(y[y != 0], 3.0 / keep, rtol=1e-6)   # inverted dropout
    assert np.array_equal(y != 0, _keep(SEED, rate))


def test_rate_edges_and_module():
    x = jnp.ones((4, 8), jnp.float32)
    m = hd.HashDropout(0.1)
    assert m.apply({}, x, deterministic=True) is x
    assert hd.HashDropout(0.0).apply({}, x, deterministic=False) is x
    assert not np.asarray(hd.HashDropout(1.0).apply({}, x, deterministic=False)).any()
    a = m.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
    b = m.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
    c = m.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(2)})
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_masks_are_independent_across_positions_and_seeds():
    rate = 0.5
    k = _keep(SEED, rate).astype(np.float64)
    flat = k.reshape(-1)
    # neighbours along each axis and in flat order: no correlation
    for a, b in [(flat[:-1], flat[1:]), (k[:, :, :-1], k[:, :, 1:]), (k[:, :-1], k[:, 1:]), (k[:-1], k[1:])]:
        r = np.corrcoef(a.reshape(-1), b.reshape(-1))[0, 1]
        assert abs(r) * np.sqrt(a.size) < 5, r
    # the two rows that share each hash word (low and high 16 bits) are unrelated
    a, b = k[:, 0::2], k[:, 1::2]
    r = np.corrcoef(a.reshape(-1), b.reshape(-1))[0, 1]
    assert abs(r) * np.sqrt(a.size) < 5, r
    # another seed (either word changed) gives an unrelated mask
    for other in ([0x1234568, 0x89ABCDE], [0x1234567, 0x89ABCDF], [0, 0]):
        k2 = _keep(jnp.array(other, jnp.uint32), rate).reshape(-1).astype(np.float64)
        r = np.corrcoef(flat, k2)[0, 1]
        assert abs(r) * np.sqrt(flat.size) < 5, (other, r)
    # keep rates per feature column and per row are homogeneous
    for counts in (k.reshape(-1, SHAPE[-1]).sum(0), k.reshape(-1, SHAPE[-1]).sum(1)):
        assert stats.chisquare(counts).pvalue > 1e-4
    # the hash's top byte is uniform
    h = np.asarray(hd.element_hash(SEED, SHAPE)).reshape(-1) >> 24
    assert stats.chisquare(np.bincount(h, minlength=256)).pvalue > 1e-4


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_backward_recomputes_the_mask_and_keeps_only_the_seed(dtype):
    kx, kg = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, SHAPE).astype(dtype)
    g = jax.random.normal(kg, SHAPE).astype(dtype)
    y, vjp = jax.vjp(lambda x: hd.hash_dropout(x, SEED, 0.1), x)
    (dx,) = vjp(g)
    # the reference: the same mask as a constant, differentiated by JAX
    keep = jnp.asarray(_keep(SEED, 0.1))
    scale = 1.0 / hd.keep_prob(0.1)
    ref = lambda x: jnp.where(keep, x.astype(jnp.float32) * scale, 0.0).astype(x.dtype)  # noqa: E731
    y0, vjp0 = jax.vjp(ref, x)
    assert y.dtype == dx.dtype == dtype
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y0, np.float32))
    np.testing.assert_array_equal(np.asarray(dx, np.float32), np.asarray(vjp0(g)[0], np.float32))
    # what the forward pass keeps for the backward: the 2 seed words, nothing of x's size
    res = saved_residuals(lambda x: hd.hash_dropout(x, SEED, 0.1).astype(jnp.float32).sum(), x)
    assert all(np.prod(r[0].shape) <= 2 for r in res), res
    # the seed gets no gradient and jit / grad compose
    gx = jax.jit(jax.grad(lambda x, s: hd.hash_dropout(x, s, 0.1).astype(jnp.float32).sum()))(x, SEED)
    np.testing.assert_array_equal(np.asarray(gx, np.float32) != 0, _keep(SEED, 0.1))


def test_same_mask_when_the_array_is_sharded():
    """4 CPU devices, batch sharded over them: the mask is that of the whole array."""
    code = """
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from jaxpeft.models.kernels import hash_dropout as hd
        assert jax.device_count() == 4
        x = jnp.arange(8 * 16 * 24, dtype=jnp.float32).reshape(8, 16, 24) + 1
        seed = jnp.array([7, 11], jnp.uint32)
        f = jax.jit(lambda x, s: hd.hash_dropout(x, s, 0.3))
        one = np.asarray(f(x, seed))
        mesh = Mesh(np.array(jax.devices()), ("data",))
        xs = jax.device_put(x, NamedSharding(mesh, P("data")))
        many = f(xs, seed)
        assert len(many.sharding.device_set) == 4
        np.testing.assert_array_equal(np.asarray(many), one)
        print("same")
    """
    cpu_devices.run(code)


SMALL = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                   vocab_size=120, max_position_embeddings=64)


def test_model_with_hashed_masks(monkeypatch):
    """Deterministic: identical to the default model. Training mode: the gradient equals JAX's
    autodiff of the same forward pass with the custom backward swapped for plain ``jnp.where``."""
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 120, size=(4, 16)), jnp.int32)
    ones = jnp.ones_like(ids)
    model0 = classifier(SMALL, 2, compute=EXACT.replace(dropout_impl="random"))
    model = classifier(SMALL, 2, compute=EXACT.replace(dropout_impl="hash"))
    params = init_params(model0, jax.random.key(0))

    def loss(p, m, det):
        logits = m.apply({"params": p}, ids, ones, jnp.zeros_like(ids), deterministic=det,
                         rngs=None if det else {"dropout": jax.random.key(5)})
        return jnp.sum(logits ** 2)

    np.testing.assert_array_equal(loss(params, model, True), loss(params, model0, True))
    l1, g1 = jax.value_and_grad(loss)(params, model, False)
    assert abs(float(l1) - float(loss(params, model, True))) > 1e-6   # dropout is on
    # the same masks without the custom backward: autodiff of jnp.where
    monkeypatch.setattr(hd, "hash_dropout", hd._apply)
    l2, g2 = jax.value_and_grad(loss)(params, model, False)
    np.testing.assert_allclose(l2, l1, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_bad_dropout_impl():
    with pytest.raises(UserError, match="--dropout_impl=fast: choose one of hash, random"):
        EXACT.replace(dropout_impl="fast")
