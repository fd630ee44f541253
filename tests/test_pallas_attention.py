"""Our short-sequence attention kernel (jaxpeft.models.kernels.pallas_attention), run by Pallas's interpreter
on the CPU, against JAX's own ``jax.nn.dot_product_attention`` (XLA implementation, a second code
path): outputs and gradients with padding masks, lengths that are not powers of two, shared and
per-row prefixes with masked prefix keys, bf16; the whole model against the dense-attention model;
and clear errors for shapes the kernel does not take."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cpu_devices

from jaxpeft.models.kernels import pallas_attention as pa
from jaxpeft.compute import EXACT
from jaxpeft.models.kernels import pallas_common
from jaxpeft.models.bert import BertConfig, check_compute
from jaxpeft.models.loading import load_classifier

from model_helpers import classifier

SMALL = pa.Tuning(block_q=8, num_warps=4, block_q_bwd=8, num_warps_bwd=4)


@pytest.fixture(autouse=True)
def _interpreted():
    """The kernels run in Pallas's interpreter on the CPU (refused outside tests)."""
    with pallas_common.interpreter():
        yield


def _xla_attention(qkv, valid, prefix=None, prefix_valid=None, dtype=jnp.float32):
    """The same attention through jax.nn.dot_product_attention (prefix keys concatenated in front),
    computed in ``dtype``."""
    b, t = qkv.shape[:2]
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    mask = valid
    if prefix is not None:
        pk, pv = (jnp.broadcast_to(x, (b,) + x.shape[1:]) for x in prefix)
        k, v = jnp.concatenate([pk, k], 1), jnp.concatenate([pv, v], 1)
        mask = jnp.concatenate([prefix_valid, valid], 1)
    qkv_ = [x.astype(dtype) for x in (q, k, v)]
    return jax.nn.dot_product_attention(*qkv_, mask=mask[:, None, None, :], implementation="xla")


def _case(b, t, n, d, p=0, batched=False, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    qkv = jnp.asarray(rng.normal(size=(b, t, 3, n, d)), dtype)
    lengths = rng.integers(1, t + 1, size=b)
    lengths[0] = t
    valid = jnp.asarray(np.arange(t)[None] < lengths[:, None])
    prefix = prefix_valid = None
    if p:
        pb = b if batched else 1
        prefix = tuple(jnp.asarray(rng.normal(size=(pb, p, n, d)), dtype) for _ in range(2))
        pv = rng.random((b, p)) > 0.3
        pv[:, 0] = True
        prefix_valid = jnp.asarray(pv)
    dout = jnp.asarray(rng.normal(size=(b, t, n, d)), jnp.float32)
    return qkv, valid, prefix, prefix_valid, dout


def _grads(fn, qkv, prefix, dout):
    loss = lambda x, pr: jnp.sum(fn(x, pr).astype(jnp.float32) * dout)
    return jax.grad(loss, argnums=(0, 1))(qkv, prefix)


@pytest.mark.parametrize("b,t,n,d,p,batched", [
    (3, 16, 2, 16, 0, False),    # padding masks
    (2, 20, 2, 16, 0, False),    # a length that is not a power of two
    (3, 16, 2, 16, 5, False),    # a prefix shared by the batch, some prefix keys masked
    (2, 12, 3, 32, 20, True),    # a prefix per row, longer than the sequence
    (3, 40, 2, 16, 0, False),    # a main segment and a tail: 32 + 16 keys, 8 of them padding
    (2, 48, 2, 16, 5, True),     # main and tail segments both full, with a prefix per row
])
def test_matches_jax_attention_forward_and_backward(b, t, n, d, p, batched):
    qkv, valid, prefix, pvalid, dout = _case(b, t, n, d, p, batched)
    got = pa.attention(qkv, valid, prefix, pvalid, tuning=SMALL)
    want = _xla_attention(qkv, valid, prefix, pvalid)
    assert got.shape == (b, t, n, d) and got.dtype == qkv.dtype
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6, rtol=1e-5)
    g = _grads(lambda x, pr: pa.attention(x, valid, pr, pvalid, tuning=SMALL), qkv, prefix, dout)
    w = _grads(lambda x, pr: _xla_attention(x, valid, pr, pvalid), qkv, prefix, dout)
    assert g[0].shape == qkv.shape
    for a, c in zip(jax.tree.leaves(g), jax.tree.leaves(w)):
        assert a.shape == c.shape
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=1e-5, rtol=1e-4)
    # masked keys get no gradient: not attended to, nothing flows back into them
    keys_grad = np.asarray(g[0])[:, :, 1:]                       # dk, dv
    assert not keys_grad[~np.asarray(valid)].any()
    if p:
        assert np.abs(np.asarray(g[1][0])).max() > 0


