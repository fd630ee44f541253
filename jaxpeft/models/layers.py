"""What every encoder family shares: dense layers that take a method's hooks, attention over a key
mask, the prompt a method hands the encoder, and the read-outs of the last layer.

**Hooks.** A method changes an encoder at two kinds of fixed points, and the encoder knows no method
by name (:class:`Hooks`):

* every dense layer ``y = x W + b`` asks ``hooks.linear(module, local, din, dout)`` for a module
  that returns a :class:`LinearChange` -- an input scale, an additive update, an output scale before
  the bias, an output scale after it (LoRA adds ``x A B``; DoRA adds it and rescales; IA3 scales the
  input or the output). ``module`` is the layer's name in transformers' model
  (``bert.encoder.layer.3.attention.self.query``), so a method matches peft's ``target_modules``
  against the same names peft does; ``local`` (``query``, ``dense``) names the hook's own module;
* after each sublayer's projection (before its residual connection) the encoder asks
  ``hooks.sublayer(module, kind, hidden)`` for a module ``y -> y'`` (bottleneck adapters).

Input-level methods (prompt tuning, P-tuning, prefix tuning) hand the encoder a :class:`Prompt`:
virtual-token embeddings for its input and/or per-layer key/value prefixes.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft.compute import Compute
from jaxpeft.models import quant
from jaxpeft.models.kernels import lean_ops
from jaxpeft.models.kernels.hash_dropout import HashDropout

Array = jax.Array


# ----------------------------------------------------------------------------- hooks


@flax.struct.dataclass
class LinearChange:
    """A method's change to one dense layer: ``y = ((x * in_scale) W + delta) * scale + b) * out_scale``.

    Each part is optional. ``delta`` is ``[..., out]`` for the layer's input; the scales are
    vectors (``[in]`` or ``[out]``) or arrays broadcasting against the output.
    """

    in_scale: Array | None = None
    delta: Array | None = None
    scale: Array | None = None
    out_scale: Array | None = None


@dataclasses.dataclass(frozen=True)
class Hooks:
    """The points where a method changes the encoder (see the module docstring).

    ``linear(module, local, din, dout)`` returns a flax module called as ``hook(x, kernel,
    deterministic) -> LinearChange`` (or ``None``: the layer is left alone); ``sublayer(module, kind,
    hidden)`` (``kind``: ``attention`` or ``ffn``) returns a module called as ``m(y, deterministic)``
    (or ``None``). Both are called inside the layer's compact method, so the module becomes a child
    of that layer and must carry its own ``name``. Both must be hashable (frozen dataclasses).
    """

    linear: Callable[[str, str, int, int], nn.Module | None] | None = None
    sublayer: Callable[[str, str, int], nn.Module | None] | None = None

    def linear_for(self, owner: nn.Module, local: str, din: int, dout: int) -> nn.Module | None:
        return None if self.linear is None else self.linear(module_name(owner, local), local, din, dout)

    def sublayer_for(self, owner: nn.Module, kind: str, hidden: int) -> nn.Module | None:
        return None if self.sublayer is None else self.sublayer(module_name(owner), kind, hidden)


NO_HOOKS = Hooks()


def module_name(owner: nn.Module, local: str | None = None) -> str:
    """transformers' dotted module name of ``owner``'s child ``local`` (or of ``owner``):
    ``('bert', 'encoder', 'layer_3', 'attention', 'self')`` + ``query`` ->
    ``bert.encoder.layer.3.attention.self.query``."""
    parts = list(owner.path) + ([local] if local else [])
    return re.sub(r"(^|\.)(layers?)_(\d+)(?=\.|$)", r"\1\2.\3", ".".join(parts))


def matmul(x: Array, kernel: Any, dt: Any) -> Array:
    """``x @ kernel`` over the last axis of ``x``, in the compute dtype ``dt``; a quantized frozen
    kernel (:class:`~jaxpeft.models.quant.QuantizedKernel`) is dequantized inside the matmul."""
    if isinstance(kernel, quant.QuantizedKernel):
        return quant.matmul(x, kernel, dt)
    return jax.lax.dot_general(x.astype(dt), kernel.astype(dt), (((x.ndim - 1,), (0,)), ((), ())))


def weight(kernel: Any, dtype: Any = jnp.float32) -> Array:
    """A kernel as a plain array (dequantized where it is stored quantized)."""
    if isinstance(kernel, quant.QuantizedKernel):
        return quant.dequantize(kernel, dtype)
    return kernel.astype(dtype)


def change_of(hook: nn.Module | None, x: Array, kernel: Array, deterministic: bool) -> LinearChange | None:
    return None if hook is None else hook(x, kernel, deterministic)


def apply_change(y: Array, change: LinearChange | None, bias: Array | None, dt: Any) -> Array:
    """``y`` (``x W``) with the change's update and scales and the bias applied."""
    if change is not None and change.delta is not None:
        y = y + change.delta.astype(dt)
    if change is not None and change.scale is not None:
        y = y * change.scale.astype(dt)
    if bias is not None:
        y = y + bias.astype(dt)
    if change is not None and change.out_scale is not None:
        y = y * change.out_scale.astype(dt)
    return y


