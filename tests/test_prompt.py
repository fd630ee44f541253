"""Prompt tuning and P-tuning v1: zero effect when masked out, pooling on the real [CLS], the
text-initialised prompt equals the same text typed into the input, initialisations, masked train
steps, export of the computed prompt."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpeft import masks, methods
from jaxpeft.training import optim
from jaxpeft.compute import EXACT
from jaxpeft.config import Optim
from jaxpeft.errors import UserError
from jaxpeft.methods.prompt import ordinary_token_ids
from jaxpeft.models.bert import BertModel
from jaxpeft.models.kernels import pallas_common
from jaxpeft.models.layers import Prompt
from jaxpeft.models.loading import load_classifier

from masked_step import assert_export_round_trip, assert_only_masked_leaves_changed, train_steps
from model_helpers import BERT, classifier

PAIRS = [
    ("it 's a charming and often affecting journey .", None),
    ("unflinchingly bleak and desperate", None),
    ("A man with a hard hat is dancing.", "A man wearing a hard hat is dancing."),
]
TEXT = "Is this review positive or negative?"


def _inputs(tokenizer):
    enc = tokenizer([a for a, _ in PAIRS], [b or "" for _, b in PAIRS], padding=True, return_tensors="np")
    assert (enc["attention_mask"] == 0).any() and (enc["token_type_ids"] == 1).any()
    return {k: enc[k].astype(np.int32) for k in ("input_ids", "attention_mask", "token_type_ids")}


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    return load_classifier(str(minilm_dir), 2)


def _with_prompt(minilm, method, seed=3):
    """The MiniLM classifier with ``method``'s prompt: pretrained encoder, the method's own
    initialisation, random head. Returns ``(module, params)``."""
    prompt = method.prompt_module(BERT, minilm.config)
    module = classifier(minilm.config, 2, method)
    k_head, k_prompt, k_init = jax.random.split(jax.random.key(seed), 3)
    h = minilm.config.hidden_size
    params = {"bert": minilm.params["bert"],
              "classifier": {"kernel": 0.5 * jax.random.normal(k_head, (h, 2)), "bias": jnp.zeros(2)},
              "prompt": prompt.init(k_prompt, 1)["params"]}
    return module, method.init_params(params, BERT, tokenizer=minilm.tokenizer, rng=k_init)


def _prompt(method, config, params, b):
    """The ``[1, P, H]`` virtual tokens ``method``'s prompt module hands the encoder."""
    return method.prompt_module(BERT, config).apply({"params": params["prompt"]}, b).embeds


def _encode(config, params, enc, **kw):
    """The encoder's ``(hidden, pooled [CLS])`` (and its state with ``mutable``)."""
    rows = jnp.zeros((enc["input_ids"].shape[0], 1), jnp.int32)
    got = BertModel(config).apply({"params": params["bert"]}, **enc, pool_rows=rows, **kw)
    out, state = got if "mutable" in kw else (got, None)
    return (out.hidden, out.pooled[:, 0]) if state is None else ((out.hidden, out.pooled[:, 0]), state)


def _head(params, pooled):
    c = params["classifier"]
    return np.asarray(pooled) @ np.asarray(c["kernel"]) + np.asarray(c["bias"])


METHODS = [("prompt", {"prompt_init": "sample_vocab"}), ("ptuning", {}), ("ptuning", {"encoder_type": "mlp"})]


@pytest.mark.parametrize("name,options", METHODS)
def test_masked_out_prompt_leaves_the_base_model_unchanged(minilm, name, options):
    method = methods.create(name, options)
    module, params = _with_prompt(minilm, method)
    cfg = minilm.config
    enc = _inputs(minilm.tokenizer)
    b, length = enc["input_ids"].shape
    p = method.extra_positions()
    prompt = _prompt(method, cfg, params, b)
    assert prompt.shape == (1, p, cfg.hidden_size)

    base_seq, base_pooled = _encode(cfg, params, enc)
    base_logits = classifier(cfg, 2).apply(
        {"params": {"bert": params["bert"], "classifier": params["classifier"]}}, **enc)
    # zero-effect setting: nobody attends to the prompt, real tokens at their own positions
    real_pos = np.concatenate([[0], np.zeros(p, int), np.arange(1, length)])
    seq, pooled = _encode(cfg, params, enc, prompt=Prompt(embeds=prompt, mask=jnp.zeros((b, p))),
                          position_ids=jnp.broadcast_to(real_pos, (b, length + p)))
    assert seq.shape == (b, length + p, cfg.hidden_size)
    real = np.r_[0, p + 1:length + p]
    valid = enc["attention_mask"].astype(bool)
    np.testing.assert_allclose(np.asarray(seq)[:, real][valid], np.asarray(base_seq)[valid], atol=2e-5)
    np.testing.assert_allclose(np.asarray(pooled), np.asarray(base_pooled), atol=2e-5)
    np.testing.assert_allclose(_head(params, pooled), np.asarray(base_logits), atol=2e-5)
    # ... and with the prompt attended to, it does change the outputs
    active = module.apply({"params": params}, **enc)
    assert np.abs(np.asarray(active) - np.asarray(base_logits)).max() > 1e-3


