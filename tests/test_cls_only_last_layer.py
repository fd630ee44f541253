"""The classifier's last layer computed for the [CLS] row only (``cls_only_last_layer``, the
default) against the same layer computed for every row: same loss and gradients for every method,
attention and kernel path, and the same [CLS] output as PyTorch's full model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import BertModel as TorchBertModel

from jaxpeft import masks, methods
from jaxpeft.compute import EXACT
from jaxpeft.models.bert import BertModel
from jaxpeft.models.kernels import pallas_common
from jaxpeft.models.loading import init_params, load_classifier
from jaxpeft.tasks.base import sequence_loss
from jaxpeft.training.steps import apply_model

from masked_step import SMALL, random_batch
from model_helpers import classifier, mask as method_mask
from test_bert_parity import _inputs

# head_dim 16, the smallest our attention kernel takes
SMALL16 = SMALL.replace(num_attention_heads=2)


def _loss_and_grads(cfg, method_name, seed=0, deterministic=True, comp=EXACT):
    method = methods.create(method_name)
    module = classifier(cfg, 2, method, comp)
    params = init_params(module, jax.random.key(seed))
    trainable, frozen = masks.split(params, method_mask(method, params))
    batch = random_batch(np.random.default_rng(seed))

    def loss(t):
        logits = apply_model(module, masks.merge(t, frozen), batch, deterministic,
                             None if deterministic else jax.random.key(3))
        return sequence_loss(logits, batch["labels"], batch["weights"], False)

    return jax.jit(jax.value_and_grad(loss))(trainable)


def _assert_same(cfg, method, rtol=1e-4, atol=1e-6, comp=EXACT):
    with pallas_common.interpreter():
        (l0, g0) = _loss_and_grads(cfg, method, comp=comp.replace(cls_only_last_layer=False))
        (l1, g1) = _loss_and_grads(cfg, method, comp=comp.replace(cls_only_last_layer=True))
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    assert jax.tree.structure(g0) == jax.tree.structure(g1)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(b, np.float32), np.asarray(a, np.float32), rtol=rtol, atol=atol,
                                   err_msg=jax.tree_util.keystr(path))


# full fine-tuning has every gradient BitFit has; prompt tuning's path is P-tuning's (virtual
# tokens after [CLS]), prefix tuning's is P-tuning v2's (keys in front in every layer)
@pytest.mark.parametrize("method", ["full", "prompt", "prefix"])
def test_same_loss_and_gradients_every_kind_of_method(method):
    _assert_same(SMALL, method)


@pytest.mark.parametrize("change", [dict(attention_impl="pallas", norm_impl="pallas"), dict(remat="layer")])
def test_same_loss_and_gradients_every_path(change):
    _assert_same(SMALL16, "full", comp=EXACT.replace(**change))


def test_bfloat16_stays_close():
    """In bf16 the one-row matmuls round differently from the full ones: close, not equal."""
    comp = EXACT.replace(dtype="bfloat16")
    (l0, g0) = _loss_and_grads(SMALL16, "full", comp=comp.replace(cls_only_last_layer=False))
    (l1, g1) = _loss_and_grads(SMALL16, "full", comp=comp)
    np.testing.assert_allclose(l1, l0, rtol=1e-3)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.max(np.abs(a - b)) <= 3e-2 * np.max(np.abs(a)) + 1e-6


def test_dropout_trains_the_same_way():
    """With dropout on, the last layer's [CLS] masks differ between the two paths (other element
    positions), so the losses differ a little; both are finite and every gradient leaf is there."""
    (l0, g0) = _loss_and_grads(SMALL, "full", deterministic=False, comp=EXACT.replace(cls_only_last_layer=False))
    (l1, g1) = _loss_and_grads(SMALL, "full", deterministic=False)
    assert np.isfinite(float(l0)) and np.isfinite(float(l1))
    assert abs(float(l1) - float(l0)) < 0.1
    assert jax.tree.structure(g0) == jax.tree.structure(g1)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(g1))


def test_cls_row_and_pooler_match_pytorch(minilm_dir):
    """The one-row last layer's [CLS] output and the pooler equal transformers' full model; the
    sequence output is that one row."""
    loaded = load_classifier(str(minilm_dir), 2)
    enc = _inputs(loaded.tokenizer)
    rows = jnp.zeros((enc["input_ids"].shape[0], 1), jnp.int32)
    out = BertModel(loaded.config).apply({"params": loaded.params["bert"]}, enc["input_ids"],
                                         enc["attention_mask"], enc["token_type_ids"], pool_rows=rows,
                                         last_rows=rows)
    seq, pooled = out.hidden, out.pooled[:, 0]
    assert seq.shape == (enc["input_ids"].shape[0], 1, loaded.config.hidden_size)
    ref = TorchBertModel.from_pretrained(str(minilm_dir), attn_implementation="eager").eval()
    with torch.no_grad():
        out = ref(**{k: torch.tensor(v) for k, v in enc.items()})
    np.testing.assert_allclose(np.asarray(seq[:, 0]), out.last_hidden_state[:, 0].numpy(), atol=1e-4)
    np.testing.assert_allclose(np.asarray(pooled), out.pooler_output.numpy(), atol=1e-4)


def test_prefix_extraction_still_sees_every_key(minilm_dir):
    """The last layer still projects every token's key and value (what prefix extraction reads)."""
    loaded = load_classifier(str(minilm_dir), 2)
    enc = _inputs(loaded.tokenizer)
    model = BertModel(loaded.config)
    args = ({"params": loaded.params["bert"]}, enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    rows = jnp.zeros((enc["input_ids"].shape[0], 1), jnp.int32)
    full_out, full = model.apply(*args, mutable=["intermediates"])
    cls_out, cls = model.apply(*args, last_rows=rows, mutable=["intermediates"])
    assert full_out.hidden.shape[1] == enc["input_ids"].shape[1] and cls_out.hidden.shape[1] == 1
    last = f"layer_{loaded.config.num_hidden_layers - 1}"
    for a, b in zip(full["intermediates"]["encoder"][last]["attention"]["self"]["key_value"],
                    cls["intermediates"]["encoder"][last]["attention"]["self"]["key_value"]):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5)
    np.testing.assert_array_equal(jnp.asarray(full["intermediates"]["encoder"]["layer_0"]["attention"]["self"]
                                              ["key_value"][0]),
                                  jnp.asarray(cls["intermediates"]["encoder"]["layer_0"]["attention"]["self"]
                                              ["key_value"][0]))
