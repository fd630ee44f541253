"""Where the time of one train step goes: device kernels grouped by kind, from a profiler trace.

    python benchmarks/profile_step.py --method=bitfit --batch=256 --out=prof [--remat=elementwise ...]

Builds the same compiled step as ``scripts/bench.py`` (``jaxpeft.bench.step.build_step``), runs a few
steps under ``jax.profiler.trace``, and reads the trace's device events back: time per kernel
kind (matmul, attention, fusion, random bits, copies, reductions) and the 40 longest kernels with
the HLO instruction each ran. Writes ``<out>/profile_<name>.md``, the compiled HLO
(``<out>/hlo_<name>.txt.gz``) and the raw per-kernel totals (``<out>/kernels_<name>.json``).
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import re
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np

from jaxpeft import compute, options
from jaxpeft.bench.step import BenchConfig, build_step, variant

KINDS = [  # first match wins; kernel names of cuBLAS/cuDNN/XLA on recent GPUs
    ("attention (cuDNN)", re.compile(r"cudnn|fmha|flash|sdpa", re.I)),
    ("matmul", re.compile(r"gemm|nvjet|cutlass|xmma|sm\d+_.*(tn|nt|nn|tt)|triton_gemm|dot", re.I)),
    ("random bits", re.compile(r"rng|philox|threefry|random", re.I)),
    ("copy / transpose", re.compile(r"copy|transpose|memcpy|memset", re.I)),
    ("reduction fusion", re.compile(r"reduce|reduction", re.I)),
    ("other fusion", re.compile(r"fusion|loop_|input_|wrapped_", re.I)),
]


def kind_of(name: str, hlo_op: str) -> str:
    for kind, rx in KINDS:
        if rx.search(name) or rx.search(hlo_op):
            return kind
    return "other"


def device_events(trace: dict) -> tuple[list[dict], list[str]]:
    """Complete events ('X') of the device's kernel streams, and the device threads' names.

    Device processes are the ones whose name names a GPU/TPU; inside them, threads named
    ``Stream ...`` hold the kernels (others, like ``XLA Ops``, repeat them by HLO op), so only those
    count when there are any.
    """
    meta = [e for e in trace.get("traceEvents", []) if e.get("ph") == "M"]
    procs = {e["pid"]: e["args"]["name"] for e in meta if e.get("name") == "process_name"}
    dev_pids = {p for p, n in procs.items() if re.search(r"/device:(GPU|TPU)", n)}
    threads = {(e["pid"], e["tid"]): str(e["args"]["name"]) for e in meta
               if e.get("name") == "thread_name" and e["pid"] in dev_pids}
    streams = {k for k, n in threads.items() if n.lower().startswith("stream")}
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X" and e.get("pid") in dev_pids
              and "dur" in e and (not streams or (e["pid"], e.get("tid")) in streams)]
    return events, sorted(set(threads.values()))


def summarize(events: list[dict], steps: int) -> tuple[dict, list]:
    per_kernel = collections.defaultdict(lambda: [0.0, 0, ""])
    for e in events:
        args = e.get("args", {})
        hlo = str(args.get("hlo_op", args.get("long_name", "")))
        k = per_kernel[e["name"]]
        k[0] += e["dur"]
        k[1] += 1
        k[2] = k[2] or hlo
    kinds = collections.Counter()
    for name, (us, _, hlo) in per_kernel.items():
        kinds[kind_of(name, hlo)] += us / steps
    top = sorted(((us / steps, n / steps, name, hlo) for name, (us, n, hlo) in per_kernel.items()),
                 reverse=True)
    return dict(kinds), top


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="bitfit")
    p.add_argument("--size", default="base")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--compute", default="auto", choices=compute.PRESETS)
    options.add_flags(p.add_argument_group("compute (each overrides the --compute preset)"), compute.Compute)
    p.add_argument("--dropout", type=float, default=None)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--name", default=None)
    p.add_argument("--out", default="profile")
    a = p.parse_args(argv)
    spec = compute.resolve(a.compute, {k: getattr(a, k) for k in compute.fields() if hasattr(a, k)})
    bc = BenchConfig(size=a.size, method=a.method, batch=a.batch, seq=a.seq, compute=spec, dropout=a.dropout)
    name = a.name or f"{a.method}_b{a.batch}"
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    _, compiled, state, frozen, batch, compile_s, _, _ = build_step(bc)
    (out / f"hlo_{name}.txt.gz").write_bytes(gzip.compress(compiled.as_text().encode()))
    lr = np.float32(1e-4)
    for _ in range(3):
        state, m = compiled(state, frozen, batch, lr)
    jax.block_until_ready((state, m))
    with tempfile.TemporaryDirectory() as log_dir:
        import time
        with jax.profiler.trace(log_dir, create_perfetto_trace=True):
            t0 = time.perf_counter()
            for _ in range(a.steps):
                state, m = compiled(state, frozen, batch, lr)
            jax.block_until_ready((state, m))
            wall_ms = 1e3 * (time.perf_counter() - t0) / a.steps
        path = next(Path(log_dir).rglob("perfetto_trace.json.gz"))
        trace = json.loads(gzip.decompress(path.read_bytes()))
    events, threads = device_events(trace)
    processes = sorted({str(e["args"].get("name")) for e in trace.get("traceEvents", [])
                        if e.get("ph") == "M" and e.get("name") == "process_name"})
    kinds, top = summarize(events, a.steps)
    busy = sum(kinds.values()) / 1e3
    lines = [f"# Profile: {name} ({bc.size}, batch {bc.batch}, seq {bc.seq}, {variant(spec.to_dict())})", "",
             f"- device: {jax.devices()[0].device_kind}, jax {jax.__version__}, compile {compile_s:.1f} s",
             f"- wall per step under the profiler: {wall_ms:.2f} ms; device kernel time per step: "
             f"{busy:.2f} ms ({len(events) / a.steps:.0f} kernels per step)",
             f"- device threads in the trace: {', '.join(threads[:12])}", "",
             "| kind | ms per step | share |", "|---|---|---|"]
    for kind, us in sorted(kinds.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {kind} | {us / 1e3:.2f} | {us / 1e3 / max(busy, 1e-9):.0%} |")
    lines += ["", "| ms per step | calls per step | kernel | HLO op |", "|---|---|---|---|"]
    for us, n, kname, hlo in top[:40]:
        lines.append(f"| {us / 1e3:.3f} | {n:g} | `{kname[:70]}` | `{hlo[:60]}` |")
    (out / f"profile_{name}.md").write_text("\n".join(lines) + "\n")
    (out / f"kernels_{name}.json").write_text(json.dumps(
        [{"us_per_step": us, "calls_per_step": n, "kernel": k, "hlo_op": h} for us, n, k, h in top]))
    print("\n".join(lines[:12 + len(kinds)]))
    if not events:
        print(f"no device events in the trace (platform {jax.default_backend()}); its processes: "
              f"{processes}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    sys.exit(main())
