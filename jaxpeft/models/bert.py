"""The BERT family: the encoder in Flax linen with transformers' parameter names, its
sequence-classification head, and what jaxpeft needs to know of it (:data:`FAMILY`).

Param paths read like transformers' names with ``/`` instead of ``.`` and ``layer_N`` instead of
``layer.N``: ``bert/encoder/layer_3/attention/self/query/bias``. Params are float32; every module
also takes a :class:`~jaxpeft.compute.Compute` spec that says how to compute (dtype, attention
kernel, ...); softmax, LayerNorm statistics and logits stay in float32 whatever the dtype.

A method changes the encoder only through :class:`~jaxpeft.models.layers.Hooks` (every dense layer,
every sublayer's output) and a :class:`~jaxpeft.models.layers.Prompt` (virtual tokens after
``[CLS]`` or in front of it; per-layer key/value prefixes). Packed rows (several examples per row)
come as ``segment_ids``; ``last_rows`` makes the last layer compute only the rows a head reads.
Each self-attention sows its projected ``(key, value)`` into the ``intermediates`` collection, so
callers (tests, prefix extraction) can read them with ``mutable=["intermediates"]``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from jaxpeft.compute import EXACT, Compute
from jaxpeft.models import layers
from jaxpeft.models.family import Family
from jaxpeft.models.kernels import pallas_attention, pallas_norm
from jaxpeft.models.kernels.embedding_lookup import SMALL_TABLE_ROWS, EmbedTable, take_small
from jaxpeft.models.kernels.hash_dropout import HashDropoutSeed
from jaxpeft.models.layers import NO_HOOKS, NO_PROMPT, Hooks, KeyMask, Prompt

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Architecture of a BERT encoder (field names as in ``transformers.BertConfig``)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0
    classifier_dropout: float | None = None

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}")
        layers.activation(self.hidden_act)  # raises on an unknown activation

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def classifier_dropout_rate(self) -> float:
        return self.hidden_dropout_prob if self.classifier_dropout is None else self.classifier_dropout

    @classmethod
    def from_hf(cls, hf_config: Any, **overrides: Any) -> "BertConfig":
        """From a ``transformers`` config object or a ``config.json`` dict."""
        get = hf_config.get if isinstance(hf_config, dict) else (lambda k, d=None: getattr(hf_config, k, d))
        kw = {f.name: get(f.name, None) for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in kw.items() if v is not None}
        pe = get("position_embedding_type", "absolute")
        if pe not in (None, "absolute"):
            raise ValueError(f"position_embedding_type={pe!r} is not supported (only 'absolute')")
        kw.update(overrides)
        return cls(**kw)

    def replace(self, **kw: Any) -> "BertConfig":
        return dataclasses.replace(self, **kw)


def check_compute(config: Any, compute: Compute) -> None:
    """Raises ``ValueError`` where ``compute`` cannot run this architecture."""
    if compute.attention_impl == "pallas":
        why = pallas_attention.supported(1, 0, config.head_dim)
        if why:
            raise ValueError(f"attention_impl='pallas': {why}")


def _dt(compute: Compute) -> Any:
    return jnp.dtype(compute.dtype)


def _first(x: Array | tuple[Array, Array]) -> Array:
    """The hidden state for the next projection (a sublayer with ``norm_impl='pallas'`` returns
    its output twice: for the next projection and for the next residual connection)."""
    return x[0] if isinstance(x, tuple) else x


def _second(x: Array | tuple[Array, Array]) -> Array:
    """The hidden state for the next residual connection."""
    return x[1] if isinstance(x, tuple) else x


@flax.struct.dataclass
class EncoderOutput:
    """``hidden`` ``[B, T, H]`` (virtual tokens included; ``[B, K, H]`` with ``last_rows``),
    ``valid`` ``[B, T]`` its real rows, ``pooled`` the pooler's output where asked for."""

    hidden: Array
    valid: Array
    pooled: Array | None = None


