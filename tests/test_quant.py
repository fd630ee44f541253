"""Weight-only quantization of frozen kernels (jaxpeft.models.quant) against references computed
here from first principles: numpy absmax scales and nearest-level codes, the NF4 construction of
QLoRA, float64 matmuls on the dequantized weight, and (where installed) qwix's NF4."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import ad_checkpoint

from jaxpeft.models import quant

REPO = Path(__file__).resolve().parent.parent

#: NF4 as published: QLoRA (Dettmers et al. 2023, arXiv:2305.14314) appendix E, and the table
#: bitsandbytes hard-codes in bitsandbytes/functional.py, get_4bit_type("nf4").
BITSANDBYTES_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0]


def weights(n_in: int, n_out: int, seed: int = 0) -> np.ndarray:
    """Normal weights with a few outliers and one all-zero output channel."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0.0, 0.02, size=(n_in, n_out)).astype(np.float32)
    w[rng.integers(0, n_in, 5), rng.integers(0, n_out, 5)] = [0.5, -0.7, 0.3, -0.2, 0.9]
    w[:, 3] = 0.0
    return w


def test_nf4_codebook_is_the_published_one():
    np.testing.assert_array_equal(quant.NF4_CODEBOOK, np.asarray(BITSANDBYTES_NF4, np.float32))


def test_nf4_codebook_follows_the_qlora_construction():
    # QLoRA section 3 / bitsandbytes create_normal_map: quantiles of N(0, 1) at 8 points from
    # offset=0.9677083 to 0.5 for the positive half (one extra positive level), 7 for the negative
    # half, a zero, all divided by the largest
    from scipy.stats import norm

    offset = 0.9677083
    pos = norm.ppf(np.linspace(offset, 0.5, 9, dtype=np.float32)[:-1])
    neg = -norm.ppf(np.linspace(offset, 0.5, 8, dtype=np.float32)[:-1])
    levels = np.sort(np.concatenate([pos, neg, [0.0]]))
    levels /= levels.max()
    np.testing.assert_allclose(quant.NF4_CODEBOOK, levels, rtol=0, atol=1e-6)


def test_nf4_codebook_and_values_equal_qwix():
    qwix = pytest.importorskip("qwix")
    from qwix._src.core import numerics

    np.testing.assert_array_equal(quant.NF4_CODEBOOK, np.asarray(numerics.get_nf4_buckets(), np.float32))
    w = jnp.asarray(weights(256, 96))
    theirs = qwix.dequantize(qwix.quantize(w, "nf4", channelwise_axes=(1,), tiled_axes={0: 64}))
    np.testing.assert_array_equal(np.asarray(quant.dequantize(quant.quantize(w, "nf4"))), np.asarray(theirs))


def test_int8_round_trip():
    w = weights(192, 40)
    q = quant.quantize(jnp.asarray(w), "int8")
    assert (q.codes.dtype, q.codes.shape, q.scale.dtype, q.scale.shape) == (jnp.int8, (192, 40), jnp.float32, (1, 40))
    # absmax / 127 (XLA may multiply by the reciprocal: an ulp apart)
    np.testing.assert_allclose(np.asarray(q.scale), np.abs(w).max(axis=0, keepdims=True) / np.float32(127),
                               rtol=2e-7, atol=0)
    scale = np.asarray(q.scale)
    codes = np.asarray(q.codes)
    assert np.abs(codes).max() == 127 and codes.min() >= -127
    np.testing.assert_array_equal(codes[:, 3], 0)
    safe = np.where(scale > 0, scale, 1)
    np.testing.assert_array_equal(codes, np.round(w / safe).astype(np.int8))
    deq = np.asarray(quant.dequantize(q))
    # per output channel: every value within half a step (float32 rounding of the product aside)
    assert np.all(np.abs(deq - w) <= scale / 2 * (1 + 1e-6))
    np.testing.assert_array_equal(deq[:, 3], 0.0)
    # the channel's absmax value comes back exactly up to float32 rounding
    top = np.abs(w).argmax(axis=0)
    np.testing.assert_allclose(deq[top, np.arange(40)], w[top, np.arange(40)], rtol=1e-6)