@pytest.mark.parametrize("b,t,n,d,p", [
    (3, 16, 2, 16, 0),     # padding masks
    (2, 20, 2, 16, 0),     # padded to 32 inside the kernel: the bias must not reach padded rows
    (2, 12, 3, 32, 5),     # with a prefix (which has no projection bias)
])
def test_projection_bias_added_inside_the_kernel_and_its_gradient(b, t, n, d, p):
    qkv, valid, prefix, pvalid, dout = _case(b, t, n, d, p, seed=1)
    bias = jnp.asarray(np.random.default_rng(2).normal(size=(3, n, d)), jnp.float32)

    def loss(fn):
        return lambda x, bb, pr: jnp.sum(fn(x, bb, pr) * dout)

    ours = lambda x, bb, pr: pa.attention(x, valid, pr, pvalid, bias=bb, tuning=SMALL)
    xla = lambda x, bb, pr: _xla_attention(x + bb, valid, pr, pvalid)
    np.testing.assert_allclose(np.asarray(ours(qkv, bias, prefix)), np.asarray(xla(qkv, bias, prefix)),
                               atol=2e-6, rtol=1e-5)
    g = jax.grad(loss(ours), argnums=(0, 1, 2))(qkv, bias, prefix)
    w = jax.grad(loss(xla), argnums=(0, 1, 2))(qkv, bias, prefix)
    assert g[1].shape == (3, n, d)
    for a, c in zip(jax.tree.leaves(g), jax.tree.leaves(w)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=1e-5, rtol=1e-4)
    # the bias gradient is the sum of dq/dk/dv over the batch and the sequence
    np.testing.assert_allclose(np.asarray(g[1]), np.asarray(g[0]).sum((0, 1)), atol=1e-5)
    # a bias changes the result (the check above is not vacuous)
    assert np.abs(np.asarray(ours(qkv, bias, prefix)) - np.asarray(ours(qkv, 0 * bias, prefix))).max() > 1e-2


@pytest.mark.parametrize("t", [32, 40])
def test_block_sizes_do_not_change_the_result(t):
    # at 40 tokens the tail's queries go to the last of 4, 1 or 2 programs per (row, head)
    qkv, valid, prefix, pvalid, dout = _case(2, t, 2, 16, p=4)
    outs = []
    for tuning in (pa.Tuning(8, 4, 8, 4), pa.Tuning(32, 4, 16, 4), pa.Tuning(16, 4, 32, 4)):
        fn = lambda x, pr, tuning=tuning: pa.attention(x, valid, pr, pvalid, tuning=tuning)
        outs.append((fn(qkv, prefix), _grads(fn, qkv, prefix, dout)))
    for out, grads in outs[1:]:
        np.testing.assert_allclose(np.asarray(out), np.asarray(outs[0][0]), atol=1e-6)
        for a, c in zip(jax.tree.leaves(grads), jax.tree.leaves(outs[0][1])):
            np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=1e-5)


def test_bfloat16_is_as_close_as_jax_attention_in_bfloat16():
    qkv, valid, prefix, pvalid, dout = _case(2, 32, 2, 32, p=6, dtype=jnp.bfloat16)
    exact = np.asarray(_xla_attention(qkv, valid, prefix, pvalid))
    ours = np.asarray(pa.attention(qkv, valid, prefix, pvalid, tuning=SMALL), np.float32)
    theirs = np.asarray(_xla_attention(qkv, valid, prefix, pvalid, dtype=jnp.bfloat16), np.float32)
    assert np.abs(ours - exact).max() > 0    # bf16 output: not exact
    assert np.abs(ours - exact).max() <= 2 * np.abs(theirs - exact).max() + 1e-3


