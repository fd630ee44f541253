"""The RoBERTa family (``model_type`` ``roberta`` and ``xlm-roberta``): BERT's layers under other
embeddings and another classification head (:data:`FAMILY`).

What differs from BERT (:mod:`jaxpeft.models.bert`):

* **Positions past the padding id.** transformers numbers a row's tokens from ``padding_idx + 1``
  (``create_position_ids_from_input_ids``: ``padding_idx + cumsum(mask) * mask``), and padding
  tokens sit at ``padding_idx``, so the table has ``max_position_embeddings`` rows of which
  ``padding_idx + 1`` are never read by text: :attr:`RobertaConfig.max_position_embeddings` is the
  number of tokens that fit (514 - 2 = 512 for ``roberta-base``), the table's size is
  :attr:`RobertaConfig.position_table_size`. We count the attention mask instead of comparing ids
  with the pad id (the same for every right- or left-padded row the tokenizer makes). The scheme
  stays coherent with what jaxpeft adds:

  - virtual tokens are counted like text (the mask with them): after ``<s>`` they take
    ``padding_idx + 2 ..``, in front (``front=True``, peft's placement) ``padding_idx + 1 ..`` --
    what transformers gives peft's ``inputs_embeds`` (``create_position_ids_from_inputs_embeds``);
  - a prefix's ``position_offset`` ``P`` moves every real token up by ``P`` and leaves padding at
    ``padding_idx``: transformers' numbering after ``P`` cached tokens (``cache_length``);
  - ``position_ids`` (packed rows) are each example's own positions from 0, as for every family;
    the encoder maps position ``i`` to ``padding_idx + 1 + i`` (and ``segment_ids == 0`` to
    ``padding_idx``), so a packed example is numbered exactly as it is alone.

* **One token type.** ``type_vocab_size`` is 1: the encoder reads no ``token_type_ids`` then
  (a BERT-style tokenizer's type 1 would index past the table); RoBERTa's pairs are
  ``<s> a </s></s> b </s>``, all of type 0, so cosine pooling (which splits a pair by its token
  types) is refused (``Family.pair_types``).
* **No pooler**: transformers' ``RobertaClassificationHead`` (``classifier.dense`` -> tanh ->
  ``classifier.out_proj``, dropout before each) reads the last layer's ``<s>`` row.

The layers are BERT's own modules (:class:`~jaxpeft.models.bert.BertEncoder`), with
transformers' names (``roberta.encoder.layer.N.attention.self.query``), so every method, the fused
q/k/v projection and our Pallas kernels work as for BERT. Where the Pallas attention kernel cannot
take the head size (not a power of two >= 16), the encoder falls back to cuDNN's attention
(bfloat16, a head size cuDNN takes; else the dense path) instead of refusing the compute spec.

peft's defaults: LoRA ``query,value``, IA3 ``key,value,output.dense`` (feed-forward
``output.dense``); peft has no IA3 default for ``xlm-roberta``, so with peft give it those
``target_modules``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxpeft.compute import EXACT, Compute
from jaxpeft.models import layers
from jaxpeft.models.bert import BITFIT_TERMS, BertEncoder, EncoderOutput
from jaxpeft.models.family import Family
from jaxpeft.models.kernels import pallas_attention
from jaxpeft.models.kernels.embedding_lookup import SMALL_TABLE_ROWS, EmbedTable, take_small
from jaxpeft.models.layers import NO_HOOKS, NO_PROMPT, Hooks, Prompt
from jaxpeft.models.qkv_attention import cudnn_head_dim

Array = jax.Array


def read_hf(cls: type, hf_config: Any, renames: dict[str, str] | None = None, **overrides: Any) -> Any:
    """``cls(**fields)`` from a ``transformers`` config object or a ``config.json`` dict: every
    dataclass field of that name (``renames``: our field -> transformers' key), then ``overrides``."""
    get = hf_config.get if isinstance(hf_config, dict) else (lambda k, d=None: getattr(hf_config, k, d))
    renames = renames or {}
    kw = {f.name: get(renames.get(f.name, f.name), None) for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in kw.items() if v is not None}
    pe = get("position_embedding_type", "absolute")
    if pe not in (None, "absolute"):
        raise ValueError(f"position_embedding_type={pe!r} is not supported (only 'absolute')")
    kw.update(overrides)
    return cls(**kw)


@dataclasses.dataclass(frozen=True)
class RobertaConfig:
    """Architecture of a RoBERTa / XLM-R encoder (transformers' field names, except
    ``position_table_size``: transformers' ``max_position_embeddings``, the table's rows)."""

    vocab_size: int = 50265
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    position_table_size: int = 514
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    pad_token_id: int = 1
    classifier_dropout: float | None = None

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.position_table_size <= self.pad_token_id + 1:
            raise ValueError(f"max_position_embeddings={self.position_table_size} leaves no position past "
                             f"pad_token_id={self.pad_token_id}")
        layers.activation(self.hidden_act)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def max_position_embeddings(self) -> int:
        """Tokens (virtual ones included) a sequence may hold: the table less the rows up to and
        including ``pad_token_id``."""
        return self.position_table_size - self.pad_token_id - 1

    @property
    def classifier_dropout_rate(self) -> float:
        return self.hidden_dropout_prob if self.classifier_dropout is None else self.classifier_dropout

    @classmethod
    def from_hf(cls, hf_config: Any, **overrides: Any) -> "RobertaConfig":
        return read_hf(cls, hf_config, {"position_table_size": "max_position_embeddings"}, **overrides)

    def replace(self, **kw: Any) -> "RobertaConfig":
        return dataclasses.replace(self, **kw)


def positions_past_padding(valid: Array, position_ids: Array | None, padding_idx: int, offset: int = 0) -> Array:
    """transformers' RoBERTa/MPNet position ids ``[B, T]``: real tokens ``padding_idx + 1 + i`` (``i``:
    the count of real tokens before it, or ``position_ids``), moved up by ``offset``; padding
    (``valid`` False) at ``padding_idx``."""
    count = jnp.cumsum(valid.astype(jnp.int32), axis=1) if position_ids is None else position_ids + 1
    return jnp.where(valid, count + offset, 0) + padding_idx


def fallback_compute(config: Any, compute: Compute) -> Compute:
    """``compute`` for BERT's layers of ``config``: where the Pallas attention kernel cannot take the
    head size, cuDNN's attention (half precision, a head size cuDNN takes) or the dense path."""
    if compute.attention_impl == "pallas" and pallas_attention.supported(1, 0, config.head_dim):
        half = compute.dtype in ("bfloat16", "float16")
        return compute.replace(attention_impl="cudnn" if half and cudnn_head_dim(config.head_dim) else "dense")
    return compute


class RobertaEmbeddings(nn.Module):
    """Words (virtual tokens put in), positions past the padding id, the one token type."""

    config: RobertaConfig
    compute: Compute = EXACT

    @nn.compact
    def __call__(self, input_ids: Array, token_type_ids: Array | None, positions: Array,
                 deterministic: bool = True, prompt: Prompt = NO_PROMPT) -> Array:
        cfg = self.config
        init = nn.initializers.normal(cfg.initializer_range)
        words = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init, param_dtype=jnp.float32,
                         name="word_embeddings")(input_ids)
        if prompt.embeds is not None:
            p = jnp.broadcast_to(prompt.embeds.astype(words.dtype), (words.shape[0],) + prompt.embeds.shape[-2:])
            words = layers.insert_virtual(words, p, prompt.front)
        pos_table = EmbedTable(cfg.position_table_size, cfg.hidden_size, init, name="position_embeddings")()
        type_table = EmbedTable(cfg.type_vocab_size, cfg.hidden_size, init, name="token_type_embeddings")()
        if token_type_ids is None:
            types = type_table[0][None, None]
        elif cfg.type_vocab_size <= SMALL_TABLE_ROWS:
            types = take_small(type_table, token_type_ids)
        else:
            types = jnp.take(type_table, token_type_ids, axis=0)
        x = words + jnp.take(pos_table, positions, axis=0) + types
        x = layers.layer_norm(cfg.layer_norm_eps, self.compute)(x)
        return layers.dropout(self.compute, cfg.hidden_dropout_prob)(x, deterministic=deterministic)


