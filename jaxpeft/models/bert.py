"""BERT encoder in Flax linen, with HF-style parameter paths.

Param paths read like Hugging Face's names with ``/`` instead of ``.`` and ``layer_N`` instead of
``layer.N``: ``encoder/layer_3/attention/self/query/bias``, ``encoder/layer_3/intermediate/dense/bias``,
``encoder/layer_3/output/LayerNorm/bias``. Params are float32; ``BertConfig.dtype`` sets the
compute dtype (e.g. ``bfloat16``); softmax, LayerNorm statistics and logits stay in float32.

Two extension points serve the prompt methods:

* ``prompt_embeds`` (``[B or 1, P, H]``): virtual-token embeddings inserted right after the first
  token (``[CLS]``), so the pooler still reads the real ``[CLS]``;
* ``prefix_kv`` (one ``(key, value)`` pair per layer, each ``[B or 1, P, heads, head_dim]``): extra
  keys/values placed in front of each layer's own, so attention has more keys than queries and the
  output keeps the input's length.

Each self-attention sows its projected ``(key, value)`` into the ``intermediates`` collection, so
callers (tests, prefix extraction) can read them with ``mutable=["intermediates"]``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxpeft.models import lean_ops, pallas_attention, pallas_gelu, pallas_norm
from jaxpeft.models.embedding_lookup import SMALL_TABLE_ROWS, EmbedTable, take_small
from jaxpeft.models.hash_dropout import HashDropout, HashDropoutSeed

Array = jax.Array

ATTENTION_IMPLS = ("dense", "xla", "cudnn", "pallas")
# What the backward pass recomputes instead of keeping from the forward pass:
#   none         keep everything XLA asks for;
#   elementwise  LayerNorms and the FFN activation are recomputed from their (compute-dtype)
#                inputs; with ``lean_residuals`` (the default) they already keep only those
#                inputs, so this saves nothing more; it matters with ``lean_residuals=False``;
#   layer        each encoder layer is recomputed from its input (least memory, one more forward).
REMAT_POLICIES = ("none", "elementwise", "layer")
DROPOUT_BITS = (32, 16, 8)
DROPOUT_IMPLS = ("hash", "random")
# norm_impl, activation_impl: XLA's ops or our Pallas kernels
KERNEL_IMPLS = ("xla", "pallas")


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
    # Not part of the HF config: how we compute. ``attention_impl``: ``dense`` (einsum + softmax,
    # with dropout on the attention probabilities, exactly BERT) or a fused kernel through
    # ``jax.nn.dot_product_attention`` (``xla``, or ``cudnn`` on NVIDIA GPUs with bf16/fp16), which
    # applies no dropout to the attention probabilities (hidden-state dropout stays); ``pallas``
    # is our own kernel for short sequences (``jaxpeft.models.pallas_attention``, no dropout on
    # the probabilities either), which reads q/k/v straight out of the fused projection and keeps
    # no attention output for the backward pass; for lengths that are not a power of two (prompt
    # tokens added) JAX's fused attention runs instead (cuDNN where it can).
    dtype: str = "float32"
    attention_impl: str = "dense"
    remat: str = "none"
    # one [H, 3H] matmul for query/key/value instead of three (same params, same paths)
    fuse_qkv: bool = True
    # random bits per element behind the hidden-state dropout masks: 32 (flax's nn.Dropout,
    # exact rate), 16 or 8 (cheaper; the rate is rounded to a multiple of 2**-bits, e.g. 0.1 -> 0.1016
    # with 8 bits)
    dropout_bits: int = 32
    # where the hidden-state dropout masks come from: ``hash`` (a keyed hash of each element's
    # position, fused into the kernels that use it: ``jaxpeft.models.hash_dropout``) or ``random``
    # (``jax.random`` bits as in flax's ``nn.Dropout``; ``dropout_bits`` applies to these only)
    dropout_impl: str = "hash"
    # LayerNorm and GELU with hand-written backward passes that keep only their compute-dtype input
    # (``jaxpeft.models.lean_ops``) instead of autodiff's float32 temporaries; same params and math
    lean_residuals: bool = True
    # launch parameters of the pallas attention kernels, "BLOCK_Q:WARPS:BLOCK_Q_BWD:WARPS_BWD"
    # (empty: ``pallas_attention.Tuning()``'s defaults)
    attention_tuning: str = ""
    # how each sublayer's output, LayerNorm(dropout(x @ W + b) + residual), is computed: ``xla``
    # (the layers one by one, fused by XLA) or ``pallas`` (one kernel each way with the hash
    # dropout mask recomputed inside: ``jaxpeft.models.pallas_norm``; same params and results)
    norm_impl: str = "xla"
    # launch parameters of those kernels, "ROWS:WARPS:ROWS_BWD:ROWS_PER_PROGRAM_BWD:WARPS_BWD"
    norm_tuning: str = ""
    # the feed-forward block's bias + GELU: ``xla`` (``lean_ops.gelu`` after the biased matmul) or
    # ``pallas`` (one kernel each way that keeps only the matmul's output:
    # ``jaxpeft.models.pallas_gelu``; GELU activations only)
    activation_impl: str = "xla"
    # sequence classification reads only the [CLS] row of the last layer's output: compute that
    # layer's queries, attention, output projection and feed-forward block for that row alone (its
    # keys and values still come from every token). Same logits and gradients; the last layer's
    # other rows are work the loss never sees (``BertModel``'s ``cls_only``)
    cls_only_last_layer: bool = True

    def __post_init__(self):
        if isinstance(self.remat, bool):  # older configs: True meant whole-layer remat
            object.__setattr__(self, "remat", "layer" if self.remat else "none")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.dropout_bits not in DROPOUT_BITS:
            raise ValueError(f"dropout_bits must be one of {DROPOUT_BITS}, got {self.dropout_bits!r}")
        if self.dropout_impl not in DROPOUT_IMPLS:
            raise ValueError(f"dropout_impl must be one of {DROPOUT_IMPLS}, got {self.dropout_impl!r}")
        if self.dropout_bits != 32 and self.dropout_impl != "random":
            raise ValueError(f"dropout_bits={self.dropout_bits} needs dropout_impl='random' "
                             f"(dropout_impl={self.dropout_impl!r} draws no random bits per element)")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
        if self.attention_impl == "pallas":
            why = pallas_attention.supported(1, 0, self.hidden_size // self.num_attention_heads)
            if why:
                raise ValueError(f"attention_impl='pallas': {why}")
        pallas_attention.Tuning.parse(self.attention_tuning)   # raises on a malformed string
        if self.norm_impl not in KERNEL_IMPLS:
            raise ValueError(f"norm_impl must be one of {KERNEL_IMPLS}, got {self.norm_impl!r}")
        if self.norm_impl == "pallas" and self.dropout_impl != "hash":
            raise ValueError("norm_impl='pallas' recomputes hash_dropout's masks in its kernels: it "
                             f"needs dropout_impl='hash', got {self.dropout_impl!r}")
        pallas_norm.Tuning.parse(self.norm_tuning)
        if self.activation_impl not in KERNEL_IMPLS:
            raise ValueError(f"activation_impl must be one of {KERNEL_IMPLS}, got {self.activation_impl!r}")
        if self.activation_impl == "pallas" and self.hidden_act not in _GELU_APPROXIMATE:
            raise ValueError(f"activation_impl='pallas' computes GELU; hidden_act={self.hidden_act!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def compute_dtype(self) -> Any:
        return jnp.dtype(self.dtype)

    @classmethod
    def from_hf(cls, hf_config: Any, **overrides: Any) -> "BertConfig":
        """From a ``transformers`` config object or a ``config.json`` dict."""
        get = hf_config.get if isinstance(hf_config, dict) else (lambda k, d=None: getattr(hf_config, k, d))
        kw = {}
        for f in dataclasses.fields(cls):
            if f.name in ("dtype", "attention_impl", "remat", "fuse_qkv", "dropout_bits",
                          "dropout_impl", "lean_residuals", "attention_tuning", "norm_impl",
                          "norm_tuning", "activation_impl", "cls_only_last_layer"):
                continue
            v = get(f.name, None)
            if v is not None:
                kw[f.name] = v
        pe = get("position_embedding_type", "absolute")
        if pe not in (None, "absolute"):
            raise ValueError(f"position_embedding_type={pe!r} is not supported (only 'absolute')")
        kw.update(overrides)
        return cls(**kw)

    def replace(self, **kw: Any) -> "BertConfig":
        return dataclasses.replace(self, **kw)


# GELU variants by name: whether each is the tanh approximation
_GELU_APPROXIMATE = {"gelu": False, "gelu_new": True, "gelu_pytorch_tanh": True, "gelu_fast": True}


def _activation(name: str, lean: bool = False):
    gelu = lean_ops.gelu if lean else (lambda x, approximate: jax.nn.gelu(x, approximate=approximate))
    acts = {
        "gelu": lambda x: gelu(x, False),
        "gelu_new": lambda x: gelu(x, True),
        "gelu_pytorch_tanh": lambda x: gelu(x, True),
        "gelu_fast": lambda x: gelu(x, True),
        "relu": jax.nn.relu,
        "silu": jax.nn.silu,
        "swish": jax.nn.silu,
        "tanh": jnp.tanh,
    }
    if name not in acts:
        raise ValueError(f"hidden_act={name!r} is not supported; known: {sorted(acts)}")
    return acts[name]


def kernels_in_compute_dtype(params: Any, cfg: BertConfig) -> Any:
    """``params`` (a whole tree or a part of it, such as the frozen params) with the encoder's and
    pooler's matmul kernels (``bert/.../kernel``) in ``cfg``'s compute dtype.

    Every one of them is cast to that dtype right before its matmul (``nn.Dense(dtype=...)`` and
    the fused projections), so the model computes exactly the same with them stored cast. For
    frozen params that takes a cast per matrix off every train step and, under bfloat16, half of
    their memory (the float32 copies and the step's bfloat16 copies both go). Embedding tables,
    biases and LayerNorm params are used in float32 and stay as they are.
    """
    dtype = cfg.compute_dtype

    def cast(path, x):
        names = [str(getattr(k, "key", k)) for k in path]
        is_kernel = len(names) > 1 and names[0] == "bert" and names[-1] == "kernel"
        if is_kernel and getattr(x, "ndim", 0) == 2 and jnp.issubdtype(x.dtype, jnp.floating):
            return x.astype(dtype)
        return x

    if dtype == jnp.float32:
        return params
    return jax.tree_util.tree_map_with_path(cast, params)


def _dense(cfg: BertConfig, features: int, name: str) -> nn.Dense:
    return nn.Dense(features, dtype=cfg.compute_dtype, param_dtype=jnp.float32,
                    kernel_init=nn.initializers.normal(cfg.initializer_range), name=name)


class LowBitDropout(nn.Module):
    """Inverted dropout whose mask comes from ``bits``-bit random integers (a quarter or half of the
    random bits of ``nn.Dropout``'s float32 uniforms): an element is kept when its integer is at least
    ``round(rate * 2**bits)``, so the rate is that over ``2**bits``."""

    rate: float
    bits: int = 8

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        if deterministic or self.rate == 0.0:
            return x
        if self.rate >= 1.0:
            return jnp.zeros_like(x)
        threshold = min(round(self.rate * 2 ** self.bits), 2 ** self.bits - 1)
        keep_prob = 1.0 - threshold / 2 ** self.bits
        r = jax.random.bits(self.make_rng("dropout"), x.shape, {8: jnp.uint8, 16: jnp.uint16}[self.bits])
        return jnp.where(r >= threshold, x * jnp.asarray(1.0 / keep_prob, x.dtype), jnp.zeros_like(x))


def _dropout(cfg: BertConfig, rate: float) -> nn.Module:
    if cfg.dropout_impl == "hash":
        return HashDropout(rate)
    return nn.Dropout(rate) if cfg.dropout_bits == 32 else LowBitDropout(rate, cfg.dropout_bits)


class _DenseParams(nn.Module):
    """The params of an ``nn.Dense`` (same names, shapes and initialisers), returned unapplied."""

    features: int
    initializer_range: float

    @nn.compact
    def __call__(self, in_features: int) -> tuple[Array, Array]:
        kernel = self.param("kernel", nn.initializers.normal(self.initializer_range),
                            (in_features, self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        return kernel, bias


class _LayerNormParams(nn.Module):
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


def _layer_norm(cfg: BertConfig, name: str = "LayerNorm") -> nn.Module:
    cls = lean_ops.LayerNorm if cfg.lean_residuals else nn.LayerNorm
    cls = nn.remat(cls) if cfg.remat == "elementwise" else cls
    return cls(epsilon=cfg.layer_norm_eps, dtype=cfg.compute_dtype, param_dtype=jnp.float32, name=name)


class BertEmbeddings(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, input_ids: Array, token_type_ids: Array, position_ids: Array | None,
                 deterministic: bool = True, prompt_embeds: Array | None = None) -> Array:
        """``position_ids=None``: positions ``0..L-1`` in every row (``L`` with the virtual tokens)."""
        cfg = self.config
        init = nn.initializers.normal(cfg.initializer_range)
        words = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init, param_dtype=jnp.float32,
                         name="word_embeddings")(input_ids)
        if prompt_embeds is not None:
            p = jnp.broadcast_to(prompt_embeds.astype(words.dtype),
                                 (words.shape[0],) + prompt_embeds.shape[-2:])
            words = jnp.concatenate([words[:, :1], p, words[:, 1:]], axis=1)
        # the position and token-type tables' gradients as sums, not scatter-adds (embedding_lookup)
        pos_table = EmbedTable(cfg.max_position_embeddings, cfg.hidden_size, init, name="position_embeddings")()
        if position_ids is None:
            pos = pos_table[None, :words.shape[1]]
        else:
            pos = jnp.take(pos_table, position_ids, axis=0)
        type_table = EmbedTable(cfg.type_vocab_size, cfg.hidden_size, init, name="token_type_embeddings")()
        if cfg.type_vocab_size <= SMALL_TABLE_ROWS:
            types = take_small(type_table, token_type_ids)
        else:
            types = jnp.take(type_table, token_type_ids, axis=0)
        x = _layer_norm(cfg)(words + pos + types)
        return _dropout(cfg, cfg.hidden_dropout_prob)(x, deterministic=deterministic)


class BertSelfAttention(nn.Module):
    """Multi-head self-attention whose keys/values may be longer than its queries (prefixes)."""

    config: BertConfig

    @nn.compact
    def __call__(self, x: Array, key_mask: Array, deterministic: bool = True,
                 prefix: tuple[Array, Array] | None = None,
                 key_lengths: Array | None = None, cls_only: bool = False) -> Array:
        cfg = self.config
        if cls_only:
            return self._cls_query(x, key_mask, deterministic, prefix)
        b, t, _ = x.shape
        n, d = cfg.num_attention_heads, cfg.head_dim
        if cfg.fuse_qkv:
            qkv = [_DenseParams(cfg.hidden_size, cfg.initializer_range, name=name)(x.shape[-1])
                   for name in ("query", "key", "value")]
            dt = cfg.compute_dtype
            kernel = jnp.concatenate([w for w, _ in qkv], axis=1).astype(dt)
            bias = jnp.concatenate([bb for _, bb in qkv]).astype(dt).reshape(3, n, d)
            y = jax.lax.dot_general(x.astype(dt), kernel, (((x.ndim - 1,), (0,)), ((), ())))
            y = y.reshape(b, t, 3, n, d)
            qkv = y + bias
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        else:
            q = _dense(cfg, cfg.hidden_size, "query")(x).reshape(b, t, n, d)
            k = _dense(cfg, cfg.hidden_size, "key")(x).reshape(b, t, n, d)
            v = _dense(cfg, cfg.hidden_size, "value")(x).reshape(b, t, n, d)
            y = bias = None
        if self.is_mutable_collection("intermediates"):
            self.sow("intermediates", "key_value", (k, v))
        if cfg.attention_impl == "pallas" and pallas_attention.fast_length(t):
            # one kernel reads the fused projection's output, adds its bias and writes dq/dk/dv
            # back into one array (and the bias gradient): no split, bias pass or concatenation
            # around it (``pallas_attention``)
            if y is None:
                y = jnp.stack([q, k, v], axis=2)
            p = 0 if prefix is None else prefix[0].shape[-3]
            if key_mask.shape != (b, p + t):
                raise ValueError(f"key mask shape {key_mask.shape} does not match keys {(b, p + t)}")
            out = pallas_attention.attention(y, key_mask[:, p:], prefix,
                                             key_mask[:, :p] if p else None, bias=bias,
                                             tuning=pallas_attention.Tuning.parse(cfg.attention_tuning))
            return out.reshape(b, t, n * d)
        if prefix is not None:
            pk, pv = prefix
            shape = (b,) + pk.shape[-3:]
            k = jnp.concatenate([jnp.broadcast_to(pk.astype(k.dtype), shape), k], axis=1)
            v = jnp.concatenate([jnp.broadcast_to(pv.astype(v.dtype), shape), v], axis=1)
        if key_mask.shape != (b, k.shape[1]):
            raise ValueError(f"key mask shape {key_mask.shape} does not match keys {(b, k.shape[1])}")
        if cfg.attention_impl == "dense":
            dropout = 0.0 if deterministic else cfg.attention_probs_dropout_prob
            out = self._dense_attention(q, k, v, key_mask, dropout)
        elif cfg.attention_impl == "pallas":
            # lengths the kernel's segments would pad by more than a quarter
            # (``pallas_attention.fast_length``): cuDNN's kernel runs instead where it can (JAX's
            # ``implementation=None`` picks XLA's, which keeps the probabilities and is slower)
            half = q.dtype in (jnp.bfloat16, jnp.float16)
            impl = "cudnn" if half and jax.default_backend() == "gpu" else "xla"
            out = self._fused_attention(q, k, v, key_mask, key_lengths, impl)
        else:
            out = self._fused_attention(q, k, v, key_mask, key_lengths, cfg.attention_impl)
        return out.reshape(b, t, n * d)

    def _cls_query(self, x: Array, key_mask: Array, deterministic: bool,
                   prefix: tuple[Array, Array] | None) -> Array:
        """Attention of the first token's query alone over every key: ``[B, 1, H]``. Same params
        (and fused key/value projection) as the full path; one query row is too little work for a
        fused kernel, so it is the dense path (with its attention dropout under ``dense``)."""
        cfg = self.config
        b, t, _ = x.shape
        n, d = cfg.num_attention_heads, cfg.head_dim
        if cfg.fuse_qkv:
            (wq, bq), (wk, bk), (wv, bv) = [
                _DenseParams(cfg.hidden_size, cfg.initializer_range, name=name)(x.shape[-1])
                for name in ("query", "key", "value")]
            dt = cfg.compute_dtype
            dims = (((x.ndim - 1,), (0,)), ((), ()))
            kv = jax.lax.dot_general(x.astype(dt), jnp.concatenate([wk, wv], axis=1).astype(dt), dims)
            kv = kv.reshape(b, t, 2, n, d) + jnp.concatenate([bk, bv]).astype(dt).reshape(2, n, d)
            k, v = kv[:, :, 0], kv[:, :, 1]
            q = jax.lax.dot_general(x[:, :1].astype(dt), wq.astype(dt), dims) + bq.astype(dt)
            q = q.reshape(b, 1, n, d)
        else:
            q = _dense(cfg, cfg.hidden_size, "query")(x[:, :1]).reshape(b, 1, n, d)
            k = _dense(cfg, cfg.hidden_size, "key")(x).reshape(b, t, n, d)
            v = _dense(cfg, cfg.hidden_size, "value")(x).reshape(b, t, n, d)
        if self.is_mutable_collection("intermediates"):
            self.sow("intermediates", "key_value", (k, v))
        if prefix is not None:
            pk, pv = prefix
            shape = (b,) + pk.shape[-3:]
            k = jnp.concatenate([jnp.broadcast_to(pk.astype(k.dtype), shape), k], axis=1)
            v = jnp.concatenate([jnp.broadcast_to(pv.astype(v.dtype), shape), v], axis=1)
        if key_mask.shape != (b, k.shape[1]):
            raise ValueError(f"key mask shape {key_mask.shape} does not match keys {(b, k.shape[1])}")
        dropout = cfg.attention_probs_dropout_prob if cfg.attention_impl == "dense" and not deterministic else 0.0
        return self._dense_attention(q, k, v, key_mask, dropout).reshape(b, 1, n * d)

    @staticmethod
    def _fused_attention(q: Array, k: Array, v: Array, key_mask: Array, key_lengths: Array | None,
                         implementation: str | None) -> Array:
        # Fused kernels (no dropout on attention probabilities). When the valid keys are a prefix
        # of each row, sequence lengths describe the mask without materialising it.
        if key_lengths is not None:
            return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=key_lengths,
                                                implementation=implementation)
        return jax.nn.dot_product_attention(q, k, v, mask=key_mask[:, None, None, :],
                                            implementation=implementation)

    def _dense_attention(self, q: Array, k: Array, v: Array, key_mask: Array, dropout: float) -> Array:
        scale = 1.0 / jnp.sqrt(jnp.asarray(q.shape[-1], jnp.float32))
        scores = jnp.einsum("btnd,bsnd->bnts", q, k, preferred_element_type=jnp.float32) * scale
        scores = jnp.where(key_mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        if dropout > 0.0:
            probs = nn.Dropout(dropout)(probs, deterministic=False)
        return jnp.einsum("bnts,bsnd->btnd", probs.astype(v.dtype), v)


class BertOutput(nn.Module):
    """Dense -> dropout -> LayerNorm(+ residual): HF's ``BertSelfOutput`` and ``BertOutput``."""

    config: BertConfig

    @nn.compact
    def __call__(self, h: Array, residual: Array, deterministic: bool = True) -> Array:
        cfg = self.config
        if cfg.norm_impl == "pallas":
            # the projection without its bias, then one kernel: bias, dropout, residual, LayerNorm
            # (returns the output twice, see ``pallas_norm.dropout_add_norm``)
            kernel, bias = _DenseParams(cfg.hidden_size, cfg.initializer_range, name="dense")(h.shape[-1])
            dt = cfg.compute_dtype
            y = jax.lax.dot_general(h.astype(dt), kernel.astype(dt), (((h.ndim - 1,), (0,)), ((), ())))
            scale, ln_bias = _LayerNormParams(cfg.hidden_size, name="LayerNorm")()
            rate = 0.0 if deterministic else cfg.hidden_dropout_prob
            # named as the unfused path's dropout module: the same RNG stream, so the same mask
            seed = HashDropoutSeed(name="HashDropout_0")() if rate else None
            return pallas_norm.dropout_add_norm(y, bias, residual, scale, ln_bias, seed, rate=rate,
                                                eps=cfg.layer_norm_eps,
                                                tuning=pallas_norm.Tuning.parse(cfg.norm_tuning))
        h = _dense(cfg, cfg.hidden_size, "dense")(h)
        h = _dropout(cfg, cfg.hidden_dropout_prob)(h, deterministic=deterministic)
        return _layer_norm(cfg)(h + residual)


class BertAttention(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x: Array, key_mask: Array, deterministic: bool = True,
                 prefix: tuple[Array, Array] | None = None,
                 key_lengths: Array | None = None, cls_only: bool = False) -> Array:
        h = BertSelfAttention(self.config, name="self")(_first(x), key_mask, deterministic, prefix,
                                                         key_lengths, cls_only)
        residual = _second(x)[:, :1] if cls_only else _second(x)
        return BertOutput(self.config, name="output")(h, residual, deterministic)


class BertLayer(nn.Module):
    """One encoder layer; with ``cls_only`` its output is the first row's alone, ``[B, 1, H]``."""

    config: BertConfig

    @nn.compact
    def __call__(self, x: Array, key_mask: Array, deterministic: bool = True,
                 prefix: tuple[Array, Array] | None = None,
                 key_lengths: Array | None = None, cls_only: bool = False) -> Array:
        cfg = self.config
        a = BertAttention(cfg, name="attention")(x, key_mask, deterministic, prefix, key_lengths, cls_only)
        h = BertIntermediate(cfg, name="intermediate")(_first(a))
        return BertOutput(cfg, name="output")(h, _second(a), deterministic)


class BertIntermediate(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        if cfg.activation_impl == "pallas":
            # the matmul without its bias, then one kernel adds it and applies GELU; the backward
            # pass keeps only the matmul's output (``pallas_gelu``)
            kernel, bias = _DenseParams(cfg.intermediate_size, cfg.initializer_range, name="dense")(x.shape[-1])
            dt = cfg.compute_dtype
            y = jax.lax.dot_general(x.astype(dt), kernel.astype(dt), (((x.ndim - 1,), (0,)), ((), ())))
            return pallas_gelu.bias_gelu(y, bias, approximate=_GELU_APPROXIMATE[cfg.hidden_act])
        act = _activation(cfg.hidden_act, cfg.lean_residuals)
        if cfg.remat == "elementwise":
            act = jax.checkpoint(act)
        return act(_dense(cfg, cfg.intermediate_size, "dense")(x))


class BertEncoder(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x: Array, key_mask: Array, deterministic: bool = True,
                 prefix_kv: Sequence[tuple[Array, Array]] | None = None,
                 key_lengths: Array | None = None, cls_only: bool = False) -> Array:
        """``cls_only``: the last layer computes the first row only (output ``[B, 1, H]``)."""
        cfg = self.config
        if prefix_kv is not None and len(prefix_kv) != cfg.num_hidden_layers:
            raise ValueError(f"prefix_kv has {len(prefix_kv)} layers, the model {cfg.num_hidden_layers}")
        layer_cls = nn.remat(BertLayer, static_argnums=(3, 6)) if cfg.remat == "layer" else BertLayer
        for i in range(cfg.num_hidden_layers):
            prefix = None if prefix_kv is None else prefix_kv[i]
            last = cls_only and i == cfg.num_hidden_layers - 1
            x = layer_cls(cfg, name=f"layer_{i}")(x, key_mask, deterministic, prefix, key_lengths, last)
        return _first(x)


class BertPooler(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return jnp.tanh(_dense(self.config, self.config.hidden_size, "dense")(x[:, 0]))


class BertModel(nn.Module):
    """The encoder: ``(input_ids, attention_mask, token_type_ids) -> (sequence_output, pooled)``.

    With ``prompt_embeds`` of length P the sequence output has length ``L + P`` (virtual tokens at
    positions ``1..P``, right after ``[CLS]``); ``prompt_mask`` (``[B, P]``, default all ones) says
    which virtual tokens the others may attend to. ``position_ids`` default to ``0..L+P-1``.
    With ``prefix_kv`` (length P per layer) the keys of every layer get ``prefix_mask`` (default all
    ones) in front of ``attention_mask``. With ``cls_only`` the last layer computes the first token's
    row only, so the sequence output is ``[B, 1, H]`` (all a pooler or [CLS] head reads).
    """

    config: BertConfig
    add_pooling_layer: bool = True

    @nn.compact
    def __call__(self, input_ids: Array, attention_mask: Array | None = None,
                 token_type_ids: Array | None = None, position_ids: Array | None = None, *,
                 deterministic: bool = True, prompt_embeds: Array | None = None,
                 prompt_mask: Array | None = None,
                 prefix_kv: Sequence[tuple[Array, Array]] | None = None,
                 prefix_mask: Array | None = None, cls_only: bool = False) -> tuple[Array, Array | None]:
        cfg = self.config
        b, length = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, length), jnp.int32)
        if token_type_ids is None:
            token_type_ids = jnp.zeros((b, length), jnp.int32)
        mask = attention_mask.astype(bool)
        if prompt_embeds is not None:
            p = prompt_embeds.shape[-2]
            pm = jnp.ones((b, p), bool) if prompt_mask is None else \
                jnp.broadcast_to(prompt_mask.astype(bool), (b, p))
            mask = jnp.concatenate([mask[:, :1], pm, mask[:, 1:]], axis=1)
            token_type_ids = jnp.concatenate(
                [token_type_ids[:, :1], jnp.zeros((b, p), jnp.int32), token_type_ids[:, 1:]], 1)
            length += p
        if length > cfg.max_position_embeddings:
            raise ValueError(f"sequence of {length} tokens (virtual tokens included) exceeds "
                             f"max_position_embeddings={cfg.max_position_embeddings}")
        x = BertEmbeddings(cfg, name="embeddings")(input_ids, token_type_ids, position_ids,
                                                   deterministic, prompt_embeds)
        key_mask = mask
        if prefix_kv is not None:
            p = prefix_kv[0][0].shape[-3]
            pm = jnp.ones((b, p), bool) if prefix_mask is None else \
                jnp.broadcast_to(prefix_mask.astype(bool), (b, p))
            key_mask = jnp.concatenate([pm, mask], axis=1)
        # Right-padded input with all-ones prompt/prefix masks keeps every row's valid keys
        # contiguous from position 0: fused attention can then take lengths instead of a mask.
        contiguous = prompt_mask is None and prefix_mask is None
        key_lengths = key_mask.sum(-1).astype(jnp.int32) if contiguous else None
        x = BertEncoder(cfg, name="encoder")(x, key_mask, deterministic, prefix_kv, key_lengths, cls_only)
        pooled = BertPooler(cfg, name="pooler")(x) if self.add_pooling_layer else None
        return x, pooled


class BertForSequenceClassification(nn.Module):
    """BERT + dropout + linear head on the pooled ``[CLS]``; ``num_labels == 1`` is regression.

    ``adapter`` is an optional module called as ``adapter(batch_size, deterministic=...)`` that
    returns keyword arguments for :class:`BertModel` (``prompt_embeds``, ``prefix_kv``, ...). Its
    params live under ``adapter/`` next to ``bert/`` and ``classifier/``.
    """

    config: BertConfig
    num_labels: int
    adapter: nn.Module | None = None

    @nn.compact
    def __call__(self, input_ids: Array, attention_mask: Array | None = None,
                 token_type_ids: Array | None = None, *, deterministic: bool = True) -> Array:
        cfg = self.config
        extra = {} if self.adapter is None else self.adapter(input_ids.shape[0], deterministic=deterministic)
        _, pooled = BertModel(cfg, name="bert")(input_ids, attention_mask, token_type_ids,
                                                deterministic=deterministic,
                                                cls_only=cfg.cls_only_last_layer, **extra)
        rate = cfg.hidden_dropout_prob if cfg.classifier_dropout is None else cfg.classifier_dropout
        pooled = _dropout(cfg, rate)(pooled, deterministic=deterministic)
        logits = nn.Dense(self.num_labels, dtype=cfg.compute_dtype, param_dtype=jnp.float32,
                          kernel_init=nn.initializers.normal(cfg.initializer_range), name="classifier")(pooled)
        return logits.astype(jnp.float32)
