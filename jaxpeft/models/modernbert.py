"""The ModernBERT family (``model_type`` ``modernbert``): transformers' ``ModernBertModel`` in Flax
linen with its parameter names, its heads, and :data:`FAMILY`.

How it differs from BERT (:mod:`jaxpeft.models.bert`):

* **pre-norm** layers: ``x + attn(attn_norm(x))``, then ``x + mlp(mlp_norm(x))`` (layer 0's
  ``attn_norm`` is the identity: the embeddings' ``norm`` precedes it), and ``final_norm`` after
  the last layer. LayerNorms have no bias (``norm_bias``), nor have the dense layers
  (``attention_bias``, ``mlp_bias``): BitFit has nothing to train and is refused;
* **rotary positions** instead of position embeddings: queries and keys are rotated by their
  position, with ``global_rope_theta`` in global layers and ``local_rope_theta`` in local ones;
  no token types;
* **fused projections**: ``attn.Wqkv`` (one dense layer, ``[H, 3H]``) and ``attn.Wo``; a gated GELU
  MLP, ``mlp.Wo(act(a) * g)`` with ``a, g`` the two halves of ``mlp.Wi`` (``[H, 2I]``);
* **local attention**: every layer but each ``global_attn_every_n_layers``-th (or as
  ``layer_types`` says) sees only keys within ``local_attention // 2`` tokens of the query;
* the heads: ``head`` (``dense``, ``classifier_activation``, ``norm``), dropout and ``classifier``,
  for sequences (on ``[CLS]`` or the mean: transformers' ``classifier_pooling``; here
  ``--pooling`` says which) and for every token (token classification; QA, whose ``classifier`` has
  the two outputs start and end).

peft has no default ``target_modules`` for ``modernbert``: give them to peft. jaxpeft's defaults:
LoRA on ``Wqkv`` (the fused query/key/value projection: peft cannot adapt query and value alone);
IA3 rescales the output of ``Wqkv`` (keys and values, and the queries) and the input of ``mlp.Wo``
(the gated feed-forward activation, IA3's ``l_ff``): ``target_modules=Wqkv,mlp.Wo``,
``feedforward_modules=mlp.Wo`` -- not ``Wo``, which would also match ``attn.Wo``.

Prompts: virtual tokens take rotary positions as text does (``0..L+P-1``), and local windows count
them as tokens. Prefix keys are rotated as positions ``-P..-1`` before the input's first position
(rotary scores depend only on the distance, so a prefix of real text's projected keys/values gives
that text prepended; ``position_offset`` moves input and prefix together and changes nothing). A
prefix is visible to every query, local layers included. Packed rows: the local window and the
example's own segment both restrict the keys (a dense mask); rotary positions are the example's own.
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
from jaxpeft.models.layers import NO_HOOKS, NO_PROMPT, Hooks, KeyMask, Prompt

Array = jax.Array
GLOBAL, LOCAL = "full_attention", "sliding_attention"


@dataclasses.dataclass(frozen=True)
class ModernBertConfig:
    """Architecture of a ModernBERT encoder (field names as in ``transformers.ModernBertConfig``;
    ``layer_types`` from the file or from ``global_attn_every_n_layers``, the rope thetas from
    ``rope_parameters`` or the older ``global_rope_theta``/``local_rope_theta``)."""

    vocab_size: int = 50368
    hidden_size: int = 768
    intermediate_size: int = 1152
    num_hidden_layers: int = 22
    num_attention_heads: int = 12
    hidden_activation: str = "gelu"
    max_position_embeddings: int = 8192
    initializer_range: float = 0.02
    norm_eps: float = 1e-5
    norm_bias: bool = False
    pad_token_id: int = 50283
    attention_bias: bool = False
    attention_dropout: float = 0.0
    local_attention: int = 128
    embedding_dropout: float = 0.0
    mlp_bias: bool = False
    mlp_dropout: float = 0.0
    classifier_pooling: str = "cls"
    classifier_dropout: float = 0.0
    classifier_bias: bool = False
    classifier_activation: str = "gelu"
    global_rope_theta: float = 160000.0
    local_rope_theta: float = 10000.0
    layer_types: tuple[str, ...] = ()

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                             f"{self.num_attention_heads}")
        layers.activation(self.hidden_activation)
        layers.activation(self.classifier_activation)
        if not self.layer_types:
            object.__setattr__(self, "layer_types", layer_types(self.num_hidden_layers, 3))
        if len(self.layer_types) != self.num_hidden_layers or set(self.layer_types) - {GLOBAL, LOCAL}:
            raise ValueError(f"layer_types {list(self.layer_types)}: one of {GLOBAL!r}, {LOCAL!r} per layer")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def hidden_dropout_prob(self) -> float:
        return self.mlp_dropout

    @property
    def window(self) -> int:
        """A local layer's query sees keys at most this many tokens away."""
        return self.local_attention // 2

    @classmethod
    def from_hf(cls, hf_config: Any, **overrides: Any) -> "ModernBertConfig":
        """From a ``transformers`` config object or a ``config.json`` dict."""
        get = hf_config.get if isinstance(hf_config, dict) else (lambda k, d=None: getattr(hf_config, k, d))
        kw = {f.name: get(f.name, None) for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in kw.items() if v is not None}
        rope = get("rope_parameters", None) or {}
        scaling = get("rope_scaling", None)
        for kind, field in ((GLOBAL, "global_rope_theta"), (LOCAL, "local_rope_theta")):
            params = rope.get(kind) or {}
            for p in (params, scaling if isinstance(scaling, dict) and kind not in scaling else {}):
                rope_type = p.get("rope_type", p.get("type", "default"))
                if rope_type != "default":
                    raise ValueError(f"rope_type {rope_type!r}: only the default rotary embedding is supported")
            if params.get("rope_theta") is not None:
                kw[field] = float(params["rope_theta"])
        every = int(get("global_attn_every_n_layers", 3) or 3)
        types = get("layer_types", None)
        kw["layer_types"] = tuple(types) if types else layer_types(int(kw.get("num_hidden_layers", 22)), every)
        kw.update(overrides)
        return cls(**kw)

    def replace(self, **kw: Any) -> "ModernBertConfig":
        return dataclasses.replace(self, **kw)