class BertEmbeddings(nn.Module):
    config: BertConfig
    compute: Compute = EXACT

    @nn.compact
    def __call__(self, input_ids: Array, token_type_ids: Array, position_ids: Array | None,
                 deterministic: bool = True, prompt: Prompt = NO_PROMPT) -> Array:
        """``position_ids=None``: positions ``0..L-1`` in every row (``L`` with the virtual tokens),
        each moved up by the prompt's ``position_offset``."""
        cfg = self.config
        init = nn.initializers.normal(cfg.initializer_range)
        words = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init, param_dtype=jnp.float32,
                         name="word_embeddings")(input_ids)
        if prompt.embeds is not None:
            p = jnp.broadcast_to(prompt.embeds.astype(words.dtype), (words.shape[0],) + prompt.embeds.shape[-2:])
            words = layers.insert_virtual(words, p, prompt.front)
        # the position and token-type tables' gradients as sums, not scatter-adds (embedding_lookup)
        pos_table = EmbedTable(cfg.max_position_embeddings, cfg.hidden_size, init, name="position_embeddings")()
        offset = prompt.position_offset
        if position_ids is None:
            pos = pos_table[None, offset:offset + words.shape[1]]
        else:
            pos = jnp.take(pos_table, position_ids + offset, axis=0)
        type_table = EmbedTable(cfg.type_vocab_size, cfg.hidden_size, init, name="token_type_embeddings")()
        if cfg.type_vocab_size <= SMALL_TABLE_ROWS:
            types = take_small(type_table, token_type_ids)
        else:
            types = jnp.take(type_table, token_type_ids, axis=0)
        x = layers.layer_norm(cfg.layer_norm_eps, self.compute)(words + pos + types)
        return layers.dropout(self.compute, cfg.hidden_dropout_prob)(x, deterministic=deterministic)


class BertSelfAttention(nn.Module):
    """Multi-head self-attention whose keys/values may be longer than its queries (prefixes).

    The query/key/value projections are one ``[H, 3H]`` matmul where the method's hooks allow
    (the params stay three dense layers: ``query``, ``key``, ``value``). ``query_rows`` ``[B, K]``
    computes the queries of those rows only (the last layer when only the head's rows are read).
    """

    config: BertConfig
    compute: Compute = EXACT
    hooks: Hooks = NO_HOOKS

    @nn.compact
    def __call__(self, x: Array, mask: KeyMask, deterministic: bool = True,
                 prefix: tuple[Array, Array] | None = None, query_rows: Array | None = None) -> Array:
        cfg, comp = self.config, self.compute
        b, t, h_in = x.shape
        n, d = cfg.num_attention_heads, cfg.head_dim
        dt = _dt(comp)
        names = ("query", "key", "value")
        params = [layers.DenseParams(cfg.hidden_size, cfg.initializer_range, name=nm)(h_in) for nm in names]
        hooks = [self.hooks.linear_for(self, nm, h_in, cfg.hidden_size) for nm in names]
        if query_rows is not None:
            xq = layers.gather_rows(x, query_rows)
            q = layers.linear(xq, *params[0], hooks[0], dt, deterministic).reshape(b, -1, n, d)
            kv, kv_bias = layers.fused_linear(x, [(w, bias, h) for (w, bias), h in zip(params[1:], hooks[1:])],
                                              dt, deterministic)
            kv = kv.reshape(b, t, 2, n * d)
            kv = kv + jnp.stack([jnp.zeros((n * d,), dt) if bb is None else bb.astype(dt) for bb in kv_bias])
            k, v = kv[:, :, 0].reshape(b, t, n, d), kv[:, :, 1].reshape(b, t, n, d)
            if self.is_mutable_collection("intermediates"):
                self.sow("intermediates", "key_value", (k, v))
            k, v = layers.with_prefix(k, v, prefix)
            rate = cfg.attention_probs_dropout_prob if comp.attention_impl == "dense" and not deterministic else 0.0
            # one query row per sequence is too little work for a fused kernel: the dense path
            return layers.dense_attention(q, k, v, mask.dense(query_rows), rate).reshape(b, -1, n * d)
        y, biases = layers.fused_linear(x, [(w, bias, h) for (w, bias), h in zip(params, hooks)], dt, deterministic)
        y = y.reshape(b, t, 3, n, d)
        bias = jnp.stack([jnp.zeros((n * d,), dt) if bb is None else bb.astype(dt) for bb in biases]).reshape(3, n, d)
        if self.is_mutable_collection("intermediates"):
            yb = y + bias
            self.sow("intermediates", "key_value", (yb[:, :, 1], yb[:, :, 2]))
        if comp.attention_impl == "pallas" and pallas_attention.fast_length(t):
            # one kernel reads the fused projection's output, adds its bias and writes dq/dk/dv
            # back into one array (and the bias gradient): no split, bias pass or concatenation
            # around it (``pallas_attention``); packed rows pass their segments
            p = 0 if prefix is None else prefix[0].shape[-3]
            out = pallas_attention.attention(y, mask.valid[:, p:], prefix, mask.valid[:, :p] if p else None,
                                             bias=bias, segments=mask.segments)
            return out.reshape(b, t, n * d)
        qkv = y + bias
        k, v = layers.with_prefix(qkv[:, :, 1], qkv[:, :, 2], prefix)
        out = layers.attention(qkv[:, :, 0], k, v, mask, comp, cfg.attention_probs_dropout_prob, deterministic)
        return out.reshape(b, t, n * d)


