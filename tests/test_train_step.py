"""The train step: only masked leaves change, equivalence with optax.multi_transform, and no
weight gradients for frozen matrices (XLA cost analysis on BERT-base shapes)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxpeft import masks, methods
from jaxpeft.training import optim
from jaxpeft.config import Optim
from jaxpeft.models.bert import BertConfig
from jaxpeft.models.loading import init_params, param_shapes
from jaxpeft.training.steps import init_state, make_train_loop, make_train_step

from model_helpers import classifier, mask as method_mask, seq_loss

SMALL = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                   vocab_size=120, max_position_embeddings=64)


def _batch(rng, b=8, t=16, vocab=120, labels=2):
    lengths = rng.integers(4, t + 1, size=b)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    return {"input_ids": rng.integers(1, vocab, size=(b, t)).astype(np.int32) * mask,
            "attention_mask": mask, "token_type_ids": np.zeros((b, t), np.int32),
            "labels": rng.integers(0, labels, size=b).astype(np.int32),
            "weights": np.ones(b, np.float32)}


@pytest.mark.parametrize("method,options", [("bitfit", {}), ("bitfit", {"bitfit_terms": "query,intermediate"}),
                                            ("frozen", {}), ("full", {})])
def test_exactly_masked_leaves_change(method, options):
    module = classifier(SMALL, 2)
    params = init_params(module, jax.random.key(0))
    m = methods.create(method, options)
    mask = method_mask(m, params)
    cfg = Optim(learning_rate=1e-2, warmup_ratio=0.0)
    tx = optim.make_optimizer(cfg)
    trainable, frozen = masks.split(params, mask)
    state = init_state(trainable, tx, seed=0)
    step = jax.jit(make_train_step(seq_loss(module), tx), donate_argnums=(0,))
    rng = np.random.default_rng(0)
    for i in range(3):
        state, metrics = step(state, frozen, _batch(rng), np.float32(cfg.learning_rate))
        assert np.isfinite(float(metrics["loss"]))
    after = masks.flatten(masks.merge(state.trainable, frozen))
    before = masks.flatten(params)
    flags = masks.flatten(mask)
    for path, value in before.items():
        if flags[path]:
            assert not np.array_equal(np.asarray(after[path]), np.asarray(value)), f"{path} did not train"
        else:
            assert np.array_equal(np.asarray(after[path]), np.asarray(value)), f"{path} changed"
    # optimizer state exists for trainable leaves only
    n_opt = sum(x.size for x in jax.tree_util.tree_leaves(state.opt_state) if getattr(x, "ndim", 0) > 0)
    assert n_opt == 2 * masks.count(params, mask)[0]


def test_split_step_equals_multi_transform_on_the_full_tree():
    """Second code path: optax.multi_transform over the full params with full gradients."""
    module = classifier(SMALL, 2)
    params = init_params(module, jax.random.key(1))
    mask = method_mask(methods.create("bitfit"), params)
    inner = optax.adamw(1e-2, weight_decay=0.0)
    batch = _batch(np.random.default_rng(1))
    rng = jax.random.key(5)

    def full_loss(p):
        logits = module.apply({"params": p}, batch["input_ids"], batch["attention_mask"],
                              batch["token_type_ids"], deterministic=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()

    tx_full = masks.multi_transform(inner, mask)
    g = jax.grad(full_loss)(params)
    upd, _ = tx_full.update(g, tx_full.init(params), params)
    want = optax.apply_updates(params, upd)

    trainable, frozen = masks.split(params, mask)
    g_t = jax.grad(lambda t: full_loss(masks.merge(t, frozen)))(trainable)
    upd_t, _ = inner.update(g_t, inner.init(trainable), trainable)
    got = masks.merge(optax.apply_updates(trainable, upd_t), frozen)
    for (p, a), b in zip(masks.flatten(want).items(), masks.flatten(got).values()):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, err_msg=p)
    del rng


def test_optimizer_with_host_lr_equals_optax_adamw_with_the_schedule():
    """make_optimizer + lr passed per step == optax.adamw(schedule) over several steps."""
    params = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "bias": jnp.ones(3)}
    cfg = Optim(learning_rate=0.1, warmup_ratio=0.25, weight_decay=0.01, max_grad_norm=0.5)
    tx = optim.make_optimizer(cfg)
    schedule = optim.Schedule.create(cfg.learning_rate, 8, cfg.warmup_ratio)
    ref = optax.chain(optax.clip_by_global_norm(0.5),
                      optax.adamw(optax.join_schedules([optax.linear_schedule(0.0, 0.1, 2),
                                                        optax.linear_schedule(0.1, 0.0, 6)], [2]),
                                  weight_decay=0.01, mask=lambda p: {"w": True, "bias": False}))
    p1, s1, p2, s2 = params, tx.init(params), params, ref.init(params)
    for i in range(8):
        g = jax.tree_util.tree_map(lambda x: jnp.sin(x * (i + 1)), p1)
        u1, s1 = tx.update(g, s1, p1)
        p1 = optax.apply_updates(p1, jax.tree_util.tree_map(lambda u: schedule(i) * u, u1))
        u2, s2 = ref.update(g, s2, p2)
        p2 = optax.apply_updates(p2, u2)
    for k in params:
        np.testing.assert_allclose(np.asarray(p1[k]), np.asarray(p2[k]), rtol=1e-6, atol=1e-7)
    assert not np.allclose(np.asarray(p1["w"]), np.asarray(params["w"]))


def _step_flops(method: str, cfg: BertConfig, batch: int, seq: int) -> float:
    module = classifier(cfg, 2)
    shapes = param_shapes(module)
    mask = method_mask(methods.create(method), shapes)
    tx = optim.make_optimizer(Optim())
    trainable, frozen = masks.split(shapes, mask)
    state = jax.eval_shape(lambda t: init_state(t, tx, 0), trainable)
    b = {k: jax.ShapeDtypeStruct((batch, seq), jnp.int32)
         for k in ("input_ids", "attention_mask", "token_type_ids")}
    b["labels"] = jax.ShapeDtypeStruct((batch,), jnp.int32)
    b["weights"] = jax.ShapeDtypeStruct((batch,), jnp.float32)
    step = make_train_step(seq_loss(module), tx)
    compiled = jax.jit(step, donate_argnums=(0,)).lower(state, frozen, b, np.float32(1e-3)).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def test_bitfit_step_costs_about_two_thirds_of_full_on_bert_base_shapes():
    base = BertConfig()  # bert-base-uncased shapes: 12 x 768, 30522 vocab
    full = _step_flops("full", base, batch=8, seq=128)
    bitfit = _step_flops("bitfit", base, batch=8, seq=128)
    frozen = _step_flops("frozen", base, batch=8, seq=128)
    ratio = bitfit / full
    print(f"full {full:.3e} bitfit {bitfit:.3e} frozen {frozen:.3e} ratio {ratio:.3f}")
    assert ratio <= 0.72, ratio
    assert frozen < 0.45 * full  # head only: forward pass, no backward through the encoder


def test_key_bias_gets_no_gradient():
    """Softmax attention is invariant to adding q·b_k to every logit of a query, so the key bias's
    gradient is zero up to rounding (why b_k does not move in BitFit), while the query bias's is not."""
    module = classifier(SMALL, 2)
    params = init_params(module, jax.random.key(1))
    batch = _batch(np.random.default_rng(0))

    def loss(p):
        logits = module.apply({"params": p}, batch["input_ids"], batch["attention_mask"],
                              batch["token_type_ids"], deterministic=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()

    grads = jax.grad(loss)(params)["bert"]["encoder"]
    for i in range(SMALL.num_hidden_layers):
        attn = grads[f"layer_{i}"]["attention"]["self"]
        g_q = np.abs(np.asarray(attn["query"]["bias"])).max()
        g_k = np.abs(np.asarray(attn["key"]["bias"])).max()
        assert g_q > 0, i
        assert g_k < 1e-4 * g_q, (i, g_k, g_q)


def test_grad_norm_and_clip_match_optax():
    """``grad_norm`` (small leaves in one reduction) == ``optax.tree.norm``, and our clip ==
    ``optax.clip_by_global_norm``, on a tree of big and small leaves with holes, above and below
    the threshold."""
    from jaxpeft.training.optim import _NORM_GROUP_SIZE, clip_by_global_norm, grad_norm

    rng = np.random.default_rng(0)
    tree = {"big": jnp.asarray(rng.normal(size=(_NORM_GROUP_SIZE + 7,)), jnp.float32),
            "w": jnp.asarray(rng.normal(size=(96, 64)), jnp.float32),
            "b": {"x": jnp.asarray(rng.normal(size=(5,)), jnp.bfloat16), "hole": optax.MaskedNode()},
            "s": jnp.asarray(rng.normal(size=(300,)), jnp.float32)}
    want = optax.tree.norm(tree)
    np.testing.assert_allclose(float(grad_norm(tree)), float(want), rtol=2e-6)
    assert float(grad_norm({"a": optax.MaskedNode()})) == 0.0
    for max_norm in (float(want) / 3, float(want) * 3):
        got, _ = clip_by_global_norm(max_norm).update(tree, optax.EmptyState())
        ref, _ = optax.clip_by_global_norm(max_norm).update(tree, optax.EmptyState())
        for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
            assert a.dtype == b.dtype
            np.testing.assert_allclose(np.asarray(b, np.float32), np.asarray(a, np.float32), rtol=1e-5, atol=1e-7)


def test_schedule_on_the_device_equals_the_host_schedule():
    s = optim.Schedule.create(3e-3, total_steps=37, warmup_ratio=0.1)
    dev = jax.jit(optim.lr_at)(jnp.arange(40), s.as_array())
    np.testing.assert_allclose(np.asarray(dev), [s(i) for i in range(40)], rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("method", ["bitfit", "full"])
def test_scanned_loop_equals_single_steps_and_skips_inactive_steps(method):
    """N steps in one call (the schedule computed from the step counter on the device) give the
    states of N single steps with the host's learning rates; steps flagged off change nothing."""
    module = classifier(SMALL, 2)
    params = init_params(module, jax.random.key(2))
    mask = method_mask(methods.create(method), params)
    cfg = Optim(learning_rate=1e-2, warmup_ratio=0.3)
    tx = optim.make_optimizer(cfg)
    schedule = optim.Schedule.create(cfg.learning_rate, 10, cfg.warmup_ratio)
    trainable, frozen = masks.split(params, mask)
    rng = np.random.default_rng(3)
    batches = [_batch(rng) for _ in range(5)]
    # single steps
    step = jax.jit(make_train_step(seq_loss(module), tx))
    state = init_state(trainable, tx, seed=4)
    losses = []
    for i, b in enumerate(batches[:3]):
        state, m = step(state, frozen, b, np.float32(schedule(i)))
        losses.append(float(m["loss"]))
    # one call: 3 active steps and 2 inactive ones
    loop = jax.jit(make_train_loop(seq_loss(module), tx))
    stacked = {k: np.stack([b[k] for b in batches]) for k in batches[0]}
    active = np.array([True, True, True, False, False])
    state2, m2 = loop(init_state(trainable, tx, seed=4), frozen, stacked, active, schedule.as_array())
    assert int(state2.step) == 3
    np.testing.assert_allclose(np.asarray(m2["loss"])[:3], losses, rtol=1e-5)
    assert np.all(np.asarray(m2["loss"])[3:] == 0)
    np.testing.assert_allclose(np.asarray(m2["lr"])[:3], [schedule(i) for i in range(3)], rtol=1e-6)
    for a, b in zip(jax.tree.leaves((state.trainable, state.opt_state)),
                    jax.tree.leaves((state2.trainable, state2.opt_state))):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=2e-6)
