#!/usr/bin/env python
"""Serving many adapters at once: K adapters mixed in one batch, against K separate passes and
against one adapter with the plain predict step. Sequences per second of prediction (no dropout,
no gradients) on random-init weights of a model's shape and random token ids, every position real.

    python benchmarks/multi_adapter.py --out=bench-multi                  # BERT-base, batch 256, seq 128
    python benchmarks/multi_adapter.py --size=tiny --batch=8 --seq=16 --ks=1,2 --out=/tmp/m   # CPU smoke

For each family (``--families``: bitfit, prefix, prompt, lora; 20 virtual tokens for prefix and
prompt, rank 8 on query and value for LoRA) and each K (``--ks``):

* ``single``: one adapter, the plain predict step (``jaxpeft.training.steps.make_predict_step``) on the
  whole batch: the reference (measured once per family);
* ``mixed``: K adapters stacked (``jaxpeft.adapters.mixed``), a random adapter per row, one call;
* ``separate``: the same rows grouped by adapter, each group its own call of the plain predict step
  with its adapter's params (a group's rows padded to a power of two, so a few shapes serve every
  K; only real rows are counted).

``--compute=auto`` (the default) is the fastest path where it runs: on one NVIDIA GPU bfloat16 with
our Pallas attention and sublayer kernels, which the mixed step runs under its row ``vmap``. If the
mixed step fails to compile or run there, it is measured again on XLA's path (cuDNN attention,
XLA sublayers) and the record says ``fallback``. Writes ``multi_adapter.jsonl`` (one record per
measurement) and ``multi_adapter.md`` (a table: each mode's sequences/s and its ratio to
``single``) under ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft import compute as compute_lib
from jaxpeft import masks, methods, runtime
from jaxpeft.adapters import mixed
from jaxpeft.bench.step import SIZES
from jaxpeft.compute import EXACT, Compute
from jaxpeft.models.bert import FAMILY as BERT
from jaxpeft.models.heads import Head
from jaxpeft.models.loading import build_module, frozen_in_dtype, init_params
from jaxpeft.training import steps

#: family -> the (exported) method whose adapters it serves, with the benchmark's options
FAMILY_METHODS = {"bitfit": ("bitfit", {}), "prefix": ("prefix", {"num_virtual_tokens": 20}),
                  "prompt": ("prompt", {"num_virtual_tokens": 20}), "lora": ("lora", {"lora_r": 8})}
LABELS = 2


class Family:
    """One family's random base and ``max_k`` random adapters, built once (their init and the
    frozen casts compiled once), and its jitted steps."""

    def __init__(self, family: str, size: str, max_k: int, compute: Compute, seed: int = 0):
        cfg = SIZES[size]
        name, options = FAMILY_METHODS[family]
        method = methods.create(name, options).for_inference()
        self.module = build_module(BERT, cfg, Head("sequence", LABELS), method, compute)
        params = init_params(self.module.clone(compute=EXACT), jax.random.key(seed))
        mask = method.mask(params, BERT)
        owned = masks.trainable_paths(mask)
        flat = masks.flatten(params)
        keys = jax.random.split(jax.random.key(seed + 1), len(owned))
        self.stacked = {p: flat[p][None] + 0.02 * jax.random.normal(kk, (max_k,) + flat[p].shape, flat[p].dtype)
                        for p, kk in zip(owned, keys)}
        frozen = masks.unflatten({p: v for p, v in flat.items() if p not in self.stacked}, params)
        self.frozen = jax.jit(lambda f: frozen_in_dtype(f, compute.dtype, BERT.prefix))(frozen)
        self.like = masks.split(params, mask)[0]
        self.plain = jax.jit(steps.make_predict_step(self.module))
        self.mixed = jax.jit(mixed.make_mixed_predict_step(self.module))

    def first(self, k: int) -> dict[str, jax.Array]:
        """The first ``k`` adapters, stacked."""
        return {p: a[:k] for p, a in self.stacked.items()}

    def one(self, i: int) -> Any:
        """Adapter ``i``'s own leaves as a trainable tree for the plain step."""
        return masks.unflatten({p: a[i] for p, a in self.stacked.items()}, self.like)


def random_batch(size: str, batch: int, seq: int, seed: int = 0) -> dict[str, jax.Array]:
    cfg = SIZES[size]
    rng = np.random.default_rng(seed)
    return {"input_ids": jnp.asarray(rng.integers(1, cfg.vocab_size, (batch, seq)), jnp.int32),
            "attention_mask": jnp.ones((batch, seq), jnp.int32),
            "token_type_ids": jnp.zeros((batch, seq), jnp.int32)}