class BertOutput(nn.Module):
    """Dense -> dropout -> (the method's sublayer hook) -> LayerNorm(+ residual): transformers'
    ``BertSelfOutput`` (``kind="attention"``) and ``BertOutput`` (``kind="ffn"``)."""

    config: BertConfig
    compute: Compute = EXACT
    hooks: Hooks = NO_HOOKS
    kind: str = "ffn"

    @nn.compact
    def __call__(self, h: Array, residual: Array, deterministic: bool = True) -> Array:
        cfg, comp = self.config, self.compute
        dt = _dt(comp)
        kernel, bias = layers.DenseParams(cfg.hidden_size, cfg.initializer_range, name="dense")(h.shape[-1])
        hook = self.hooks.linear_for(self, "dense", h.shape[-1], cfg.hidden_size)
        change = layers.change_of(hook, h, kernel, deterministic)
        hin = h if change is None or change.in_scale is None else h * change.in_scale.astype(h.dtype)
        y = layers.apply_change(layers.matmul(hin, kernel, dt), change, None, dt)
        sub = self.hooks.sublayer_for(self, self.kind, cfg.hidden_size)
        rate = 0.0 if deterministic else cfg.hidden_dropout_prob
        fused_bias = change is None or change.out_scale is None
        if comp.norm_impl == "pallas" and sub is None and fused_bias:
            # one kernel: bias, dropout, residual, LayerNorm (returns the output twice, see
            # ``pallas_norm.dropout_add_norm``); named as the unfused path's dropout module: the same
            # RNG stream, so the same mask
            scale, ln_bias = layers.LayerNormParams(cfg.hidden_size, name="LayerNorm")()
            seed = HashDropoutSeed(name="HashDropout_0")() if rate else None
            return pallas_norm.dropout_add_norm(y, bias, residual, scale, ln_bias, seed, rate=rate,
                                                eps=cfg.layer_norm_eps)
        y = y + bias.astype(dt) if fused_bias else layers.apply_change(y, change.replace(delta=None, scale=None),
                                                                       bias, dt)
        y = layers.dropout(comp, cfg.hidden_dropout_prob)(y, deterministic=deterministic)
        if sub is not None:
            y = sub(y, deterministic)
        return layers.layer_norm(cfg.layer_norm_eps, comp)(y + residual)


