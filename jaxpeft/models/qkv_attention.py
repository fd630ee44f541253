"""Self-attention for families whose q/k/v projections are named otherwise than BERT's
(DistilBERT's ``q_lin``, MPNet's ``q``), on :func:`jaxpeft.models.layers.attention`.

:func:`self_attention` is called inside the owning module's compact method, so its dense layers
(and the method hooks beside them) are that module's children with transformers' names. The three
projections are one matmul where the hooks allow (:func:`jaxpeft.models.layers.fused_linear`).
How the scores are computed follows the compute spec:

* ``dense``: transformers' math (float32 softmax, dropout on the probabilities), with an additive
  ``bias`` (relative positions) where the family has one; also the path of the last layer's
  query rows (``query_rows``: too little work for a fused kernel);
* ``cudnn``, and ``pallas`` (our Pallas kernel is BERT's fused-q/k/v kernel; these families fall
  back to cuDNN's): ``jax.nn.dot_product_attention`` -- cuDNN's kernel in half precision where it
  takes the head size (:func:`cudnn_head_dim`), XLA's otherwise -- with the bias where there is
  one; no dropout on the probabilities, as BERT's fused paths.

The projected keys and values are sown into ``intermediates`` as ``key_value`` (before any
prefix), as BERT's attention does.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxpeft.compute import Compute
from jaxpeft.models import layers
from jaxpeft.models.layers import Hooks, KeyMask

Array = jax.Array


def self_attention(owner: nn.Module, x: Array, names: Sequence[str], mask: KeyMask, compute: Compute, hooks: Hooks,
                   *, heads: int, head_dim: int, initializer_range: float, dropout_rate: float,
                   deterministic: bool, prefix: tuple[Array, Array] | None = None, query_rows: Array | None = None,
                   bias: Array | None = None) -> Array:
    """Multi-head attention of ``x`` ``[B, T, H]`` through ``owner``'s dense layers ``names``
    (query, key, value): ``[B, T, heads * head_dim]`` (``[B, K, ...]`` for ``query_rows`` ``[B, K]``),
    before the output projection. ``bias`` ``[1 or B, heads, T, S]`` is added to the scores
    (``S``: the prefix's keys and the sequence's)."""
    b, t, h_in = x.shape
    n, d = heads, head_dim
    dt = jnp.dtype(compute.dtype)
    params = [layers.DenseParams(n * d, initializer_range, name=nm)(h_in) for nm in names]
    hks = [hooks.linear_for(owner, nm, h_in, n * d) for nm in names]
    parts = [(w, bb, h) for (w, bb), h in zip(params, hks)]

    def project(inp: Array, chosen: list) -> list[Array]:
        y, biases = layers.fused_linear(inp, chosen, dt, deterministic)
        y = y + jnp.concatenate([jnp.zeros((n * d,), dt) if bb is None else bb.astype(dt) for bb in biases])
        return jnp.split(y, len(chosen), axis=-1)

    if query_rows is None:
        q, k, v = project(x, parts)
    else:
        (q,) = project(layers.gather_rows(x, query_rows), parts[:1])
        k, v = project(x, parts[1:])
    q, k, v = (a.reshape(b, -1, n, d) for a in (q, k, v))
    if owner.is_mutable_collection("intermediates"):
        owner.sow("intermediates", "key_value", (k, v))
    k, v = layers.with_prefix(k, v, prefix)
    dense = compute.attention_impl == "dense"
    rate = dropout_rate if dense and not deterministic else 0.0
    if query_rows is not None:
        if bias is not None:
            bias = jnp.broadcast_to(bias, (b,) + bias.shape[1:])
            bias = jnp.take_along_axis(bias, query_rows[:, None, :, None], axis=2)
        out = layers.dense_attention(q, k, v, mask.dense(query_rows), rate, bias=bias)
    elif dense:
        out = layers.dense_attention(q, k, v, mask.dense(), rate, bias=bias)
    else:
        half = dt in (jnp.bfloat16, jnp.float16)
        impl = "cudnn" if half and cudnn_head_dim(d) else None
        if bias is None and mask.lengths is not None and mask.segments is None:
            out = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=mask.lengths, implementation=impl)
        else:
            out = jax.nn.dot_product_attention(q, k, v, bias=None if bias is None else bias.astype(q.dtype),
                                               mask=mask.dense(), implementation=impl)
    return out.reshape(b, -1, n * d)


def cudnn_head_dim(head_dim: int) -> bool:
    """Whether cuDNN's fused attention takes heads of this size (multiples of 8 up to 128); XLA's
    attention runs the others."""
    return head_dim % 8 == 0 and head_dim <= 128