def timed(fn: Callable[[], Any], steps_: int, repeats: int, warmup: int = 2) -> tuple[float, float]:
    """``(compile and first-call seconds, median seconds per call)``."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps_):
            out = fn()
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / steps_)
    return first, statistics.median(times)


def pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def measure(mode: str, fam: Family, k: int, args) -> dict[str, Any]:
    batch = random_batch(args.size, args.batch, args.seq, args.seed)
    index = np.random.default_rng(args.seed + k).integers(0, k, args.batch).astype(np.int32)
    if mode == "single":
        trainable = fam.one(0)
        fn = lambda: fam.plain(trainable, fam.frozen, batch)  # noqa: E731
    elif mode == "mixed":
        stacked = fam.first(k)
        routed = {**batch, mixed.INDEX_KEY: jnp.asarray(index)}
        fn = lambda: fam.mixed(stacked, fam.frozen, routed)  # noqa: E731
    else:
        host = {n: np.asarray(v) for n, v in batch.items()}
        groups = []
        for i in range(k):
            rows = np.flatnonzero(index == i)
            if len(rows):
                pad = np.concatenate([rows, np.full(pow2(len(rows)) - len(rows), rows[0])])
                groups.append((fam.one(i), {n: jnp.asarray(v[pad]) for n, v in host.items()}))
        fn = lambda: [fam.plain(t, fam.frozen, b) for t, b in groups]  # noqa: E731
    first, per_batch = timed(fn, args.steps, args.repeats)
    return {"seq_per_s": args.batch / per_batch, "ms_per_batch": 1e3 * per_batch, "first_call_s": first,
            **({"calls": len(groups)} if mode == "separate" else {})}


def record(mode: str, family: str, k: int, args, compute: Compute, built: dict) -> dict[str, Any]:
    """One measurement as a JSON record; a failure is recorded, not raised. ``built`` caches each
    (family, compute)'s :class:`Family`."""
    dev = jax.devices()[0]
    base = {"family": family, "k": k, "mode": mode, "size": args.size, "batch": args.batch, "seq": args.seq,
            "device": dev.device_kind, "platform": dev.platform, "jax": jax.__version__, **compute.to_dict()}

    def fam(c: Compute) -> Family:
        if (family, c) not in built:
            built[(family, c)] = Family(family, args.size, max(args.ks), c, args.seed)
        return built[(family, c)]

    try:
        return {**base, **measure(mode, fam(compute), k, args)}
    except Exception as e:  # noqa: BLE001 -- one failed configuration must not end the run
        error = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        if mode != "mixed" or not compute.uses_pallas():
            return {**base, "error": error}
        xla = compute.replace(attention_impl="cudnn" if compute.dtype == "bfloat16" else "dense", norm_impl="xla")
        print(f"  mixed on our kernels failed ({error}); measuring XLA's path", file=sys.stderr)
        try:
            return {**base, **xla.to_dict(), **measure(mode, fam(xla), k, args), "fallback": "xla",
                    "fallback_reason": error}
        except Exception as e2:  # noqa: BLE001
            return {**base, "error": f"{error}; on XLA's path too: {type(e2).__name__}: {str(e2)[:300]}"}


def markdown(records: list[dict], compute: Compute, args) -> str:
    single = {r["family"]: r for r in records if r["mode"] == "single" and "seq_per_s" in r}
    by = {(r["family"], r["k"], r["mode"]): r for r in records}
    dev = records[0]["device"] if records else "?"
    lines = [f"# Many adapters in one batch ({datetime.date.today().isoformat()})", "",
             f"{dev}, {args.size} shapes, batch {args.batch}, seq {args.seq}; compute {compute.dtype}/"
             f"{compute.attention_impl}/{compute.norm_impl}. Sequences per second of prediction; the ratios "
             "are to one adapter with the plain predict step.", "",
             "| family | K | single seq/s | mixed seq/s | mixed / single | separate seq/s | separate / single |",
             "|---|---|---|---|---|---|---|"]

    def cell(r):
        if r is None:
            return "—", "—"
        if "seq_per_s" not in r:
            return f"fails: {r.get('error', '?')[:60]}", "—"
        s = single.get(r["family"])
        ratio = f"{r['seq_per_s'] / s['seq_per_s']:.2f}x" if s else "—"
        return f"{r['seq_per_s']:,.0f}" + (" (XLA)" if r.get("fallback") else ""), ratio

    for fam in args.families:
        for k in args.ks:
            s = single.get(fam)
            m, mr = cell(by.get((fam, k, "mixed")))
            p, pr = cell(by.get((fam, k, "separate")))
            lines.append(f"| {fam} | {k} | {s['seq_per_s']:,.0f} | {m} | {mr} | {p} | {pr} |" if s else
                         f"| {fam} | {k} | — | {m} | {mr} | {p} | {pr} |")
    return "\n".join(lines) + "\n"


def parse(argv=None) -> argparse.Namespace:
    ints = lambda s: [int(x) for x in s.split(",") if x.strip()]  # noqa: E731
    names = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", type=names, default=["bitfit", "prefix", "prompt", "lora"])
    p.add_argument("--ks", type=ints, default=[1, 8, 64], help="adapters per batch")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--size", default="base", choices=sorted(SIZES))
    p.add_argument("--compute", default="auto", choices=compute_lib.PRESETS)
    p.add_argument("--steps", type=int, default=10, help="calls per timed repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench-multi-adapter", help="folder for multi_adapter.jsonl and .md")
    args = p.parse_args(argv)
    bad = [f for f in args.families if f not in FAMILY_METHODS]
    if bad:
        p.error(f"unknown family {bad[0]!r}; known: {', '.join(FAMILY_METHODS)}")
    if not args.ks or min(args.ks) < 1 or args.batch < 1 or args.seq < 1:
        p.error("--ks, --batch and --seq must be positive")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    compute = compute_lib.resolve(args.compute)
    runtime.set_prng_impl(compute.prng_impl)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "multi_adapter.jsonl"
    records, built = [], {}
    for fam in args.families:
        todo = [("single", 1)] + [(mode, k) for k in args.ks for mode in ("mixed", "separate")]
        for mode, k in todo:
            r = record(mode, fam, k, args, compute, built)
            records.append(r)
            with open(jsonl, "a") as f:
                f.write(json.dumps(r) + "\n")
            shown = f"{r['seq_per_s']:,.0f} seq/s" if "seq_per_s" in r else f"error: {r['error']}"
            print(f"{fam:7s} K={k:<3d} {mode:8s} {shown}", file=sys.stderr, flush=True)
        built.clear()   # one family's arrays at a time
    (out / "multi_adapter.md").write_text(markdown(records, compute, args))
    print((out / "multi_adapter.md").read_text())
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
