"""The DeBERTa-v2/v3 family (``model_type`` ``deberta-v2``): transformers' ``DebertaV2Model`` in Flax
linen with its parameter names, its sequence-classification head, and :data:`FAMILY`.

How it differs from BERT (:mod:`jaxpeft.models.bert`):

* **disentangled attention**: the scores add to ``q.k`` a content-to-position term ``q_i . Kr[d]``
  (``c2p``) and a position-to-content term ``k_j . Qr[d]`` (``p2c``), where ``Kr``/``Qr`` are the
  relative-position table ``encoder.rel_embeddings`` (optionally LayerNorm'ed:
  ``norm_rel_ebd=layer_norm``) projected by ``pos_key_proj``/``pos_query_proj``, or by
  ``key_proj``/``query_proj`` themselves with ``share_att_key`` (a method's hook on those layers
  then acts on the position projections too, as in peft). ``d`` is the relative distance ``i - j``,
  in log buckets (``position_buckets``, ``max_relative_positions``) and clipped to the table; all
  three terms are divided by ``sqrt(head_dim * (1 + #pos_att_type))``;
* **positions**: the input gets absolute position embeddings only with ``position_biased_input``
  (DeBERTa-v2); DeBERTa-v3 has none (relative positions only; ``max_position_embeddings`` is then
  ``None``: the buckets take any length). Token types only where ``type_vocab_size > 0``;
* the embeddings' output is multiplied by the mask (padding rows are zero), and v2-xlarge's
  ``ConvLayer`` (``conv_kernel_size > 0``) mixes the embeddings into the first layer's output
  with a 1-D convolution that never reads across padding or a packed example's boundary;
* the head (``DebertaV2ForSequenceClassification``): ``ContextPooler`` -- dropout, ``pooler.dense``,
  ``pooler_hidden_act`` -- on the row the pooling reads (``[CLS]``, or the mean), dropout
  (``cls_dropout``), ``classifier``; both are top-level modules, not part of the encoder;
* attention is always computed densely (the relative terms are a bias on the float32 scores, with
  dropout on the probabilities): ``attention_impl`` and ``norm_impl`` do not apply.

Prompts: virtual tokens are part of the sequence, so their relative distances are those of ``P``
more tokens of text (and absolute positions ``0..L+P-1`` with ``position_biased_input``). Prefix
keys/values sit at positions ``-P..-1``, right before the first token, as if ``P`` tokens of text
preceded the input: query ``i`` sees prefix key ``j`` at distance ``i + P - j``, in both ``c2p``
and ``p2c`` (a prefix whose keys/values are those of real text gives the outputs of that text
prepended, ``tests/test_family_deberta.py``; transformers' attention, given more keys than
queries, would read the ``p2c`` term at key-to-key distances). Distances are translation invariant,
so ``position_offset`` moves only absolute position embeddings; the ``ConvLayer`` reads the input's
tokens only. Packed rows: each token attends to its own example's tokens; distances within an
example are those of the example alone.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft.compute import EXACT, Compute
from jaxpeft.models import layers
from jaxpeft.models.bert import EncoderOutput
from jaxpeft.models.family import Family
from jaxpeft.models.kernels.embedding_lookup import SMALL_TABLE_ROWS, EmbedTable, take_small
from jaxpeft.models.layers import NO_HOOKS, NO_PROMPT, Hooks, Prompt

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class DebertaV2Config:
    """Architecture of a DeBERTa-v2/v3 encoder (field names as in ``transformers.DebertaV2Config``).

    ``max_relative_positions`` is resolved (``max_position_embeddings`` where the file has ``< 1``);
    ``max_position_embeddings`` is ``None`` without absolute position embeddings.
    """

    vocab_size: int = 128100
    hidden_size: int = 1536
    num_hidden_layers: int = 24
    num_attention_heads: int = 24
    intermediate_size: int = 6144
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int | None = 512
    type_vocab_size: int = 0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-7
    relative_attention: bool = False
    max_relative_positions: int = 512
    position_buckets: int = -1
    pad_token_id: int = 0
    position_biased_input: bool = True
    pos_att_type: tuple[str, ...] = ()
    share_att_key: bool = False
    norm_rel_ebd: tuple[str, ...] = ("none",)
    pooler_dropout: float = 0.0
    pooler_hidden_act: str = "gelu"
    cls_dropout: float | None = None
    attention_head_size: int | None = None
    conv_kernel_size: int = 0
    conv_groups: int = 1
    conv_act: str = "tanh"

    def __post_init__(self):
        if self.attention_head_size is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                             f"{self.num_attention_heads}")
        for act in (self.hidden_act, self.pooler_hidden_act, self.conv_act):
            layers.activation(act)   # raises on an unknown activation
        bad = set(self.pos_att_type) - {"c2p", "p2c"}
        if bad:
            raise ValueError(f"pos_att_type {sorted(bad)} is not supported (only c2p, p2c)")
        if self.conv_kernel_size > 0 and (self.conv_kernel_size % 2 == 0 or self.hidden_size % self.conv_groups):
            raise ValueError(f"conv_kernel_size={self.conv_kernel_size}, conv_groups={self.conv_groups}: "
                             "an odd kernel and groups dividing hidden_size are supported")

    @property
    def head_dim(self) -> int:
        return self.attention_head_size or self.hidden_size // self.num_attention_heads

    @property
    def classifier_dropout(self) -> None:
        """None: the token and QA heads drop at ``hidden_dropout_prob``, as transformers' do."""
        return None

    @property
    def att_span(self) -> int:
        """Half the relative-position table: distances are clipped to ``[-span, span)``."""
        return self.position_buckets if self.position_buckets > 0 else self.max_relative_positions

    @property
    def scale_factor(self) -> int:
        return 1 + len(self.pos_att_type)

    @classmethod
    def from_hf(cls, hf_config: Any, **overrides: Any) -> "DebertaV2Config":
        """From a ``transformers`` config object or a ``config.json`` dict."""
        get = hf_config.get if isinstance(hf_config, dict) else (lambda k, d=None: getattr(hf_config, k, d))
        kw = {f.name: get(f.name, None) for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in kw.items() if v is not None}
        types = get("pos_att_type", None) or ()
        if isinstance(types, str):
            types = types.lower().split("|")
        kw["pos_att_type"] = tuple(t.strip() for t in types if t.strip())
        kw["norm_rel_ebd"] = tuple(t.strip() for t in str(get("norm_rel_ebd", "none") or "none").lower().split("|"))
        max_pos = get("max_position_embeddings", 512)
        if int(get("max_relative_positions", -1) or -1) < 1:
            kw["max_relative_positions"] = max_pos
        if not get("position_biased_input", True):
            kw["max_position_embeddings"] = None
        emb = get("embedding_size", None)
        if emb is not None and emb != get("hidden_size"):
            raise ValueError(f"embedding_size={emb} differs from hidden_size (an embed_proj): not supported")
        pooler = get("pooler_hidden_size", None)
        if pooler is not None and pooler != get("hidden_size"):
            raise ValueError(f"pooler_hidden_size={pooler} differs from hidden_size: not supported")
        kw.update(overrides)
        return cls(**kw)

    def replace(self, **kw: Any) -> "DebertaV2Config":
        return dataclasses.replace(self, **kw)