@pytest.mark.parametrize("t", [8, 40])
def test_a_row_with_every_key_masked_stays_finite(t):
    # padding past the sequence (to 16 keys, or to a tail of 16) is not averaged in
    qkv, valid, _, _, dout = _case(2, t, 2, 16)
    valid = valid.at[1].set(False)
    out = pa.attention(qkv, valid, tuning=SMALL)
    g = _grads(lambda x, _: pa.attention(x, valid, tuning=SMALL), qkv, None, dout)[0]
    assert np.isfinite(np.asarray(out)).all() and np.isfinite(np.asarray(g)).all()
    # every key masked: the softmax is uniform over all keys (a plain average of the values)
    np.testing.assert_allclose(np.asarray(out[1]), np.broadcast_to(np.asarray(qkv[1, :, 2]).mean(0), out[1].shape),
                               atol=1e-5)


def test_backward_needs_no_split_or_concatenation():
    qkv, valid, _, _, dout = _case(2, 16, 2, 16)
    jaxpr = jax.make_jaxpr(lambda x: _grads(lambda y, _: pa.attention(y, valid, tuning=SMALL),
                                            x, None, dout))(qkv)
    prims = {e.primitive.name for e in jaxpr.jaxpr.eqns}
    assert str(jaxpr).count("pallas_call") >= 2        # the two kernels (behind a jit of their own)
    assert not prims & {"concatenate", "slice", "dynamic_slice", "gather"}, prims


def test_shapes_the_kernel_does_not_take():
    qkv = jnp.zeros((1, 8, 3, 2, 12))
    with pytest.raises(ValueError, match="head_dim 12"):
        pa.attention(qkv, jnp.ones((1, 8), bool))
    with pytest.raises(ValueError, match="longer than 512"):
        pa.attention(jnp.zeros((1, 600, 3, 1, 16)), jnp.ones((1, 600), bool))
    with pytest.raises(ValueError, match=r"\[B, T, 3, N, D\]"):
        pa.attention(jnp.zeros((1, 8, 2, 2, 16)), jnp.ones((1, 8), bool))
    with pytest.raises(ValueError, match="head_dim 12"):
        check_compute(BertConfig(hidden_size=48, num_attention_heads=4), EXACT.replace(attention_impl="pallas"))


