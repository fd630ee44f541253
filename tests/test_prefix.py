"""Prefix tuning and P-tuning v2: the equivalence with real prefix tokens (keys/values of [p; x]
reused as prefixes of x), zero effect of a masked prefix, dropout, masked train steps, export."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpeft import masks, methods
from jaxpeft.errors import UserError
from jaxpeft.compute import EXACT
from jaxpeft.models.bert import BertModel
from jaxpeft.models.kernels import pallas_common
from jaxpeft.models.layers import Prompt
from jaxpeft.models.loading import load_classifier

from masked_step import SMALL, assert_export_round_trip, assert_only_masked_leaves_changed, train_steps
from model_helpers import BERT, classifier

SENTENCES = [
    ("it 's a charming and often affecting journey .", None),
    ("unflinchingly bleak and desperate", None),
    ("A man with a hard hat is dancing.", "A man wearing a hard hat is dancing."),
]
PREFIX_TEXT = "the weather was cold that day ."


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    return load_classifier(str(minilm_dir), 2)


def _inputs(tokenizer, length=None):
    """The sentence pairs, padded to the longest, or to ``length`` (a power of two keeps the
    pallas kernel on its fast path instead of its fallback)."""
    pad = {"padding": "max_length", "max_length": length} if length else {"padding": True}
    enc = tokenizer([a for a, _ in SENTENCES], [b or "" for _, b in SENTENCES], **pad,
                    return_tensors="np")
    assert (enc["attention_mask"] == 0).any()
    return {k: enc[k].astype(np.int32) for k in ("input_ids", "attention_mask", "token_type_ids")}


def _hidden(cfg, comp, bert, enc, **kw):
    """The encoder's hidden states ``[B, T, H]`` (and its state with ``mutable``)."""
    got = BertModel(cfg, comp).apply(bert, **enc, **kw)
    return (got[0].hidden, got[1]) if "mutable" in kw else got.hidden


def _layer_kv(intermediates, n_layers):
    enc = intermediates["bert"]["encoder"] if "bert" in intermediates else intermediates["encoder"]
    return [enc[f"layer_{i}"]["attention"]["self"]["key_value"][0] for i in range(n_layers)]


@pytest.mark.parametrize("impl,dtype,atol", [("dense", "float32", 2e-5), ("pallas", "float32", 2e-5),
                                             ("dense", "bfloat16", None)])
def test_prefix_equals_real_tokens_in_front(minilm, impl, dtype, atol):
    """Keys/values of real tokens p, taken from a run on [p; x], as prefixes of x (positions shifted
    by |p|) give x the outputs it has in [p; x]."""
    cfg, comp = minilm.config, EXACT.replace(attention_impl=impl, dtype=dtype)
    bert = {"params": minilm.params["bert"]}
    interpreted = pallas_common.interpreter()
    interpreted.__enter__()
    enc = _inputs(minilm.tokenizer, 32 if impl == "pallas" else None)
    b, length = enc["input_ids"].shape
    p_ids = np.asarray(minilm.tokenizer(PREFIX_TEXT, add_special_tokens=False)["input_ids"], np.int32)
    p = len(p_ids)
    joined = {"input_ids": np.concatenate([np.tile(p_ids, (b, 1)), enc["input_ids"]], 1),
              "attention_mask": np.concatenate([np.ones((b, p), np.int32), enc["attention_mask"]], 1),
              "token_type_ids": np.concatenate([np.zeros((b, p), np.int32), enc["token_type_ids"]], 1)}
    seq_joined, state = _hidden(cfg, comp, bert, joined, mutable=["intermediates"])
    prefix_kv = tuple((k[:, :p], v[:, :p]) for k, v in _layer_kv(state["intermediates"], cfg.num_hidden_layers))
    assert prefix_kv[0][0].shape == (b, p, cfg.num_attention_heads, cfg.head_dim)
    positions = jnp.broadcast_to(p + jnp.arange(length), (b, length))
    seq = _hidden(cfg, comp, bert, enc, position_ids=positions, prompt=Prompt(prefix_kv=prefix_kv))
    # shift_positions' path: the same positions from an offset instead of explicit ids
    shifted = _hidden(cfg, comp, bert, enc, prompt=Prompt(prefix_kv=prefix_kv, position_offset=p))
    np.testing.assert_array_equal(np.asarray(shifted), np.asarray(seq))
    assert seq.shape == (b, length, cfg.hidden_size)
    valid = enc["attention_mask"].astype(bool)
    got = np.asarray(seq, np.float32)[valid]
    want = np.asarray(seq_joined, np.float32)[:, p:][valid]
    err = np.abs(got - want)
    if atol is not None:
        np.testing.assert_allclose(got, want, atol=atol)
    else:
        # bf16: the two runs round differently, but far less than bf16 differs from fp32
        ref = _hidden(cfg, comp.replace(dtype="float32"), bert, joined)
        bf16_vs_fp32 = np.abs(want - np.asarray(ref)[:, p:][valid])
        # (on CPU both runs round identically: err is 0; bf16 vs fp32 is ~2e-3 mean, 3e-2 max)
        assert err.max() < 0.1 and err.mean() <= 0.5 * bf16_vs_fp32.mean(), (err.mean(), err.max())
    # without the prefixes x's outputs are different: the test is not vacuous
    alone = _hidden(cfg, comp, bert, enc, position_ids=positions)
    interpreted.__exit__(None, None, None)
    assert np.abs(np.asarray(alone, np.float32)[valid] - want).mean() > 10 * max(err.mean(), 1e-4)