@pytest.mark.parametrize("name,options", METHODS[:2])
def test_pooled_output_reads_the_real_cls(minilm, name, options):
    """The pooler reads sequence position 0, and position 0 is the real [CLS] at position id 0:
    its layer-0 key (a function of its own embedding only) is the base model's [CLS] key."""
    method = methods.create(name, options)
    module, params = _with_prompt(minilm, method)
    enc = _inputs(minilm.tokenizer)
    prompt = _prompt(method, minilm.config, params, 3)
    (seq, pooled), state = _encode(minilm.config, params, enc, prompt=Prompt(embeds=prompt),
                                   mutable=["intermediates"])
    _, base_state = _encode(minilm.config, params, enc, mutable=["intermediates"])
    key0 = lambda st: np.asarray(st["intermediates"]["encoder"]["layer_0"]["attention"]["self"]["key_value"][0][0])  # noqa: E731
    np.testing.assert_allclose(key0(state)[:, 0], key0(base_state)[:, 0], atol=1e-5)
    assert np.abs(key0(state)[:, 1] - key0(base_state)[:, 0]).max() > 1e-2
    pool = params["bert"]["pooler"]["dense"]
    at = lambda i: np.tanh(np.asarray(seq[:, i]) @ np.asarray(pool["kernel"]) + np.asarray(pool["bias"]))  # noqa: E731
    np.testing.assert_allclose(np.asarray(pooled), at(0), atol=1e-5)
    assert np.abs(np.asarray(pooled) - at(1)).max() > 1e-2       # position 1 is the first virtual token
    logits = module.apply({"params": params}, **enc)
    np.testing.assert_allclose(np.asarray(logits), _head(params, at(0)), atol=1e-5)


def test_our_attention_kernel_with_the_prompt_equals_dense_attention(minilm):
    """20 prompt tokens in front of 28: 48 keys, which our kernel covers as a main segment of 32 and
    a tail of 16 (not a power of two). Logits and the prompt's and head's gradients as with dense
    attention, padding included."""
    from jaxpeft.models.kernels import pallas_attention

    method = methods.create("prompt", {"prompt_init": "sample_vocab"})
    module, params = _with_prompt(minilm, method)
    enc = minilm.tokenizer([a for a, _ in PAIRS], padding="max_length", max_length=28, return_tensors="np")
    enc = {k: jnp.asarray(enc[k], jnp.int32) for k in ("input_ids", "attention_mask", "token_type_ids")}
    t = 28 + method.extra_positions()
    assert pallas_attention.segments(t) == (32, 16) and pallas_attention.fast_length(t)
    results = {}
    for impl in ("dense", "pallas"):
        cfg = minilm.config
        model = classifier(cfg, 2, method, EXACT.replace(attention_impl=impl))
        loss = lambda p, model=model: jnp.sum(jax.nn.log_softmax(model.apply({"params": p}, **enc))[:, 0])  # noqa: E731
        with pallas_common.interpreter():
            results[impl] = (model.apply({"params": params}, **enc), jax.grad(loss)(params))
    np.testing.assert_allclose(np.asarray(results["pallas"][0]), np.asarray(results["dense"][0]), atol=2e-5)
    for part in ("prompt", "classifier"):
        for a, b in zip(jax.tree.leaves(results["pallas"][1][part]), jax.tree.leaves(results["dense"][1][part])):
            assert np.abs(np.asarray(b)).max() > 0
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


