"""How the step is computed must not change what it computes: fused QKV, the remat policies, the
hand-written LayerNorm/GELU backward passes, our sublayer-output and bias + GELU kernels and the
low-bit dropout masks against the plain paths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpeft import masks, methods
from jaxpeft.config import TrainConfig
from jaxpeft.errors import UserError
from jaxpeft.models.bert import BertConfig, BertForSequenceClassification, LowBitDropout
from jaxpeft.models.loading import init_params
from jaxpeft.train import _apply, loss_and_outputs

SMALL = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                   vocab_size=120, max_position_embeddings=64)


def _batch(b=6, t=16):
    rng = np.random.default_rng(0)
    lengths = rng.integers(4, t + 1, size=b)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    return {"input_ids": rng.integers(1, 120, size=(b, t)).astype(np.int32) * mask,
            "attention_mask": mask, "token_type_ids": np.zeros((b, t), np.int32),
            "labels": rng.integers(0, 2, size=b).astype(np.int32), "weights": np.ones(b, np.float32)}


def _grads(cfg, method, params, deterministic):
    module = BertForSequenceClassification(cfg, num_labels=2)
    trainable, frozen = masks.split(params, methods.create(method).mask(params))
    batch = _batch()

    def loss(t):
        logits = _apply(module, masks.merge(t, frozen), batch, deterministic,
                        None if deterministic else jax.random.key(3))
        return loss_and_outputs(logits, batch["labels"], batch["weights"], False)

    return jax.jit(jax.value_and_grad(loss))(trainable)


@pytest.mark.parametrize("method", ["bitfit", "full"])
@pytest.mark.parametrize("change", [dict(fuse_qkv=False), dict(remat="elementwise"), dict(remat="layer"),
                                    dict(lean_residuals=False),
                                    dict(lean_residuals=False, remat="elementwise"),
                                    dict(norm_impl="pallas"), dict(norm_impl="pallas", remat="layer"),
                                    dict(activation_impl="pallas")])
def test_same_loss_and_gradients(method, change):
    """Same params, same dropout key: the loss and every gradient agree with the default path."""
    params = init_params(BertForSequenceClassification(SMALL, num_labels=2), jax.random.key(0))
    (l0, g0) = _grads(SMALL, method, params, deterministic=False)
    (l1, g1) = _grads(SMALL.replace(**change), method, params, deterministic=False)
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    assert jax.tree.structure(g0) == jax.tree.structure(g1)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_kernels_keep_param_paths():
    shapes = lambda cfg: jax.eval_shape(  # noqa: E731
        lambda: init_params(BertForSequenceClassification(cfg, 2), jax.random.key(0)))
    cfg = SMALL.replace(num_attention_heads=2)     # head_dim 16: the attention kernel's smallest
    want = shapes(cfg)
    got = shapes(cfg.replace(norm_impl="pallas", activation_impl="pallas", attention_impl="pallas"))
    assert jax.tree.structure(got) == jax.tree.structure(want)
    assert [x.shape for x in jax.tree.leaves(got)] == [x.shape for x in jax.tree.leaves(want)]


def test_fused_qkv_keeps_param_paths():
    a = jax.eval_shape(lambda: init_params(BertForSequenceClassification(SMALL, 2), jax.random.key(0)))
    b = jax.eval_shape(lambda: init_params(BertForSequenceClassification(SMALL.replace(fuse_qkv=False), 2),
                                           jax.random.key(0)))
    assert jax.tree.structure(a) == jax.tree.structure(b)
    assert "query" in a["bert"]["encoder"]["layer_0"]["attention"]["self"]


@pytest.mark.parametrize("bits", [8, 16])
def test_low_bit_dropout_rate_and_scale(bits):
    x = jnp.ones((1000, 1000), jnp.float32)
    y = np.asarray(LowBitDropout(0.1, bits).apply({}, x, deterministic=False,
                                                  rngs={"dropout": jax.random.key(0)}))
    threshold = round(0.1 * 2 ** bits)
    keep = 1 - threshold / 2 ** bits
    kept = (y != 0).mean()
    sd = np.sqrt(keep * (1 - keep) / y.size)
    assert abs(kept - keep) < 5 * sd, (kept, keep)
    np.testing.assert_allclose(y[y != 0], 1 / keep, rtol=1e-6)   # inverted dropout: mean kept at 1
    assert abs(y.mean() - 1.0) < 5 * sd / keep
    same = LowBitDropout(0.1, bits).apply({}, x, deterministic=True)
    assert same is x


def test_low_bit_dropout_trains_like_a_dropout():
    """The model with 8-bit masks: deterministic output unchanged, stochastic output differs."""
    params = init_params(BertForSequenceClassification(SMALL, num_labels=2), jax.random.key(0))
    l_det, _ = _grads(SMALL, "bitfit", params, deterministic=True)
    low = SMALL.replace(dropout_impl="random", dropout_bits=8)
    l_det8, _ = _grads(low, "bitfit", params, deterministic=True)
    l_drop8, _ = _grads(low, "bitfit", params, deterministic=False)
    np.testing.assert_allclose(l_det8, l_det, rtol=1e-6)
    assert abs(float(l_drop8) - float(l_det)) > 1e-6


@pytest.mark.parametrize("flag,value", [("remat", "sometimes"), ("dropout_bits", 4), ("dropout_impl", "fast"),
                                        ("attention_impl", "flash"), ("norm_impl", "triton")])
def test_bad_compute_options_are_one_line_errors(flag, value):
    with pytest.raises(UserError, match=f"--{flag}={value}: choose one of"):
        TrainConfig(**{flag: value, **({"dropout_impl": "random"} if flag == "dropout_bits" else {})})


def test_dropout_bits_need_random_masks():
    with pytest.raises(UserError, match="--dropout_bits=8 needs --dropout_impl=random"):
        TrainConfig(dropout_bits=8)
    assert TrainConfig(dropout_bits=8, dropout_impl="random").dropout_bits == 8
    with pytest.raises(UserError, match="--norm_impl=pallas needs --dropout_impl=hash"):
        TrainConfig(norm_impl="pallas", dropout_impl="random")


@pytest.mark.parametrize("method", ["bitfit", "prefix"])
def test_frozen_kernels_in_compute_dtype_change_nothing(method):
    """bf16 compute: the frozen tree with its matmul kernels stored in bf16 (as the Trainer and the
    benchmark keep it) gives bit-identical loss and gradients; only ``bert/.../kernel`` is cast."""
    from jaxpeft.models.bert import kernels_in_compute_dtype

    cfg = SMALL.replace(dtype="bfloat16")
    m = methods.create(method)
    module = BertForSequenceClassification(cfg, num_labels=2, adapter=m.adapter(cfg))
    params = init_params(module, jax.random.key(0))
    trainable, frozen = masks.split(params, m.mask(params))
    cast = kernels_in_compute_dtype(frozen, cfg)
    changed = {p for p, x in masks.flatten(cast).items() if x.dtype != jnp.float32}
    assert changed and all(p.startswith("bert/") and p.endswith("/kernel") for p in changed)
    assert "bert/encoder/layer_0/intermediate/dense/kernel" in changed
    assert not any("embeddings" in p for p in changed)
    batch = _batch()

    def loss(t, f):
        logits = _apply(module, masks.merge(t, f), batch, False, jax.random.key(3))
        return loss_and_outputs(logits, batch["labels"], batch["weights"], False)

    (l0, g0), (l1, g1) = (jax.jit(jax.value_and_grad(loss))(trainable, f) for f in (frozen, cast))
    assert np.asarray(l1) == np.asarray(l0)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
    # float32 compute: nothing to cast, the same tree back
    assert kernels_in_compute_dtype(frozen, SMALL) is frozen
