"""Attention for short sequences as one Pallas (Triton) kernel per (batch row, head), both ways.

BERT fine-tuning runs at 128 tokens or fewer: every key and value of one head fits on one SM, so
nothing needs the flash-attention machinery that long sequences do. The forward kernel computes a
block of queries against all keys at once (no running max). The backward kernel loops over the
query blocks of its head and finishes ``dq`` of each block, and ``dk``/``dv`` of the head, without
atomics, a ``dq`` accumulator or a separate ``rowsum(o * do)`` pass. Because every key of a row is
in the block, that row sum is ``rowsum(p * dp)`` of values the backward kernel computes anyway, so
the attention output is not kept for the backward pass: only q/k/v (which the projection's own
backward needs too) and one float32 log-sum-exp per query. Where nothing else needs the output
(BitFit, prefix and prompt methods: the output projection is frozen) that is one ``[B, T, H]``
activation per layer less than cuDNN's kernel keeps.

Both kernels read q, k and v straight out of the fused projection's output ``[B, T, 3, N, D]``
(the ``[B, T, 3H]`` matmul result, reshaped for free) and the backward kernel writes
``dq``/``dk``/``dv`` into one ``[B, T, 3, N, D]`` array, which is the gradient of that matmul
output. So there is no split of q/k/v before attention and no concatenation after it. The projection's bias
is an input too: the kernels add it to q/k/v as they load them, and the backward kernel sums its
gradient per (row, head), so there is no pass over the projection's output to add the bias and none
over its gradient to reduce it.

Lengths that are not a power of two (prompt tuning's 20 tokens in front of 128) are covered by a
power-of-two main segment and a short tail segment (148 = 128 + 32, 12 of them padding), attended to
together; the last query block of each (row, head) takes the tail's queries too. Padding past the
sequence never gets weight.

Prefix keys/values (prefix tuning, P-tuning v2) come in as their own small inputs, shared by the
batch or per row, and are attended to together with the sequence's own keys (one softmax); their
gradients are summed over the batch outside the kernel. Masked-out keys (padding, masked prefixes)
get zero weight; a query row whose keys are all masked averages the values (no NaN).

No dropout on the attention probabilities (as with the cuDNN kernel). The kernels compile for NVIDIA
GPUs only; the CPU tests run them in Pallas's interpreter (``pallas_common.interpreter``) against
plain ``jax.numpy`` attention.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxpeft.models.kernels.pallas_common import CompilerParams, batch_parallel, interpret, pow2

Array = jax.Array

LOG2E = math.log2(math.e)
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
# beyond this many (padded) keys or queries one head no longer fits the single-block design
MAX_LENGTH = 512

# indices into the fused projection's "3" axis, as 0-d arrays (Pallas's interpreter wants arrays)
_Q, _K, _V = (np.int32(i) for i in range(3))


#: the longest main segment where the kernels beat cuDNN's. Attention alone, forward and backward,
#: batch 32, 12 heads of 32 dimensions (MiniLM), one H100 (``benchmarks/attention_kernels.py``,
#: 2026-12-07): 128 tokens 0.11 ms against cuDNN's 0.27; 256 tokens 0.47 against 0.31 (and 2.2 s to
#: compile against 0.5 s); 384 tokens 1.7-3.0 ms against 0.44 (7-57 s to compile): the backward
#: kernel holds every key's dk/dv of its head, which past 128 keys no longer fits in registers.
FAST_MAIN = 128


def fast_length(t: int) -> bool:
    """Whether the kernels are the fast path for ``t`` tokens: a main segment of at most
    :data:`FAST_MAIN` keys, the whole padded by at most a quarter (148 = 128 + 20 in a tail segment
    of 32: 8% padding). cuDNN's kernel runs for other lengths. (The quarter is a judgement: measured
    against cuDNN at 128 and 148 tokens only.)"""
    main, tail = segments(t)
    return 16 <= t and main <= FAST_MAIN and main + tail <= 1.25 * t


def segments(t: int) -> tuple[int, int]:
    """How the kernels cover ``t`` keys (and queries): a power-of-two main segment and a tail
    segment (0: none), each at least 16 (the smallest block Triton's dot takes), e.g. 148 -> (128,
    32), 192 -> (128, 64), 200 -> (256, 0)."""
    main = max(16, pow2(t) // 2 if pow2(t) != t else t)
    rest = t - main
    if rest <= 0:
        return main, 0
    tail = pow2(max(rest, 16))
    return (main, tail) if tail < main else (2 * main, 0)


def supported(t: int, prefix_len: int, head_dim: int) -> str | None:
    """Why these shapes cannot use the kernel (``None`` if they can)."""
    if pow2(head_dim) != head_dim or head_dim < 16:
        return f"head_dim {head_dim} is not a power of two >= 16"
    if pow2(t) > MAX_LENGTH or (prefix_len and pow2(prefix_len) > MAX_LENGTH):
        return f"sequence of {t} tokens (+{prefix_len} prefix) is longer than {MAX_LENGTH}"
    return None


def _dot(a, b, trans_b=False, trans_a=False):
    """``a @ b`` (either side transposed) with float32 accumulation, as Triton's ``tl.dot``."""
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _load(qkv_ref, bias_ref, which, rows, ok):
    """Rows ``rows`` of q, k or v (``which``) for this program's head, with the projection's bias
    added (in float32, rounded once to the input dtype, as an XLA add of the two would be) and rows
    past the sequence zero."""
    x = plgpu.load(qkv_ref.at[rows, which, :], mask=ok[:, None], other=0.0)
    b = plgpu.load(bias_ref.at[which, :]).astype(jnp.float32)
    return jnp.where(ok[:, None], x.astype(jnp.float32) + b[None, :], 0.0).astype(x.dtype)