def test_nf4_round_trip():
    n_in, n_out, block = 256, 40, 64
    w = weights(n_in, n_out)
    q = quant.quantize(jnp.asarray(w), "nf4", block=block)
    assert (q.codes.dtype, q.codes.shape) == (jnp.uint8, (n_in // 2, n_out))
    assert (q.scale.dtype, q.scale.shape, q.shape) == (jnp.float32, (n_in // block, n_out), (n_in, n_out))
    blocks = w.reshape(n_in // block, block, n_out)
    absmax = np.abs(blocks).max(axis=1)
    np.testing.assert_array_equal(np.asarray(q.scale), absmax)
    # nearest level of each value over its block's absmax, from the codebook alone
    cb = np.asarray(BITSANDBYTES_NF4, np.float32)
    v = blocks / np.where(absmax > 0, absmax, 1)[:, None, :]
    want_codes = np.abs(v[..., None] - cb).argmin(axis=-1).reshape(n_in, n_out)
    packed = np.asarray(q.codes)
    got_codes = np.stack([packed >> 4, packed & 0xF], axis=1).reshape(n_in, n_out)   # even rows high
    np.testing.assert_array_equal(got_codes, want_codes)
    deq = np.asarray(quant.dequantize(q))
    want = (cb[want_codes].reshape(n_in // block, block, n_out) * absmax[:, None, :]).reshape(n_in, n_out)
    np.testing.assert_array_equal(deq, want)
    # error bound: half the widest gap between neighbouring levels, times the block's absmax
    bound = np.diff(cb).max() / 2 * np.repeat(absmax, block, axis=0)
    assert np.all(np.abs(deq - w) <= bound * (1 + 1e-6))
    np.testing.assert_array_equal(deq[:, 3], 0.0)


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_matmul_equals_x_times_dequantized(fmt):
    rng = np.random.default_rng(1)
    q = quant.quantize(jnp.asarray(weights(128, 48)), fmt)
    x = jnp.asarray(rng.normal(size=(2, 5, 128)), jnp.float32)
    ref = np.asarray(x, np.float64) @ np.asarray(quant.dequantize(q), np.float64)
    for f in (quant.matmul, jax.jit(quant.matmul)):
        y = f(x, q)
        assert y.shape == (2, 5, 48) and y.dtype == jnp.float32
        assert np.abs(np.asarray(y, np.float64) - ref).max() <= 1e-6 * np.abs(ref).max()
    # bfloat16 compute: bfloat16 out, close to the float32 result
    yb = jax.jit(quant.matmul, static_argnums=2)(x, q, jnp.bfloat16)
    assert yb.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(yb, np.float32), ref, rtol=0, atol=2e-2 * np.abs(ref).max())


def test_matmul_on_a_float_kernel():
    rng = np.random.default_rng(2)
    w, x = jnp.asarray(weights(64, 32)), jnp.asarray(rng.normal(size=(7, 64)), jnp.float32)
    np.testing.assert_allclose(quant.matmul(x, w), np.asarray(x, np.float64) @ np.asarray(w, np.float64),
                               rtol=1e-5, atol=1e-6)
    assert quant.matmul(x, w, jnp.bfloat16).dtype == jnp.bfloat16


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_gradient_wrt_x(fmt, capsys):
    rng = np.random.default_rng(3)
    q = quant.quantize(jnp.asarray(weights(128, 48)), fmt)
    w = quant.dequantize(q)
    x = jnp.asarray(rng.normal(size=(6, 128)), jnp.float32)

    def loss(x, kernel):
        return jnp.sum(jnp.sin(quant.matmul(x, kernel)) * jnp.arange(48.0))

    want = jax.grad(loss)(x, w)
    for g in (jax.grad(loss), jax.jit(jax.grad(loss))):
        got = g(x, q)
        assert got.shape == x.shape and got.dtype == x.dtype
        assert np.abs(np.asarray(got) - np.asarray(want)).max() <= 1e-6 * np.abs(np.asarray(want)).max()
    # bfloat16 compute: the cotangent comes back in x's dtype
    gb = jax.grad(lambda x: jnp.sum(quant.matmul(x, q, jnp.bfloat16).astype(jnp.float32)))(x)
    assert gb.dtype == jnp.float32
    # the kernel is frozen: its cotangents are zeros (float0 for the integer codes)
    dq = jax.grad(loss, argnums=1, allow_int=True)(x, q)
    assert dq.codes.dtype == jax.dtypes.float0 and not np.any(np.asarray(dq.scale))
    # the residuals between the forward and backward passes are the stored leaves, never a float
    # [in, out] weight
    ad_checkpoint.print_saved_residuals(loss, x, q)
    saved = [line.split(" ", 1) for line in capsys.readouterr().out.splitlines()]
    assert not any(t.endswith("[128,48]") and not t.startswith("i8") for t, _ in saved), saved
    assert any(where == "from the argument kernel.codes" for _, where in saved), saved


@pytest.mark.parametrize("n_in,n_out", [(768, 3072), (1024, 4096)])
def test_bytes_per_format(n_in, n_out):
    w = jnp.asarray(weights(n_in, n_out))
    f32 = quant.nbytes(w)
    assert f32 == 4 * n_in * n_out
    int8, nf4 = quant.quantize(w, "int8"), quant.quantize(w, "nf4")
    assert quant.nbytes(int8) == n_in * n_out + 4 * n_out           # codes + one scale a channel
    assert quant.nbytes(nf4) == n_in * n_out // 2 + 4 * n_in * n_out // 64   # + one a block
    assert quant.nbytes(int8) / f32 == pytest.approx(1 / 4 + 1 / n_in)
    assert quant.nbytes(nf4) / f32 == pytest.approx(1 / 8 + 1 / 64)
    # what the device holds (one CPU device: everything)
    dev = jax.devices()[0]
    assert quant.nbytes(nf4, device=dev) == quant.nbytes(nf4)
    tree = {"q": nf4, "b": jnp.zeros(3), "n": np.zeros((2, 2), np.float16), "hole": None}
    assert quant.nbytes(tree) == quant.nbytes(nf4) + 12 + 8


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_pytree_through_jit_and_device_put(fmt):
    q = quant.quantize(jnp.asarray(weights(128, 16)), fmt)
    leaves, treedef = jax.tree_util.tree_flatten(q)
    assert [x.dtype for x in leaves] == [q.codes.dtype, jnp.float32]
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert isinstance(rebuilt, quant.QuantizedKernel) and rebuilt.shape == q.shape == (128, 16)
    for moved in (jax.jit(lambda q: q)(q), jax.device_put(q, jax.devices()[0]),
                  jax.tree.map(lambda x: x, q)):
        assert isinstance(moved, quant.QuantizedKernel) and (moved.format, moved.block) == (fmt, 64)
        np.testing.assert_array_equal(np.asarray(moved.codes), np.asarray(q.codes))
        np.testing.assert_array_equal(np.asarray(moved.scale), np.asarray(q.scale))
    # a quantized kernel as a jit argument: one trace for every kernel of the same shape
    traces = []

    @jax.jit
    def f(x, q):
        traces.append(1)
        return quant.matmul(x, q)

    x = jnp.ones((2, 128))
    f(x, q)
    f(x, quant.quantize(jnp.asarray(weights(128, 16, seed=5)), fmt))
    assert len(traces) == 1


def test_quantize_tree():
    params = {
        "bert": {"layer_0": {"query": {"kernel": jnp.asarray(weights(128, 64)), "bias": jnp.zeros(64)},
                             "LayerNorm": {"scale": jnp.ones(64)}},
                 "embeddings": {"word_embeddings": {"embedding": jnp.ones((100, 64))}}},
        "classifier": {"kernel": jnp.ones((64, 2)), "bias": optax.MaskedNode()},
        "ids": jnp.ones((4, 4), jnp.int32),
    }

    def is_frozen_kernel(path, leaf):
        return path.startswith("bert/") and path.endswith("/kernel")

    for fmt in ("int8", "nf4"):
        out = quant.quantize_tree(params, fmt, is_frozen_kernel)
        k = out["bert"]["layer_0"]["query"]["kernel"]
        assert isinstance(k, quant.QuantizedKernel) and k.format == fmt
        assert out["classifier"]["kernel"] is params["classifier"]["kernel"]
        assert out["bert"]["embeddings"]["word_embeddings"]["embedding"] is \
            params["bert"]["embeddings"]["word_embeddings"]["embedding"]
        assert out["ids"] is params["ids"]
        assert out["bert"]["layer_0"]["query"]["bias"] is params["bert"]["layer_0"]["query"]["bias"]
        # already quantized leaves pass through a second call unchanged
        again = quant.quantize_tree(out, fmt, is_frozen_kernel)
        assert again["bert"]["layer_0"]["query"]["kernel"] is k
    bf = quant.quantize_tree(params, "bfloat16", is_frozen_kernel)
    assert bf["bert"]["layer_0"]["query"]["kernel"].dtype == jnp.bfloat16
    assert bf["classifier"]["kernel"].dtype == jnp.float32
    f32 = quant.quantize_tree(params, "float32", is_frozen_kernel)
    assert f32["bert"]["layer_0"]["query"]["kernel"].dtype == jnp.float32
    with pytest.raises(ValueError, match="nf4 block 64 does not divide in=100"):
        quant.quantize_tree({"k": jnp.ones((100, 8))}, "nf4", lambda p, x: True)
    with pytest.raises(ValueError, match="unknown base dtype"):
        quant.quantize_tree(params, "int4", is_frozen_kernel)


def test_quantize_refuses():
    with pytest.raises(ValueError, match="2-D float"):
        quant.quantize(jnp.ones(64), "int8")
    with pytest.raises(ValueError, match="2-D float"):
        quant.quantize(jnp.ones((64, 2), jnp.int32), "nf4")
    with pytest.raises(ValueError, match="even block"):
        quant.quantize(jnp.ones((96, 2)), "nf4")
    with pytest.raises(ValueError, match="unknown quantized format"):
        quant.quantize(jnp.ones((64, 2)), "fp4")


SHARDED = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxpeft.models import quant

assert jax.device_count() == 8
mesh = Mesh(np.array(jax.devices()), ("fsdp",))
rng = np.random.default_rng(0)
w = jnp.asarray(rng.normal(0, 0.02, (512, 1024)), jnp.float32)
x = jnp.asarray(rng.normal(size=(4, 512)), jnp.float32)
for fmt in ("int8", "nf4"):
    q = quant.quantize(w, fmt)
    sq = jax.device_put(q, NamedSharding(mesh, P(None, "fsdp")))   # the out axis over 8 devices
    assert isinstance(sq, quant.QuantizedKernel)
    assert str(sq.codes.sharding.spec) == str(P(None, "fsdp")), sq.codes.sharding
    per = [quant.nbytes(sq, device=d) for d in jax.devices()]
    assert all(p == quant.nbytes(q) // 8 for p in per), (per, quant.nbytes(q))
    loss = lambda x, q: jnp.sum(jnp.tanh(quant.matmul(x, q)))
    y = jax.jit(quant.matmul)(x, sq)
    g = jax.jit(jax.grad(loss))(x, sq)
    np.testing.assert_allclose(np.asarray(y), np.asarray(quant.matmul(x, q)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(g), np.asarray(jax.grad(loss)(x, q)), rtol=1e-5, atol=1e-6)
    print(fmt, quant.nbytes(q), per[0])
print("same")
"""


def test_sharded_kernel_holds_an_eighth_per_device():
    # the device count is fixed when JAX starts: a process of its own with 8 CPU devices
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(SHARDED)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0 and "same" in p.stdout, p.stdout + p.stderr
    sizes = dict(line.split(" ", 1) for line in p.stdout.splitlines() if line.startswith(("int8", "nf4")))
    assert sizes["int8"] == f"{512 * 1024 + 4 * 1024} {(512 * 1024 + 4 * 1024) // 8}"
    assert sizes["nf4"] == f"{512 * 1024 // 2 + 4 * 1024 * 8} {(512 * 1024 // 2 + 4 * 1024 * 8) // 8}"


def test_benchmark_runs_small_on_cpu(tmp_path):
    # benchmarks/quant_matmul.py must not rot; no speed is asserted
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "quant_matmul.py"), "--small", "--iters=1",
                        "--layers=2", f"--out={tmp_path}"], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "quant_matmul.jsonl").read_text().splitlines()]
    assert not any("error" in r for r in rows), rows
    assert sorted((r["kernel"], r["format"]) for r in rows) == sorted(
        (k, f) for k in ("qkv", "ffn_in", "chain_256x256") for f in ("bfloat16", "int8", "nf4"))
    for k in ("qkv", "ffn_in", "chain_256x256"):
        size = {r["format"]: r["kernel_bytes"] for r in rows if r["kernel"] == k}
        assert size["nf4"] < size["int8"] < size["bfloat16"]
    assert all(r["fwd_rel_err"] < 0.02 and r["dx_rel_err"] < 0.02 and r["fwd_ms"] > 0 for r in rows)