class RobertaModel(nn.Module):
    """The encoder (transformers' ``RobertaModel`` without its pooler), called like
    :class:`~jaxpeft.models.bert.BertModel`; ``pool_rows`` is ignored (no pooler)."""

    config: RobertaConfig
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
        p = prompt.num_virtual
        token_type_ids = None if cfg.type_vocab_size == 1 else layers.token_types(token_type_ids, input_ids, prompt)
        if length + p + prompt.position_offset > cfg.max_position_embeddings:
            raise ValueError(f"sequence of {length + p} tokens (virtual tokens included) from position "
                             f"{prompt.position_offset} exceeds max_position_embeddings={cfg.max_position_embeddings} "
                             f"(a table of {cfg.position_table_size} rows from pad_token_id + 1)")
        positions = positions_past_padding(valid, position_ids, cfg.pad_token_id, prompt.position_offset)
        x = RobertaEmbeddings(cfg, self.compute, name="embeddings")(input_ids, token_type_ids, positions,
                                                                    deterministic, prompt)
        mask = layers.key_mask(valid, prompt, segment_ids)
        x = BertEncoder(cfg, fallback_compute(cfg, self.compute), self.hooks, name="encoder")(
            x, mask, deterministic, prompt.prefix_kv, last_rows)
        return EncoderOutput(x, valid, None)