# ----------------------------------------------------------------------------- relative positions


def log_bucket(rel: np.ndarray, bucket_size: int, max_position: int) -> np.ndarray:
    """transformers' ``make_log_bucket_position``, in float32 as torch computes it: distances within
    ``bucket_size // 2`` stay, longer ones go to log-spaced buckets up to ``max_position``."""
    rel = np.asarray(rel, np.int64)
    sign = np.sign(rel).astype(np.float32)
    mid = bucket_size // 2
    abs_pos = np.where((rel < mid) & (rel > -mid), mid - 1, np.abs(rel)).astype(np.int64)
    with np.errstate(divide="ignore"):
        log_pos = np.ceil(np.log(abs_pos.astype(np.float32) / np.float32(mid))
                          / np.log(np.float32((max_position - 1) / mid)) * np.float32(mid - 1)) + np.float32(mid)
    return np.where(abs_pos <= mid, rel.astype(np.float32), log_pos * sign).astype(np.int64)


def relative_index(config: DebertaV2Config, length: int, prefix: int = 0) -> np.ndarray:
    """``[T, P + T]`` rows of the relative-position table each query reads for each key: the
    (bucketed) distance ``i - j`` moved into ``[0, 2 span)``; prefix keys sit at ``-P..-1``."""
    q = np.arange(length)
    k = np.arange(-prefix, length)
    rel = q[:, None] - k[None, :]
    if config.position_buckets > 0 and config.max_relative_positions > 0:
        rel = log_bucket(rel, config.position_buckets, config.max_relative_positions)
    span = config.att_span
    return np.clip(rel + span, 0, 2 * span - 1).astype(np.int32)