def _with_prefix(minilm, method, seed=3):
    prompt = method.prompt_module(BERT, minilm.config)
    module = classifier(minilm.config, 2, method)
    k_head, k_prompt = jax.random.split(jax.random.key(seed))
    h = minilm.config.hidden_size
    params = {"bert": minilm.params["bert"],
              "classifier": {"kernel": 0.5 * jax.random.normal(k_head, (h, 2)), "bias": jnp.zeros(2)},
              "prompt": prompt.init(k_prompt, 1)["params"]}
    return module, params


@pytest.mark.parametrize("name", ["prefix", "ptuning_v2"])
def test_masked_out_prefix_leaves_the_base_model_unchanged(minilm, name):
    method = methods.create(name, {"num_virtual_tokens": 7})
    module, params = _with_prefix(minilm, method)
    cfg = minilm.config
    enc = _inputs(minilm.tokenizer)
    b = enc["input_ids"].shape[0]
    prompt = method.prompt_module(BERT, cfg).apply({"params": params["prompt"]}, b)
    assert prompt.embeds is None and len(prompt.prefix_kv) == cfg.num_hidden_layers
    base = classifier(cfg, 2).apply(
        {"params": {"bert": params["bert"], "classifier": params["classifier"]}}, **enc)
    masked = prompt.replace(prefix_mask=jnp.zeros((b, 7)))
    out = BertModel(cfg).apply({"params": params["bert"]}, **enc, prompt=masked, pool_rows=jnp.zeros((b, 1), jnp.int32))
    c = params["classifier"]
    np.testing.assert_allclose(np.asarray(out.pooled[:, 0]) @ np.asarray(c["kernel"]) + np.asarray(c["bias"]),
                               np.asarray(base), atol=2e-5)
    active = module.apply({"params": params}, **enc)
    assert np.abs(np.asarray(active) - np.asarray(base)).max() > 1e-3


def test_prompt_module_shapes_defaults_and_dropout():
    v2 = methods.create("ptuning_v2")
    prefix = methods.create("prefix")
    assert (v2.prefix_projection, v2.prefix_dropout) == (False, 0.1)
    assert (prefix.prefix_projection, prefix.prefix_dropout, prefix.encoder_hidden_size) == (True, 0.0, 512)
    assert v2.extra_positions() == prefix.extra_positions() == 0
    method = methods.create("ptuning_v2", {"num_virtual_tokens": 16, "prefix_dropout": 0.5})
    module = method.prompt_module(BERT, SMALL)
    params = module.init(jax.random.key(0), 1)["params"]
    assert params["prefix_keys"].shape == (2, 16, 32)
    kv = module.apply({"params": params}, 4).prefix_kv
    assert kv[1][0].shape == (1, 16, 4, 8)
    np.testing.assert_array_equal(np.asarray(kv[1][1]).reshape(16, 32), np.asarray(params["prefix_values"][1]))
    dropped = module.apply({"params": params}, 4, deterministic=False,
                           rngs={"dropout": jax.random.key(1)}).prefix_kv
    k = np.asarray(dropped[0][0])
    assert k.shape == (4, 16, 4, 8)
    zero = k == 0
    assert 0.4 < zero.mean() < 0.6
    assert not np.array_equal(zero[0], zero[1]), "each row draws its own dropout mask"
    kept = np.broadcast_to(np.asarray(params["prefix_keys"][0]).reshape(16, 4, 8) * 2, k.shape)
    np.testing.assert_allclose(k[~zero], kept[~zero], rtol=1e-6)