def _expected_text_ids(tokenizer, text, n):
    ids = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(text))
    return [ids[i % len(ids)] for i in range(n)]


@pytest.mark.parametrize("n", [3, 7, 20])   # cut, exactly the text (7 tokens), repeated
def test_text_init_is_the_word_embeddings_of_the_tokenized_text(minilm, n):
    method = methods.create("prompt", {"num_virtual_tokens": n, "prompt_init": "text", "prompt_init_text": TEXT})
    module, params = _with_prompt(minilm, method)
    ids = _expected_text_ids(minilm.tokenizer, TEXT, n)
    assert len(minilm.tokenizer.tokenize(TEXT)) == 7
    words = np.asarray(params["bert"]["embeddings"]["word_embeddings"]["embedding"])
    np.testing.assert_array_equal(np.asarray(params["prompt"]["prompt_embeddings"]), words[ids])


def test_text_prompt_equals_the_text_typed_after_cls(minilm):
    """Layout check: a text-initialised prompt of the text's length is the same model as the
    text written right after [CLS] (same positions, token types, attention)."""
    n = len(minilm.tokenizer.tokenize(TEXT))
    method = methods.create("prompt", {"num_virtual_tokens": n, "prompt_init": "text", "prompt_init_text": TEXT})
    module, params = _with_prompt(minilm, method)
    enc = _inputs(minilm.tokenizer)
    b = enc["input_ids"].shape[0]
    text_ids = np.asarray(_expected_text_ids(minilm.tokenizer, TEXT, n), np.int32)
    typed = {"input_ids": np.concatenate([enc["input_ids"][:, :1], np.tile(text_ids, (b, 1)),
                                          enc["input_ids"][:, 1:]], 1),
             "attention_mask": np.concatenate([enc["attention_mask"][:, :1], np.ones((b, n), np.int32),
                                               enc["attention_mask"][:, 1:]], 1),
             "token_type_ids": np.concatenate([enc["token_type_ids"][:, :1], np.zeros((b, n), np.int32),
                                               enc["token_type_ids"][:, 1:]], 1)}
    want = classifier(minilm.config, 2).apply(
        {"params": {"bert": params["bert"], "classifier": params["classifier"]}}, **typed)
    got = module.apply({"params": params}, **enc)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_sample_vocab_and_random_init(minilm):
    _, params = _with_prompt(minilm, methods.create("prompt", {"prompt_init": "sample_vocab"}))
    words = np.asarray(params["bert"]["embeddings"]["word_embeddings"]["embedding"])
    prompt = np.asarray(params["prompt"]["prompt_embeddings"])
    rows = [np.flatnonzero((words == r).all(axis=1)) for r in prompt]
    assert all(len(r) == 1 for r in rows), "every virtual token is one row of the vocabulary"
    ids = [int(r[0]) for r in rows]
    assert len(set(ids)) == len(ids)
    ordinary = set(ordinary_token_ids(minilm.tokenizer).tolist())
    assert set(ids) <= ordinary and minilm.tokenizer.cls_token_id not in ordinary
    for t in minilm.tokenizer.convert_ids_to_tokens(ids):
        assert not t.startswith("##") and not (len(t) > 2 and t.startswith("[")), t
    _, again = _with_prompt(minilm, methods.create("prompt", {"prompt_init": "sample_vocab"}))
    np.testing.assert_array_equal(np.asarray(again["prompt"]["prompt_embeddings"]), prompt)

    _, params = _with_prompt(minilm, methods.create("prompt", {"prompt_init": "random"}))
    rnd = np.asarray(params["prompt"]["prompt_embeddings"])
    assert abs(rnd.std() / words.std() - 1) < 0.1 and abs(rnd.mean()) < 0.1 * words.std()


@pytest.mark.parametrize("options,needle", [
    ({"prompt_init": "vocab"}, "--prompt_init=vocab: choose one of random, sample_vocab, text"),
    ({"prompt_init": "text"}, "needs --prompt_init_text"),
    ({"num_virtual_tokens": 0}, "--num_virtual_tokens=0: must be > 0"),
])
def test_bad_prompt_options(options, needle):
    with pytest.raises(UserError, match=needle):
        methods.create("prompt", options)


