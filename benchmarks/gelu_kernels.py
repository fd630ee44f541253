"""The feed-forward bias + GELU alone, forward and backward, in isolation: what its erf costs.

Two programs per variant: the forward, and the gradients of ``h`` and ``b`` for a given output
gradient (the forward's output is unused there, so XLA drops what only it needs). Variants, each
from the matmul's output without its bias (bf16 ``[B, T, 4H]``) and the float32 bias:

- ``floor``: the same memory traffic with no arithmetic to speak of (``0.5 * (h + b)**2``, whose
  gradient reads ``h`` and the output gradient and sums the bias's column): the bandwidth bound;
- ``xla``: the model's default (``lean_ops.gelu`` on the bias-added output, exact erf GELU);
- ``xla_tanh``: the tanh approximation the same way (another transcendental, for comparison);
- ``pallas`` / ``pallas_tanh``: ``pallas_gelu.bias_gelu`` (exact / tanh).

If ``xla`` is well above ``floor`` while ``xla_tanh`` is not, the float32 erf's arithmetic (a
rational function with a division per element, twice in the backward pass) is what bounds it.
Each time is the mean of ``--iters`` calls dispatched back to back (one sync at the end), in ms;
``*_gb_per_s`` count the bytes each program must move (forward: read 1, write 1 bf16 tensor;
gradients: read 2, write 1) over its time.

    python benchmarks/gelu_kernels.py --out=OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxpeft.models import lean_ops, pallas_gelu  # noqa: E402

VARIANTS = ("floor", "xla", "xla_tanh", "pallas", "pallas_tanh")


def _floor(h, b):
    x = h.astype(jnp.float32) + b
    return (0.5 * x * x).astype(h.dtype)


def _fn(name):
    if name == "floor":
        return _floor
    if name.startswith("xla"):
        approx = name.endswith("tanh")
        return lambda h, b: lean_ops.gelu((h + b.astype(h.dtype)), approx)
    approx = name.endswith("tanh")
    return lambda h, b: pallas_gelu.bias_gelu(h, b, approximate=approx)


def _time(fn, args, iters):
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    out = None
    for _ in range(iters):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / iters * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--cols", type=int, default=3072)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    shape = (a.batch, a.seq, a.cols)
    h = jnp.asarray(rng.normal(size=shape), jnp.bfloat16)
    dy = jnp.asarray(rng.normal(size=shape), jnp.bfloat16)
    b = jnp.asarray(rng.normal(size=(a.cols,)) * 0.1, jnp.float32)
    tensor_gb = a.batch * a.seq * a.cols * 2 / 1e9
    rows = []
    for name in a.variants.split(","):
        f = _fn(name)
        fwd = jax.jit(f)

        def grads(h, b, f=f):
            _, vjp = jax.vjp(f, h, b)
            return vjp(dy)

        bwd = jax.jit(grads)
        row = {"variant": name, "batch": a.batch, "seq": a.seq, "cols": a.cols}
        try:
            row["fwd_ms"] = round(_time(fwd, (h, b), a.iters), 4)
            row["grad_ms"] = round(_time(bwd, (h, b), a.iters), 4)
            row["fwd_gb_per_s"] = round(2 * tensor_gb / row["fwd_ms"] * 1e3, 1)
            row["grad_gb_per_s"] = round(3 * tensor_gb / row["grad_ms"] * 1e3, 1)
        except Exception as e:  # noqa: BLE001 - a failing variant is a result too
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        print(json.dumps(row), flush=True)
        rows.append(row)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "gelu_kernels.jsonl"), "a") as fh:
            for r in rows:
                fh.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
