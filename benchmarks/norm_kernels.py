"""A sublayer's output alone (bias, dropout, residual, LayerNorm), forward and forward+backward:
our Pallas kernels (``pallas_norm``) against XLA's fusions of the same ops, as the model uses them.

Both sides start from the projection's output without its bias and the residual, and end with the
gradients of both and of the four parameter vectors. ``--rates`` separates the cost of the dropout
hash (rate 0: no mask at all) from the memory traffic; the line's ``gb_per_s`` counts the bytes the
kernels must move (forward: two reads and two writes of [B, T, H]; backward: three reads and two
writes) over the forward+backward time. Prints one JSON line per configuration (median
milliseconds over ``--iters`` calls) and the largest difference of each against XLA's result.
The times include each call's dispatch and the loss's own passes over the outputs, so they rank
configurations but are not kernel times (the profile, ``profile_step.py``, gives those); their
differences between rates 0 and 0.1 are the hash's cost.

    python benchmarks/norm_kernels.py --tunings=2:4:2:32:4,2:4:2:32:4:2 --rates=0,0.1 --out=OUT
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

from jaxpeft.models.kernels import pallas_norm as pn


def _time(fn, args, iters):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--rates", default="0,0.1")
    ap.add_argument("--tunings", default="2:4:2:32:4")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--no_xla", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    b, t, n = a.batch, a.seq, a.hidden
    rng = np.random.default_rng(0)
    bf = jnp.bfloat16
    h, res, dya, dyb = (jnp.asarray(rng.normal(size=(b, t, n)), bf) for _ in range(4))
    params = tuple(jnp.asarray(rng.normal(size=(n,)), jnp.float32) for _ in range(3))   # bias, scale, ln bias
    seed = jnp.asarray([123, 456], jnp.uint32)
    rows = []
    for rate, spec in itertools.product([float(r) for r in a.rates.split(",")],
                                        (["xla"] if not a.no_xla else []) + a.tunings.split(",")):
        s = None if rate == 0 else seed
        if spec == "xla":
            fn = lambda x, r, p, s=s, rate=rate: pn.reference(x, p[0], r, p[1], p[2], s, rate=rate, eps=1e-12)
            two = lambda x, r, p, fn=fn: (fn(x, r, p),) * 2   # noqa: E731
        else:
            tuning = pn.Tuning.parse(spec)
            two = lambda x, r, p, s=s, rate=rate, tuning=tuning: pn.dropout_add_norm(   # noqa: E731
                x, p[0], r, p[1], p[2], s, rate=rate, eps=1e-12, tuning=tuning)
        fwd = jax.jit(lambda x, r, p, two=two: two(x, r, p)[0])
        loss = lambda x, r, p, two=two: sum(jnp.sum(y.astype(jnp.float32) * dy.astype(jnp.float32))  # noqa: E731
                                            for y, dy in zip(two(x, r, p), (dya, dyb)))
        bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        row = {"impl": spec, "rate": rate, "batch": b, "seq": t, "hidden": n}
        args = (h, res, params)
        try:
            row["fwd_ms"] = round(_time(fwd, args, a.iters), 4)
            row["fwd_bwd_ms"] = round(_time(bwd, args, a.iters), 4)
            elements = b * t * n
            row["gb_per_s"] = round(elements * 2 * (4 + 5) / row["fwd_bwd_ms"] / 1e6, 1)
            row["fwd_gb_per_s"] = round(elements * 2 * 4 / row["fwd_ms"] / 1e6, 1)
            if spec != "xla" and not a.no_xla:
                want = jax.jit(lambda x, r, p, s=s, rate=rate: pn.reference(
                    x, p[0], r, p[1], p[2], s, rate=rate, eps=1e-12))(*args)
                row["fwd_err"] = float(jnp.max(jnp.abs(fwd(*args).astype(jnp.float32) - want.astype(jnp.float32))))
        except Exception as e:  # noqa: BLE001 - a failing configuration is a result too
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        print(json.dumps(row), flush=True)
        rows.append(row)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "norm_kernels.jsonl"), "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
