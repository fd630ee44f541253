#!/usr/bin/env python
"""Train-step benchmark of every method, with the PyTorch + peft peer in the same run.

    python scripts/bench.py --sizes=base --methods=full,bitfit --batches=64,256 --out=bench/
    python scripts/bench.py --sizes=base --peer=eager,compile --capacity --out=bench/

Each configuration runs in its own process (clean peak-memory numbers, no state carried over).
Writes OUT/bench.jsonl (one record per configuration and framework) and OUT/bench.md (tables).
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def one(spec: str) -> int:
    """Child mode: benchmark one configuration, print one JSON line."""
    from jaxpeft import benchmark

    d = json.loads(spec)
    prng = d.pop("prng_impl", None)
    if prng:
        import jax

        jax.config.update("jax_default_prng_impl", prng)
    bc = benchmark.BenchConfig(**d)
    rec = benchmark.run(bc)
    rec["framework"] = "jaxpeft"
    if prng:
        rec["prng_impl"] = prng
    print("RESULT " + json.dumps(rec), flush=True)
    return 0


def child(cmd: list[str], env: dict, timeout: int) -> dict | None:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout}s"}
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
        if line.startswith("{"):
            return json.loads(line)
    tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
    return {"error": " | ".join(tail)[-400:] or f"exit {p.returncode}"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--sizes", default="base")
    ap.add_argument("--methods", default="full,frozen,bitfit,prompt,ptuning,prefix,ptuning_v2")
    ap.add_argument("--batches", default="64,256")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--attention_impl", default=None, help="default: cudnn on GPU, xla elsewhere")
    ap.add_argument("--prng_impl", default=None, help="e.g. rbg / unsafe_rbg (faster dropout masks)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--peer", default="", help="comma list of peer modes: eager,compile")
    ap.add_argument("--capacity", action="store_true", help="also find the largest batch per method")
    ap.add_argument("--peak_tflops", type=float, default=0.0, help="0: measure a bf16 matmul here")
    ap.add_argument("--timeout", type=int, default=600)
    ap.add_argument("--out", default="bench")
    a = ap.parse_args()
    if a.one:
        return one(a.one)

    import jax

    from jaxpeft import benchmark, methods

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    platform = jax.devices()[0].platform
    impl = a.attention_impl or ("cudnn" if platform == "gpu" else "xla")
    peak = a.peak_tflops or (benchmark.matmul_peak_tflops() if platform == "gpu" else 1.0)
    print(f"# {jax.devices()[0].device_kind}: bf16 matmul {peak:.0f} TFLOP/s, attention {impl}", flush=True)
    env = dict(os.environ)
    sizes, batches = a.sizes.split(","), [int(b) for b in a.batches.split(",")]
    wanted = [m for m in a.methods.split(",") if m]
    unknown = [m for m in wanted if m not in methods.REGISTRY]
    if unknown:
        print(f"# skipping methods not in this build: {unknown}", flush=True)
    meths = [m for m in wanted if m in methods.REGISTRY]
    records = []
    jsonl = open(out / "bench.jsonl", "a")

    def emit(rec):
        records.append(rec)
        jsonl.write(json.dumps(rec) + "\n")
        jsonl.flush()
        if "error" in rec:
            print(f"{rec.get('framework', 'jaxpeft'):>8} {rec.get('mode', ''):>7} {rec['size']:>6} "
                  f"{rec['method']:>10} b{rec['batch']:<5} ERROR {rec['error'][:150]}", flush=True)
        else:
            print(f"{rec.get('framework', 'jaxpeft')[:8]:>8} {rec.get('mode', ''):>7} {rec['size']:>6} "
                  f"{rec['method']:>10} b{rec['batch']:<5} {rec['seq_per_s']:>9,.0f} seq/s "
                  f"{rec['step_ms']:7.2f} ms  peak {(rec.get('peak_bytes') or 0) / 2**30:6.2f} GiB"
                  + (f"  mfu {100 * rec['mfu']:.1f}%" if "mfu" in rec else ""), flush=True)

    def ours(size, method, batch, **extra):
        bc = benchmark.BenchConfig(size=size, method=method, batch=batch, seq=a.seq, dtype=a.dtype,
                                   attention_impl=impl, steps=a.steps, repeats=a.repeats, peak_tflops=peak)
        spec = dataclasses.asdict(bc)
        if a.prng_impl:
            spec["prng_impl"] = a.prng_impl
        rec = child([sys.executable, __file__, "--one", json.dumps(spec)], env, a.timeout)
        base = {"framework": "jaxpeft", "size": size, "method": method, "batch": batch, "seq": a.seq}
        return {**base, **rec, **extra}

    t0 = time.time()
    for size in sizes:
        for method in meths:
            for batch in batches:
                emit(ours(size, method, batch))
                for mode in [m for m in a.peer.split(",") if m]:
                    cmd = [sys.executable, str(REPO / "benchmarks" / "peft_peer.py"), f"--size={size}",
                           f"--method={method}", f"--batch={batch}", f"--seq={a.seq}", f"--mode={mode}",
                           f"--steps={a.steps}", f"--repeats={a.repeats}"]
                    rec = child(cmd, env, a.timeout)
                    emit({"framework": "torch", "mode": mode, "size": size, "method": method,
                          "batch": batch, "seq": a.seq, **rec})
            if a.capacity:
                emit(capacity(size, method, records, ours))
    md = ["# Benchmark", "", f"{jax.devices()[0].device_kind}, bf16 matmul {peak:.0f} TFLOP/s measured, "
          f"attention `{impl}`, seq {a.seq}, {time.strftime('%Y-%m-%d')}", "",
          "## Speed", "", benchmark.speed_table(records), "", "## Memory", "", benchmark.memory_table(records)]
    (out / "bench.md").write_text("\n".join(md) + "\n")
    print("\n".join(md[5:]))
    print(f"# {time.time() - t0:.0f}s", flush=True)
    return 0


def capacity(size, method, records, ours) -> dict:
    """Largest batch that runs: fit peak memory ~ a + b * batch on two measured batches, predict the
    device limit, then confirm by running there (stepping down 15% on failure)."""
    import jax

    limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
    pts = sorted((r["batch"], r["peak_bytes"]) for r in records if r.get("framework") == "jaxpeft"
                 and r["size"] == size and r["method"] == method and r.get("peak_bytes")
                 and not r.get("capacity"))
    base = {"framework": "jaxpeft", "capacity": True, "size": size, "method": method,
            "seq": records[-1]["seq"] if records else 128, "batch": 0}
    if not limit or len(pts) < 2 or pts[-1][0] == pts[0][0]:
        return {**base, "error": "needs two measured batches and a device memory limit"}
    (b1, m1), (b2, m2) = pts[0], pts[-1]
    slope = (m2 - m1) / (b2 - b1)
    guess = int((0.97 * limit - (m1 - slope * b1)) / slope) // 8 * 8
    tried = []
    for _ in range(4):
        if guess <= b2:
            break
        rec = ours(size, method, guess, capacity=True)
        tried.append(guess)
        if "error" not in rec:
            return {**rec, "max_batch": guess, "predicted_batch": tried[0], "tried": tried}
        guess = int(guess * 0.85) // 8 * 8
    return {**base, "max_batch": b2 if not tried else None, "tried": tried,
            "error": "no larger batch ran" if tried else "prediction below measured batch"}


if __name__ == "__main__":
    sys.exit(main())
