"""Embedding tables whose gradients are sums instead of scatter-adds: same values and gradients as
``jnp.take``'s autodiff, and the embedding gradients of a whole BERT equal PyTorch's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import BertModel as TorchBertModel

from jaxpeft.models.bert import BertModel
from jaxpeft.models.kernels.embedding_lookup import SMALL_TABLE_ROWS, take_small
from jaxpeft.models.loading import load_classifier

from test_bert_parity import _inputs


@pytest.mark.parametrize("rows", [1, 2, SMALL_TABLE_ROWS])
def test_take_small_matches_take(rows):
    rng = np.random.default_rng(rows)
    table = jnp.asarray(rng.normal(size=(rows, 24)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, rows, size=(5, 7)), jnp.int32)
    w = jnp.asarray(rng.normal(size=(5, 7, 24)), jnp.float32)

    def loss(take):
        return lambda t: jnp.sum(take(t, ids) * w)

    np.testing.assert_array_equal(take_small(table, ids), jnp.take(table, ids, axis=0))
    got = jax.jit(jax.grad(loss(take_small)))(table)
    want = jax.grad(loss(lambda t, i: jnp.take(t, i, axis=0)))(table)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # a row no id points at gets no gradient
    unused = np.setdiff1d(np.arange(rows), np.asarray(ids))
    assert np.all(np.asarray(got)[unused] == 0)


def test_take_small_refuses_large_tables():
    with pytest.raises(ValueError, match="at most"):
        jax.vjp(take_small, jnp.zeros((SMALL_TABLE_ROWS + 1, 4)), jnp.zeros((2,), jnp.int32))


def test_default_positions_equal_explicit_ones(tiny_bert_dir):
    """``position_ids=None`` (a slice of the table) and explicit ``0..L-1`` (a gather): same output
    and same gradient of every param."""
    loaded = load_classifier(str(tiny_bert_dir), 2)
    enc = _inputs(loaded.tokenizer)
    b, t = enc["input_ids"].shape
    model = BertModel(loaded.config)
    w = jnp.asarray(np.random.default_rng(0).normal(size=(b, t, loaded.config.hidden_size)), jnp.float32)

    def loss(params, position_ids):
        seq = model.apply({"params": params}, enc["input_ids"], enc["attention_mask"],
                          enc["token_type_ids"], position_ids).hidden
        return jnp.sum(seq * w)

    explicit = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    l0, g0 = jax.value_and_grad(loss)(loaded.params["bert"], None)
    l1, g1 = jax.value_and_grad(loss)(loaded.params["bert"], explicit)
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    for a, c in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)


def test_embedding_gradients_match_pytorch(tiny_bert_dir):
    """Sentence pairs (token types 0 and 1) with padding: the gradients of the word, position and
    token-type tables of ``sum(sequence_output * w)`` over the real tokens equal transformers' in
    float32."""
    loaded = load_classifier(str(tiny_bert_dir), 2)
    enc = _inputs(loaded.tokenizer)
    assert set(np.unique(enc["token_type_ids"])) == {0, 1}
    b, t = enc["input_ids"].shape
    w = np.random.default_rng(1).normal(size=(b, t, loaded.config.hidden_size)).astype(np.float32)
    # padded positions out of the loss, as in training: PyTorch's word table has padding_idx=0 and
    # never gives the [PAD] row a gradient, ours gives it what the padded outputs send back
    w *= enc["attention_mask"][..., None]
    model = BertModel(loaded.config)

    def loss(params):
        seq = model.apply({"params": params}, enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]).hidden
        return jnp.sum(seq * w)

    grads = jax.jit(jax.grad(loss))(loaded.params["bert"])["embeddings"]

    ref = TorchBertModel.from_pretrained(str(tiny_bert_dir), attn_implementation="eager").eval()
    out = ref(**{k: torch.tensor(v) for k, v in enc.items()})
    (out.last_hidden_state * torch.tensor(w)).sum().backward()
    for ours, theirs in (("word_embeddings", ref.embeddings.word_embeddings),
                         ("position_embeddings", ref.embeddings.position_embeddings),
                         ("token_type_embeddings", ref.embeddings.token_type_embeddings)):
        want = theirs.weight.grad.numpy()
        got = np.asarray(grads[ours]["embedding"])
        assert got.shape == want.shape, ours
        scale = np.abs(want).max()
        assert scale > 0, ours
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * scale, err_msg=ours)