def layer_types(n: int, every: int) -> tuple[str, ...]:
    """transformers' default: layer ``i`` is global where ``i % every == 0``, local otherwise."""
    return tuple(LOCAL if i % every else GLOBAL for i in range(n))


# ----------------------------------------------------------------------------- rotary positions


def rotary(positions: Array, theta: float, dim: int) -> tuple[Array, Array]:
    """``(cos, sin)`` ``[..., T, 1, dim]`` (float32) of positions ``[..., T]``, as transformers'
    default rotary embedding (frequencies ``theta ** (-2i / dim)``, each used twice)."""
    inv = 1.0 / (np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv, jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)[..., None, :]
    return jnp.cos(emb), jnp.sin(emb)


def rotate(x: Array, rope: tuple[Array, Array]) -> Array:
    """``x`` ``[B, T, n, d]`` rotated (in float32, back in its dtype)."""
    cos, sin = rope
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    turned = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos + turned * sin).astype(x.dtype)


def local_band(length: int, prefix: int, window: int) -> np.ndarray:
    """``[T, P + T]``: which keys a local layer's query may see (every prefix key, and the sequence's
    tokens at most ``window`` rows away)."""
    i = np.arange(length)
    near = np.abs(i[:, None] - i[None, :]) <= window
    return np.concatenate([np.ones((length, prefix), bool), near], axis=1)


# ----------------------------------------------------------------------------- modules


class ModernBertEmbeddings(nn.Module):
    config: ModernBertConfig
    compute: Compute = EXACT

    @nn.compact
    def __call__(self, input_ids: Array, deterministic: bool = True, prompt: Prompt = NO_PROMPT) -> Array:
        cfg = self.config
        x = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=nn.initializers.normal(cfg.initializer_range),
                     param_dtype=jnp.float32, name="tok_embeddings")(input_ids)
        if prompt.embeds is not None:
            p = jnp.broadcast_to(prompt.embeds.astype(x.dtype), (x.shape[0],) + prompt.embeds.shape[-2:])
            x = layers.insert_virtual(x, p, prompt.front)
        x = layers.layer_norm(cfg.norm_eps, self.compute, name="norm", use_bias=cfg.norm_bias)(x)
        return layers.dropout(self.compute, cfg.embedding_dropout)(x, deterministic=deterministic)


def _masked_attention(q: Array, k: Array, v: Array, mask: Array, compute: Compute, rate: float,
                      deterministic: bool) -> Array:
    """:func:`layers.attention` with a dense boolean mask ``[B, 1, T, S]`` (local windows)."""
    if compute.attention_impl == "dense":
        return layers.dense_attention(q, k, v, mask, 0.0 if deterministic else rate)
    half = jnp.dtype(compute.dtype) in (jnp.bfloat16, jnp.float16)
    impl = "cudnn" if half and compute.attention_impl in ("cudnn", "pallas") else None
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)


