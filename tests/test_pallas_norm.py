"""The fused sublayer output (jaxpeft.models.kernels.pallas_norm), run by Pallas's interpreter on the CPU,
against the unfused layers it replaces (nn.Dense's bias add, hash_dropout, lean_ops.layer_norm,
which are themselves tested against Flax's LayerNorm and autodiff): same dropout mask, outputs and
every gradient; the whole model with it against the model without; the same result with the
batch sharded over four CPU devices; clear errors for bad arguments."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cpu_devices

from jaxpeft.models.kernels import hash_dropout
from jaxpeft.models.kernels import pallas_norm as pn
from jaxpeft.compute import EXACT
from jaxpeft.models.kernels import pallas_common
from jaxpeft.models.bert import BertConfig

from model_helpers import classifier

# blocks of two rows, as the default: each hash word once for its pair of rows
SMALL = pn.Tuning(block_rows=2, num_warps=4, block_rows_bwd=2, rows_bwd=8, num_warps_bwd=4)


@pytest.fixture(autouse=True)
def _interpreted():
    """The kernels run in Pallas's interpreter on the CPU (refused outside tests)."""
    with pallas_common.interpreter():
        yield


def _case(b, t, n, dtype=jnp.float32, seed=0):
    r = np.random.default_rng(seed)
    arr = lambda *shape, s=1.0: jnp.asarray(s * r.normal(size=shape), dtype)   # noqa: E731
    h, res = arr(b, t, n), arr(b, t, n)
    bias = jnp.asarray(0.3 * r.normal(size=n), jnp.float32)
    scale = jnp.asarray(1 + 0.2 * r.normal(size=n), jnp.float32)
    lnb = jnp.asarray(0.2 * r.normal(size=n), jnp.float32)
    douts = (arr(b, t, n), arr(b, t, n))
    words = jnp.asarray(r.integers(0, 2 ** 32, size=2, dtype=np.uint64).astype(np.uint32))
    return h, bias, res, scale, lnb, words, douts


def _loss(fn, douts):
    def loss(h, bias, res, scale, lnb):
        ya, yb = fn(h, bias, res, scale, lnb)
        return jnp.sum(ya.astype(jnp.float32) * douts[0]) + jnp.sum(yb.astype(jnp.float32) * douts[1])
    return loss


@pytest.mark.parametrize("b,t,n,rate", [
    (2, 16, 32, 0.1),    # rows a multiple of every block
    (3, 12, 40, 0.3),    # hidden size not a power of two, rows not a multiple of the blocks
    (2, 8, 24, 0.0),     # no dropout
    (2, 7, 96, 0.1),     # odd rows per sequence: blocks of two rows are not pairs of hash words
])
def test_matches_the_unfused_layers(b, t, n, rate):
    h, bias, res, scale, lnb, words, douts = _case(b, t, n)
    seed = words if rate else None
    ours = lambda *a: pn.dropout_add_norm(*a, seed, rate=rate, eps=1e-12, tuning=SMALL)   # noqa: E731

    def theirs(*a):
        y = pn.reference(*a, seed, rate=rate, eps=1e-12)
        return y, y

    got, want = ours(h, bias, res, scale, lnb), theirs(h, bias, res, scale, lnb)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(got[1]))
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), atol=2e-5, rtol=1e-5)
    args = (h, bias, res, scale, lnb)
    g = jax.grad(_loss(ours, douts), argnums=tuple(range(5)))(*args)
    w = jax.grad(_loss(theirs, douts), argnums=tuple(range(5)))(*args)
    for name, a, c in zip(("h", "bias", "residual", "scale", "ln_bias"), g, w):
        assert a.shape == c.shape and a.dtype == c.dtype, name
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=5e-5, rtol=1e-5, err_msg=name)
    if rate:
        # the same elements are dropped: their projection gradient is exactly zero, and only theirs
        dropped = ~np.asarray(hash_dropout.keep_mask(words, (b, t, n), rate))
        assert dropped.any() and (np.asarray(g[0])[dropped] == 0).all()
        assert (np.asarray(g[0])[~dropped] != 0).all()


def test_bfloat16_matches_the_unfused_layers_in_bfloat16():
    h, bias, res, scale, lnb, words, douts = _case(2, 16, 64, jnp.bfloat16, seed=3)
    got = pn.dropout_add_norm(h, bias, res, scale, lnb, words, rate=0.1, eps=1e-12, tuning=SMALL)[0]
    want = pn.reference(h, bias, res, scale, lnb, words, rate=0.1, eps=1e-12)
    assert got.dtype == jnp.bfloat16
    diff = np.abs(np.asarray(got, np.float32) - np.asarray(want, np.float32))
    assert diff.max() <= 2 ** -6 * np.abs(np.asarray(want, np.float32)).max(), diff.max()   # one bf16 ulp
    assert (diff == 0).mean() > 0.95