def linear(x: Array, kernel: Array, bias: Array | None, hook: nn.Module | None, dt: Any,
           deterministic: bool = True) -> Array:
    """A dense layer with its method's hook (``None``: plain ``x W + b``)."""
    change = change_of(hook, x, kernel, deterministic)
    xin = x if change is None or change.in_scale is None else x * change.in_scale.astype(x.dtype)
    return apply_change(matmul(xin, kernel, dt), change, bias, dt)


@functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable, static_argnums=(2,))
def _concat_matmul(x: Array, kernels: tuple[Array, ...], dt: Any) -> Array:
    """``x @ concat(kernels)``, rematerialised: the backward pass concatenates the kernels again
    instead of keeping each layer's concatenated copy alive from the forward pass (with the layers
    unrolled, those copies add up to one more copy of the attention's q/k/v kernels)."""
    return matmul(x, jnp.concatenate(kernels, axis=1), dt)


def fused_linear(x: Array, parts: Sequence[tuple[Array, Array | None, nn.Module | None]], dt: Any,
                 deterministic: bool = True) -> tuple[Array, list[Array | None]]:
    """Several dense layers of the same input as one matmul where their hooks allow.

    Returns ``(y, biases)``: ``y`` ``[..., sum(out)]`` holds each layer's ``x W`` with its update and
    pre-bias scale, and ``biases`` the bias each part still has to add -- its own, or ``None`` where
    the part needed an after-bias scale (then it is applied here, bias included). Callers that fuse
    the bias into a later kernel (the attention) add the returned biases themselves.
    """
    changes = [change_of(h, x, k, deterministic) for k, _, h in parts]
    quantized = any(isinstance(k, quant.QuantizedKernel) for k, _, _ in parts)
    if quantized or any(c is not None and c.in_scale is not None for c in changes):
        ys = [matmul(x if c is None or c.in_scale is None else x * c.in_scale.astype(x.dtype), k, dt)
              for (k, _, _), c in zip(parts, changes)]
    else:
        y = _concat_matmul(x, tuple(k for k, _, _ in parts), jnp.dtype(dt))
        if all(c is None for c in changes):
            return y, [b for _, b, _ in parts]
        bounds = [int(s) for s in np.cumsum([k.shape[1] for k, _, _ in parts])[:-1]]
        ys = jnp.split(y, bounds, axis=-1)
    out, biases = [], []
    for yi, (_, b, _), c in zip(ys, parts, changes):
        if c is not None and c.out_scale is not None:
            out.append(apply_change(yi, c, b, dt))
            biases.append(None)
        else:
            out.append(apply_change(yi, c, None, dt))
            biases.append(b)
    return jnp.concatenate(out, axis=-1), biases