# ----------------------------------------------------------------------------- modules


class DebertaV2Embeddings(nn.Module):
    config: DebertaV2Config
    compute: Compute = EXACT

    @nn.compact
    def __call__(self, input_ids: Array, token_type_ids: Array, position_ids: Array | None, valid: Array,
                 deterministic: bool = True, prompt: Prompt = NO_PROMPT) -> Array:
        cfg = self.config
        init = nn.initializers.normal(cfg.initializer_range)
        x = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init, param_dtype=jnp.float32,
                     name="word_embeddings")(input_ids)
        if prompt.embeds is not None:
            p = jnp.broadcast_to(prompt.embeds.astype(x.dtype), (x.shape[0],) + prompt.embeds.shape[-2:])
            x = layers.insert_virtual(x, p, prompt.front)
        if cfg.position_biased_input:
            table = EmbedTable(cfg.max_position_embeddings, cfg.hidden_size, init, name="position_embeddings")()
            offset = prompt.position_offset
            x = x + (table[None, offset:offset + x.shape[1]] if position_ids is None
                     else jnp.take(table, position_ids + offset, axis=0))
        if cfg.type_vocab_size > 0:
            table = EmbedTable(cfg.type_vocab_size, cfg.hidden_size, init, name="token_type_embeddings")()
            take = take_small if cfg.type_vocab_size <= SMALL_TABLE_ROWS else (lambda t, i: jnp.take(t, i, axis=0))
            x = x + take(table, token_type_ids)
        x = layers.layer_norm(cfg.layer_norm_eps, self.compute)(x)
        x = x * valid[..., None].astype(x.dtype)
        return layers.dropout(self.compute, cfg.hidden_dropout_prob)(x, deterministic=deterministic)