class ModernBertAttention(nn.Module):
    """``Wo(attention(rotate(q), rotate(k), v))`` over the prefix and the sequence; ``band`` (local
    layers) further restricts the keys."""

    config: ModernBertConfig
    compute: Compute = EXACT
    hooks: Hooks = NO_HOOKS

    @nn.compact
    def __call__(self, x: Array, mask: KeyMask, band: Array | None, rope: tuple, prefix_rope: tuple | None,
                 deterministic: bool = True, prefix: tuple[Array, Array] | None = None) -> Array:
        cfg, comp = self.config, self.compute
        b, t, h = x.shape
        n, d = cfg.num_attention_heads, cfg.head_dim
        qkv = layers.dense(self, "Wqkv", x, 3 * h, cfg.initializer_range, comp, self.hooks, deterministic,
                           use_bias=cfg.attention_bias).reshape(b, t, 3, n, d)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if self.is_mutable_collection("intermediates"):
            self.sow("intermediates", "key_value", (k, v))      # keys before their rotation
        q, k = rotate(q, rope), rotate(k, rope)
        if prefix is not None:
            prefix = (rotate(prefix[0], prefix_rope), prefix[1])
        k, v = layers.with_prefix(k, v, prefix)
        if band is None:
            out = layers.attention(q, k, v, mask, comp, cfg.attention_dropout, deterministic)
        else:
            out = _masked_attention(q, k, v, mask.dense() & band[None, None], comp, cfg.attention_dropout,
                                    deterministic)
        y = layers.dense(self, "Wo", out.reshape(b, t, h), h, cfg.initializer_range, comp, self.hooks,
                         deterministic, use_bias=cfg.attention_bias)
        y = layers.dropout(comp, cfg.attention_dropout)(y, deterministic=deterministic)
        sub = self.hooks.sublayer_for(self, "attention", h)
        return y if sub is None else sub(y, deterministic)


class ModernBertMLP(nn.Module):
    """``Wo(dropout(act(a) * g))`` with ``[a, g] = Wi(x)``."""

    config: ModernBertConfig
    compute: Compute = EXACT
    hooks: Hooks = NO_HOOKS

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        cfg, comp = self.config, self.compute
        y = layers.dense(self, "Wi", x, 2 * cfg.intermediate_size, cfg.initializer_range, comp, self.hooks,
                         deterministic, use_bias=cfg.mlp_bias)
        a, g = jnp.split(y, 2, axis=-1)
        y = layers.dropout(comp, cfg.mlp_dropout)(layers.activation(cfg.hidden_activation)(a) * g,
                                                  deterministic=deterministic)
        y = layers.dense(self, "Wo", y, cfg.hidden_size, cfg.initializer_range, comp, self.hooks, deterministic,
                         use_bias=cfg.mlp_bias)
        sub = self.hooks.sublayer_for(self, "ffn", cfg.hidden_size)
        return y if sub is None else sub(y, deterministic)


class ModernBertEncoderLayer(nn.Module):
    config: ModernBertConfig
    compute: Compute = EXACT
    hooks: Hooks = NO_HOOKS
    index: int = 0

    @nn.compact
    def __call__(self, x, mask, band, rope, prefix_rope, deterministic=True, prefix=None):
        cfg, comp, hk = self.config, self.compute, self.hooks
        norm = (lambda name: layers.layer_norm(cfg.norm_eps, comp, name=name, use_bias=cfg.norm_bias))
        h = x if self.index == 0 else norm("attn_norm")(x)
        x = x + ModernBertAttention(cfg, comp, hk, name="attn")(h, mask, band, rope, prefix_rope, deterministic,
                                                                 prefix)
        return x + ModernBertMLP(cfg, comp, hk, name="mlp")(norm("mlp_norm")(x), deterministic)


