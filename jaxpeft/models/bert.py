"""BERT encoder in Flax linen, with HF-style parameter paths.

Param paths read like Hugging Face's names with ``/`` instead of ``.`` and ``layer_N`` instead of
``layer.N``: ``encoder/layer_3/attention/self/query/bias``, ``encoder/layer_3/intermediate/dense/bias``,
``encoder/layer_3/output/LayerNorm/bias``. Params are float32. :class:`BertConfig` is the
architecture only (transformers' field names); every module also takes a
:class:`~jaxpeft.compute.Compute` spec that says how to compute (dtype, attention kernel, ...);
softmax, LayerNorm statistics and logits stay in float32 whatever the dtype.

Extension points:

* ``prompt_embeds`` (``[B or 1, P, H]``): virtual-token embeddings inserted right after the first
  token (``[CLS]``), so the pooler still reads the real ``[CLS]`` (prompt methods); with
  ``prompt_front`` they go in front of ``[CLS]`` instead, where peft puts them (the pooler then
  reads the first virtual token);
* ``prefix_kv`` (one ``(key, value)`` pair per layer, each ``[B or 1, P, heads, head_dim]``): extra
  keys/values placed in front of each layer's own (prefix methods);
* ``segment_ids`` / ``read_positions``: packed rows (several examples per row, each attending
  only to its own tokens, and the positions whose outputs the head reads);
* ``lora`` in every dense layer (query, key, value, the two output projections, the intermediate
  layer and the pooler) and ``adapter`` after the sublayers come from the method
  (``jaxpeft.methods``) through :class:`Extras`.

Each self-attention sows its projected ``(key, value)`` into the ``intermediates`` collection, so
callers (tests, prefix extraction) can read them with ``mutable=["intermediates"]``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from jaxpeft.compute import EXACT, Compute
from jaxpeft.models.kernels import lean_ops, pallas_attention, pallas_norm
from jaxpeft.models.kernels.embedding_lookup import SMALL_TABLE_ROWS, EmbedTable, take_small
from jaxpeft.models.kernels.hash_dropout import HashDropout, HashDropoutSeed

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
        _activation(self.hidden_act)  # raises on an unknown activation

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

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


def check_compute(config: BertConfig, compute: Compute) -> None:
    """Raises ``ValueError`` where ``compute`` cannot run this architecture."""
    if compute.attention_impl == "pallas":
        why = pallas_attention.supported(1, 0, config.head_dim)
        if why:
            raise ValueError(f"attention_impl='pallas': {why}")


def _activation(name: str):
    acts = {
        "gelu": lambda x: lean_ops.gelu(x, False),
        "gelu_new": lambda x: lean_ops.gelu(x, True),
        "gelu_pytorch_tanh": lambda x: lean_ops.gelu(x, True),
        "gelu_fast": lambda x: lean_ops.gelu(x, True),
        "relu": jax.nn.relu,
        "silu": jax.nn.silu,
        "swish": jax.nn.silu,
        "tanh": jnp.tanh,
    }
    if name not in acts:
        raise ValueError(f"hidden_act={name!r} is not supported; known: {sorted(acts)}")
    return acts[name]


def kernels_in_compute_dtype(params: Any, compute: Compute) -> Any:
    """``params`` (a whole tree or a part of it, such as the frozen params) with the encoder's and
    pooler's matmul kernels (``bert/.../kernel``) in ``compute``'s dtype.

    Every one of them is cast to that dtype right before its matmul, so the model computes exactly
    the same with them stored cast. For frozen params that takes a cast per matrix off every train
    step and, under bfloat16, half of their memory. Embedding tables, biases and LayerNorm params
    are used in float32 and stay as they are.
    """
    dtype = jnp.dtype(compute.dtype)

    def cast(path, x):
        names = [str(getattr(k, "key", k)) for k in path]
        is_kernel = len(names) > 1 and names[0] == "bert" and names[-1] == "kernel"
        if is_kernel and getattr(x, "ndim", 0) == 2 and jnp.issubdtype(x.dtype, jnp.floating):
            return x.astype(dtype)
        return x

    if dtype == jnp.float32:
        return params
    return jax.tree_util.tree_map_with_path(cast, params)


def _dt(compute: Compute) -> Any:
    return jnp.dtype(compute.dtype)


def _matmul(x: Array, kernel: Array, dt: Any) -> Array:
    return jax.lax.dot_general(x.astype(dt), kernel.astype(dt), (((x.ndim - 1,), (0,)), ((), ())))


def _dropout(compute: Compute, rate: float) -> nn.Module:
    return HashDropout(rate) if compute.dropout_impl == "hash" else nn.Dropout(rate)


class DenseParams(nn.Module):
    """The params of an ``nn.Dense`` (same names, shapes and initialisers), returned unapplied."""

    features: int
    initializer_range: float

    @nn.compact
    def __call__(self, in_features: int) -> tuple[Array, Array]:
        kernel = self.param("kernel", nn.initializers.normal(self.initializer_range),
                            (in_features, self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        return kernel, bias


@dataclasses.dataclass(frozen=True)
class Extras:
    """Added modules a method puts into every layer (built by the method, see ``jaxpeft.methods``).

    ``lora``: ``lora(name, in_features, out_features)`` returns a module computing the low-rank
    update ``x -> delta`` of the dense layer ``name`` (``query``, ``key``, ``value``,
    ``attention_output``, ``intermediate``, ``output``, ``pooler``), or ``None`` where it has none;
    the layer adds ``module(x, deterministic)`` to its matmul's output (before the bias).
    ``adapter``: ``adapter(site, hidden)`` returns a module applied as ``y = module(y,
    deterministic)`` to a sublayer's projection output after its dropout and before its residual
    connection and LayerNorm (``site``: ``attention`` or ``output``), or ``None``.

    Both are called inside the layer's compact method, so the module they return becomes a child
    of that layer: give it a ``name`` (LoRA: ``query_lora`` beside ``query``; adapters:
    ``adapter``). Both must be hashable (frozen dataclasses), as module attributes are.
    """

    lora: Any = None
    adapter: Any = None

    def lora_for(self, name: str, din: int, dout: int) -> nn.Module | None:
        return None if self.lora is None else self.lora(name, din, dout)

    def adapter_for(self, site: str, hidden: int) -> nn.Module | None:
        return None if self.adapter is None else self.adapter(site, hidden)


NO_EXTRAS = Extras()


class LayerNormParams(nn.Module):
    """The params of a ``LayerNorm`` over ``features`` (same names, shapes and initialisers)."""

    features: int

    @nn.compact
    def __call__(self) -> tuple[Array, Array]:
        return (self.param("scale", nn.initializers.ones, (self.features,), jnp.float32),
                self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32))


def _first(x: Array | tuple[Array, Array]) -> Array:
    """The hidden state for the next projection (a sublayer with ``norm_impl='pallas'`` returns
    its output twice: for the next projection and for the next residual connection)."""
    return x[0] if isinstance(x, tuple) else x


def _second(x: Array | tuple[Array, Array]) -> Array:
    """The hidden state for the next residual connection."""
    return x[1] if isinstance(x, tuple) else x


def _layer_norm(config: BertConfig, compute: Compute, name: str = "LayerNorm") -> nn.Module:
    return lean_ops.LayerNorm(epsilon=config.layer_norm_eps, dtype=_dt(compute), param_dtype=jnp.float32,
                              name=name)


def _gather_rows(x: Array, positions: Array) -> Array:
    """``x[b, positions[b, k]]``: ``[B, T, ...]`` -> ``[B, K, ...]``."""
    return jnp.take_along_axis(x, positions.reshape(positions.shape + (1,) * (x.ndim - 2)), axis=1)


class BertEmbeddings(nn.Module):
    config: BertConfig
    compute: Compute = EXACT

    @nn.compact
    def __call__(self, input_ids: Array, token_type_ids: Array, position_ids: Array | None,
                 deterministic: bool = True, prompt_embeds: Array | None = None,
                 prompt_front: bool = False, position_offset: int = 0) -> Array:
        """``position_ids=None``: positions ``0..L-1`` in every row (``L`` with the virtual tokens).
        The virtual tokens go after the first token, or in front of it with ``prompt_front``.
        ``position_offset`` is added to every position (a prefix of that many keys in front)."""
        cfg = self.config
        init = nn.initializers.normal(cfg.initializer_range)
        words = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init, param_dtype=jnp.float32,
                         name="word_embeddings")(input_ids)
        if prompt_embeds is not None:
            p = jnp.broadcast_to(prompt_embeds.astype(words.dtype),
                                 (words.shape[0],) + prompt_embeds.shape[-2:])
            words = (jnp.concatenate([p, words], axis=1) if prompt_front
                     else jnp.concatenate([words[:, :1], p, words[:, 1:]], axis=1))
        # the position and token-type tables' gradients as sums, not scatter-adds (embedding_lookup)
        pos_table = EmbedTable(cfg.max_position_embeddings, cfg.hidden_size, init, name="position_embeddings")()
        if position_ids is None:
            pos = pos_table[None, position_offset:position_offset + words.shape[1]]
        else:
            pos = jnp.take(pos_table, position_ids + position_offset, axis=0)
        type_table = EmbedTable(cfg.type_vocab_size, cfg.hidden_size, init, name="token_type_embeddings")()
        if cfg.type_vocab_size <= SMALL_TABLE_ROWS:
            types = take_small(type_table, token_type_ids)
        else:
            types = jnp.take(type_table, token_type_ids, axis=0)
        x = _layer_norm(cfg, self.compute)(words + pos + types)
        return _dropout(self.compute, cfg.hidden_dropout_prob)(x, deterministic=deterministic)


@flax.struct.dataclass
class KeyMask:
    """Which keys each query may attend to.

    ``valid`` ``[B, S]``: the keys (prefix keys first) that exist. ``segments`` (packed rows)
    ``[B, T]``: the segment of each of the sequence's own tokens (0: padding); a query then sees the
    keys of its own segment and every valid prefix key (a padding query: the padding keys). ``lengths`` ``[B]``: set when each row's
    valid keys are a prefix of the row (fused kernels take lengths instead of a mask).
    """

    valid: Array
    segments: Array | None = None
    lengths: Array | None = None

    def dense(self, query_rows: Array | None = None) -> Array:
        """The boolean mask ``[B, 1, Tq, S]`` (or ``[B, 1, 1, S]``) for the queries at
        ``query_rows`` ``[B, K]`` (default: every row)."""
        if self.segments is None:
            return self.valid[:, None, None, :]
        seg_q = self.segments if query_rows is None else _gather_rows(self.segments, query_rows)
        p = self.valid.shape[1] - self.segments.shape[1]
        # a padding query (segment 0) sees the padding keys: no query is left without a key, which
        # fused kernels (cuDNN's) turn into NaN; no real query sees a padding key
        same = seg_q[:, :, None] == self.segments[:, None, :]
        if p:
            prefix = jnp.broadcast_to(self.valid[:, None, :p], same.shape[:2] + (p,))
            same = jnp.concatenate([prefix, same], axis=-1)
        return same[:, None]


class BertSelfAttention(nn.Module):
    """Multi-head self-attention whose keys/values may be longer than its queries (prefixes).

    The query/key/value projections are one ``[H, 3H]`` matmul (the params stay three
    ``nn.Dense``'s: ``query``, ``key``, ``value``). ``query_rows`` (``[B, K]``) computes the
    queries of those rows only (the last layer when only the head's rows are read).
    """

    config: BertConfig
    compute: Compute = EXACT
    extras: Extras = NO_EXTRAS

    @nn.compact
    def __call__(self, x: Array, mask: KeyMask, deterministic: bool = True,
                 prefix: tuple[Array, Array] | None = None, query_rows: Array | None = None) -> Array:
        cfg, comp = self.config, self.compute
        b, t, h_in = x.shape
        n, d = cfg.num_attention_heads, cfg.head_dim
        dt = _dt(comp)
        (wq, bq), (wk, bk), (wv, bv) = [DenseParams(cfg.hidden_size, cfg.initializer_range, name=name)(h_in)
                                        for name in ("query", "key", "value")]
        loras = [self.extras.lora_for(name, h_in, cfg.hidden_size) for name in ("query", "key", "value")]
        if query_rows is None:
            y = _matmul(x, jnp.concatenate([wq, wk, wv], axis=1), dt).reshape(b, t, 3, n, d)
            if any(loras):
                y = y + jnp.stack([jnp.zeros((b, t, n * d), dt) if lo is None else lo(x, deterministic).astype(dt)
                                   for lo in loras], axis=2).reshape(b, t, 3, n, d)
            bias = jnp.concatenate([bq, bk, bv]).astype(dt).reshape(3, n, d)
            rows = None
        else:
            xq = _gather_rows(x, query_rows)
            kv = _matmul(x, jnp.concatenate([wk, wv], axis=1), dt).reshape(b, t, 2, n * d)
            q = _matmul(xq, wq, dt)
            if loras[0] is not None:
                q = q + loras[0](xq, deterministic).astype(dt)
            if loras[1] is not None or loras[2] is not None:
                kv = kv + jnp.stack([jnp.zeros((b, t, n * d), dt) if lo is None else lo(x, deterministic).astype(dt)
                                     for lo in loras[1:]], axis=2)
            kv = kv + jnp.concatenate([bk, bv]).astype(dt).reshape(2, n * d)
            q = (q + bq.astype(dt)).reshape(b, -1, n, d)
            k, v = kv[:, :, 0].reshape(b, t, n, d), kv[:, :, 1].reshape(b, t, n, d)
            if self.is_mutable_collection("intermediates"):
                self.sow("intermediates", "key_value", (k, v))
            k, v = _with_prefix(k, v, prefix)
            rows = query_rows
            dropout = cfg.attention_probs_dropout_prob if comp.attention_impl == "dense" and not deterministic else 0.0
            # one query row per sequence is too little work for a fused kernel: the dense path
            return self._dense_attention(q, k, v, mask.dense(rows), dropout).reshape(b, -1, n * d)
        if self.is_mutable_collection("intermediates"):
            yb = y + bias
            self.sow("intermediates", "key_value", (yb[:, :, 1], yb[:, :, 2]))
        if comp.attention_impl == "pallas" and pallas_attention.fast_length(t):
            # one kernel reads the fused projection's output, adds its bias and writes dq/dk/dv
            # back into one array (and the bias gradient): no split, bias pass or concatenation
            # around it (``pallas_attention``); packed rows pass their segments
            p = 0 if prefix is None else prefix[0].shape[-3]
            out = pallas_attention.attention(y, mask.valid[:, p:], prefix,
                                             mask.valid[:, :p] if p else None, bias=bias,
                                             segments=mask.segments)
            return out.reshape(b, t, n * d)
        qkv = y + bias
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        k, v = _with_prefix(k, v, prefix)
        if comp.attention_impl == "dense":
            dropout = 0.0 if deterministic else cfg.attention_probs_dropout_prob
            out = self._dense_attention(q, k, v, mask.dense(), dropout)
        else:
            # cuDNN's fused kernel (also for lengths our kernel would pad by more than a quarter,
            # and packed rows); XLA's where cuDNN takes no float32
            half = dt in (jnp.bfloat16, jnp.float16)
            impl = "cudnn" if half and comp.attention_impl in ("cudnn", "pallas") else None
            if mask.lengths is not None and mask.segments is None:
                out = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=mask.lengths,
                                                   implementation=impl)
            else:
                out = jax.nn.dot_product_attention(q, k, v, mask=mask.dense(), implementation=impl)
        return out.reshape(b, t, n * d)

    def _dense_attention(self, q: Array, k: Array, v: Array, mask: Array, dropout: float) -> Array:
        scale = 1.0 / jnp.sqrt(jnp.asarray(q.shape[-1], jnp.float32))
        scores = jnp.einsum("btnd,bsnd->bnts", q, k, preferred_element_type=jnp.float32) * scale
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        if dropout > 0.0:
            probs = nn.Dropout(dropout)(probs, deterministic=False)
        return jnp.einsum("bnts,bsnd->btnd", probs.astype(v.dtype), v)


def _with_prefix(k: Array, v: Array, prefix: tuple[Array, Array] | None) -> tuple[Array, Array]:
    if prefix is None:
        return k, v
    pk, pv = prefix
    shape = (k.shape[0],) + pk.shape[-3:]
    return (jnp.concatenate([jnp.broadcast_to(pk.astype(k.dtype), shape), k], axis=1),
            jnp.concatenate([jnp.broadcast_to(pv.astype(v.dtype), shape), v], axis=1))


class BertOutput(nn.Module):
    """Dense -> dropout -> (adapter) -> LayerNorm(+ residual): HF's ``BertSelfOutput`` and
    ``BertOutput``. ``site`` names it for the method's extras (``attention_output`` /
    ``output``)."""

    config: BertConfig
    compute: Compute = EXACT
    extras: Extras = NO_EXTRAS
    site: str = "output"

    @nn.compact
    def __call__(self, h: Array, residual: Array, deterministic: bool = True) -> Array:
        cfg, comp = self.config, self.compute
        dt = _dt(comp)
        kernel, bias = DenseParams(cfg.hidden_size, cfg.initializer_range, name="dense")(h.shape[-1])
        y = _matmul(h, kernel, dt)
        lora = self.extras.lora_for(self.site, h.shape[-1], cfg.hidden_size)
        if lora is not None:
            y = y + lora(h, deterministic).astype(dt)
        adapter = self.extras.adapter_for("attention" if self.site == "attention_output" else "output",
                                          cfg.hidden_size)
        rate = 0.0 if deterministic else cfg.hidden_dropout_prob
        if comp.norm_impl == "pallas" and adapter is None:
            # one kernel: bias, dropout, residual, LayerNorm (returns the output twice, see
            # ``pallas_norm.dropout_add_norm``); named as the unfused path's dropout module: the same
            # RNG stream, so the same mask
            scale, ln_bias = LayerNormParams(cfg.hidden_size, name="LayerNorm")()
            seed = HashDropoutSeed(name="HashDropout_0")() if rate else None
            return pallas_norm.dropout_add_norm(y, bias, residual, scale, ln_bias, seed, rate=rate,
                                                eps=cfg.layer_norm_eps)
        y = y + bias.astype(dt)
        y = _dropout(comp, cfg.hidden_dropout_prob)(y, deterministic=deterministic)
        if adapter is not None:
            y = adapter(y, deterministic)
        return _layer_norm(cfg, comp)(y + residual)


class BertAttention(nn.Module):
    config: BertConfig
    compute: Compute = EXACT
    extras: Extras = NO_EXTRAS

    @nn.compact
    def __call__(self, x: Array, mask: KeyMask, deterministic: bool = True,
                 prefix: tuple[Array, Array] | None = None, query_rows: Array | None = None) -> Array:
        h = BertSelfAttention(self.config, self.compute, self.extras, name="self")(
            _first(x), mask, deterministic, prefix, query_rows)
        residual = _second(x) if query_rows is None else _gather_rows(_second(x), query_rows)
        return BertOutput(self.config, self.compute, self.extras, "attention_output", name="output")(
            h, residual, deterministic)


class BertIntermediate(nn.Module):
    config: BertConfig
    compute: Compute = EXACT
    extras: Extras = NO_EXTRAS

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        cfg = self.config
        dt = _dt(self.compute)
        kernel, bias = DenseParams(cfg.intermediate_size, cfg.initializer_range, name="dense")(x.shape[-1])
        y = _matmul(x, kernel, dt)
        lora = self.extras.lora_for("intermediate", x.shape[-1], cfg.intermediate_size)
        if lora is not None:
            y = y + lora(x, deterministic).astype(dt)
        return _activation(cfg.hidden_act)(y + bias.astype(dt))


class BertLayer(nn.Module):
    """One encoder layer; with ``query_rows`` its output is those rows' alone, ``[B, K, H]``."""

    config: BertConfig
    compute: Compute = EXACT
    extras: Extras = NO_EXTRAS

    @nn.compact
    def __call__(self, x: Array, mask: KeyMask, deterministic: bool = True,
                 prefix: tuple[Array, Array] | None = None, query_rows: Array | None = None) -> Array:
        cfg, comp, ex = self.config, self.compute, self.extras
        a = BertAttention(cfg, comp, ex, name="attention")(x, mask, deterministic, prefix, query_rows)
        h = BertIntermediate(cfg, comp, ex, name="intermediate")(_first(a), deterministic)
        return BertOutput(cfg, comp, ex, "output", name="output")(h, _second(a), deterministic)


class BertEncoder(nn.Module):
    config: BertConfig
    compute: Compute = EXACT
    extras: Extras = NO_EXTRAS

    @nn.compact
    def __call__(self, x: Array, mask: KeyMask, deterministic: bool = True,
                 prefix_kv: Sequence[tuple[Array, Array]] | None = None,
                 last_rows: Array | None = None) -> Array:
        """``last_rows`` ``[B, K]``: the last layer computes those rows only (output ``[B, K, H]``)."""
        cfg = self.config
        if prefix_kv is not None and len(prefix_kv) != cfg.num_hidden_layers:
            raise ValueError(f"prefix_kv has {len(prefix_kv)} layers, the model {cfg.num_hidden_layers}")
        layer_cls = nn.remat(BertLayer, static_argnums=(3,)) if self.compute.remat == "layer" else BertLayer
        for i in range(cfg.num_hidden_layers):
            prefix = None if prefix_kv is None else prefix_kv[i]
            rows = last_rows if i == cfg.num_hidden_layers - 1 else None
            x = layer_cls(cfg, self.compute, self.extras, name=f"layer_{i}")(x, mask, deterministic, prefix, rows)
        return _first(x)


class BertPooler(nn.Module):
    """``tanh(dense(x))`` of the read rows: ``[B, K, H]`` -> ``[B, K, H]``."""

    config: BertConfig
    compute: Compute = EXACT
    extras: Extras = NO_EXTRAS

    @nn.compact
    def __call__(self, rows: Array, deterministic: bool = True) -> Array:
        kernel, bias = DenseParams(self.config.hidden_size, self.config.initializer_range,
                                   name="dense")(rows.shape[-1])
        dt = _dt(self.compute)
        y = _matmul(rows, kernel, dt)
        lora = self.extras.lora_for("pooler", rows.shape[-1], self.config.hidden_size)
        if lora is not None:
            y = y + lora(rows, deterministic).astype(dt)
        return jnp.tanh(y + bias.astype(dt))


class BertModel(nn.Module):
    """The encoder: ``(input_ids, attention_mask, token_type_ids) -> (sequence_output, pooled)``.

    With ``prompt_embeds`` of length P the sequence output has length ``L + P`` (virtual tokens at
    positions ``1..P``, right after ``[CLS]``; with ``prompt_front`` at ``0..P-1``, in front of
    ``[CLS]`` as peft places them, so the pooler reads the first virtual token); ``prompt_mask``
    (``[B, P]``, default all ones) says which virtual tokens the others may attend to.
    ``position_ids`` default to ``0..L+P-1``.
    With ``prefix_kv`` (length P per layer) the keys of every layer get ``prefix_mask`` (default all
    ones) in front of ``attention_mask``.

    Packed rows: ``segment_ids`` ``[B, L]`` (0: padding, 1, 2, ...: the examples of the row) make
    each token attend only to its own example's tokens (and the prefix); pass each example's own
    ``position_ids``. ``read_positions`` ``[B, K]`` are the rows whose outputs are read (default:
    ``[CLS]`` at 0); ``pooled`` is ``[B, K, H]`` then, else ``[B, H]``. With ``cls_only`` the last
    layer computes the read rows only, so the sequence output is ``[B, K, H]``.
    """

    config: BertConfig
    compute: Compute = EXACT
    extras: Extras = NO_EXTRAS
    add_pooling_layer: bool = True

    @nn.compact
    def __call__(self, input_ids: Array, attention_mask: Array | None = None,
                 token_type_ids: Array | None = None, position_ids: Array | None = None, *,
                 deterministic: bool = True, prompt_embeds: Array | None = None,
                 prompt_mask: Array | None = None, prompt_front: bool = False,
                 prefix_kv: Sequence[tuple[Array, Array]] | None = None,
                 prefix_mask: Array | None = None, segment_ids: Array | None = None,
                 read_positions: Array | None = None, cls_only: bool = False,
                 pooling: str = "cls", position_offset: int = 0,
                 mean_f32: bool = False) -> tuple[Array, Array | None]:
        cfg = self.config
        b, length = input_ids.shape
        if segment_ids is not None:
            if prompt_embeds is not None:
                raise ValueError("packed rows (segment_ids) cannot take input prompts")
            attention_mask = segment_ids > 0
        if attention_mask is None:
            attention_mask = jnp.ones((b, length), jnp.int32)
        if token_type_ids is None:
            token_type_ids = jnp.zeros((b, length), jnp.int32)
        valid = attention_mask.astype(bool)
        if prompt_embeds is not None:
            p = prompt_embeds.shape[-2]
            pm = jnp.ones((b, p), bool) if prompt_mask is None else \
                jnp.broadcast_to(prompt_mask.astype(bool), (b, p))
            zeros = jnp.zeros((b, p), token_type_ids.dtype)
            if prompt_front:
                valid = jnp.concatenate([pm, valid], axis=1)
                token_type_ids = jnp.concatenate([zeros, token_type_ids], 1)
            else:
                valid = jnp.concatenate([valid[:, :1], pm, valid[:, 1:]], axis=1)
                token_type_ids = jnp.concatenate([token_type_ids[:, :1], zeros, token_type_ids[:, 1:]], 1)
            length += p
        if length + position_offset > cfg.max_position_embeddings:
            raise ValueError(f"sequence of {length} tokens (virtual tokens included) from position "
                             f"{position_offset} exceeds max_position_embeddings={cfg.max_position_embeddings}")
        x = BertEmbeddings(cfg, self.compute, name="embeddings")(input_ids, token_type_ids, position_ids,
                                                                 deterministic, prompt_embeds, prompt_front,
                                                                 position_offset)
        key_valid = valid
        if prefix_kv is not None:
            p = prefix_kv[0][0].shape[-3]
            pm = jnp.ones((b, p), bool) if prefix_mask is None else \
                jnp.broadcast_to(prefix_mask.astype(bool), (b, p))
            key_valid = jnp.concatenate([pm, valid], axis=1)
        # Right-padded input with all-ones prompt/prefix masks keeps every row's valid keys
        # contiguous from position 0: fused attention can then take lengths instead of a mask.
        contiguous = prompt_mask is None and prefix_mask is None and segment_ids is None
        mask = KeyMask(key_valid, segment_ids,
                       key_valid.sum(-1).astype(jnp.int32) if contiguous else None)
        rows = read_positions if read_positions is not None else jnp.zeros((b, 1), jnp.int32)
        x = BertEncoder(cfg, self.compute, self.extras, name="encoder")(
            x, mask, deterministic, prefix_kv, rows if cls_only else None)
        if pooling == "mean":
            if cls_only:
                raise ValueError("mean pooling reads every row of the last layer (cls_only=False)")
            mean = _mean_pool(x, valid, segment_ids, read_positions)
            return x, mean if mean_f32 else mean.astype(x.dtype)
        read = x if cls_only else _gather_rows(x, rows)
        pooled = (BertPooler(cfg, self.compute, self.extras, name="pooler")(read, deterministic)
                  if self.add_pooling_layer else None)
        if pooled is not None and read_positions is None:
            pooled = pooled[:, 0]
        return x, pooled


def _mean_pool(x: Array, valid: Array, segments: Array | None, read_positions: Array | None) -> Array:
    """The mean of the valid rows of ``x`` ``[B, T, H]``, in float32: ``[B, H]``, or per packed
    example ``[B, K, H]`` (slot ``k`` is segment ``k + 1``)."""
    xf = x.astype(jnp.float32)
    if segments is None:
        m = valid.astype(jnp.float32)[..., None]
        return jnp.sum(xf * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
    k = read_positions.shape[1]
    onehot = (segments[:, None, :] == jnp.arange(1, k + 1)[None, :, None]).astype(jnp.float32)   # [B, K, T]
    sums = jnp.einsum("bkt,bth->bkh", onehot, xf)
    return sums / jnp.maximum(onehot.sum(-1, keepdims=True), 1.0)


POOLINGS = ("cls", "mean", "cosine")


def split_pair(input_ids: Array, attention_mask: Array | None, token_type_ids: Array) -> tuple[Array, Array]:
    """The two sentences of joint pair rows ``[CLS] a [SEP] b [SEP]`` (right-padded, ``b``'s tokens of
    type 1) as rows of their own: ``[2B, L]`` ids and masks, the ``B`` first sentences ``[CLS] a [SEP]``
    then the ``B`` second ones ``[CLS] b [SEP]`` -- each as the tokenizer encodes a single sentence."""
    b, length = input_ids.shape
    valid = (jnp.ones((b, length), bool) if attention_mask is None else attention_mask.astype(bool))
    first = valid & (token_type_ids == 0)
    n_a = first.sum(-1)
    n_b = (valid & (token_type_ids != 0)).sum(-1)
    j = jnp.arange(length)[None, :]
    src = jnp.clip(n_a[:, None] - 1 + j, 0, length - 1)      # row j of b's own: joint row n_a - 1 + j
    b_ids = jnp.where(j == 0, input_ids[:, :1], jnp.take_along_axis(input_ids, src, axis=1))
    b_valid = j < (n_b + 1)[:, None]
    return (jnp.concatenate([jnp.where(first, input_ids, 0), jnp.where(b_valid, b_ids, 0)]),
            jnp.concatenate([first, b_valid]).astype(jnp.int32))


def cosine(u: Array, v: Array) -> Array:
    """Row-wise cosine similarity of ``[B, H]`` arrays, in float32: ``[B]``."""
    u, v = u.astype(jnp.float32), v.astype(jnp.float32)
    return jnp.sum(u * v, -1) / jnp.maximum(jnp.linalg.norm(u, axis=-1) * jnp.linalg.norm(v, axis=-1), 1e-8)


class BertForSequenceClassification(nn.Module):
    """BERT + dropout + linear head on the pooled ``[CLS]``; ``num_labels == 1`` is regression.

    ``pooling="mean"``: the head reads the mean of the last layer's token outputs instead (the
    read-out sentence-embedding models are trained for; no pooler layer, every row of the last
    layer computed).

    ``pooling="cosine"`` (sentence pairs): the two sentences are encoded apart (:func:`split_pair`),
    each read as the mean of its last layer's outputs, and the head reads the cosine of the two
    means -- one number, how a sentence-embedding model compares two sentences -- through a dense
    layer of one input. No dropout on it; unpacked rows only.

    ``adapter`` is an optional module called as ``adapter(batch_size, deterministic=...)`` that
    returns keyword arguments for :class:`BertModel` (``prompt_embeds``, ``prefix_kv``, ...). Its
    params live under ``adapter/`` next to ``bert/`` and ``classifier/``. ``extras`` are the
    method's modules inside the layers (LoRA, bottleneck adapters), with params under ``bert/``.

    Returns logits ``[B, num_labels]``, or ``[B, K, num_labels]`` for packed rows
    (``read_positions`` ``[B, K]``: each example's ``[CLS]``).
    """

    config: BertConfig
    num_labels: int
    adapter: nn.Module | None = None
    compute: Compute = EXACT
    extras: Extras = NO_EXTRAS
    pooling: str = "cls"

    @nn.compact
    def __call__(self, input_ids: Array, attention_mask: Array | None = None,
                 token_type_ids: Array | None = None, *, deterministic: bool = True,
                 position_ids: Array | None = None, segment_ids: Array | None = None,
                 read_positions: Array | None = None) -> Array:
        cfg, comp = self.config, self.compute
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        pooling, b = self.pooling, input_ids.shape[0]
        if pooling == "cosine":
            if segment_ids is not None or position_ids is not None:
                raise ValueError("cosine pooling reads unpacked pair rows (no segment_ids or position_ids)")
            if token_type_ids is None:
                raise ValueError("cosine pooling needs the pair's token_type_ids")
            input_ids, attention_mask = split_pair(input_ids, attention_mask, token_type_ids)
            token_type_ids, pooling = jnp.zeros_like(input_ids), "mean"
        extra = {} if self.adapter is None else self.adapter(input_ids.shape[0], deterministic=deterministic)
        _, pooled = BertModel(cfg, comp, self.extras, name="bert")(
            input_ids, attention_mask, token_type_ids, position_ids, deterministic=deterministic,
            segment_ids=segment_ids, read_positions=read_positions,
            cls_only=comp.cls_only_last_layer and pooling == "cls", pooling=pooling,
            mean_f32=self.pooling == "cosine", **extra)
        if self.pooling == "cosine":
            pooled = cosine(pooled[:b], pooled[b:])[:, None]
        else:
            rate = cfg.hidden_dropout_prob if cfg.classifier_dropout is None else cfg.classifier_dropout
            pooled = _dropout(comp, rate)(pooled, deterministic=deterministic)
        logits = nn.Dense(self.num_labels, dtype=jnp.float32 if self.pooling == "cosine" else _dt(comp),
                          param_dtype=jnp.float32,
                          kernel_init=nn.initializers.normal(cfg.initializer_range), name="classifier")(pooled)
        return logits.astype(jnp.float32)