class DisentangledSelfAttention(nn.Module):
    """Self-attention with the disentangled relative-position terms (see the module docstring).

    ``rel`` is ``(table [2 span, H], index [T, P + T])`` or ``None`` (no relative attention).
    """

    config: DebertaV2Config
    compute: Compute = EXACT
    hooks: Hooks = NO_HOOKS

    @nn.compact
    def __call__(self, x: Array, mask: Array, rel: tuple[Array, Array] | None, deterministic: bool = True,
                 prefix: tuple[Array, Array] | None = None) -> Array:
        cfg, comp = self.config, self.compute
        b, t, h_in = x.shape
        n, d = cfg.num_attention_heads, cfg.head_dim
        dt = jnp.dtype(comp.dtype)
        names = ("query_proj", "key_proj", "value_proj")
        params = {nm: layers.DenseParams(n * d, cfg.initializer_range, name=nm)(h_in) for nm in names}
        hooks = {nm: self.hooks.linear_for(self, nm, h_in, n * d) for nm in names}
        y, biases = layers.fused_linear(x, [(*params[nm], hooks[nm]) for nm in names], dt, deterministic)
        y = y.reshape(b, t, 3, n * d) + jnp.stack([jnp.zeros((n * d,), dt) if bb is None else bb.astype(dt)
                                                   for bb in biases])
        q, k, v = (y[:, :, i].reshape(b, t, n, d) for i in range(3))
        if self.is_mutable_collection("intermediates"):
            self.sow("intermediates", "key_value", (k, v))
        k, v = layers.with_prefix(k, v, prefix)
        scale = 1.0 / float(np.sqrt(d * cfg.scale_factor))
        bias = None
        if rel is not None and cfg.pos_att_type:
            table, index = rel
            table = layers.dropout(comp, cfg.hidden_dropout_prob)(table, deterministic=deterministic)
            span2 = table.shape[0]

            def project(local: str) -> Array:
                """The table through ``local`` (or its own ``pos_*`` layer), ``[2 span, n, d]``."""
                if cfg.share_att_key:
                    kernel, bb = params[local]
                    hook = hooks[local]
                else:
                    own = "pos_" + local
                    kernel, bb = layers.DenseParams(n * d, cfg.initializer_range, name=own)(h_in)
                    hook = self.hooks.linear_for(self, own, h_in, n * d)
                return layers.linear(table, kernel, bb, hook, dt, deterministic).reshape(span2, n, d)

            bias = jnp.zeros((b, n, t, k.shape[1]), jnp.float32)
            # Each (query, key) pair's row of the projected table is gathered first, [T, S, n, d]
            # (no batch axis: cheap, and its gradient is a small scatter), and the terms are then one
            # batched product each, as many FLOPs as q.k: no [B, n, T, 2 span] scores to gather from.
            if "c2p" in cfg.pos_att_type:
                rel_k = jnp.take(project("key_proj"), index, axis=0)
                bias = bias + jnp.einsum("btnd,tsnd->bnts", q, rel_k, preferred_element_type=jnp.float32)
            if "p2c" in cfg.pos_att_type:
                rel_q = jnp.take(project("query_proj"), index, axis=0)
                bias = bias + jnp.einsum("bsnd,tsnd->bnts", k, rel_q, preferred_element_type=jnp.float32)
            bias = bias * scale
        rate = 0.0 if deterministic else cfg.attention_probs_dropout_prob
        out = layers.dense_attention(q, k, v, mask, rate, scale=scale, bias=bias)
        return out.reshape(b, t, n * d)


class DebertaV2Output(nn.Module):
    """Dense -> dropout -> (the method's sublayer hook) -> LayerNorm(+ residual): transformers'
    ``DebertaV2SelfOutput`` (``kind="attention"``) and ``DebertaV2Output`` (``kind="ffn"``)."""

    config: DebertaV2Config
    compute: Compute = EXACT
    hooks: Hooks = NO_HOOKS
    kind: str = "ffn"

    @nn.compact
    def __call__(self, h: Array, residual: Array, deterministic: bool = True) -> Array:
        cfg, comp = self.config, self.compute
        y = layers.dense(self, "dense", h, cfg.hidden_size, cfg.initializer_range, comp, self.hooks, deterministic)
        y = layers.dropout(comp, cfg.hidden_dropout_prob)(y, deterministic=deterministic)
        sub = self.hooks.sublayer_for(self, self.kind, cfg.hidden_size)
        if sub is not None:
            y = sub(y, deterministic)
        return layers.layer_norm(cfg.layer_norm_eps, comp)(y + residual)


class DebertaV2Attention(nn.Module):
    config: DebertaV2Config
    compute: Compute = EXACT
    hooks: Hooks = NO_HOOKS

    @nn.compact
    def __call__(self, x, mask, rel, deterministic=True, prefix=None):
        h = DisentangledSelfAttention(self.config, self.compute, self.hooks, name="self")(
            x, mask, rel, deterministic, prefix)
        return DebertaV2Output(self.config, self.compute, self.hooks, "attention", name="output")(h, x, deterministic)


class DebertaV2Intermediate(nn.Module):
    config: DebertaV2Config
    compute: Compute = EXACT
    hooks: Hooks = NO_HOOKS

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        cfg = self.config
        y = layers.dense(self, "dense", x, cfg.intermediate_size, cfg.initializer_range, self.compute,
                         self.hooks, deterministic)
        return layers.activation(cfg.hidden_act)(y)


class DebertaV2Layer(nn.Module):
    config: DebertaV2Config
    compute: Compute = EXACT
    hooks: Hooks = NO_HOOKS

    @nn.compact
    def __call__(self, x, mask, rel, deterministic=True, prefix=None):
        cfg, comp, hk = self.config, self.compute, self.hooks
        a = DebertaV2Attention(cfg, comp, hk, name="attention")(x, mask, rel, deterministic, prefix)
        h = DebertaV2Intermediate(cfg, comp, hk, name="intermediate")(a, deterministic)
        return DebertaV2Output(cfg, comp, hk, "ffn", name="output")(h, a, deterministic)


