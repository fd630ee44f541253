"""The compute spec (jaxpeft.compute): its presets per platform, its checks, and that how the step
is computed does not change what it computes (remat, our sublayer-output kernel run in Pallas's
interpreter, bf16 kernels stored in the compute dtype), against the plain path."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpeft import compute, config, masks, methods
from jaxpeft.data import encoding
from jaxpeft.training import steps
from jaxpeft.compute import EXACT, FAST, Compute
from jaxpeft.errors import UserError
from jaxpeft.models.kernels import pallas_common
from jaxpeft.models.bert import BertConfig
from jaxpeft.models.loading import frozen_in_dtype, init_params
from jaxpeft.tasks.base import sequence_loss

from model_helpers import classifier, mask as method_mask

SMALL = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                   vocab_size=120, max_position_embeddings=64)


def _batch(b=6, t=16):
    rng = np.random.default_rng(0)
    lengths = rng.integers(4, t + 1, size=b)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    return {"input_ids": rng.integers(1, 120, size=(b, t)).astype(np.int32) * mask,
            "attention_mask": mask, "token_type_ids": np.zeros((b, t), np.int32),
            "labels": rng.integers(0, 2, size=b).astype(np.int32), "weights": np.ones(b, np.float32)}


def _grads(comp, method, params, deterministic):
    module = classifier(SMALL, 2, compute=comp)
    trainable, frozen = masks.split(params, method_mask(methods.create(method), params))
    batch = _batch()

    def loss(t):
        logits = steps.apply_model(module, masks.merge(t, frozen), batch, deterministic,
                                   None if deterministic else jax.random.key(3))
        return sequence_loss(logits, batch["labels"], batch["weights"], False)

    return jax.jit(jax.value_and_grad(loss))(trainable)


# ----------------------------------------------------------------------------- presets and checks


def test_presets_per_platform():
    assert compute.resolve("auto", platform="cpu", num_devices=1) == EXACT
    assert compute.resolve("exact", platform="gpu", num_devices=1) == EXACT
    assert compute.resolve("auto", platform="gpu", num_devices=1) == FAST
    assert FAST.dtype == "bfloat16" and FAST.attention_impl == "pallas" and FAST.norm_impl == "pallas"
    mesh = compute.resolve("auto", platform="gpu", num_devices=8)
    assert mesh.attention_impl == "cudnn" and mesh.norm_impl == "xla" and mesh.dtype == "bfloat16"
    tpu = compute.resolve("auto", platform="tpu", num_devices=4)
    assert tpu.dtype == "bfloat16" and not tpu.uses_pallas() and tpu.attention_impl == "dense"
    rocm = compute.resolve("auto", platform="gpu", num_devices=1, nvidia=False)
    assert not rocm.uses_pallas() and rocm.attention_impl == "dense"
    assert EXACT.dtype == "float32" and EXACT.attention_impl == "dense"
    # XLA's Triton GEMMs and GEMM autotuning off on NVIDIA GPUs (the compilation they cost), XLA's
    # defaults elsewhere
    off = {"xla_gpu_enable_triton_gemm": False, "xla_gpu_autotune_level": 0}
    assert FAST.compiler_options() == mesh.compiler_options() == off
    assert EXACT.compiler_options() == tpu.compiler_options() == rocm.compiler_options() == {}
    assert compute.resolve("fast", {"triton_gemm": True, "gemm_autotune": True}, platform="gpu").compiler_options() == {}
    assert compute.resolve("fast", {"gemm_autotune": True}, platform="gpu").compiler_options() == {
        "xla_gpu_enable_triton_gemm": False}
    assert config.parse_args(["--method=bitfit", "--task=sst2", "--no-triton_gemm"]).compute_overrides == {"triton_gemm": False}


def test_auto_equals_exact_on_this_cpu():
    if jax.default_backend() != "cpu":
        pytest.skip("a CPU check")
    assert compute.resolve("auto") == compute.resolve("exact")
    assert config.build({"method": "bitfit", "task": "sst2"}).resolve_compute() == EXACT


def test_overrides_and_their_checks():
    assert compute.resolve("fast", {"attention_impl": "cudnn"}, platform="gpu").attention_impl == "cudnn"
    assert compute.resolve("exact", {"dtype": None}, platform="cpu") == EXACT     # None: not given
    with pytest.raises(UserError, match="--attention_impl=pallas is a Triton kernel for NVIDIA GPUs"):
        compute.resolve("exact", {"attention_impl": "pallas"}, platform="cpu")
    with pytest.raises(UserError, match="--norm_impl=pallas is a Triton kernel"):
        compute.resolve("exact", {"norm_impl": "pallas"}, platform="tpu")
    with pytest.raises(UserError, match="Triton kernel for NVIDIA GPUs"):
        compute.resolve("fast", platform="cpu")
    with pytest.raises(UserError, match="--attention_impl=cudnn needs an NVIDIA GPU"):
        compute.resolve("exact", {"attention_impl": "cudnn", "dtype": "bfloat16"}, platform="cpu")
    with pytest.raises(UserError, match="--attention_impl=cudnn needs --dtype=bfloat16"):
        Compute(attention_impl="cudnn")
    with pytest.raises(UserError, match="--norm_impl=pallas recomputes hashed dropout masks"):
        Compute(norm_impl="pallas", dropout_impl="random")
    with pytest.raises(UserError, match="--compute=quick: choose one of auto, exact, fast"):
        compute.resolve("quick")


@pytest.mark.parametrize("flag,value", [("remat", "sometimes"), ("dropout_impl", "fast"),
                                        ("attention_impl", "flash"), ("norm_impl", "triton"),
                                        ("dtype", "float16"), ("prng_impl", "philox")])
def test_bad_compute_options_are_one_line_errors(flag, value):
    with pytest.raises(UserError, match=f"--{flag}={value}: choose one of"):
        config.build({"method": "bitfit", flag: value})


def test_a_compute_option_is_one_field():
    """Every field of the spec is a flag of training, prediction and the benchmark, with choices,
    and says whether a resume must match it."""
    from jaxpeft.cli import bench, predict

    train_flags = {a.dest for a in config.make_parser()._actions}
    bench_flags = {a.dest for a in bench.parser()._actions}
    predict_flags = set(vars(predict.parse(["--adapter=x", "--dtype=bfloat16"])))
    for f in dataclasses.fields(Compute):
        assert f.name in train_flags and f.name in bench_flags, f.name
        assert f.metadata["choices"] and "trajectory" in f.metadata, f.name
    assert "dtype" in predict_flags
    assert set(EXACT.trajectory()) == {"dtype", "attention_impl", "dropout_impl", "prng_impl",
                                       "cls_only_last_layer", "base_dtype"}


def test_pallas_kernels_refuse_to_run_interpreted_outside_tests():
    if jax.default_backend() == "gpu":
        pytest.skip("compiled on a GPU")
    from jaxpeft.models.kernels import pallas_norm

    x = jnp.ones((1, 4, 8), jnp.float32)
    v = jnp.ones((8,), jnp.float32)
    with pytest.raises(RuntimeError, match="compile for NVIDIA GPUs only"):
        pallas_norm.dropout_add_norm(x, v, x, v, v, None, rate=0.0, eps=1e-12)
    with pallas_common.interpreter():
        y, _ = pallas_norm.dropout_add_norm(x, v, x, v, v, None, rate=0.0, eps=1e-12)
    assert y.shape == x.shape


# ----------------------------------------------------------------------------- same results


@pytest.mark.parametrize("method", ["full"])   # full fine-tuning has every gradient the others have
@pytest.mark.parametrize("change", [dict(remat="layer"), dict(norm_impl="pallas"),
                                    dict(cls_only_last_layer=False)])
def test_same_loss_and_gradients(method, change):
    """Same params, same dropout key: the loss and every gradient agree with the default path
    (deterministic for the [CLS]-only layer, whose dropout masks sit at other positions)."""
    params = init_params(classifier(SMALL, 2), jax.random.key(0))
    det = "cls_only_last_layer" in change
    (l0, g0) = _grads(EXACT, method, params, deterministic=det)
    with pallas_common.interpreter():
        (l1, g1) = _grads(EXACT.replace(**change), method, params, deterministic=det)
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    assert jax.tree.structure(g0) == jax.tree.structure(g1)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_kernels_keep_param_paths():
    shapes = lambda comp: jax.eval_shape(  # noqa: E731
        lambda: init_params(classifier(SMALL, 2, compute=comp), jax.random.key(0)))
    want = shapes(EXACT)
    with pallas_common.interpreter():
        got = shapes(FAST.replace(attention_impl="dense"))   # attention creates no params of its own
    assert jax.tree.structure(got) == jax.tree.structure(want)
    assert [x.shape for x in jax.tree.leaves(got)] == [x.shape for x in jax.tree.leaves(want)]
    assert "query" in want["bert"]["encoder"]["layer_0"]["attention"]["self"]


@pytest.mark.parametrize("method", ["prefix"])
def test_frozen_kernels_in_compute_dtype_change_nothing(method):
    """bf16 compute: the frozen tree with its matmul kernels stored in bf16 (as training and the
    benchmark keep it) gives bit-identical loss and gradients; only ``bert/.../kernel`` is cast."""
    comp = EXACT.replace(dtype="bfloat16")
    m = methods.create(method)
    module = classifier(SMALL, 2, m, comp)
    params = init_params(module, jax.random.key(0))
    trainable, frozen = masks.split(params, method_mask(m, params))
    cast = frozen_in_dtype(frozen, comp.dtype, "bert")
    changed = {p for p, x in masks.flatten(cast).items() if x.dtype != jnp.float32}
    assert changed and all(p.startswith("bert/") and p.endswith("/kernel") for p in changed)
    assert "bert/encoder/layer_0/intermediate/dense/kernel" in changed
    assert not any("embeddings" in p for p in changed)
    batch = _batch()

    def loss(t, f):
        logits = steps.apply_model(module, masks.merge(t, f), batch, False, jax.random.key(3))
        return sequence_loss(logits, batch["labels"], batch["weights"], False)

    (l0, g0), (l1, g1) = (jax.jit(jax.value_and_grad(loss))(trainable, f) for f in (frozen, cast))
    assert np.asarray(l1) == np.asarray(l0)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
    # float32 compute: nothing to cast, the same tree back
    assert frozen_in_dtype(frozen, EXACT.dtype, "bert") is frozen


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the fast path runs on an NVIDIA GPU")
@pytest.mark.parametrize("method", ["bitfit", "full", "prefix"])
def test_auto_matches_exact_within_bf16_tolerance_on_gpu(method, minilm_dir):
    """On one NVIDIA GPU ``auto`` is the fast path (bf16 + our kernels): same loss and gradients as
    ``exact`` (float32, dense attention) within bf16 rounding, dropout off (the fused kernels apply
    no attention-probability dropout, so with dropout the two differ by design)."""
    from jaxpeft.models.loading import load_classifier

    auto = compute.resolve("auto")
    assert auto == FAST
    m = methods.create(method)
    results = []
    for comp in (EXACT, auto):
        loaded = load_classifier(str(minilm_dir), 2, m, compute=comp)
        params = m.init_params(loaded.params, loaded.family, tokenizer=loaded.tokenizer, rng=jax.random.key(1))
        trainable, frozen = masks.split(params, method_mask(m, params))
        frozen = frozen_in_dtype(frozen, comp.dtype, "bert")
        rng = np.random.default_rng(0)
        b, t = 32, 64
        lengths = rng.integers(8, t + 1, size=b)
        mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
        batch = {"input_ids": rng.integers(1000, 20000, size=(b, t)).astype(np.int32) * mask,
                 "attention_mask": mask, "token_type_ids": np.zeros((b, t), np.int32),
                 "labels": rng.integers(0, 2, size=b).astype(np.int32), "weights": np.ones(b, np.float32)}

        def loss(tr, module=loaded.module, frozen=frozen):
            logits = steps.apply_model(module, masks.merge(tr, frozen), batch, True)
            return sequence_loss(logits, batch["labels"], batch["weights"], False)

        results.append(jax.jit(jax.value_and_grad(loss))(trainable))
    (l0, g0), (l1, g1) = results
    np.testing.assert_allclose(float(l1), float(l0), rtol=2e-2)
    flat0, flat1 = masks.flatten(g0), masks.flatten(g1)
    num = sum(float(jnp.sum((flat1[k] - flat0[k]) ** 2)) for k in flat0)
    den = sum(float(jnp.sum(flat0[k] ** 2)) for k in flat0)
    assert (num / den) ** 0.5 < 5e-2, (num / den) ** 0.5       # relative error of the whole gradient


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the fused kernels run on an NVIDIA GPU")
@pytest.mark.parametrize("attention_impl", ["pallas", "cudnn"])
def test_packed_rows_with_fused_attention_match_exact_on_gpu(attention_impl, minilm_dir):
    """Packed rows (several examples per row, padding slots at the end) through each fused
    attention: finite outputs and gradients that match ``exact`` within bf16 rounding (a padding
    query without any key made cuDNN's softmax NaN)."""
    from jaxpeft.data import packing
    from jaxpeft.models.loading import load_classifier

    rng = np.random.default_rng(3)
    n, t = 40, 64
    lengths = rng.integers(4, 20, size=n)
    valid = np.arange(t)[None] < lengths[:, None]
    ids = rng.integers(1000, 20000, size=(n, t)).astype(np.int32) * valid
    ids[:, 0] = 101
    enc = encoding.Encoded(ids, np.zeros((n, t), np.int32), lengths, rng.integers(0, 2, size=n).astype(np.int32))
    packed = next(packing.eval_batches(enc, t, rows_per_batch=8))
    batch = steps.model_inputs(packed)
    used = jnp.asarray(packed["index"] >= 0, jnp.float32)          # [rows, slots]: the real examples
    m = methods.create("bitfit")
    results = []
    for comp in (EXACT, FAST.replace(attention_impl=attention_impl, norm_impl="xla")):
        loaded = load_classifier(str(minilm_dir), 2, compute=comp)
        trainable, frozen = masks.split(loaded.params, method_mask(m, loaded.params))
        frozen = frozen_in_dtype(frozen, comp.dtype, "bert")

        def loss(tr, module=loaded.module, frozen=frozen):
            logits = steps.apply_model(module, masks.merge(tr, frozen), batch, True).astype(jnp.float32)
            weight = jnp.sin(jnp.arange(logits.size, dtype=jnp.float32)).reshape(logits.shape)
            return jnp.sum(logits * weight * used[..., None])

        results.append(jax.jit(jax.value_and_grad(loss))(trainable))
    (l0, g0), (l1, g1) = results
    flat0, flat1 = masks.flatten(g0), masks.flatten(g1)
    assert np.isfinite(float(l1)) and all(bool(jnp.all(jnp.isfinite(v))) for v in flat1.values())
    np.testing.assert_allclose(float(l1), float(l0), rtol=5e-2, atol=5e-2)
    num = sum(float(jnp.sum((flat1[k] - flat0[k]) ** 2)) for k in flat0)
    den = sum(float(jnp.sum(flat0[k] ** 2)) for k in flat0)
    assert (num / den) ** 0.5 < 5e-2, (num / den) ** 0.5