def _key_segments(qkv_ref, bias_ref, kvalid_ref, prefix_refs, t, p, segmented=False):
    """This head's keys as segments ``(keys, values, fill)``, each a power of two long: the prefix
    (if any), the sequence's main segment and its tail (if any). ``fill`` is the score of each key
    where its mask is off: ``MASK_VALUE`` for real keys (a row whose keys are all masked averages
    them, as a softmax over equal scores does) and ``-inf`` for padding past the sequence or the
    prefix (never attended to)."""
    main, tail = segments(t)
    out = []
    if prefix_refs:
        pk_ref, pv_ref, pvalid_ref = prefix_refs
        pin = jnp.arange(pvalid_ref.shape[0]) < p
        ok = plgpu.load(pvalid_ref, mask=pin, other=0) != 0
        out.append((plgpu.load(pk_ref, mask=pin[:, None], other=0.0),
                    plgpu.load(pv_ref, mask=pin[:, None], other=0.0), ok, pin, None))
    for start, size in ((0, main), (main, tail)):
        if size:
            rows = pl.ds(start, size)
            real = (start + jnp.arange(size)) < t
            seg = plgpu.load(kvalid_ref.at[rows], mask=real, other=0)
            out.append((_load(qkv_ref, bias_ref, _K, rows, real), _load(qkv_ref, bias_ref, _V, rows, real),
                        seg != 0, real, seg if segmented else None))
    return [(k, v, ok, jnp.where(real, MASK_VALUE, -jnp.inf), seg) for k, v, ok, real, seg in out]


def _scores(q, segs, c, qseg=None):
    """Scores of queries ``q`` against each key segment, in log2 units, masked keys at their fill.
    ``qseg`` (packed rows): each query's segment; a query then sees the keys of its own segment
    (and every valid prefix key)."""
    out = []
    for k, _, ok, fill, kseg in segs:
        ok2 = ok[None, :] if kseg is None or qseg is None else ok[None, :] & (kseg[None, :] == qseg[:, None])
        out.append(jnp.where(ok2, _dot(q, k, trans_b=True) * c, fill[None, :]))
    return out


def _fwd_kernel(qkv_ref, bias_ref, kvalid_ref, *refs, t, p, block_q, scale, has_prefix, segmented):
    prefix_refs, (o_ref, lse_ref) = (refs[:3], refs[3:]) if has_prefix else ((), refs)
    segs = _key_segments(qkv_ref, bias_ref, kvalid_ref, prefix_refs, t, p, segmented)
    c = scale * LOG2E

    def queries(start, size):
        rows = pl.ds(start, size)
        row_ok = (start + jnp.arange(size)) < t
        q = _load(qkv_ref, bias_ref, _Q, rows, row_ok)
        qseg = plgpu.load(kvalid_ref.at[rows], mask=row_ok, other=0) if segmented else None
        ss = _scores(q, segs, c, qseg)
        m = functools.reduce(jnp.maximum, [jnp.max(s, axis=1) for s in ss])
        es = [jnp.exp2(s - m[:, None]) for s in ss]
        l = sum(jnp.sum(e, axis=1) for e in es)
        acc = sum(_dot(e.astype(v.dtype), v) for e, (_, v, _, _, _) in zip(es, segs))
        plgpu.store(o_ref.at[rows, :], (acc / l[:, None]).astype(o_ref.dtype), mask=row_ok[:, None])
        lse_ref[rows] = m + jnp.log2(l)

    main, tail = segments(t)
    queries(pl.program_id(2) * block_q, block_q)
    if tail:
        # the tail's queries: the last program of the (row, head) takes them too
        last = main // block_q - 1
        if last == 0:
            queries(main, tail)
        else:
            pl.when(pl.program_id(2) == last)(lambda: queries(main, tail))