def test_block_sizes_do_not_change_the_result():
    h, bias, res, scale, lnb, words, douts = _case(2, 32, 48, seed=4)
    results = []
    # row blocks (two rows: each hash word once for a pair of rows; more: once per element), and
    # the backward loop pipelined
    for tuning in (SMALL, pn.Tuning(8, 4, 2, 16, 4), pn.Tuning(32, 4, 16, 32, 4), pn.Tuning(4, 4, 2, 8, 4, 2)):
        fn = lambda *a, tuning=tuning: pn.dropout_add_norm(*a, words, rate=0.2, eps=1e-6, tuning=tuning)  # noqa: E731
        results.append((fn(h, bias, res, scale, lnb)[0],
                        jax.grad(_loss(fn, douts), argnums=tuple(range(5)))(h, bias, res, scale, lnb)))
    for out, grads in results[1:]:
        np.testing.assert_allclose(np.asarray(out), np.asarray(results[0][0]), atol=1e-6)
        for a, c in zip(grads, results[0][1]):
            np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=2e-5, rtol=1e-5)


def test_bad_arguments_are_named():
    h, bias, res, scale, lnb, words, _ = _case(1, 4, 8)
    with pytest.raises(ValueError, match="needs a seed"):
        pn.dropout_add_norm(h, bias, res, scale, lnb, None, rate=0.1, eps=1e-12)
    with pytest.raises(ValueError, match=r"bias must be \[8\]"):
        pn.dropout_add_norm(h, bias[:4], res, scale, lnb, words, rate=0.1, eps=1e-12)
    with pytest.raises(ValueError, match="same"):
        pn.dropout_add_norm(h, bias, res[:, :2], scale, lnb, words, rate=0.1, eps=1e-12)
    with pytest.raises(ValueError, match=r"dropout rate must be in \[0, 1\)"):
        pn.dropout_add_norm(h, bias, res, scale, lnb, words, rate=1.0, eps=1e-12)


def test_model_with_the_fused_output_equals_the_model_without():
    """A small BERT with dropout: same logits and parameter gradients with norm_impl='pallas' as
    with the unfused layers (the same hash masks: the seeds come from the same RNG stream names)."""
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.0)
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 50, size=(3, 12)))
    mask = jnp.asarray(np.arange(12)[None] < np.array([[12], [7], [9]]))
    params = classifier(cfg, 2).init(jax.random.key(0), ids)["params"]
    results = {}
    for impl in ("xla", "pallas"):
        model = classifier(cfg, 2, compute=EXACT.replace(norm_impl=impl))

        def loss(p, model=model):
            logits = model.apply({"params": p}, ids, mask, deterministic=False,
                                 rngs={"dropout": jax.random.key(7)})
            return jnp.sum(jax.nn.log_softmax(logits)[:, 0]), logits
        results[impl] = jax.grad(loss, has_aux=True)(params)
    np.testing.assert_allclose(np.asarray(results["pallas"][1]), np.asarray(results["xla"][1]), atol=1e-5)
    flat = dict(jax.tree_util.tree_leaves_with_path(results["xla"][0]))
    for path, g in jax.tree_util.tree_leaves_with_path(results["pallas"][0]):
        np.testing.assert_allclose(np.asarray(g), np.asarray(flat[path]), atol=2e-5,
                                   err_msg=jax.tree_util.keystr(path))
    out = flat[next(p for p in flat if "output" in jax.tree_util.keystr(p) and "LayerNorm" in jax.tree_util.keystr(p))]
    assert np.abs(np.asarray(out)).max() > 0


def test_batch_sharded_over_four_devices_gives_the_unsharded_mask_and_gradients():
    code = """
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import NamedSharding, PartitionSpec as P
        from jaxpeft.models.kernels import pallas_norm as pn
        mesh = jax.make_mesh((2, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
        r = np.random.default_rng(0)
        b, t, n = 8, 8, 24
        h, res, da, db = (jnp.asarray(r.normal(size=(b, t, n)), jnp.float32) for _ in range(4))
        vec = lambda: jnp.asarray(r.normal(size=n), jnp.float32)
        bias, scale, lnb = vec(), vec(), vec()
        words = jnp.asarray([123456789, 3987654321], jnp.uint32)
        tun = pn.Tuning(4, 4, 4, 8, 4)
        def loss(h, res, bias, scale, lnb, da, db):
            ya, yb = pn.dropout_add_norm(h, bias, res, scale, lnb, words, rate=0.25, eps=1e-12, tuning=tun)
            return jnp.sum(ya * da) + jnp.sum(yb * db)
        g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))
        want = g(h, res, bias, scale, lnb, da, db)
        rows, rep = NamedSharding(mesh, P(("data", "fsdp"))), NamedSharding(mesh, P())
        args = [jax.device_put(x, rows) for x in (h, res)] + [jax.device_put(x, rep) for x in (bias, scale, lnb)] \\
            + [jax.device_put(x, rows) for x in (da, db)]
        hlo = g.lower(*args).compile().as_text()
        assert "all-gather" not in hlo, "gathered"
        got = g(*args)
        assert got[1][0].sharding.spec[0] == ("data", "fsdp"), got[1][0].sharding
        err = rel_err(got, want)
        assert err < 2e-5, err
        print("same", err)
    """
    cpu_devices.run(code)
