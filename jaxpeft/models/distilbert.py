"""The DistilBERT family (``model_type`` ``distilbert``): a six-layer BERT without token types
or pooler, under its own names (:data:`FAMILY`).

What differs from BERT (:mod:`jaxpeft.models.bert`):

* **Names and config.** ``distilbert.embeddings.{word_embeddings,position_embeddings,LayerNorm}``;
  ``distilbert.transformer.layer.N.attention.{q_lin,k_lin,v_lin,out_lin}``, ``sa_layer_norm``,
  ``ffn.{lin1,lin2}``, ``output_layer_norm``. ``config.json`` says ``dim``, ``n_layers``,
  ``n_heads``, ``hidden_dim``, ``activation``, ``dropout``, ``attention_dropout``;
  :class:`DistilBertConfig` exposes BERT's names as properties. LayerNorm epsilon is 1e-12.
* **No token types**: ``token_type_ids`` are ignored (the tokenizer may still give pairs types).
* **Sublayers**: the attention's output projection has no dropout after it; the feed-forward block
  is ``lin1`` -> activation -> ``lin2`` -> dropout. A method's sublayer hook sits after each, before
  the residual connection and LayerNorm.
* **Head** (transformers' ``DistilBertForSequenceClassification``): ``pre_classifier`` -> ReLU ->
  dropout (``seq_classif_dropout``) -> ``classifier`` on the ``[CLS]`` row; both are the head's
  top-level modules. Token classification reads ``dropout``.

Positions are BERT's (``0..L-1``, virtual tokens counted, a prefix's ``position_offset`` added);
a table of sinusoids (``sinusoidal_pos_embds``) is in the checkpoint like a learned one. Attention
runs through :mod:`jaxpeft.models.qkv_attention`: under ``attention_impl="pallas"`` (BERT's
fused-q/k/v kernel) it uses cuDNN's attention instead (XLA's where cuDNN cannot take the head
size), and ``norm_impl="pallas"`` uses XLA's LayerNorm, so ``--compute=fast`` runs.

peft has no default ``target_modules`` for DistilBERT; ours are the attention's query and value
projections for LoRA (``q_lin,v_lin``, give them to peft as ``target_modules``), and for IA3
``k_lin,v_lin,ffn.lin2`` with feed-forward ``ffn.lin2`` (BERT's choice in DistilBERT's names).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxpeft.compute import EXACT, Compute
from jaxpeft.models import layers
from jaxpeft.models.bert import EncoderOutput
from jaxpeft.models.family import Family
from jaxpeft.models.kernels.embedding_lookup import EmbedTable
from jaxpeft.models.layers import NO_HOOKS, NO_PROMPT, Hooks, KeyMask, Prompt
from jaxpeft.models.qkv_attention import self_attention

Array = jax.Array
LAYER_NORM_EPS = 1e-12


@dataclasses.dataclass(frozen=True)
class DistilBertConfig:
    """Architecture of a DistilBERT encoder (transformers' field names; BERT's as properties)."""

    vocab_size: int = 30522
    dim: int = 768
    n_layers: int = 6
    n_heads: int = 12
    hidden_dim: int = 3072
    activation: str = "gelu"
    dropout: float = 0.1
    attention_dropout: float = 0.1
    seq_classif_dropout: float = 0.2
    max_position_embeddings: int = 512
    initializer_range: float = 0.02
    pad_token_id: int = 0

    def __post_init__(self):
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not a multiple of n_heads {self.n_heads}")
        layers.activation(self.activation)

    hidden_size = property(lambda self: self.dim)
    num_hidden_layers = property(lambda self: self.n_layers)
    num_attention_heads = property(lambda self: self.n_heads)
    intermediate_size = property(lambda self: self.hidden_dim)
    hidden_dropout_prob = property(lambda self: self.dropout)
    attention_probs_dropout_prob = property(lambda self: self.attention_dropout)
    head_dim = property(lambda self: self.dim // self.n_heads)
    #: the token-classification head's dropout is ``dropout`` (``hidden_dropout_prob``)
    classifier_dropout = property(lambda self: None)

    @classmethod
    def from_hf(cls, hf_config: Any, **overrides: Any) -> "DistilBertConfig":
        get = hf_config.get if isinstance(hf_config, dict) else (lambda k, d=None: getattr(hf_config, k, d))
        kw = {f.name: get(f.name, None) for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in kw.items() if v is not None}
        kw.update(overrides)
        return cls(**kw)

    def replace(self, **kw: Any) -> "DistilBertConfig":
        return dataclasses.replace(self, **kw)


class DistilBertEmbeddings(nn.Module):
    config: DistilBertConfig
    compute: Compute = EXACT

    @nn.compact
    def __call__(self, input_ids: Array, position_ids: Array | None, deterministic: bool = True,
                 prompt: Prompt = NO_PROMPT) -> Array:
        cfg = self.config
        init = nn.initializers.normal(cfg.initializer_range)
        words = nn.Embed(cfg.vocab_size, cfg.dim, embedding_init=init, param_dtype=jnp.float32,
                         name="word_embeddings")(input_ids)
        if prompt.embeds is not None:
            p = jnp.broadcast_to(prompt.embeds.astype(words.dtype), (words.shape[0],) + prompt.embeds.shape[-2:])
            words = layers.insert_virtual(words, p, prompt.front)
        pos_table = EmbedTable(cfg.max_position_embeddings, cfg.dim, init, name="position_embeddings")()
        offset = prompt.position_offset
        if position_ids is None:
            pos = pos_table[None, offset:offset + words.shape[1]]
        else:
            pos = jnp.take(pos_table, position_ids + offset, axis=0)
        x = layers.layer_norm(LAYER_NORM_EPS, self.compute)(words + pos)
        return layers.dropout(self.compute, cfg.dropout)(x, deterministic=deterministic)


class MultiHeadSelfAttention(nn.Module):
    """``q_lin``/``k_lin``/``v_lin`` -> attention -> ``out_lin`` -> (the sublayer hook)."""

    config: DistilBertConfig
    compute: Compute = EXACT
    hooks: Hooks = NO_HOOKS

    @nn.compact
    def __call__(self, x: Array, mask: KeyMask, deterministic: bool = True,
                 prefix: tuple[Array, Array] | None = None, query_rows: Array | None = None) -> Array:
        cfg, comp = self.config, self.compute
        h = self_attention(self, x, ("q_lin", "k_lin", "v_lin"), mask, comp, self.hooks, heads=cfg.n_heads,
                           head_dim=cfg.head_dim, initializer_range=cfg.initializer_range,
                           dropout_rate=cfg.attention_dropout, deterministic=deterministic, prefix=prefix,
                           query_rows=query_rows)
        y = layers.dense(self, "out_lin", h, cfg.dim, cfg.initializer_range, comp, self.hooks, deterministic)
        sub = self.hooks.sublayer_for(self, "attention", cfg.dim)
        return y if sub is None else sub(y, deterministic)


class FFN(nn.Module):
    """``lin1`` -> activation -> ``lin2`` -> dropout -> (the sublayer hook)."""

    config: DistilBertConfig
    compute: Compute = EXACT
    hooks: Hooks = NO_HOOKS

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        cfg, comp = self.config, self.compute
        h = layers.dense(self, "lin1", x, cfg.hidden_dim, cfg.initializer_range, comp, self.hooks, deterministic)
        h = layers.activation(cfg.activation)(h)
        y = layers.dense(self, "lin2", h, cfg.dim, cfg.initializer_range, comp, self.hooks, deterministic)
        y = layers.dropout(comp, cfg.dropout)(y, deterministic=deterministic)
        sub = self.hooks.sublayer_for(self, "ffn", cfg.dim)
        return y if sub is None else sub(y, deterministic)


class TransformerBlock(nn.Module):
    """One layer; with ``query_rows`` its output is those rows' alone, ``[B, K, H]``."""

    config: DistilBertConfig
    compute: Compute = EXACT
    hooks: Hooks = NO_HOOKS

    @nn.compact
    def __call__(self, x: Array, mask: KeyMask, deterministic: bool = True,
                 prefix: tuple[Array, Array] | None = None, query_rows: Array | None = None) -> Array:
        cfg, comp, hk = self.config, self.compute, self.hooks
        a = MultiHeadSelfAttention(cfg, comp, hk, name="attention")(x, mask, deterministic, prefix, query_rows)
        residual = x if query_rows is None else layers.gather_rows(x, query_rows)
        a = layers.layer_norm(LAYER_NORM_EPS, comp, name="sa_layer_norm")(a + residual)
        f = FFN(cfg, comp, hk, name="ffn")(a, deterministic)
        return layers.layer_norm(LAYER_NORM_EPS, comp, name="output_layer_norm")(f + a)