class ClassificationHead(nn.Module):
    """transformers' ``RobertaClassificationHead`` on the read vector ``[..., H]``: dropout,
    ``dense``, the activation (tanh; ELECTRA's gelu), dropout, ``out_proj``."""

    hidden_size: int
    num_labels: int
    dropout_rate: float
    initializer_range: float
    activation: str = "tanh"
    compute: Compute = EXACT

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        dt = jnp.dtype(self.compute.dtype)
        init = nn.initializers.normal(self.initializer_range)
        x = layers.dropout(self.compute, self.dropout_rate)(x, deterministic=deterministic)
        x = nn.Dense(self.hidden_size, dtype=dt, param_dtype=jnp.float32, kernel_init=init, name="dense")(x)
        x = layers.activation(self.activation)(x)
        x = layers.dropout(self.compute, self.dropout_rate)(x, deterministic=deterministic)
        return nn.Dense(self.num_labels, dtype=dt, param_dtype=jnp.float32, kernel_init=init, name="out_proj")(x)


def sequence_head(config: RobertaConfig, num_labels: int, compute: Compute, pooling: str, read: Array,
                  pooled: Array | None, deterministic: bool = True) -> Array:
    """transformers' ``RobertaForSequenceClassification`` head (``classifier/dense``,
    ``classifier/out_proj``) on the ``<s>`` row (``pooling="cls"``) or the vector it reads."""
    del pooled
    return ClassificationHead(config.hidden_size, num_labels, config.classifier_dropout_rate, config.initializer_range,
                              "tanh", compute, name="classifier")(read, deterministic)


FAMILY = Family(
    name="roberta", model_types=("roberta", "xlm-roberta"), prefix="roberta", config=RobertaConfig,
    encoder=RobertaModel, sequence_head=sequence_head, word_embeddings="roberta/embeddings/word_embeddings/embedding",
    pooler_in_encoder=False, head_modules=("classifier",), bitfit_terms=BITFIT_TERMS,
    lora_targets=("query", "value"), ia3_targets=("key", "value", "output.dense"), ia3_feedforward=("output.dense",),
    position_scheme="absolute_offset", packing=True, check_compute=None, pair_types=False)