class DenseParams(nn.Module):
    """The params of an ``nn.Dense`` (same names, shapes and initialisers), returned unapplied.

    A kernel stored quantized (:class:`~jaxpeft.models.quant.QuantizedKernel`, a pytree of codes
    and scales) is returned as it is stored, for :func:`matmul` to dequantize."""

    features: int
    initializer_range: float
    use_bias: bool = True

    @nn.compact
    def __call__(self, in_features: int) -> tuple[Array, Array | None]:
        stored = self.get_variable("params", "kernel") if self.has_variable("params", "kernel") else None
        if isinstance(stored, quant.QuantizedKernel):   # flax would compare the codes' shape with the kernel's
            kernel = stored
        else:
            kernel = self.param("kernel", nn.initializers.normal(self.initializer_range),
                                (in_features, self.features), jnp.float32)
        if not self.use_bias:
            return kernel, None
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        return kernel, bias


def dense(owner: nn.Module, local: str, x: Array, features: int, initializer_range: float, compute: Compute,
          hooks: Hooks, deterministic: bool = True, use_bias: bool = True) -> Array:
    """A dense layer named ``local`` inside ``owner``'s compact method, with its method's hook
    (the hook is ``owner``'s child too, beside the layer: ``query`` and ``query_lora``)."""
    kernel, bias = DenseParams(features, initializer_range, use_bias, name=local)(x.shape[-1])
    hook = hooks.linear_for(owner, local, x.shape[-1], features)
    return linear(x, kernel, bias, hook, jnp.dtype(compute.dtype), deterministic)


class LayerNormParams(nn.Module):
    """The params of a ``LayerNorm`` over ``features`` (same names, shapes and initialisers)."""

    features: int

    @nn.compact
    def __call__(self) -> tuple[Array, Array]:
        return (self.param("scale", nn.initializers.ones, (self.features,), jnp.float32),
                self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32))


def layer_norm(eps: float, compute: Compute, name: str = "LayerNorm", use_bias: bool = True) -> nn.Module:
    return lean_ops.LayerNorm(epsilon=eps, dtype=jnp.dtype(compute.dtype), param_dtype=jnp.float32,
                              use_bias=use_bias, name=name)


