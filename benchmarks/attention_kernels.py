"""Attention alone, forward and forward+backward: our Pallas kernel against cuDNN, as the model uses them.

Both sides start from the fused projection's ``[B, T, 3H]`` output (before its bias) and end with
the gradient of it and of the bias, so cuDNN's side includes the bias add, the q/k/v split, the
dq/dk/dv concatenation and the bias gradient's reduction that the model pays for around it.
Prints one JSON line per configuration (median milliseconds over ``--iters`` calls, and the seconds
each program took to lower and compile) and the largest difference of each against a float32
``jax.numpy`` reference on the same inputs.

    python benchmarks/attention_kernels.py --batch=256 --seq=128 --prefix=0,20 --out=OUT
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft.models.kernels import pallas_attention as pa


def _cudnn(qkv, valid, prefix, prefix_valid, bias):
    b, t, _, n, d = qkv.shape
    qkv = qkv + bias
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if prefix is None:
        lengths = valid.sum(-1).astype(jnp.int32)
        return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation="cudnn")
    pk, pv = (jnp.broadcast_to(x, (b,) + x.shape[1:]) for x in prefix)
    k, v = jnp.concatenate([pk, k], 1), jnp.concatenate([pv, v], 1)
    lengths = valid.sum(-1).astype(jnp.int32) + pk.shape[1]
    return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation="cudnn")


def _time(fn, args, iters):
    out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _ints(s):
    return [int(x) for x in s.split(",") if x]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seq", type=_ints, default=[128])
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head_dim", type=int, default=64)
    ap.add_argument("--prefix", type=_ints, default=[0])
    ap.add_argument("--block_q", type=_ints, default=[128, 64])
    ap.add_argument("--warps", type=_ints, default=[4, 8])
    ap.add_argument("--block_q_bwd", type=_ints, default=[32, 64, 128])
    ap.add_argument("--warps_bwd", type=_ints, default=[4, 8])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--no_cudnn", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    rows = []
    on_gpu = jax.default_backend() == "gpu"
    for t, p in itertools.product(a.seq, a.prefix):
        b, n, d = a.batch, a.heads, a.head_dim
        rng = np.random.default_rng(0)
        qkv = jnp.asarray(rng.normal(size=(b, t, 3, n, d)), jnp.bfloat16)
        lengths = rng.integers(t // 2, t + 1, size=b)
        valid = jnp.asarray(np.arange(t)[None] < lengths[:, None])
        prefix = None if not p else tuple(jnp.asarray(rng.normal(size=(1, p, n, d)), jnp.bfloat16)
                                          for _ in range(2))
        dout = jnp.asarray(rng.normal(size=(b, t, n, d)), jnp.bfloat16)
        bias = jnp.asarray(0.1 * rng.normal(size=(3, n, d)), jnp.bfloat16)
        ref_f = jax.jit(lambda x, bb, pr: pa.reference(
            x.astype(jnp.float32), valid, None if pr is None else tuple(y.astype(jnp.float32) for y in pr),
            bias=bb.astype(jnp.float32)))
        want = ref_f(qkv, bias, prefix)
        want_g = jax.grad(lambda x, bb, pr: jnp.sum(ref_f(x, bb, pr) * dout.astype(jnp.float32)),
                          argnums=(0, 1, 2))(qkv, bias, prefix)

        def measure(name, attn, **extra):
            fwd = jax.jit(lambda x, bb, pr: attn(x, valid, pr, bb))
            loss = lambda x, bb, pr: jnp.sum(attn(x, valid, pr, bb).astype(jnp.float32) * dout.astype(jnp.float32))
            bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
            row = {"impl": name, "batch": b, "seq": t, "prefix": p, "heads": n, "head_dim": d, **extra}
            args = (qkv, bias, prefix)
            try:
                # compile time of each program (lowering included), then the compiled programs
                t0 = time.perf_counter()
                fwd = fwd.lower(*args).compile()
                row["fwd_compile_s"] = round(time.perf_counter() - t0, 3)
                t0 = time.perf_counter()
                bwd = bwd.lower(*args).compile()
                row["fwd_bwd_compile_s"] = round(time.perf_counter() - t0, 3)
                got = fwd(*args)
                got_g = bwd(*args)
                # gradients relative to the reference's largest entry (the bias gradient is a sum
                # over the batch)
                row["fwd_err"] = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want)))
                row["grad_err"] = max(float(jnp.max(jnp.abs(x.astype(jnp.float32) - y)) / jnp.max(jnp.abs(y)))
                                      for x, y in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)))
                row["fwd_ms"] = round(_time(fwd, args, a.iters), 4)
                row["fwd_bwd_ms"] = round(_time(bwd, args, a.iters), 4)
            except Exception as e:  # noqa: BLE001 - a failing configuration is a result too
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            print(json.dumps(row), flush=True)
            rows.append(row)

        if on_gpu and not a.no_cudnn:
            measure("cudnn", lambda x, v, pr, bb: _cudnn(x, v, pr, None, bb))
        for bq, w, bqb, wb in itertools.product(a.block_q, a.warps, a.block_q_bwd, a.warps_bwd):
            tuning = pa.Tuning(bq, w, bqb, wb)
            measure("pallas", lambda x, v, pr, bb, tuning=tuning: pa.attention(x, v, pr, bias=bb, tuning=tuning),
                    block_q=bq, warps=w, block_q_bwd=bqb, warps_bwd=wb)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "attention_kernels.jsonl"), "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
