"""The MPNet family (``model_type`` ``mpnet``): BERT-shaped layers with a relative position bias
on the attention scores, absolute positions past the padding id, no token types (:data:`FAMILY`).

What differs from BERT (:mod:`jaxpeft.models.bert`):

* **Relative position bias.** One table ``mpnet.encoder.relative_attention_bias`` (``[buckets,
  heads]``) gives every layer the same bias, added to the scaled scores: for a query at index
  ``i`` and a key at index ``j`` of the sequence, the bucket of ``j - i`` (transformers'
  ``MPNetEncoder.compute_position_bias``: 32 buckets, bidirectional, exact up to 8 apart, then
  logarithmic up to 128; transformers uses 32 buckets whatever ``relative_attention_num_buckets``
  says, and so do we). Indices are the sequence's own, virtual tokens included, as transformers
  numbers the ``inputs_embeds`` peft hands it; in packed rows, index differences within an example
  are its own (other examples are masked out).
* **Prefix keys** (transformers' MPNet takes no past keys/values, so this is our definition): the
  ``P`` prefix keys are read as ``P`` tokens right in front of the sequence, indices ``-P..-1``:
  a query at ``i`` sees prefix key ``j`` at relative position ``j - P - i``. With the prefix's
  ``position_offset`` (``P``) moving the absolute positions up as well, a prefix equal to the keys
  and values of ``P`` real tokens gives exactly the outputs of those tokens typed in front.
* **Absolute positions past the padding id**, as RoBERTa (:mod:`jaxpeft.models.roberta`): real
  tokens at ``2, 3, ..`` (transformers' MPNet fixes ``padding_idx`` to 1), padding at 1; virtual
  tokens counted like text; ``position_ids`` (packed rows) are each example's positions from 0;
  :attr:`MPNetConfig.max_position_embeddings` is the usable count (the table less 2).
* **Names**: ``mpnet.encoder.layer.N.attention.attn.{q,k,v,o}``, ``attention.LayerNorm``,
  ``intermediate.dense``, ``output.dense``, ``output.LayerNorm``. No token types
  (``token_type_ids`` are ignored); pairs are ``<s> a </s></s> b </s>`` of type 0, so cosine
  pooling (which splits a pair by its token types) is refused (``Family.pair_types``).
* **Head** (transformers' ``MPNetClassificationHead``): ``classifier.dense`` -> tanh ->
  ``classifier.out_proj`` on the ``<s>`` row, dropout ``hidden_dropout_prob``; no pooler.

Attention runs through :mod:`jaxpeft.models.qkv_attention` with the bias: dense (transformers'
math), or under ``cudnn`` and ``pallas`` (BERT's fused-q/k/v kernel, which takes no bias) cuDNN's
attention with the bias (XLA's where cuDNN cannot take the head size); ``norm_impl="pallas"`` uses
XLA's LayerNorm. So ``--compute=fast`` runs.

peft has no default ``target_modules`` for MPNet; ours are the query and value projections for
LoRA (``q,v``; give them to peft), and for IA3 ``k,v,output.dense`` with feed-forward
``output.dense`` (BERT's choice: keys, values and the feed-forward output's input).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft.compute import EXACT, Compute
from jaxpeft.models import layers
from jaxpeft.models.bert import BertIntermediate, BertOutput, EncoderOutput
from jaxpeft.models.family import Family
from jaxpeft.models.kernels.embedding_lookup import EmbedTable
from jaxpeft.models.layers import NO_HOOKS, NO_PROMPT, Hooks, KeyMask, Prompt
from jaxpeft.models.qkv_attention import self_attention
from jaxpeft.models.roberta import ClassificationHead, positions_past_padding, read_hf

Array = jax.Array
#: transformers' MPNet numbers positions past this id, whatever ``pad_token_id`` says.
PADDING_IDX = 1
#: transformers' ``compute_position_bias`` buckets (its default argument, not the config's).
NUM_BUCKETS = 32
MAX_DISTANCE = 128


@dataclasses.dataclass(frozen=True)
class MPNetConfig:
    """Architecture of an MPNet encoder (transformers' field names, except
    ``position_table_size``: transformers' ``max_position_embeddings``)."""

    vocab_size: int = 30527
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    position_table_size: int = 514
    relative_attention_num_buckets: int = 32
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 1

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.relative_attention_num_buckets < NUM_BUCKETS:
            raise ValueError(f"relative_attention_num_buckets={self.relative_attention_num_buckets}: transformers' "
                             f"MPNet reads {NUM_BUCKETS} buckets")
        layers.activation(self.hidden_act)

    head_dim = property(lambda self: self.hidden_size // self.num_attention_heads)
    #: the heads' dropout is ``hidden_dropout_prob``
    classifier_dropout = property(lambda self: None)

    @property
    def max_position_embeddings(self) -> int:
        """Tokens (virtual ones included) a sequence may hold: the table less its first two rows."""
        return self.position_table_size - PADDING_IDX - 1

    @classmethod
    def from_hf(cls, hf_config: Any, **overrides: Any) -> "MPNetConfig":
        return read_hf(cls, hf_config, {"position_table_size": "max_position_embeddings"}, **overrides)

    def replace(self, **kw: Any) -> "MPNetConfig":
        return dataclasses.replace(self, **kw)


def relative_position_bucket(relative_position: np.ndarray, num_buckets: int = NUM_BUCKETS,
                             max_distance: int = MAX_DISTANCE) -> np.ndarray:
    """transformers' ``MPNetEncoder.relative_position_bucket`` (the same float32 arithmetic), on
    host integers: half the buckets for keys before the query, half for keys after it."""
    n = -np.asarray(relative_position, np.int64)
    num_buckets //= 2
    ret = (n < 0).astype(np.int64) * num_buckets
    n = np.abs(n)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    with np.errstate(divide="ignore"):
        scaled = (np.log(n.astype(np.float32) / np.float32(max_exact)) / np.float32(math.log(max_distance / max_exact))
                  * np.float32(num_buckets - max_exact))
    large = max_exact + np.where(is_small, 0, scaled).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return ret + np.where(is_small, n, large)


def position_buckets(length: int, prefix: int = 0) -> np.ndarray:
    """``[T, P + T]`` buckets of a sequence of ``length`` queries against ``prefix`` prefix keys
    (indices ``-P..-1``) and the sequence's own keys."""
    context = np.arange(length)[:, None]
    memory = np.arange(-prefix, length)[None, :]
    return relative_position_bucket(memory - context)


class MPNetEmbeddings(nn.Module):
    config: MPNetConfig
    compute: Compute = EXACT

    @nn.compact
    def __call__(self, input_ids: Array, positions: Array, deterministic: bool = True,
                 prompt: Prompt = NO_PROMPT) -> Array:
        cfg = self.config
        init = nn.initializers.normal(cfg.initializer_range)
        words = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init, param_dtype=jnp.float32,
                         name="word_embeddings")(input_ids)
        if prompt.embeds is not None:
            p = jnp.broadcast_to(prompt.embeds.astype(words.dtype), (words.shape[0],) + prompt.embeds.shape[-2:])
            words = layers.insert_virtual(words, p, prompt.front)
        pos_table = EmbedTable(cfg.position_table_size, cfg.hidden_size, init, name="position_embeddings")()
        x = layers.layer_norm(cfg.layer_norm_eps, self.compute)(words + jnp.take(pos_table, positions, axis=0))
        return layers.dropout(self.compute, cfg.hidden_dropout_prob)(x, deterministic=deterministic)


class MPNetSelfAttention(nn.Module):
    """``q``/``k``/``v`` -> attention with the position bias -> ``o``."""

    config: MPNetConfig
    compute: Compute = EXACT
    hooks: Hooks = NO_HOOKS

    @nn.compact
    def __call__(self, x: Array, mask: KeyMask, bias: Array, deterministic: bool = True,
                 prefix: tuple[Array, Array] | None = None, query_rows: Array | None = None) -> Array:
        cfg, comp = self.config, self.compute
        h = self_attention(self, x, ("q", "k", "v"), mask, comp, self.hooks, heads=cfg.num_attention_heads,
                           head_dim=cfg.head_dim, initializer_range=cfg.initializer_range,
                           dropout_rate=cfg.attention_probs_dropout_prob, deterministic=deterministic, prefix=prefix,
                           query_rows=query_rows, bias=bias)
        return layers.dense(self, "o", h, cfg.hidden_size, cfg.initializer_range, comp, self.hooks, deterministic)


class MPNetAttention(nn.Module):
    """``attn`` -> dropout -> (the sublayer hook) -> ``LayerNorm`` (+ residual)."""

    config: MPNetConfig
    compute: Compute = EXACT
    hooks: Hooks = NO_HOOKS

    @nn.compact
    def __call__(self, x: Array, mask: KeyMask, bias: Array, deterministic: bool = True,
                 prefix: tuple[Array, Array] | None = None, query_rows: Array | None = None) -> Array:
        cfg, comp = self.config, self.compute
        y = MPNetSelfAttention(cfg, comp, self.hooks, name="attn")(x, mask, bias, deterministic, prefix, query_rows)
        y = layers.dropout(comp, cfg.hidden_dropout_prob)(y, deterministic=deterministic)
        sub = self.hooks.sublayer_for(self, "attention", cfg.hidden_size)
        if sub is not None:
            y = sub(y, deterministic)
        residual = x if query_rows is None else layers.gather_rows(x, query_rows)
        return layers.layer_norm(cfg.layer_norm_eps, comp)(y + residual)


class MPNetLayer(nn.Module):
    """One layer (BERT's ``intermediate`` and ``output``); with ``query_rows`` its output is those
    rows' alone, ``[B, K, H]``."""

    config: MPNetConfig
    compute: Compute = EXACT
    hooks: Hooks = NO_HOOKS

    @nn.compact
    def __call__(self, x: Array, mask: KeyMask, bias: Array, deterministic: bool = True,
                 prefix: tuple[Array, Array] | None = None, query_rows: Array | None = None) -> Array:
        cfg, comp, hk = self.config, self.compute, self.hooks
        a = MPNetAttention(cfg, comp, hk, name="attention")(x, mask, bias, deterministic, prefix, query_rows)
        h = BertIntermediate(cfg, comp, hk, name="intermediate")(a, deterministic)
        return BertOutput(cfg, comp, hk, "ffn", name="output")(h, a, deterministic)


class MPNetEncoder(nn.Module):
    config: MPNetConfig
    compute: Compute = EXACT
    hooks: Hooks = NO_HOOKS

    @nn.compact
    def __call__(self, x: Array, mask: KeyMask, deterministic: bool = True,
                 prefix_kv: tuple | None = None, last_rows: Array | None = None) -> Array:
        cfg = self.config
        if prefix_kv is not None and len(prefix_kv) != cfg.num_hidden_layers:
            raise ValueError(f"prefix_kv has {len(prefix_kv)} layers, the model {cfg.num_hidden_layers}")
        p = 0 if prefix_kv is None else int(prefix_kv[0][0].shape[-3])
        buckets = jnp.asarray(position_buckets(x.shape[1], p), jnp.int32)
        table = nn.Embed(cfg.relative_attention_num_buckets, cfg.num_attention_heads,
                         embedding_init=nn.initializers.normal(cfg.initializer_range), param_dtype=jnp.float32,
                         name="relative_attention_bias")
        bias = jnp.transpose(table(buckets), (2, 0, 1))[None]            # [1, heads, T, P + T]
        layer_cls = self.compute.remat_layer(MPNetLayer, (4,))
        for i in range(cfg.num_hidden_layers):
            prefix = None if prefix_kv is None else prefix_kv[i]
            rows = last_rows if i == cfg.num_hidden_layers - 1 else None
            x = layer_cls(cfg, self.compute, self.hooks, name=f"layer_{i}")(x, mask, bias, deterministic, prefix, rows)
        return x


class MPNetModel(nn.Module):
    """The encoder (transformers' ``MPNetModel`` without its pooler), called like
    :class:`~jaxpeft.models.bert.BertModel`; ``token_type_ids`` and ``pool_rows`` are ignored."""

    config: MPNetConfig
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
                             f"{prompt.position_offset} exceeds max_position_embeddings={cfg.max_position_embeddings} "
                             f"(a table of {cfg.position_table_size} rows from position {PADDING_IDX + 1})")
        positions = positions_past_padding(valid, position_ids, PADDING_IDX, prompt.position_offset)
        x = MPNetEmbeddings(cfg, comp, name="embeddings")(input_ids, positions, deterministic, prompt)
        mask = layers.key_mask(valid, prompt, segment_ids)
        x = MPNetEncoder(cfg, comp, self.hooks, name="encoder")(x, mask, deterministic, prompt.prefix_kv, last_rows)
        return EncoderOutput(x, valid, None)