@pytest.mark.parametrize("options,needle", [
    ({"prefix_dropout": 1.0}, r"--prefix_dropout=1.0: must be in \[0, 1\)"),
    ({"num_virtual_tokens": -3}, "--num_virtual_tokens=-3: must be > 0"),
    ({"encoder_hidden_size": 0}, "--encoder_hidden_size=0: must be > 0"),
])
def test_bad_prefix_options(options, needle):
    with pytest.raises(UserError, match=needle):
        methods.create("prefix", options)


@pytest.mark.parametrize("name,options", [
    ("prefix", {"num_virtual_tokens": 5, "encoder_hidden_size": 16}),
    ("prefix", {"num_virtual_tokens": 5, "encoder_hidden_size": 16, "shift_positions": True}),
    ("ptuning_v2", {"num_virtual_tokens": 5}),
    ("ptuning_v2", {"num_virtual_tokens": 5, "prefix_projection": True, "encoder_hidden_size": 16,
                    "prefix_dropout": 0.0}),
])
def test_train_step_changes_only_prefix_mlp_and_head_and_export_round_trips(name, options):
    method = methods.create(name, options)
    _, before, after, mask, _ = train_steps(method)
    paths = masks.trainable_paths(mask)
    assert all(p.startswith(("prompt/", "classifier/")) for p in paths)
    assert_only_masked_leaves_changed(before, after, mask)

    exported = assert_export_round_trip(method, after)
    assert sorted(exported) == ["classifier/bias", "classifier/kernel", "prompt/prefix_keys",
                                "prompt/prefix_values"]
    assert exported["prompt/prefix_keys"].shape == (2, 5, 32)
    inference = method.for_inference()
    assert type(inference) is type(method) and inference.prefix_projection is False
    if not method.prefix_projection:
        for p in exported:
            np.testing.assert_array_equal(np.asarray(exported[p]), np.asarray(masks.flatten(after)[p]))


def test_bfloat16_train_step():
    method = methods.create("ptuning_v2", {"num_virtual_tokens": 4})
    _, before, after, mask, _ = train_steps(method, steps=2, compute=EXACT.replace(dtype="bfloat16"))
    assert_only_masked_leaves_changed(before, after, mask)
    assert masks.flatten(after)["prompt/prefix_keys"].dtype == jnp.float32


@pytest.mark.parametrize("name", ["prefix", "ptuning_v2"])
def test_shift_positions_numbers_the_input_after_the_prefix(minilm, name):
    """``shift_positions``: the classifier reads the input at positions P.. (unpacked rows, and
    packed rows' own position ids moved by P), which changes the logits."""
    enc = _inputs(minilm.tokenizer)
    b, length = enc["input_ids"].shape
    p = 6
    shifted = methods.create(name, {"num_virtual_tokens": p, "shift_positions": True})
    module, params = _with_prefix(minilm, shifted)
    plain_module, _ = _with_prefix(minilm, methods.create(name, {"num_virtual_tokens": p}))
    assert shifted.extra_positions() == p
    got = module.apply({"params": params}, **enc)
    want = plain_module.apply({"params": params}, **enc, position_ids=jnp.broadcast_to(p + jnp.arange(length), (b, length)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    assert np.abs(np.asarray(got) - np.asarray(plain_module.apply({"params": params}, **enc))).max() > 1e-3
    ids = jnp.asarray(np.tile(np.arange(length) % 5, (b, 1)))        # packed rows: positions restart
    np.testing.assert_allclose(np.asarray(module.apply({"params": params}, **enc, position_ids=ids)),
                               np.asarray(plain_module.apply({"params": params}, **enc, position_ids=ids + p)), atol=1e-5)
