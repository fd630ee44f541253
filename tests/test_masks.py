"""jaxpeft.masks on BERT params, a linen MLP, an nnx module and plain dicts."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxpeft import masks
from jaxpeft.models.bert import BertConfig
from jaxpeft.models.loading import param_shapes

from model_helpers import classifier

CFG = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 vocab_size=100, max_position_embeddings=64)


@pytest.fixture(scope="module")
def bert_params():
    return param_shapes(classifier(CFG, 2))


def test_bert_paths_read_like_hf(bert_params):
    ps = masks.paths(bert_params)
    assert "bert/encoder/layer_1/attention/self/query/bias" in ps
    assert "bert/encoder/layer_0/intermediate/dense/bias" in ps
    assert "bert/encoder/layer_0/output/LayerNorm/bias" in ps
    assert "bert/embeddings/word_embeddings/embedding" in ps
    assert "classifier/kernel" in ps


def test_bitfit_all_biases(bert_params):
    m = masks.bitfit(bert_params)
    sel = masks.trainable_paths(m)
    assert sel and all(p.endswith("/bias") for p in sel)
    # every bias: 8 per layer + embeddings LN + pooler + classifier
    assert len(sel) == 8 * CFG.num_hidden_layers + 3


@pytest.mark.parametrize("term,suffix", [
    ("query", "attention/self/query/bias"), ("key", "attention/self/key/bias"),
    ("value", "attention/self/value/bias"), ("attention_output", "attention/output/dense/bias"),
    ("attention_layernorm", "attention/output/LayerNorm/bias"),
    ("intermediate", "intermediate/dense/bias"), ("output", "output/dense/bias"),
    ("output_layernorm", "output/LayerNorm/bias")])
def test_bitfit_each_term_selects_exactly_its_bias(bert_params, term, suffix):
    sel = masks.trainable_paths(masks.bitfit(bert_params, [term]))
    expected = [f"bert/encoder/layer_{i}/{suffix}" for i in range(CFG.num_hidden_layers)]
    assert sel == expected


def test_bitfit_terms_are_disjoint_and_cover_the_layer_biases(bert_params):
    total = masks.count(bert_params, masks.bitfit(bert_params, list(masks.BERT_BIAS_TERMS)))[0]
    each = sum(masks.count(bert_params, masks.bitfit(bert_params, [t]))[0] for t in masks.BERT_BIAS_TERMS)
    assert total == each
    layer_biases = masks.match(bert_params, include=r"encoder/layer_\d+/.*bias$")
    assert masks.count(bert_params, layer_biases)[0] == total


def test_bitfit_paper_aliases_and_comma_string(bert_params):
    a = masks.bitfit(bert_params, "b_q,b_m2")
    b = masks.bitfit(bert_params, ["query", "intermediate"])
    assert masks.trainable_paths(a) == masks.trainable_paths(b)


def test_unknown_term_is_a_clear_error(bert_params):
    with pytest.raises(masks.MaskError, match="unknown BitFit term 'querry'"):
        masks.bitfit(bert_params, "querry")


def test_term_that_matches_nothing_is_an_error():
    mlp = {"dense": {"kernel": np.ones((2, 2)), "bias": np.zeros(2)}}
    with pytest.raises(masks.MaskError, match="matches no parameter"):
        masks.bitfit(mlp, "query")


def test_empty_mask_is_an_error(bert_params):
    with pytest.raises(masks.MaskError, match="selects no parameter"):
        masks.match(bert_params, include=r"^nothing/")
    assert not any(jax.tree_util.tree_leaves(masks.match(bert_params, include="^x", allow_empty=True)))
    with pytest.raises(masks.MaskError):
        masks.multi_transform(optax.sgd(0.1), masks.match(bert_params, include="^x", allow_empty=True))
    with pytest.raises(masks.MaskError, match="no leaf named 'bias'"):
        masks.bitfit({"w": np.ones(2)})


def test_bad_regex_is_a_clear_error(bert_params):
    with pytest.raises(masks.MaskError, match="invalid regular expression"):
        masks.match(bert_params, include="(")


def test_match_include_exclude_union_count(bert_params):
    kernels = masks.match(bert_params, include=r"kernel$", exclude=r"^classifier/")
    head = masks.match(bert_params, include=r"^classifier/")
    both = masks.union(kernels, head)
    assert masks.count(bert_params, both)[0] == masks.count(bert_params, kernels)[0] + \
        masks.count(bert_params, head)[0]
    assert masks.count(bert_params, masks.intersect(kernels, head))[0] == 0
    t, n = masks.count(bert_params, masks.invert(both))
    assert t + masks.count(bert_params, both)[0] == n
    assert n == sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(bert_params))


def test_split_merge_roundtrip_and_grad_only_on_trainable():
    params = {"a": {"kernel": jnp.arange(6.0).reshape(2, 3), "bias": jnp.ones(3)}, "b": jnp.ones(())}
    mask = masks.bitfit(params)
    t, f = masks.split(params, mask)
    assert set(masks.flatten(t)) == {"a/bias"}
    assert set(masks.flatten(f)) == {"a/kernel", "b"}
    back = masks.merge(t, f)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda x, y: bool(jnp.all(x == y)), back, params))
    g = jax.grad(lambda tt: jnp.sum(masks.merge(tt, f)["a"]["bias"] ** 2))(t)
    assert list(masks.flatten(g)) == ["a/bias"]
    assert masks.unflatten(masks.flatten(t), params)["a"]["kernel"] == optax.MaskedNode()


def test_multi_transform_updates_only_trainable_and_keeps_no_frozen_state(bert_params):
    params = jax.tree_util.tree_map(lambda s: jnp.ones(s.shape, s.dtype), bert_params)
    mask = masks.bitfit(params)
    tx = masks.multi_transform(optax.adam(0.1), mask)
    state = tx.init(params)
    n_state = sum(x.size for x in jax.tree_util.tree_leaves(state) if hasattr(x, "size") and x.ndim)
    assert n_state == 2 * masks.count(params, mask)[0]   # adam mu + nu for trainable leaves only
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    updates, _ = tx.update(grads, state, params)
    for p, u in masks.flatten(updates).items():
        changed = bool(jnp.any(u != 0))
        assert changed == p.endswith("/bias"), p


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(8, name="hidden")(x))
        return nn.Dense(2, name="out")(x)


def test_masks_on_a_linen_mlp():
    params = MLP().init(jax.random.key(0), jnp.ones((1, 3)))["params"]
    m = masks.bitfit(params)
    assert masks.trainable_paths(m) == ["hidden/bias", "out/bias"]
    assert masks.count(params, m) == (10, 3 * 8 + 8 + 8 * 2 + 2)
    tx = masks.multi_transform(optax.sgd(1.0), m)
    grads = jax.grad(lambda p: jnp.sum(MLP().apply({"params": p}, jnp.ones((4, 3)))))(params)
    updates, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    assert jnp.array_equal(new["hidden"]["kernel"], params["hidden"]["kernel"])
    assert not jnp.array_equal(new["out"]["bias"], params["out"]["bias"])


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(3, 8, rngs=rngs)
        self.out = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.hidden(x)))


def test_masks_on_an_nnx_state():
    model = NnxMLP(nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    m = masks.bitfit(state)
    assert masks.trainable_paths(m) == ["hidden/bias", "out/bias"]
    assert masks.count(state, m) == (10, 50)
    head = masks.match(state, include=r"^out/")
    assert masks.trainable_paths(masks.union(m, head)) == ["hidden/bias", "out/bias", "out/kernel"]
    # optax on the nnx state with the mask as labels: frozen leaves get zero updates
    tx = masks.multi_transform(optax.sgd(1.0), m)
    grads = nnx.grad(lambda mod: jnp.sum(mod(jnp.ones((4, 3)))))(model)
    updates, _ = tx.update(grads, tx.init(state), state)
    flat = masks.flatten(updates)
    assert float(jnp.abs(flat["hidden/kernel"]).sum()) == 0.0
    assert float(jnp.abs(flat["out/bias"]).sum()) > 0.0


def test_describe_matches_peft_format():
    line = masks.describe({"w": np.ones((10, 10)), "b": np.ones(10)}, {"w": False, "b": True})
    assert line == "trainable params: 10 || all params: 110 || trainable%: 9.0909"