def test_bad_ptuning_options():
    with pytest.raises(UserError, match="--encoder_type=gru: choose one of lstm, mlp"):
        methods.create("ptuning", {"encoder_type": "gru"})
    # the prompt comes out of the encoder: prompt tuning's initialisations are no option of it
    with pytest.raises(UserError, match="--prompt_init is not an option of --method=ptuning"):
        methods.create("ptuning", {"prompt_init": "text", "prompt_init_text": "hi"})


@pytest.mark.parametrize("name,options", [
    ("prompt", {"num_virtual_tokens": 5}),
    ("ptuning", {"num_virtual_tokens": 5}),
    ("ptuning", {"num_virtual_tokens": 5, "encoder_type": "mlp", "encoder_hidden_size": 24}),
])
def test_train_step_changes_only_prompt_encoder_and_head_and_export_round_trips(name, options):
    method = methods.create(name, options)
    _, before, after, mask, state = train_steps(method)
    paths = masks.trainable_paths(mask)
    assert all(p.startswith(("prompt/", "classifier/")) for p in paths)
    assert "prompt/prompt_embeddings" in paths or "prompt/input_embeddings" in paths
    assert_only_masked_leaves_changed(before, after, mask)
    n_opt = sum(x.size for x in jax.tree_util.tree_leaves(state.opt_state) if getattr(x, "ndim", 0) > 0)
    assert n_opt == 2 * masks.count(before, mask)[0]

    exported = assert_export_round_trip(method, after)   # logits of the exported adapter agree
    if name == "prompt":
        assert sorted(exported) == paths
    else:   # the computed prompt under prompt tuning's path, no encoder
        assert sorted(exported) == ["classifier/bias", "classifier/kernel", "prompt/prompt_embeddings"]
        assert exported["prompt/prompt_embeddings"].shape == (5, 32)
        assert isinstance(method.for_inference(), methods.PromptTuning)