def dropout(compute: Compute, rate: float) -> nn.Module:
    return HashDropout(rate) if compute.dropout_impl == "hash" else nn.Dropout(rate)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": lambda x: lean_ops.gelu(x, False),
    "gelu_new": lambda x: lean_ops.gelu(x, True),
    "gelu_pytorch_tanh": lambda x: lean_ops.gelu(x, True),
    "gelu_fast": lambda x: lean_ops.gelu(x, True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def activation(name: str) -> Callable[[Array], Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"hidden_act={name!r} is not supported; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


# ----------------------------------------------------------------------------- prompts


@flax.struct.dataclass
class Prompt:
    """What an input-level method hands the encoder.

    ``embeds`` ``[B or 1, P, H]``: virtual-token embeddings put right after the first token
    (``front``: in front of it, where peft puts them); ``mask`` ``[B, P]`` which of them the others
    may attend to (default: all). ``prefix_kv``: one ``(key, value)`` pair per layer, each
    ``[B or 1, P', heads, head_dim]``, placed in front of that layer's own keys and values;
    ``prefix_mask`` ``[B, P']``. ``position_offset``: added to every input position (a prefix read
    as ``P'`` tokens of text in front of the input).
    """

    embeds: Array | None = None
    mask: Array | None = None
    prefix_kv: tuple | None = None
    prefix_mask: Array | None = None
    front: bool = flax.struct.field(pytree_node=False, default=False)
    position_offset: int = flax.struct.field(pytree_node=False, default=0)

    @property
    def num_virtual(self) -> int:
        """Virtual tokens added to the input sequence."""
        return 0 if self.embeds is None else int(self.embeds.shape[-2])

    @property
    def prefix_length(self) -> int:
        return 0 if self.prefix_kv is None else int(self.prefix_kv[0][0].shape[-3])


NO_PROMPT = Prompt()


def insert_virtual(x: Array, virtual: Array, front: bool) -> Array:
    """``virtual`` ``[B, P, ...]`` put into ``x`` ``[B, L, ...]`` after its first row (or in front)."""
    return jnp.concatenate([virtual, x], axis=1) if front else \
        jnp.concatenate([x[:, :1], virtual, x[:, 1:]], axis=1)


def remove_virtual(x: Array, p: int, front: bool) -> Array:
    """Inverse of :func:`insert_virtual`: the rows of the real tokens ``[B, L, ...]``."""
    if not p:
        return x
    return x[:, p:] if front else jnp.concatenate([x[:, :1], x[:, 1 + p:]], axis=1)


def prompt_valid(valid: Array, prompt: Prompt) -> Array:
    """The input's key mask ``[B, L]`` with the virtual tokens' ``[B, L + P]``."""
    p = prompt.num_virtual
    if not p:
        return valid
    b = valid.shape[0]
    pm = jnp.ones((b, p), bool) if prompt.mask is None else jnp.broadcast_to(prompt.mask.astype(bool), (b, p))
    return insert_virtual(valid, pm, prompt.front)


def input_valid(input_ids: Array, attention_mask: Array | None, segment_ids: Array | None,
                prompt: Prompt) -> Array:
    """Every family's key mask ``[B, L + P]`` of its inputs: packed rows' ``segment_ids`` (which take
    no input prompt), else ``attention_mask`` (all ones when absent), with the virtual tokens'."""
    if segment_ids is not None:
        if prompt.num_virtual:
            raise ValueError("packed rows (segment_ids) cannot take input prompts")
        attention_mask = segment_ids > 0
    if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape, bool)
    return prompt_valid(attention_mask.astype(bool), prompt)


def token_types(token_type_ids: Array | None, input_ids: Array, prompt: Prompt) -> Array:
    """Segment ids ``[B, L + P]``: zeros when absent, the virtual tokens in segment 0."""
    b, length = input_ids.shape
    p = prompt.num_virtual
    if token_type_ids is None:
        return jnp.zeros((b, length + p), jnp.int32)
    if not p:
        return token_type_ids
    return insert_virtual(token_type_ids, jnp.zeros((b, p), token_type_ids.dtype), prompt.front)


def prefix_valid(valid: Array, prompt: Prompt) -> Array:
    """The keys' mask with the prefix's in front."""
    p = prompt.prefix_length
    if not p:
        return valid
    b = valid.shape[0]
    pm = jnp.ones((b, p), bool) if prompt.prefix_mask is None else \
        jnp.broadcast_to(prompt.prefix_mask.astype(bool), (b, p))
    return jnp.concatenate([pm, valid], axis=1)


# ----------------------------------------------------------------------------- attention


def gather_rows(x: Array, positions: Array) -> Array:
    """``x[b, positions[b, k]]``: ``[B, T, ...]`` -> ``[B, K, ...]``."""
    return jnp.take_along_axis(x, positions.reshape(positions.shape + (1,) * (x.ndim - 2)), axis=1)


@flax.struct.dataclass
class KeyMask:
    """Which keys each query may attend to.

    ``valid`` ``[B, S]``: the keys (prefix keys first) that exist. ``segments`` (packed rows)
    ``[B, T]``: the segment of each of the sequence's own tokens (0: padding); a query then sees the
    keys of its own segment and every valid prefix key (a padding query: the padding keys).
    ``lengths`` ``[B]``: set when each row's valid keys are a prefix of the row (fused kernels take
    lengths instead of a mask).
    """

    valid: Array
    segments: Array | None = None
    lengths: Array | None = None

    def dense(self, query_rows: Array | None = None) -> Array:
        """The boolean mask ``[B, 1, Tq, S]`` (or ``[B, 1, 1, S]``) for the queries at
        ``query_rows`` ``[B, K]`` (default: every row)."""
        if self.segments is None:
            return self.valid[:, None, None, :]
        seg_q = self.segments if query_rows is None else gather_rows(self.segments, query_rows)
        p = self.valid.shape[1] - self.segments.shape[1]
        # a padding query (segment 0) sees the padding keys: no query is left without a key, which
        # fused kernels (cuDNN's) turn into NaN; no real query sees a padding key
        same = seg_q[:, :, None] == self.segments[:, None, :]
        if p:
            prefix = jnp.broadcast_to(self.valid[:, None, :p], same.shape[:2] + (p,))
            same = jnp.concatenate([prefix, same], axis=-1)
        return same[:, None]


def key_mask(valid: Array, prompt: Prompt, segment_ids: Array | None) -> KeyMask:
    """The :class:`KeyMask` of an input whose (virtual tokens included) mask is ``valid``."""
    key_valid = prefix_valid(valid, prompt)
    # right-padded input with all-ones prompt/prefix masks keeps every row's valid keys contiguous
    # from position 0: fused attention can then take lengths instead of a mask
    contiguous = prompt.mask is None and prompt.prefix_mask is None and segment_ids is None
    return KeyMask(key_valid, segment_ids, key_valid.sum(-1).astype(jnp.int32) if contiguous else None)


def with_prefix(k: Array, v: Array, prefix: tuple[Array, Array] | None) -> tuple[Array, Array]:
    """Keys and values ``[B, T, n, d]`` with a layer's prefix in front."""
    if prefix is None:
        return k, v
    pk, pv = prefix
    shape = (k.shape[0],) + pk.shape[-3:]
    return (jnp.concatenate([jnp.broadcast_to(pk.astype(k.dtype), shape), k], axis=1),
            jnp.concatenate([jnp.broadcast_to(pv.astype(v.dtype), shape), v], axis=1))


def dense_attention(q: Array, k: Array, v: Array, mask: Array, dropout_rate: float, *,
                    scale: float | None = None, bias: Array | None = None) -> Array:
    """Softmax attention as transformers computes it: ``[B, T, n, d]`` queries, ``[B, S, n, d]``
    keys/values, boolean ``mask`` broadcasting to ``[B, n, T, S]``, optional additive ``bias``
    (relative positions) on the float32 scores, dropout on the probabilities."""
    scale = 1.0 / jnp.sqrt(jnp.asarray(q.shape[-1], jnp.float32)) if scale is None else scale
    scores = jnp.einsum("btnd,bsnd->bnts", q, k, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        scores = scores + bias.astype(jnp.float32)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    if dropout_rate > 0.0:
        probs = nn.Dropout(dropout_rate)(probs, deterministic=False)
    return jnp.einsum("bnts,bsnd->btnd", probs.astype(v.dtype), v)


def attention(q: Array, k: Array, v: Array, mask: KeyMask, compute: Compute, dropout_rate: float,
              deterministic: bool) -> Array:
    """Multi-head attention ``[B, T, n, d]`` by the compute spec: dense (with probability dropout)
    or a fused kernel (cuDNN's in half precision, else XLA's)."""
    if compute.attention_impl == "dense":
        return dense_attention(q, k, v, mask.dense(), 0.0 if deterministic else dropout_rate)
    half = jnp.dtype(compute.dtype) in (jnp.bfloat16, jnp.float16)
    impl = "cudnn" if half and compute.attention_impl in ("cudnn", "pallas") else None
    if mask.lengths is not None and mask.segments is None:
        return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=mask.lengths, implementation=impl)
    return jax.nn.dot_product_attention(q, k, v, mask=mask.dense(), implementation=impl)


# ----------------------------------------------------------------------------- read-outs


def mean_pool(x: Array, valid: Array, segments: Array | None = None,
              read_positions: Array | None = None) -> Array:
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


def split_pair(input_ids: Array, attention_mask: Array | None, token_type_ids: Array,
               cls_id: Array | None = None) -> tuple[Array, Array]:
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