class Transformer(nn.Module):
    config: DistilBertConfig
    compute: Compute = EXACT
    hooks: Hooks = NO_HOOKS

    @nn.compact
    def __call__(self, x: Array, mask: KeyMask, deterministic: bool = True,
                 prefix_kv: tuple | None = None, last_rows: Array | None = None) -> Array:
        cfg = self.config
        if prefix_kv is not None and len(prefix_kv) != cfg.n_layers:
            raise ValueError(f"prefix_kv has {len(prefix_kv)} layers, the model {cfg.n_layers}")
        block = self.compute.remat_layer(TransformerBlock, (3,))
        for i in range(cfg.n_layers):
            prefix = None if prefix_kv is None else prefix_kv[i]
            rows = last_rows if i == cfg.n_layers - 1 else None
            x = block(cfg, self.compute, self.hooks, name=f"layer_{i}")(x, mask, deterministic, prefix, rows)
        return x


class DistilBertModel(nn.Module):
    """The encoder (transformers' ``DistilBertModel``), called like
    :class:`~jaxpeft.models.bert.BertModel`; ``token_type_ids`` and ``pool_rows`` are ignored."""

    config: DistilBertConfig
    compute: Compute = EXACT
    hooks: Hooks = NO_HOOKS

    @nn.compact
    def __call__(self, input_ids: Array, attention_mask: Array | None = None,
                 token_type_ids: Array | None = None, position_ids: Array | None = None, *,
                 deterministic: bool = True, prompt: Prompt = NO_PROMPT, segment_ids: Array | None = None,
                 pool_rows: Array | None = None, last_rows: Array | None = None) -> EncoderOutput:
        del token_type_ids, pool_rows
        cfg = self.config
        comp = self.compute.replace(norm_impl="xla")
        length = input_ids.shape[1]
        valid = layers.input_valid(input_ids, attention_mask, segment_ids, prompt)
        total = length + prompt.num_virtual
        if total + prompt.position_offset > cfg.max_position_embeddings:
            raise ValueError(f"sequence of {total} tokens (virtual tokens included) from position "
                             f"{prompt.position_offset} exceeds max_position_embeddings={cfg.max_position_embeddings}")
        x = DistilBertEmbeddings(cfg, comp, name="embeddings")(input_ids, position_ids, deterministic, prompt)
        mask = layers.key_mask(valid, prompt, segment_ids)
        x = Transformer(cfg, comp, self.hooks, name="transformer")(x, mask, deterministic, prompt.prefix_kv, last_rows)
        return EncoderOutput(x, valid, None)