class BertAttention(nn.Module):
    config: BertConfig
    compute: Compute = EXACT
    hooks: Hooks = NO_HOOKS

    @nn.compact
    def __call__(self, x: Array, mask: KeyMask, deterministic: bool = True,
                 prefix: tuple[Array, Array] | None = None, query_rows: Array | None = None) -> Array:
        h = BertSelfAttention(self.config, self.compute, self.hooks, name="self")(
            _first(x), mask, deterministic, prefix, query_rows)
        residual = _second(x) if query_rows is None else layers.gather_rows(_second(x), query_rows)
        return BertOutput(self.config, self.compute, self.hooks, "attention", name="output")(
            h, residual, deterministic)


class BertIntermediate(nn.Module):
    config: BertConfig
    compute: Compute = EXACT
    hooks: Hooks = NO_HOOKS

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        cfg = self.config
        y = layers.dense(self, "dense", x, cfg.intermediate_size, cfg.initializer_range, self.compute,
                         self.hooks, deterministic)
        return layers.activation(cfg.hidden_act)(y)


class BertLayer(nn.Module):
    """One encoder layer; with ``query_rows`` its output is those rows' alone, ``[B, K, H]``."""

    config: BertConfig
    compute: Compute = EXACT
    hooks: Hooks = NO_HOOKS

    @nn.compact
    def __call__(self, x: Array, mask: KeyMask, deterministic: bool = True,
                 prefix: tuple[Array, Array] | None = None, query_rows: Array | None = None) -> Array:
        cfg, comp, hk = self.config, self.compute, self.hooks
        a = BertAttention(cfg, comp, hk, name="attention")(x, mask, deterministic, prefix, query_rows)
        h = BertIntermediate(cfg, comp, hk, name="intermediate")(_first(a), deterministic)
        return BertOutput(cfg, comp, hk, "ffn", name="output")(h, _second(a), deterministic)


class BertEncoder(nn.Module):
    config: BertConfig
    compute: Compute = EXACT
    hooks: Hooks = NO_HOOKS

    @nn.compact
    def __call__(self, x: Array, mask: KeyMask, deterministic: bool = True,
                 prefix_kv: tuple | None = None, last_rows: Array | None = None) -> Array:
        """``last_rows`` ``[B, K]``: the last layer computes those rows only (output ``[B, K, H]``)."""
        cfg = self.config
        if prefix_kv is not None and len(prefix_kv) != cfg.num_hidden_layers:
            raise ValueError(f"prefix_kv has {len(prefix_kv)} layers, the model {cfg.num_hidden_layers}")
        layer_cls = self.compute.remat_layer(BertLayer, (3,))
        for i in range(cfg.num_hidden_layers):
            prefix = None if prefix_kv is None else prefix_kv[i]
            rows = last_rows if i == cfg.num_hidden_layers - 1 else None
            x = layer_cls(cfg, self.compute, self.hooks, name=f"layer_{i}")(x, mask, deterministic, prefix, rows)
        return _first(x)


class BertPooler(nn.Module):
    """``tanh(dense(x))`` of the read rows: ``[B, K, H]`` -> ``[B, K, H]``."""

    config: BertConfig
    compute: Compute = EXACT
    hooks: Hooks = NO_HOOKS

    @nn.compact
    def __call__(self, rows: Array, deterministic: bool = True) -> Array:
        y = layers.dense(self, "dense", rows, self.config.hidden_size, self.config.initializer_range, self.compute,
                         self.hooks, deterministic)
        return jnp.tanh(y)