class ConvParams(nn.Module):
    """``nn.Conv1d``'s params: ``kernel`` ``[k, in / groups, out]`` (transformers' weight reversed)
    and ``bias``."""

    features: int
    kernel_size: int
    groups: int = 1

    @nn.compact
    def __call__(self) -> tuple[Array, Array]:
        init = nn.initializers.lecun_normal()
        return (self.param("kernel", init, (self.kernel_size, self.features // self.groups, self.features),
                           jnp.float32),
                self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32))


class ConvLayer(nn.Module):
    """transformers' ``ConvLayer`` (DeBERTa-v2-xlarge): ``LayerNorm(residual + act(conv(x)))`` with
    padding rows zero. A token's window reads only tokens of its own segment (``segments``: the
    packed example, or 1 for every real token), which is the zero padding of an unpacked row."""

    config: DebertaV2Config
    compute: Compute = EXACT

    @nn.compact
    def __call__(self, x: Array, residual: Array, segments: Array, valid: Array,
                 deterministic: bool = True) -> Array:
        cfg, comp = self.config, self.compute
        k, g, hdim = cfg.conv_kernel_size, cfg.conv_groups, cfg.hidden_size
        kernel, bias = ConvParams(hdim, k, g, name="conv")()
        dt = jnp.dtype(comp.dtype)
        b, t, _ = x.shape
        pad = (k - 1) // 2
        xp = jnp.pad(x, ((0, 0), (pad, pad), (0, 0)))
        sp = jnp.pad(segments, ((0, 0), (pad, pad)), constant_values=-1)
        out = jnp.zeros((b, t, hdim), jnp.float32)
        for s in range(k):
            same = (sp[:, s:s + t] == segments)[..., None]
            xs = jnp.where(same, xp[:, s:s + t], 0).astype(dt).reshape(b, t, g, hdim // g)
            w = kernel[s].astype(dt).reshape(hdim // g, g, hdim // g)
            out = out + jnp.einsum("btgi,igj->btgj", xs, w, preferred_element_type=jnp.float32).reshape(b, t, hdim)
        out = (out + bias).astype(dt) * valid[..., None].astype(dt)
        out = layers.activation(cfg.conv_act)(layers.dropout(comp, cfg.hidden_dropout_prob)(out, deterministic))
        y = layers.layer_norm(cfg.layer_norm_eps, comp)(residual + out)
        return y * valid[..., None].astype(y.dtype)


class DebertaV2Encoder(nn.Module):
    config: DebertaV2Config
    compute: Compute = EXACT
    hooks: Hooks = NO_HOOKS

    @nn.compact
    def __call__(self, x: Array, mask: Array, valid: Array, segments: Array, deterministic: bool = True,
                 prefix_kv: tuple | None = None) -> Array:
        cfg = self.config
        if prefix_kv is not None and len(prefix_kv) != cfg.num_hidden_layers:
            raise ValueError(f"prefix_kv has {len(prefix_kv)} layers, the model {cfg.num_hidden_layers}")
        rel = None
        if cfg.relative_attention:
            table = EmbedTable(2 * cfg.att_span, cfg.hidden_size, nn.initializers.normal(cfg.initializer_range),
                               name="rel_embeddings")()
            if "layer_norm" in cfg.norm_rel_ebd:
                table = layers.layer_norm(cfg.layer_norm_eps, self.compute)(table)
            p = 0 if prefix_kv is None else int(prefix_kv[0][0].shape[-3])
            rel = (table, jnp.asarray(relative_index(cfg, x.shape[1], p)))
        layer_cls = self.compute.remat_layer(DebertaV2Layer, (4,))
        embedded = x
        for i in range(cfg.num_hidden_layers):
            prefix = None if prefix_kv is None else prefix_kv[i]
            x = layer_cls(cfg, self.compute, self.hooks, name=f"layer_{i}")(x, mask, rel, deterministic, prefix)
            if i == 0 and cfg.conv_kernel_size > 0:
                x = ConvLayer(cfg, self.compute, name="conv")(embedded, x, segments, valid, deterministic)
        return x


class DebertaV2Model(nn.Module):
    """The encoder, called like :class:`~jaxpeft.models.bert.BertModel` (no pooler: the
    ``ContextPooler`` is part of the head). ``last_rows``: the hidden states of those rows."""

    config: DebertaV2Config
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
        limit = cfg.max_position_embeddings
        if limit is not None and length + p + prompt.position_offset > limit:
            raise ValueError(f"sequence of {length + p} tokens (virtual tokens included) from position "
                             f"{prompt.position_offset} exceeds max_position_embeddings={limit}")
        x = DebertaV2Embeddings(cfg, self.compute, name="embeddings")(input_ids, token_type_ids, position_ids, valid,
                                                                     deterministic, prompt)
        mask = layers.key_mask(valid, prompt, segment_ids).dense()
        segments = valid.astype(jnp.int32) if segment_ids is None else segment_ids
        x = DebertaV2Encoder(cfg, self.compute, self.hooks, name="encoder")(x, mask, valid, segments, deterministic,
                                                                           prompt.prefix_kv)
        if last_rows is not None:
            x = layers.gather_rows(x, last_rows)
        return EncoderOutput(x, valid, None)


class ContextPooler(nn.Module):
    """transformers' ``ContextPooler`` on the read row(s): dropout, ``dense``, activation."""

    config: DebertaV2Config
    compute: Compute = EXACT

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        cfg = self.config
        x = layers.dropout(self.compute, cfg.pooler_dropout)(x, deterministic=deterministic)
        x = nn.Dense(cfg.hidden_size, dtype=jnp.dtype(self.compute.dtype), param_dtype=jnp.float32,
                     kernel_init=nn.initializers.normal(cfg.initializer_range), name="dense")(x)
        return layers.activation(cfg.pooler_hidden_act)(x)


def sequence_head(config: DebertaV2Config, num_labels: int, compute: Compute, pooling: str, read: Array,
                  pooled: Array | None, deterministic: bool = True) -> Array:
    """transformers' ``DebertaV2ForSequenceClassification`` head on the vector the pooling read
    (``[CLS]``: transformers' own; ``mean``: the same modules on the mean)."""
    x = ContextPooler(config, compute, name="pooler")(read, deterministic)
    rate = config.hidden_dropout_prob if config.cls_dropout is None else config.cls_dropout
    x = layers.dropout(compute, rate)(x, deterministic=deterministic)
    return nn.Dense(num_labels, dtype=jnp.dtype(compute.dtype), param_dtype=jnp.float32,
                    kernel_init=nn.initializers.normal(config.initializer_range), name="classifier")(x)


_LAYER = r"layer_\d+"
#: BitFit's terms (BERT's names) on DeBERTa's paths.
BITFIT_TERMS = {
    "query": rf"{_LAYER}/attention/self/query_proj/bias$",
    "key": rf"{_LAYER}/attention/self/key_proj/bias$",
    "value": rf"{_LAYER}/attention/self/value_proj/bias$",
    "attention_output": rf"{_LAYER}/attention/output/dense/bias$",
    "attention_layernorm": rf"{_LAYER}/attention/output/LayerNorm/bias$",
    "intermediate": rf"{_LAYER}/intermediate/dense/bias$",
    "output": rf"{_LAYER}/output/dense/bias$",
    "output_layernorm": rf"{_LAYER}/output/LayerNorm/bias$",
}

FAMILY = Family(
    name="deberta-v2", model_types=("deberta-v2",), prefix="deberta", config=DebertaV2Config,
    encoder=DebertaV2Model, sequence_head=sequence_head, pooler_in_encoder=False,
    head_modules=("pooler", "classifier"), word_embeddings="deberta/embeddings/word_embeddings/embedding",
    bitfit_terms=BITFIT_TERMS, lora_targets=("query_proj", "value_proj"),
    ia3_targets=("key_proj", "value_proj", "output.dense"), ia3_feedforward=("output.dense",),
    position_scheme="relative", packing=True)