def test_model_with_pallas_attention_equals_dense_attention(minilm_dir):
    """MiniLM (real weights), dropout off: logits and every parameter gradient as with dense
    attention, padding included."""
    minilm = load_classifier(str(minilm_dir), 2)
    cfg = minilm.config.replace(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    enc = minilm.tokenizer(["a short one", "a somewhat longer sentence to pad the batch with"],
                           padding="max_length", max_length=16, return_tensors="np")
    batch = {k: jnp.asarray(enc[k]) for k in ("input_ids", "attention_mask", "token_type_ids")}
    params = {"bert": minilm.params["bert"],
              "classifier": {"kernel": 0.1 * jax.random.normal(jax.random.key(0), (cfg.hidden_size, 2)),
                             "bias": jnp.zeros(2)}}
    results = {}
    for impl in ("dense", "pallas"):
        model = classifier(cfg, 2, compute=EXACT.replace(attention_impl=impl))
        loss = lambda p, model=model: jnp.sum(jax.nn.log_softmax(model.apply({"params": p}, **batch))[:, 0])
        results[impl] = (model.apply({"params": params}, **batch), jax.grad(loss)(params))
    np.testing.assert_allclose(np.asarray(results["pallas"][0]), np.asarray(results["dense"][0]), atol=2e-5)
    flat_p = jax.tree_util.tree_leaves_with_path(results["pallas"][1])
    flat_d = dict(jax.tree_util.tree_leaves_with_path(results["dense"][1]))
    for path, g in flat_p:
        np.testing.assert_allclose(np.asarray(g), np.asarray(flat_d[path]), atol=2e-5,
                                   err_msg=jax.tree_util.keystr(path))


def test_batch_sharded_over_four_devices_needs_no_gather_and_gives_the_same_gradients():
    """Under a jit with the batch sharded over a 2x2 mesh each device runs the kernels on its own
    rows (custom_partitioning): no all-gather in the compiled step, same loss and gradients
    (the shared prefix's and the bias's gradients are the only all-reduces besides the loss)."""
    code = """
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import NamedSharding, PartitionSpec as P
        from jaxpeft.models.kernels import pallas_attention as pa
        mesh = jax.make_mesh((2, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
        r = np.random.default_rng(0)
        b, t, n, d, p = 8, 16, 2, 16, 5
        qkv = jnp.asarray(r.normal(size=(b, t, 3, n, d)), jnp.float32)
        valid = jnp.asarray(np.arange(t)[None] < r.integers(1, t + 1, size=b)[:, None])
        prefix = tuple(jnp.asarray(r.normal(size=(1, p, n, d)), jnp.float32) for _ in range(2))
        pvalid = jnp.asarray(r.random((b, p)) > 0.2)
        dout = jnp.asarray(r.normal(size=(b, t, n, d)), jnp.float32)
        bias = jnp.asarray(r.normal(size=(3, n, d)), jnp.float32)
        tun = pa.Tuning(8, 4, 8, 4)
        loss = lambda x, pr, bb, v, pv, do: jnp.sum(pa.attention(x, v, pr, pv, bias=bb, tuning=tun) * do)
        g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
        want = g(qkv, prefix, bias, valid, pvalid, dout)
        rows, rep = NamedSharding(mesh, P(("data", "fsdp"))), NamedSharding(mesh, P())
        args = (jax.device_put(qkv, rows), jax.device_put(prefix, rep), jax.device_put(bias, rep),
                jax.device_put(valid, rows), jax.device_put(pvalid, rows), jax.device_put(dout, rows))
        hlo = g.lower(*args).compile().as_text()
        assert "all-gather" not in hlo, "gathered"
        got = g(*args)
        assert got[1][0].sharding.spec[0] == ("data", "fsdp"), got[1][0].sharding
        err = rel_err(got, want)
        assert err < 2e-5, err
        print("same", err)
    """
    cpu_devices.run(code)


def test_backward_keeps_no_attention_output():
    """Residuals of attention followed by a frozen projection: q/k/v and the float32 log-sum-exp,
    nothing of the output's [B, T, N, D] shape (cuDNN's kernel keeps the output)."""
    from jax._src.ad_checkpoint import saved_residuals

    qkv, valid, _, _, _ = _case(2, 16, 2, 16)
    w = jnp.ones((16, 3))
    res = saved_residuals(lambda x: jnp.sum(pa.attention(x, valid, tuning=SMALL) @ w), qkv)
    shapes = [tuple(r[0].shape) for r in res]
    assert (2, 16, 3, 2, 16) in shapes and (2, 2, 16) in shapes, shapes
    assert (2, 16, 2, 16) not in shapes, shapes
    assert pa.fast_length(128) and pa.fast_length(148) and not pa.fast_length(200) and not pa.fast_length(8)
    # past a main segment of 128 keys cuDNN's kernel is faster (SQuAD's 384 tokens: 256 + 128)
    assert not pa.fast_length(256) and not pa.fast_length(384)


@pytest.mark.parametrize("t,p", [(16, 0), (32, 5)])
def test_packed_rows_attend_within_their_segment(t, p):
    """Segment ids (packed rows): forward and backward equal the reference, where each query sees
    only its own example's keys (and the prefix); padding queries stay finite."""
    rng = np.random.default_rng(t + p)
    b, n, d = 2, 2, 16
    qkv = jnp.asarray(rng.normal(size=(b, t, 3, n, d)), jnp.float32)
    seg = np.zeros((b, t), np.int32)
    for r in range(b):             # examples of random lengths one after another, then padding
        pos, k = 0, 1
        while pos < t - 2:
            n_tok = int(rng.integers(2, 9))
            seg[r, pos:pos + n_tok] = k
            pos, k = pos + n_tok, k + 1
    seg = jnp.asarray(np.minimum(seg, seg.max()))
    prefix = None if not p else tuple(jnp.asarray(rng.normal(size=(1, p, n, d)), jnp.float32) for _ in range(2))
    dout = jnp.asarray(rng.normal(size=(b, t, n, d)), jnp.float32) * (seg > 0)[:, :, None, None]
    got = pa.attention(qkv, seg > 0, prefix, segments=seg, tuning=SMALL)
    want = pa.reference(qkv, seg > 0, prefix, segments=seg)
    real = np.asarray(seg > 0)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=2e-5)
    gq = jax.grad(lambda x: jnp.sum(pa.attention(x, seg > 0, prefix, segments=seg, tuning=SMALL) * dout))(qkv)
    gr = jax.grad(lambda x: jnp.sum(pa.reference(x, seg > 0, prefix, segments=seg) * dout))(qkv)
    np.testing.assert_allclose(np.asarray(gq), np.asarray(gr), atol=2e-5)
    assert np.isfinite(np.asarray(got)).all()