def sequence_head(config: MPNetConfig, num_labels: int, compute: Compute, pooling: str, read: Array,
                  pooled: Array | None, deterministic: bool = True) -> Array:
    """transformers' ``MPNetForSequenceClassification`` head (``classifier/dense`` -> tanh ->
    ``classifier/out_proj``) on the ``<s>`` row (``pooling="cls"``) or the vector it reads."""
    del pooled
    return ClassificationHead(config.hidden_size, num_labels, config.hidden_dropout_prob, config.initializer_range,
                              "tanh", compute, name="classifier")(read, deterministic)


_LAYER = r"layer_\d+"
#: BitFit's BERT terms in MPNet's names.
BITFIT_TERMS = {
    "query": rf"{_LAYER}/attention/attn/q/bias$",
    "key": rf"{_LAYER}/attention/attn/k/bias$",
    "value": rf"{_LAYER}/attention/attn/v/bias$",
    "attention_output": rf"{_LAYER}/attention/attn/o/bias$",
    "attention_layernorm": rf"{_LAYER}/attention/LayerNorm/bias$",
    "intermediate": rf"{_LAYER}/intermediate/dense/bias$",
    "output": rf"{_LAYER}/output/dense/bias$",
    "output_layernorm": rf"{_LAYER}/output/LayerNorm/bias$",
}

FAMILY = Family(
    name="mpnet", model_types=("mpnet",), prefix="mpnet", config=MPNetConfig, encoder=MPNetModel,
    sequence_head=sequence_head, word_embeddings="mpnet/embeddings/word_embeddings/embedding",
    pooler_in_encoder=False, head_modules=("classifier",), bitfit_terms=BITFIT_TERMS,
    lora_targets=("q", "v"), ia3_targets=("k", "v", "output.dense"), ia3_feedforward=("output.dense",),
    position_scheme="relative", packing=True, check_compute=None, pair_types=False)