class BertModel(nn.Module):
    """The encoder: ``(input_ids, attention_mask, token_type_ids, position_ids) -> EncoderOutput``.

    With a prompt of ``P`` virtual tokens the hidden states have length ``L + P`` (see
    :class:`~jaxpeft.models.layers.Prompt` for where they go); ``position_ids`` default to
    ``0..L+P-1`` plus the prompt's offset. Packed rows: ``segment_ids`` ``[B, L]`` (0: padding, 1,
    2, ...: the examples of the row) make each token attend only to its own example's tokens (and
    the prefix); pass each example's own ``position_ids``. ``pool_rows`` ``[B, K]``: the pooler
    reads those rows (``pooled`` ``[B, K, H]``); with ``last_rows`` the last layer computes only
    those rows (``hidden`` ``[B, K, H]``).
    """

    config: BertConfig
    compute: Compute = EXACT
    hooks: Hooks = NO_HOOKS
    add_pooling_layer: bool = True

    @nn.compact
    def __call__(self, input_ids: Array, attention_mask: Array | None = None,
                 token_type_ids: Array | None = None, position_ids: Array | None = None, *,
                 deterministic: bool = True, prompt: Prompt = NO_PROMPT, segment_ids: Array | None = None,
                 pool_rows: Array | None = None, last_rows: Array | None = None) -> EncoderOutput:
        cfg = self.config
        length = input_ids.shape[1]
        valid = layers.input_valid(input_ids, attention_mask, segment_ids, prompt)
        token_type_ids = layers.token_types(token_type_ids, input_ids, prompt)
        length += prompt.num_virtual
        if length + prompt.position_offset > cfg.max_position_embeddings:
            raise ValueError(f"sequence of {length} tokens (virtual tokens included) from position "
                             f"{prompt.position_offset} exceeds max_position_embeddings={cfg.max_position_embeddings}")
        x = BertEmbeddings(cfg, self.compute, name="embeddings")(input_ids, token_type_ids, position_ids,
                                                                 deterministic, prompt)
        mask = layers.key_mask(valid, prompt, segment_ids)
        x = BertEncoder(cfg, self.compute, self.hooks, name="encoder")(x, mask, deterministic, prompt.prefix_kv,
                                                                      last_rows)
        pooled = None
        if pool_rows is not None and self.add_pooling_layer:
            read = x if last_rows is not None else layers.gather_rows(x, pool_rows)
            pooled = BertPooler(cfg, self.compute, self.hooks, name="pooler")(read, deterministic)
        return EncoderOutput(x, valid, pooled)


def sequence_head(config: BertConfig, num_labels: int, compute: Compute, pooling: str, read: Array,
                  pooled: Array | None, deterministic: bool = True) -> Array:
    """transformers' ``BertForSequenceClassification`` head, built in the caller's scope: dropout
    then ``classifier`` on the pooled ``[CLS]`` (``pooling="cls"``), or on the vector it reads
    (``mean``)."""
    x = pooled if pooling == "cls" else read
    x = layers.dropout(compute, config.classifier_dropout_rate)(x, deterministic=deterministic)
    return nn.Dense(num_labels, dtype=_dt(compute), param_dtype=jnp.float32,
                    kernel_init=nn.initializers.normal(config.initializer_range), name="classifier")(x)


_LAYER = r"layer_\d+"
#: BitFit term names (Ben Zaken et al. 2022, table 1) -> regex over a BERT param path.
BITFIT_TERMS = {
    "query": rf"{_LAYER}/attention/self/query/bias$",
    "key": rf"{_LAYER}/attention/self/key/bias$",
    "value": rf"{_LAYER}/attention/self/value/bias$",
    "attention_output": rf"{_LAYER}/attention/output/dense/bias$",
    "attention_layernorm": rf"{_LAYER}/attention/output/LayerNorm/bias$",
    "intermediate": rf"{_LAYER}/intermediate/dense/bias$",
    "output": rf"{_LAYER}/output/dense/bias$",
    "output_layernorm": rf"{_LAYER}/output/LayerNorm/bias$",
}

FAMILY = Family(
    name="bert", model_types=("bert",), prefix="bert", config=BertConfig, encoder=BertModel,
    sequence_head=sequence_head, pooler_in_encoder=True, head_modules=("classifier",),
    word_embeddings="bert/embeddings/word_embeddings/embedding", bitfit_terms=BITFIT_TERMS, lora_targets=("query", "value"), ia3_targets=("key", "value", "output.dense"),
    ia3_feedforward=("output.dense",), position_scheme="absolute", check_compute=check_compute)