def sequence_head(config: DistilBertConfig, num_labels: int, compute: Compute, pooling: str, read: Array,
                  pooled: Array | None, deterministic: bool = True) -> Array:
    """transformers' ``DistilBertForSequenceClassification`` head, built in the caller's scope:
    ``pre_classifier`` -> ReLU -> dropout -> ``classifier`` on the ``[CLS]`` row (``pooling="cls"``)
    or the vector it reads."""
    del pooled
    dt = jnp.dtype(compute.dtype)
    init = nn.initializers.normal(config.initializer_range)
    x = nn.Dense(config.dim, dtype=dt, param_dtype=jnp.float32, kernel_init=init, name="pre_classifier")(read)
    x = jax.nn.relu(x)
    x = layers.dropout(compute, config.seq_classif_dropout)(x, deterministic=deterministic)
    return nn.Dense(num_labels, dtype=dt, param_dtype=jnp.float32, kernel_init=init, name="classifier")(x)


_LAYER = r"transformer/layer_\d+"
#: BitFit's BERT terms in DistilBERT's names.
BITFIT_TERMS = {
    "query": rf"{_LAYER}/attention/q_lin/bias$",
    "key": rf"{_LAYER}/attention/k_lin/bias$",
    "value": rf"{_LAYER}/attention/v_lin/bias$",
    "attention_output": rf"{_LAYER}/attention/out_lin/bias$",
    "attention_layernorm": rf"{_LAYER}/sa_layer_norm/bias$",
    "intermediate": rf"{_LAYER}/ffn/lin1/bias$",
    "output": rf"{_LAYER}/ffn/lin2/bias$",
    "output_layernorm": rf"{_LAYER}/output_layer_norm/bias$",
}

FAMILY = Family(
    name="distilbert", model_types=("distilbert",), prefix="distilbert", config=DistilBertConfig,
    encoder=DistilBertModel, sequence_head=sequence_head, word_embeddings="distilbert/embeddings/word_embeddings/embedding",
    pooler_in_encoder=False, head_modules=("pre_classifier", "classifier"), bitfit_terms=BITFIT_TERMS,
    lora_targets=("q_lin", "v_lin"), ia3_targets=("k_lin", "v_lin", "ffn.lin2"), ia3_feedforward=("ffn.lin2",),
    position_scheme="absolute", packing=True, check_compute=None)