def _bwd_kernel(qkv_ref, bias_ref, kvalid_ref, *refs, t, p, block_q, scale, has_prefix, segmented):
    if has_prefix:
        prefix_refs, (do_ref, lse_ref, dqkv_ref, dbias_ref, dpk_ref, dpv_ref) = refs[:3], refs[3:]
    else:
        prefix_refs, (do_ref, lse_ref, dqkv_ref, dbias_ref) = (), refs
    segs = _key_segments(qkv_ref, bias_ref, kvalid_ref, prefix_refs, t, p, segmented)
    dt = qkv_ref.dtype
    c = scale * LOG2E

    def queries(start, size, carry):
        """One block of queries: its dq is finished and stored, dk/dv of every segment and the sum
        of dq (the q bias's gradient) accumulate in ``carry``."""
        rows = pl.ds(start, size)
        row_ok = (start + jnp.arange(size)) < t
        q = _load(qkv_ref, bias_ref, _Q, rows, row_ok)
        do = plgpu.load(do_ref.at[rows, :], mask=row_ok[:, None], other=0.0)
        lse = lse_ref[rows]
        qseg = plgpu.load(kvalid_ref.at[rows], mask=row_ok, other=0) if segmented else None
        ps = [jnp.exp2(s - lse[:, None]) for s in _scores(q, segs, c, qseg)]
        dps = [_dot(do, v, trans_b=True) for _, v, _, _, _ in segs]
        # every key of the row is here, so rowsum(p * dp) gives the softmax backward's
        # rowsum(o * do) without keeping the output o for the backward pass
        delta = sum(jnp.sum(pr * dp, axis=1) for pr, dp in zip(ps, dps))
        dq, grads = None, []
        for (k, _, _, _, _), pr, dp, (dk, dv) in zip(segs, ps, dps, carry[1]):
            ds = (pr * (dp - delta[:, None])).astype(dt)
            dq = _dot(ds, k) if dq is None else dq + _dot(ds, k)
            grads.append((dk + _dot(ds, q, trans_a=True), dv + _dot(pr.astype(dt), do, trans_a=True)))
        # rows past the sequence have no output gradient, so their dq is zero
        plgpu.store(dqkv_ref.at[rows, _Q, :], (dq * scale).astype(dqkv_ref.dtype), mask=row_ok[:, None])
        return carry[0] + jnp.sum(dq, axis=0), grads

    d = qkv_ref.shape[-1]
    init = (jnp.zeros((d,), jnp.float32),
            [(jnp.zeros(k.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32)) for k, _, _, _, _ in segs])
    main, tail = segments(t)
    carry = jax.lax.fori_loop(0, main // block_q, lambda i, cr: queries(i * block_q, block_q, cr), init)
    if tail:
        carry = queries(main, tail, carry)
    dq_sum, grads = carry
    if has_prefix:
        (dpk, dpv), grads = grads[0], grads[1:]
        dpk_ref[...] = dpk * scale
        dpv_ref[...] = dpv
    dk_sum = dv_sum = 0.0
    for (start, size), (dk, dv) in zip(((0, main), (main, tail)), grads):
        rows = pl.ds(start, size)
        real = ((start + jnp.arange(size)) < t)[:, None]
        plgpu.store(dqkv_ref.at[rows, _K, :], (dk * scale).astype(dqkv_ref.dtype), mask=real)
        plgpu.store(dqkv_ref.at[rows, _V, :], dv.astype(dqkv_ref.dtype), mask=real)
        # padding keys get no weight, so their dk/dv are zero
        dk_sum, dv_sum = dk_sum + jnp.sum(dk, axis=0), dv_sum + jnp.sum(dv, axis=0)
    # this (row, head)'s share of the projection bias's gradient, summed over the batch outside
    dbias_ref[_Q, :] = dq_sum * scale
    dbias_ref[_K, :] = dk_sum * scale
    dbias_ref[_V, :] = dv_sum


def _specs(d, tp, pp, batched_prefix):
    """Block specs shared by both kernels: program ``(row, head[, query block])`` sees all of its
    row's q/k/v for its head, the head's q/k/v bias, its row's key mask, and the prefix of its row
    (or the shared one)."""
    qkv = pl.BlockSpec((None, tp, 3, None, d), lambda i, j, *_: (i, 0, 0, j, 0))
    bias = pl.BlockSpec((3, None, d), lambda i, j, *_: (0, j, 0))
    row = pl.BlockSpec((None, tp), lambda i, j, *_: (i, 0))
    pref = pl.BlockSpec((None, pp, None, d), lambda i, j, *_: (i if batched_prefix else 0, 0, j, 0))
    prow = pl.BlockSpec((None, pp), lambda i, j, *_: (i, 0))
    return qkv, bias, row, pref, prow


@dataclasses.dataclass(frozen=True)
class Tuning:
    """Kernel launch parameters: queries per block and Triton warps, forward and backward.

    The defaults were the fastest whole BERT-base train step (seq 128, batch 256) on an H200:
    7,529 seq/s against 7,352 for ``128:8:64:8`` and 7,246 for cuDNN in the same process
    (2026-12-01; in the git history of docs/benchmarks.md)."""

    block_q: int = 128
    num_warps: int = 8
    block_q_bwd: int = 128
    num_warps_bwd: int = 8


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attention(qkv, bias, key_valid, prefix_k, prefix_v, prefix_valid, static):
    """``static``: ``(tuning, segmented)``; ``segmented``: ``key_valid`` holds segment ids."""
    return _forward(qkv, bias, key_valid, prefix_k, prefix_v, prefix_valid, static)[0]


def _shapes(qkv, prefix_k):
    b, t, _, n, d = qkv.shape
    p = 0 if prefix_k is None else prefix_k.shape[1]
    pp = pow2(max(p, 16)) if p else 0
    batched = prefix_k is not None and prefix_k.shape[0] != 1
    # the blocks span the next power of two (loads past the sequence are masked)
    return b, t, n, d, pow2(max(t, 16)), p, pp, batched


def _fwd_call(static, qkv, bias, key_valid, prefix_k=None, prefix_v=None, prefix_valid=None):
    """The forward kernel on whatever rows it is given (all of them, or one device's)."""
    tuning, segmented = static
    b, t, n, d, tp, p, pp, batched = _shapes(qkv, prefix_k)
    main = segments(t)[0]
    bq = min(tuning.block_q, main)
    has_prefix = prefix_k is not None
    qkv_spec, bias_spec, row_spec, pref_spec, prow_spec = _specs(d, tp, pp, batched)
    in_specs = [qkv_spec, bias_spec, row_spec] + ([pref_spec, pref_spec, prow_spec] if has_prefix else [])
    kernel = functools.partial(_fwd_kernel, t=t, p=p, block_q=bq, scale=1.0 / math.sqrt(d),
                               has_prefix=has_prefix, segmented=segmented)
    args = [qkv, bias, key_valid] + ([prefix_k, prefix_v, prefix_valid] if has_prefix else [])
    return tuple(pl.pallas_call(
        kernel,
        grid=(b, n, main // bq),
        in_specs=in_specs,
        # each program writes its block of queries (the last one the tail's too) into its
        # (row, head)'s block
        out_specs=[pl.BlockSpec((None, tp, None, d), lambda i, j, k: (i, 0, j, 0)),
                   pl.BlockSpec((None, None, tp), lambda i, j, k: (i, j, 0))],
        out_shape=[jax.ShapeDtypeStruct((b, t, n, d), qkv.dtype),
                   jax.ShapeDtypeStruct((b, n, tp), jnp.float32)],
        compiler_params=CompilerParams(num_warps=tuning.num_warps, num_stages=1),
        interpret=interpret(),
        name="short_attention_fwd",
    )(*args))


def _bwd_call(static, qkv, bias, key_valid, *rest):
    """The backward kernel: ``rest`` is ``[prefix_k, prefix_v, prefix_valid,] dout, lse``. Returns
    dq/dk/dv, each (row, head)'s partial sums of them (the bias gradient before the sum over the
    batch) and, with a prefix, each (row, head)'s prefix key/value gradients."""
    tuning, segmented = static
    has_prefix = len(rest) == 5
    prefix_k = rest[0] if has_prefix else None
    b, t, n, d, tp, p, pp, batched = _shapes(qkv, prefix_k)
    bq = min(tuning.block_q_bwd, segments(t)[0])
    qkv_spec, bias_spec, row_spec, pref_spec, prow_spec = _specs(d, tp, pp, batched)
    od_spec = pl.BlockSpec((None, tp, None, d), lambda i, j: (i, 0, j, 0))
    lse_spec = pl.BlockSpec((None, None, tp), lambda i, j: (i, j, 0))
    in_specs = [qkv_spec, bias_spec, row_spec]
    out_specs = [qkv_spec, pl.BlockSpec((None, None, 3, d), lambda i, j: (i, j, 0, 0))]
    out_shape = [jax.ShapeDtypeStruct(qkv.shape, qkv.dtype),
                 jax.ShapeDtypeStruct((b, n, 3, d), jnp.float32)]
    if has_prefix:
        in_specs += [pref_spec, pref_spec, prow_spec]
        part = pl.BlockSpec((None, None, pp, d), lambda i, j: (i, j, 0, 0))
        out_specs += [part, part]
        out_shape += [jax.ShapeDtypeStruct((b, n, pp, d), jnp.float32)] * 2
    in_specs += [od_spec, lse_spec]
    kernel = functools.partial(_bwd_kernel, t=t, p=p, block_q=bq, scale=1.0 / math.sqrt(d),
                               has_prefix=has_prefix, segmented=segmented)
    return tuple(pl.pallas_call(
        kernel,
        grid=(b, n),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=CompilerParams(num_warps=tuning.num_warps_bwd, num_stages=1),
        interpret=interpret(),
        name="short_attention_bwd",
    )(qkv, bias, key_valid, *rest))


def _forward(qkv, bias, key_valid, prefix_k, prefix_v, prefix_valid, static):
    has_prefix = prefix_k is not None
    args = [qkv, bias, key_valid] + ([prefix_k, prefix_v, prefix_valid] if has_prefix else [])
    batched = (True, False, True) + ((prefix_k.shape[0] != 1,) * 2 + (True,) if has_prefix else ())
    out, lse = batch_parallel(functools.partial(_fwd_call, static), batched, args)
    # the output itself is not kept: the backward kernel needs only the log-sum-exp per query
    return out, (qkv, bias, key_valid, prefix_k, prefix_v, prefix_valid, lse)


def _backward(static, res, dout):
    qkv, bias, key_valid, prefix_k, prefix_v, prefix_valid, lse = res
    has_prefix = prefix_k is not None
    args = [qkv, bias, key_valid] + ([prefix_k, prefix_v, prefix_valid] if has_prefix else []) + \
        [dout.astype(qkv.dtype), lse]
    batched = (True, False, True) + ((prefix_k.shape[0] != 1,) * 2 + (True,) if has_prefix else ()) + \
        (True, True)
    grads = batch_parallel(functools.partial(_bwd_call, static), batched, args)
    dqkv = grads[0]
    dbias = grads[1].sum(0).transpose(1, 0, 2).astype(bias.dtype)          # [3, N, D]
    if not has_prefix:
        return dqkv, dbias, None, None, None, None
    b, p = qkv.shape[0], prefix_k.shape[1]
    dpk, dpv = (g[:, :, :p].transpose(0, 2, 1, 3) for g in grads[2:])   # [B, P, N, D]
    if prefix_k.shape[0] != b or b == 1:
        dpk, dpv = dpk.sum(0, keepdims=True), dpv.sum(0, keepdims=True)
    return dqkv, dbias, None, dpk.astype(prefix_k.dtype), dpv.astype(prefix_v.dtype), None


_attention.defvjp(_forward, _backward)


def attention(qkv: Array, key_valid: Array, prefix: tuple[Array, Array] | None = None,
              prefix_valid: Array | None = None, *, bias: Array | None = None,
              segments: Array | None = None, tuning: Tuning = Tuning()) -> Array:
    """Softmax attention of each query over the valid keys (prefix keys first), per head.

    Args:
      qkv: ``[B, T, 3, N, D]``: queries, keys and values as the fused projection writes them.
      bias: optional ``[3, N, D]`` projection bias, added to q/k/v inside the kernels (so the
        projection's output is read once, unbiased, and the bias gradient is summed there too).
      key_valid: ``[B, T]``: which of the sequence's own keys may be attended to.
      prefix: optional ``(keys, values)``, each ``[1 or B, P, N, D]``, in front of the own keys.
      prefix_valid: ``[B, P]``: which prefix keys may be attended to (default: all).
      segments: packed rows, ``[B, T]`` int: each token's example (0: padding); a query then sees
        the keys of its own example only (and the valid prefix keys). Replaces ``key_valid``.
      tuning: block sizes and warps of the two kernels.

    Returns:
      ``[B, T, N, D]`` in ``qkv``'s dtype, scaled by ``1/sqrt(D)`` as usual.
    """
    b, t, three, n, d = qkv.shape
    if three != 3:
        raise ValueError(f"qkv must be [B, T, 3, N, D], got {qkv.shape}")
    p = 0 if prefix is None else prefix[0].shape[1]
    why = supported(t, p, d)
    if why:
        raise ValueError(f"pallas attention: {why}")
    segmented = segments is not None
    key_valid = jnp.broadcast_to(segments if segmented else key_valid, (b, t)).astype(jnp.int32)
    static = (tuning, segmented)
    if bias is None:
        bias = jnp.zeros((3, n, d), qkv.dtype)
    elif bias.shape != (3, n, d):
        raise ValueError(f"qkv bias must be [3, {n}, {d}], got {bias.shape}")
    bias = bias.astype(qkv.dtype)
    if prefix is None:
        return _attention_call(qkv, bias, key_valid, None, None, None, static)
    pk, pv = (x.astype(qkv.dtype) for x in prefix)
    if pk.ndim != 4 or pk.shape[0] not in (1, b) or pk.shape[2:] != (n, d) or pv.shape != pk.shape:
        raise ValueError(f"prefix keys/values must be [1 or {b}, P, {n}, {d}], got {pk.shape}, {pv.shape}")
    pvalid = jnp.ones((b, p), jnp.int32) if prefix_valid is None else \
        jnp.broadcast_to(prefix_valid, (b, p)).astype(jnp.int32)
    return _attention_call(qkv, bias, key_valid, pk, pv, pvalid, static)


# The kernels behind a jit of their own: every layer calls them with the same shapes, and JAX traces
# and lowers one jitted function once per shape, so the Triton kernels are lowered once, not once per
# layer (see ``pallas_norm._add_norm_call``).
_attention_call = jax.jit(_attention, static_argnums=(6,))


def reference(qkv: Array, key_valid: Array, prefix: tuple[Array, Array] | None = None,
              prefix_valid: Array | None = None, bias: Array | None = None,
              segments: Array | None = None) -> Array:
    """The same attention in plain ``jax.numpy`` (float32 softmax), for tests."""
    b, t, _, n, d = qkv.shape
    if segments is not None:
        key_valid = segments > 0
    if bias is not None:
        qkv = qkv + bias.astype(qkv.dtype)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    valid = jnp.broadcast_to(key_valid, (b, t)).astype(bool)
    if prefix is not None:
        pk, pv = (jnp.broadcast_to(x.astype(qkv.dtype), (b,) + x.shape[1:]) for x in prefix)
        pvalid = jnp.ones((b, pk.shape[1]), bool) if prefix_valid is None else \
            jnp.broadcast_to(prefix_valid, (b, pk.shape[1])).astype(bool)
        k, v = jnp.concatenate([pk, k], 1), jnp.concatenate([pv, v], 1)
        valid = jnp.concatenate([pvalid, valid], 1)
    s = jnp.einsum("btnd,bsnd->bnts", q, k, preferred_element_type=jnp.float32) / math.sqrt(d)
    allowed = jnp.broadcast_to(valid[:, None, None, :], s.shape)
    if segments is not None:   # own segment only (prefix keys: every query)
        same = segments[:, :, None] == segments[:, None, :]
        p = s.shape[-1] - t
        allowed = allowed & jnp.concatenate([jnp.ones((b, t, p), bool), same], -1)[:, None]
    s = jnp.where(allowed, s, MASK_VALUE)
    w = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bnts,bsnd->btnd", w.astype(v.dtype), v,
                      preferred_element_type=jnp.float32).astype(qkv.dtype)
