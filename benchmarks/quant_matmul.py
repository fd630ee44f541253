"""Frozen-kernel matmuls, forward and forward + x-gradient: a bfloat16 kernel against the int8 and
NF4 kernels of ``jaxpeft.models.quant`` (dequantized inside the step, bfloat16 compute).

Shapes are those of one layer's projections: BERT-large (hidden 1024, FFN 4096) and a 3.5B model
(hidden 2560, FFN 10240), ``x`` of ``[batch * seq, in]`` tokens; each kernel alone, then a chain of
``--layers`` hidden x hidden kernels with a tanh between them. Prints one JSON line per (kernel,
format): median milliseconds over ``--iters`` calls of the forward and of the forward plus the
gradient w.r.t. ``x`` (kernels are frozen), the bytes the kernels hold (``quant.nbytes``), the
compiled programs' temporary bytes (``memory_analysis``) and the largest difference of each output
against float32 matmuls on the same dequantized weights. In the chain's gradient, temporaries near
``bf16_weight_bytes`` mean the dequantized weights stay alive from the forward to the backward pass
(XLA:CPU merges the two passes' dequantizations, so it shows that there). ``--small`` runs tiny
shapes, a quick CPU run. Times include each call's dispatch; CPU times say nothing about a GPU.

    python benchmarks/quant_matmul.py --out=OUT
    python benchmarks/quant_matmul.py --small --iters=3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp

from jaxpeft.models import quant

#: name -> (in, out) of the kernels, per model
SHAPES = {
    "bert-large": {"qkv": (1024, 1024), "ffn_in": (1024, 4096), "ffn_out": (4096, 1024)},
    "3.5b": {"qkv": (2560, 2560), "ffn_in": (2560, 10240), "ffn_out": (10240, 2560)},
}
SMALL = {"small": {"qkv": (256, 256), "ffn_in": (256, 1024)}}
FORMATS = ("bfloat16", "int8", "nf4")


def _time(fn, args, iters):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _temp_bytes(fn, args):
    try:
        return int(fn.lower(*args).compile().memory_analysis().temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None


def _apply(x, kernels):
    for i, k in enumerate(kernels):
        x = quant.matmul(x if i == 0 else jnp.tanh(x), k, jnp.bfloat16)
    return x


def measure(model, name, n_in, n_out, fmt, tokens, iters, key, layers=1):
    """One row: ``layers`` kernels of ``[n_in, n_out]`` applied in a chain (tanh between them)."""
    kw, kx, kg = jax.random.split(key, 3)
    ws = [0.02 * jax.random.normal(k, (n_in, n_out), jnp.float32) for k in jax.random.split(kw, layers)]
    x = jax.random.normal(kx, (tokens, n_in), jnp.bfloat16)
    dy = jax.random.normal(kg, (tokens, n_out), jnp.bfloat16)
    kernels = [w.astype(jnp.bfloat16) if fmt == "bfloat16" else quant.quantize(w, fmt) for w in ws]
    del ws
    fwd = jax.jit(_apply)
    # value and x-gradient: the forward pass is part of what is timed, as in a train step
    grad = jax.jit(jax.value_and_grad(lambda x, ks, dy: jnp.sum((_apply(x, ks) * dy).astype(jnp.float32))))
    row = {"model": model, "kernel": name, "layers": layers, "in": n_in, "out": n_out, "tokens": tokens,
           "format": fmt, "device": jax.devices()[0].device_kind, "kernel_bytes": quant.nbytes(kernels),
           "bf16_weight_bytes": 2 * n_in * n_out * layers}
    try:
        hi = jax.lax.Precision.HIGHEST
        w_ref = [k.astype(jnp.float32) if fmt == "bfloat16" else quant.dequantize(k) for k in kernels]

        def ref(x):
            for i, w in enumerate(w_ref):
                x = jnp.dot(x if i == 0 else jnp.tanh(x), w, precision=hi)
            return x

        want, vjp = jax.vjp(ref, x.astype(jnp.float32))
        (want_dx,) = vjp(dy.astype(jnp.float32))
        got, (_, got_dx) = fwd(x, kernels), grad(x, kernels, dy)
        row["fwd_rel_err"] = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want)) / jnp.max(jnp.abs(want)))
        row["dx_rel_err"] = float(jnp.max(jnp.abs(got_dx.astype(jnp.float32) - want_dx)) / jnp.max(jnp.abs(want_dx)))
        del want, want_dx, got, got_dx, vjp, ref
        row["fwd_ms"] = round(_time(fwd, (x, kernels), iters), 4)
        row["fwd_dx_ms"] = round(_time(grad, (x, kernels, dy), iters), 4)
        row["fwd_temp_bytes"] = _temp_bytes(fwd, (x, kernels))
        row["fwd_dx_temp_bytes"] = _temp_bytes(grad, (x, kernels, dy))
    except Exception as e:  # noqa: BLE001 - a failing configuration is a result too
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(SHAPES), help=f"comma-separated, of {sorted(SHAPES)}")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--layers", type=int, default=4, help="length of the chain of square kernels (1: none)")
    ap.add_argument("--small", action="store_true", help="tiny shapes and 64 tokens: a quick CPU run")
    ap.add_argument("--out", default=None, help="folder to append quant_matmul.jsonl to")
    a = ap.parse_args(argv)
    shapes = SMALL if a.small else {m: SHAPES[m] for m in a.models.split(",")}
    tokens = 64 if a.small else a.batch * a.seq
    rows = []
    key = jax.random.PRNGKey(0)
    for model, kernels in shapes.items():
        # each kernel alone, then a chain of --layers square kernels: its gradient's temporaries
        # show whether the forward pass's dequantized weights stay alive until the backward pass
        runs = [(name, shape, 1) for name, shape in kernels.items()]
        if a.layers > 1:
            n = kernels["qkv"][0]
            runs.append((f"chain_{n}x{n}", (n, n), a.layers))
        for name, (n_in, n_out), layers in runs:
            for fmt in a.formats.split(","):
                row = measure(model, name, n_in, n_out, fmt, tokens, a.iters, key, layers)
                print(json.dumps(row), flush=True)
                rows.append(row)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "quant_matmul.jsonl"), "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return rows


if __name__ == "__main__":
    main()