class ModernBertModel(nn.Module):
    """The encoder, called like :class:`~jaxpeft.models.bert.BertModel` (``token_type_ids`` are
    ignored: ModernBERT has none). ``position_ids`` default to ``0..L+P-1`` plus the prompt's
    offset; ``last_rows``: the hidden states of those rows."""

    config: ModernBertConfig
    compute: Compute = EXACT
    hooks: Hooks = NO_HOOKS

    @nn.compact
    def __call__(self, input_ids: Array, attention_mask: Array | None = None,
                 token_type_ids: Array | None = None, position_ids: Array | None = None, *,
                 deterministic: bool = True, prompt: Prompt = NO_PROMPT, segment_ids: Array | None = None,
                 pool_rows: Array | None = None, last_rows: Array | None = None) -> EncoderOutput:
        del token_type_ids, pool_rows
        cfg = self.config
        length = input_ids.shape[1]
        valid = layers.input_valid(input_ids, attention_mask, segment_ids, prompt)
        t = length + prompt.num_virtual
        offset = prompt.position_offset
        x = ModernBertEmbeddings(cfg, self.compute, name="embeddings")(input_ids, deterministic, prompt)
        positions = (jnp.arange(t)[None] if position_ids is None else position_ids) + offset
        p = prompt.prefix_length
        if prompt.prefix_kv is not None and len(prompt.prefix_kv) != cfg.num_hidden_layers:
            raise ValueError(f"prefix_kv has {len(prompt.prefix_kv)} layers, the model {cfg.num_hidden_layers}")
        theta = {GLOBAL: cfg.global_rope_theta, LOCAL: cfg.local_rope_theta}
        ropes = {kind: rotary(positions, theta[kind], cfg.head_dim) for kind in set(cfg.layer_types)}
        prefix_ropes = {kind: rotary(jnp.arange(offset - p, offset)[None], theta[kind], cfg.head_dim)
                        for kind in set(cfg.layer_types)} if p else {}
        band = jnp.asarray(local_band(t, p, cfg.window))
        mask = layers.key_mask(valid, prompt, segment_ids)
        layer_cls = self.compute.remat_layer(ModernBertEncoderLayer, (6,))
        for i, kind in enumerate(cfg.layer_types):
            prefix = None if prompt.prefix_kv is None else prompt.prefix_kv[i]
            x = layer_cls(cfg, self.compute, self.hooks, i, name=f"layers_{i}")(
                x, mask, band if kind == LOCAL else None, ropes[kind], prefix_ropes.get(kind), deterministic, prefix)
        if last_rows is not None:
            x = layers.gather_rows(x, last_rows)
        x = layers.layer_norm(cfg.norm_eps, self.compute, name="final_norm", use_bias=cfg.norm_bias)(x)
        return EncoderOutput(x, valid, None)


class ModernBertPredictionHead(nn.Module):
    """``norm(act(dense(x)))``: transformers' ``ModernBertPredictionHead``."""

    config: ModernBertConfig
    compute: Compute = EXACT

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        x = nn.Dense(cfg.hidden_size, use_bias=cfg.classifier_bias, dtype=jnp.dtype(self.compute.dtype),
                     param_dtype=jnp.float32, kernel_init=nn.initializers.normal(cfg.initializer_range),
                     name="dense")(x)
        x = layers.activation(cfg.classifier_activation)(x)
        return layers.layer_norm(cfg.norm_eps, self.compute, name="norm", use_bias=cfg.norm_bias)(x)


def _head(config: ModernBertConfig, num_outputs: int, compute: Compute, x: Array, deterministic: bool) -> Array:
    x = ModernBertPredictionHead(config, compute, name="head")(x)
    x = layers.dropout(compute, config.classifier_dropout)(x, deterministic=deterministic)
    return nn.Dense(num_outputs, dtype=jnp.dtype(compute.dtype), param_dtype=jnp.float32,
                    kernel_init=nn.initializers.normal(config.initializer_range), name="classifier")(x)


def sequence_head(config: ModernBertConfig, num_labels: int, compute: Compute, pooling: str, read: Array,
                  pooled: Array | None, deterministic: bool = True) -> Array:
    """transformers' ``ModernBertForSequenceClassification`` head on the vector the pooling read
    (``[CLS]`` or the mean of the valid rows: its ``classifier_pooling``)."""
    return _head(config, num_labels, compute, read, deterministic)


def token_head(config: ModernBertConfig, kind: str, num_outputs: int, compute: Compute, hidden: Array,
               deterministic: bool = True) -> Array:
    """``ModernBertForTokenClassification`` / ``ForQuestionAnswering``: the same modules on every row."""
    return _head(config, num_outputs, compute, hidden, deterministic)


FAMILY = Family(
    name="modernbert", model_types=("modernbert",), prefix="model", config=ModernBertConfig,
    encoder=ModernBertModel, sequence_head=sequence_head, pooler_in_encoder=False,
    head_modules=("head", "classifier"), word_embeddings="model/embeddings/tok_embeddings/embedding",
    bitfit_terms={}, lora_targets=("Wqkv",), ia3_targets=("Wqkv", "mlp.Wo"), ia3_feedforward=("mlp.Wo",),
    position_scheme="rotary", packing=True, token_head=token_head,
    token_head_modules={"token": ("head", "classifier"), "span": ("head", "classifier")})