def test_head_learning_rate_scales_only_the_head_updates():
    params = {"prompt": {"prompt_embeddings": jnp.ones((2, 3))},
              "classifier": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
    grads = jax.tree_util.tree_map(lambda x: jnp.full_like(x, 0.5), params)

    def first_update(**kw):
        tx = optim.make_optimizer(Optim(learning_rate=1e-3, warmup_ratio=0.0, **kw), [r"^classifier/"])
        return masks.flatten(tx.update(grads, tx.init(params), params)[0])

    same, split = first_update(), first_update(head_learning_rate=3e-2)
    np.testing.assert_allclose(split["prompt/prompt_embeddings"], same["prompt/prompt_embeddings"])
    for p in ("classifier/kernel", "classifier/bias"):
        np.testing.assert_allclose(split[p], 30 * np.asarray(same[p]), rtol=1e-5)
    assert float(np.abs(same["classifier/kernel"]).max()) > 0
    with pytest.raises(UserError, match="--head_learning_rate=-1.0: must be > 0"):
        first_update(head_learning_rate=-1.0)


def test_ptuning_lstm_encoder_equals_torch_and_is_unrolled():
    """P-tuning's LSTM encoder (2-layer bidirectional LSTM + MLP, as peft's ``PromptEncoder``)
    gives ``torch.nn.LSTM``'s prompt with the same weights; our LSTM's hand-written backward pass
    gives the gradients of autodiff through flax's own cells; the encoder's gradient compiles to
    straight-line code (no device loop)."""
    torch = pytest.importorskip("torch")
    from jaxpeft.methods.prompt import PromptEncoder, bidirectional_lstm

    p, h, e = 6, 16, 8
    enc = PromptEncoder(num_virtual_tokens=p, hidden_size=h, encoder_hidden_size=e)
    params = jax.jit(lambda r: enc.init(r, 2)["params"])(jax.random.key(0))
    rng = np.random.default_rng(0)   # non-zero biases, so their placement is checked too
    params = jax.tree_util.tree_map(lambda x: x + 0.1 * rng.normal(size=x.shape).astype(np.float32), params)
    want_shape = (1, p, h)
    got = np.asarray(jax.jit(lambda q: enc.apply({"params": q}, 2))(params).embeds)
    assert got.shape == want_shape

    t = lambda x: torch.tensor(np.asarray(x), dtype=torch.float64)   # noqa: E731
    lstm = torch.nn.LSTM(h, e, num_layers=2, bidirectional=True, batch_first=True).double()
    with torch.no_grad():
        for layer in range(2):
            for direction, suffix in (("forward", ""), ("backward", "_reverse")):
                cell = params[f"lstm_{layer}_{direction}"]
                gates = "ifgo"   # torch's order of the four gates, as flax names them
                getattr(lstm, f"weight_ih_l{layer}{suffix}").copy_(
                    torch.cat([t(cell[f"i{g}"]["kernel"]).T for g in gates]))
                getattr(lstm, f"weight_hh_l{layer}{suffix}").copy_(
                    torch.cat([t(cell[f"h{g}"]["kernel"]).T for g in gates]))
                getattr(lstm, f"bias_ih_l{layer}{suffix}").zero_()
                getattr(lstm, f"bias_hh_l{layer}{suffix}").copy_(
                    torch.cat([t(cell[f"h{g}"]["bias"]) for g in gates]))
        out, _ = lstm(t(params["input_embeddings"])[None])
        hid = torch.relu(out[0] @ t(params["mlp_in"]["kernel"]) + t(params["mlp_in"]["bias"]))
        ref = (hid @ t(params["mlp_out"]["kernel"]) + t(params["mlp_out"]["bias"])).numpy()
    np.testing.assert_allclose(got[0], ref, rtol=1e-5, atol=1e-5)

    # gradients: our hand-written backward pass against autodiff through flax's own cells
    import flax.linen as nn

    class FlaxLSTM(nn.Module):
        @nn.compact
        def __call__(self, x):
            for i in range(2):
                x = nn.Bidirectional(nn.RNN(nn.OptimizedLSTMCell(e, name=f"lstm_{i}_forward")),
                                     nn.RNN(nn.OptimizedLSTMCell(e, name=f"lstm_{i}_backward")))(x)
            return x

    lstm_params = {k: v for k, v in params.items() if k.startswith("lstm_")}
    w = rng.normal(size=(p, 2 * e)).astype(np.float32)
    def our_lstm(q, x):
        for i in range(2):
            x = bidirectional_lstm(x, q[f"lstm_{i}_forward"], q[f"lstm_{i}_backward"])
        return x

    ours = jax.jit(jax.grad(lambda q, x: jnp.sum(our_lstm(q, x) * w), argnums=(0, 1)))
    ref = jax.jit(jax.grad(lambda q, x: jnp.sum(FlaxLSTM().apply({"params": q}, x[None])[0] * w),
                           argnums=(0, 1)))
    args = (lstm_params, params["input_embeddings"])
    for a, b in zip(jax.tree.leaves(ref(*args)), jax.tree.leaves(ours(*args))):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)

    grad = jax.jit(jax.grad(lambda q: jnp.sum(enc.apply({"params": q}, 2).embeds ** 2)))
    assert " while(" not in grad.lower(params).compile().as_text()


def test_fresh_params_made_on_the_host_equal_the_device_init():
    """``init_params(on_host=True)`` (what an accelerator does for a pretrained model's fresh params:
    the CPU computes them, then they are placed) gives the same params, holes and placement as the
    device's own init; here with P-tuning's LSTM encoder (orthogonal recurrent kernels)."""
    import optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from masked_step import SMALL
    from jaxpeft.models.loading import init_params, trace_init

    method = methods.create("ptuning", {"num_virtual_tokens": 4})
    module = classifier(SMALL, 2, method)
    traced = trace_init(module)
    skip = [p for p in masks.flatten(traced.shapes) if p.startswith("bert/")]
    mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
    replicated = NamedSharding(mesh, PartitionSpec())
    place = lambda shapes: jax.tree_util.tree_map(lambda _: replicated, shapes)     # noqa: E731
    for shardings in (None, place):
        on_device = init_params(module, jax.random.key(3), shardings, skip=skip, traced=traced, on_host=False)
        on_host = init_params(module, jax.random.key(3), shardings, skip=skip, traced=traced, on_host=True)
        a, b = masks.flatten(on_device), masks.flatten(on_host)
        assert sorted(a) == sorted(b) and any("lstm_1_backward" in p for p in a)
        assert not any(p.startswith("bert/") for p in b)
        for p in a:
            np.testing.assert_array_equal(np.asarray(a[p]), np.asarray(b[p]))
            if shardings is not None:
                assert b[p].sharding == replicated
        holes = jax.tree_util.tree_leaves(on_host, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
        assert sum(isinstance(x, optax.MaskedNode) for x in holes) == len(skip)
