"""The ELECTRA family (``model_type`` ``electra``; the discriminator, which is what is fine-tuned):
BERT's layers under narrower embeddings, and another classification head (:data:`FAMILY`).

What differs from BERT (:mod:`jaxpeft.models.bert`):

* **Embedding width.** The word, position and token-type tables and their LayerNorm are
  ``embedding_size`` wide; when that differs from ``hidden_size`` (``electra-small``: 128 and
  256) a dense layer ``electra.embeddings_project`` maps them to the hidden size (it takes a
  method's hooks like every dense layer). Virtual tokens go into the embeddings, so they must be
  ``embedding_size`` wide: a prompt of ``hidden_size`` vectors on a model whose widths differ is
  refused (peft's prompt tuning fails there too: its ``token_dim`` is ``hidden_size``).
* **No pooler**: transformers' ``ElectraClassificationHead`` (``classifier.dense`` -> gelu ->
  ``classifier.out_proj``, dropout before each) reads the last layer's ``[CLS]`` row.

Positions are BERT's (``0..L-1``, virtual tokens counted, a prefix's ``position_offset`` added:
transformers' numbering after cached tokens). The layers are BERT's own modules, with
transformers' names (``electra.encoder.layer.N.attention.self.query``), so every method, the
fused q/k/v projection and our Pallas kernels work as for BERT; where the Pallas attention kernel
cannot take the head size the encoder falls back to cuDNN's attention (bfloat16, a head size cuDNN
takes; else the dense path) instead of refusing the compute spec.

peft's defaults: LoRA ``query,value``. peft has no IA3 default for ELECTRA: ours is BERT's
(``key,value,output.dense``, feed-forward ``output.dense``); with peft give those ``target_modules``
and ``feedforward_modules``.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxpeft.compute import EXACT, Compute
from jaxpeft.errors import UserError
from jaxpeft.models import layers
from jaxpeft.models.bert import BITFIT_TERMS, BertConfig, BertEncoder, EncoderOutput
from jaxpeft.models.family import Family
from jaxpeft.models.kernels.embedding_lookup import SMALL_TABLE_ROWS, EmbedTable, take_small
from jaxpeft.models.layers import NO_HOOKS, NO_PROMPT, Hooks, Prompt
from jaxpeft.models.roberta import ClassificationHead, fallback_compute

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ElectraConfig(BertConfig):
    """Architecture of an ELECTRA discriminator (transformers' field names; defaults:
    ``electra-small-discriminator``)."""

    hidden_size: int = 256
    num_attention_heads: int = 4
    intermediate_size: int = 1024
    embedding_size: int = 128


class ElectraEmbeddings(nn.Module):
    """BERT's embeddings, ``embedding_size`` wide."""

    config: ElectraConfig
    compute: Compute = EXACT

    @nn.compact
    def __call__(self, input_ids: Array, token_type_ids: Array, position_ids: Array | None,
                 deterministic: bool = True, prompt: Prompt = NO_PROMPT) -> Array:
        cfg = self.config
        e = cfg.embedding_size
        init = nn.initializers.normal(cfg.initializer_range)
        words = nn.Embed(cfg.vocab_size, e, embedding_init=init, param_dtype=jnp.float32,
                         name="word_embeddings")(input_ids)
        if prompt.embeds is not None:
            if prompt.embeds.shape[-1] != e:
                raise UserError(f"virtual tokens of width {prompt.embeds.shape[-1]} cannot go into ELECTRA's "
                                f"embeddings of width embedding_size={e} (hidden_size={cfg.hidden_size})")
            p = jnp.broadcast_to(prompt.embeds.astype(words.dtype), (words.shape[0],) + prompt.embeds.shape[-2:])
            words = layers.insert_virtual(words, p, prompt.front)
        pos_table = EmbedTable(cfg.max_position_embeddings, e, init, name="position_embeddings")()
        offset = prompt.position_offset
        if position_ids is None:
            pos = pos_table[None, offset:offset + words.shape[1]]
        else:
            pos = jnp.take(pos_table, position_ids + offset, axis=0)
        type_table = EmbedTable(cfg.type_vocab_size, e, init, name="token_type_embeddings")()
        if cfg.type_vocab_size <= SMALL_TABLE_ROWS:
            types = take_small(type_table, token_type_ids)
        else:
            types = jnp.take(type_table, token_type_ids, axis=0)
        x = layers.layer_norm(cfg.layer_norm_eps, self.compute)(words + pos + types)
        return layers.dropout(self.compute, cfg.hidden_dropout_prob)(x, deterministic=deterministic)


class ElectraModel(nn.Module):
    """The encoder (transformers' ``ElectraModel``), called like :class:`~jaxpeft.models.bert.BertModel`;
    ``pool_rows`` is ignored (no pooler)."""

    config: ElectraConfig
    compute: Compute = EXACT
    hooks: Hooks = NO_HOOKS

    @nn.compact
    def __call__(self, input_ids: Array, attention_mask: Array | None = None,
                 token_type_ids: Array | None = None, position_ids: Array | None = None, *,
                 deterministic: bool = True, prompt: Prompt = NO_PROMPT, segment_ids: Array | None = None,
                 pool_rows: Array | None = None, last_rows: Array | None = None) -> EncoderOutput:
        cfg = self.config
        length = input_ids.shape[1]
        valid = layers.input_valid(input_ids, attention_mask, segment_ids, prompt)
        token_type_ids = layers.token_types(token_type_ids, input_ids, prompt)
        p = prompt.num_virtual
        if length + p + prompt.position_offset > cfg.max_position_embeddings:
            raise ValueError(f"sequence of {length + p} tokens (virtual tokens included) from position "
                             f"{prompt.position_offset} exceeds max_position_embeddings={cfg.max_position_embeddings}")
        x = ElectraEmbeddings(cfg, self.compute, name="embeddings")(input_ids, token_type_ids, position_ids,
                                                                    deterministic, prompt)
        if cfg.embedding_size != cfg.hidden_size:
            x = layers.dense(self, "embeddings_project", x, cfg.hidden_size, cfg.initializer_range, self.compute,
                             self.hooks, deterministic)
        mask = layers.key_mask(valid, prompt, segment_ids)
        x = BertEncoder(cfg, fallback_compute(cfg, self.compute), self.hooks, name="encoder")(
            x, mask, deterministic, prompt.prefix_kv, last_rows)
        return EncoderOutput(x, valid, None)


def sequence_head(config: ElectraConfig, num_labels: int, compute: Compute, pooling: str, read: Array,
                  pooled: Array | None, deterministic: bool = True) -> Array:
    """transformers' ``ElectraForSequenceClassification`` head (``classifier/dense`` -> gelu ->
    ``classifier/out_proj``) on the ``[CLS]`` row (``pooling="cls"``) or the vector it reads."""
    del pooled
    return ClassificationHead(config.hidden_size, num_labels, config.classifier_dropout_rate, config.initializer_range,
                              "gelu", compute, name="classifier")(read, deterministic)


FAMILY = Family(
    name="electra", model_types=("electra",), prefix="electra", config=ElectraConfig, encoder=ElectraModel,
    sequence_head=sequence_head, word_embeddings="electra/embeddings/word_embeddings/embedding",
    pooler_in_encoder=False, head_modules=("classifier",), bitfit_terms=BITFIT_TERMS,
    lora_targets=("query", "value"), ia3_targets=("key", "value", "output.dense"), ia3_feedforward=("output.dense",),
    position_scheme="absolute", packing=True, check_compute=None)
