#!/usr/bin/env python
"""Train-step benchmark of every method, with the PyTorch + peft peer in the same run.

    python scripts/bench.py --sizes=base --methods=full,bitfit --batches=64,256 --out=bench/
    python scripts/bench.py --sizes=base,large --peer=eager,compile --capacity --out=bench/

Writes OUT/bench.jsonl (one record per configuration and framework, appended as they finish)
and OUT/bench.md (speed and memory tables). Our configurations run in this process (memory is
XLA's analysis of the compiled step, which does not depend on what ran before); the peer runs in
a child process per configuration.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def peer(size, method, batch, seq, mode, steps, repeats, timeout) -> dict:
    cmd = [sys.executable, str(REPO / "benchmarks" / "peft_peer.py"), f"--size={size}", f"--method={method}",
           f"--batch={batch}", f"--seq={seq}", f"--mode={mode}", f"--steps={steps}", f"--repeats={repeats}"]
    base = {"framework": "torch", "mode": mode, "size": size, "method": method, "batch": batch, "seq": seq}
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ))
    except subprocess.TimeoutExpired:
        return {**base, "error": f"timeout after {timeout}s"}
    for line in p.stdout.splitlines():
        if line.startswith("{"):
            return {**base, **json.loads(line)}
    return {**base, "error": " | ".join((p.stderr or "").strip().splitlines()[-2:])[-300:]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="base")
    ap.add_argument("--methods", default="full,frozen,bitfit,prompt,ptuning,prefix,ptuning_v2")
    ap.add_argument("--batches", default="64,256")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--attention_impl", default=None,
                    help="comma list: pallas, cudnn, xla, dense (default: pallas on one GPU, cudnn with "
                         "--mesh, xla elsewhere)")
    ap.add_argument("--attention_tuning", default="",
                    help="comma list of pallas kernel launch parameters BLOCK_Q:WARPS:BLOCK_Q_BWD:WARPS_BWD "
                         "(empty: the defaults); each runs with --attention_impl=pallas")
    ap.add_argument("--norm_impl", default=None,
                    help="comma list: xla (sublayer outputs as separate ops), pallas (one kernel each way); "
                         "default: pallas on one GPU, xla with --mesh or on the CPU")
    ap.add_argument("--norm_tuning", default="",
                    help="comma list of launch parameters ROWS:WARPS:ROWS_BWD:ROWS_PER_PROGRAM_BWD:WARPS_BWD "
                         "for --norm_impl=pallas (empty: the defaults)")
    ap.add_argument("--activation_impl", default="xla",
                    help="comma list: xla (lean GELU after the biased matmul), pallas (bias + GELU kernels)")
    ap.add_argument("--cls_only", default="1",
                    help="comma list: 1 (the last layer for the [CLS] row only, the default), 0 (every row, "
                         "as the peer computes it)")
    ap.add_argument("--prng_impl", default="auto", help="auto (rbg on GPU), threefry2x32, rbg, unsafe_rbg")
    ap.add_argument("--dropout", type=float, default=None, help="override BERT's dropout (0.1)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--peer", default="", help="comma list of peer modes: eager,compile")
    ap.add_argument("--peer_batches", default=None, help="batches for the peer (default: --batches)")
    ap.add_argument("--capacity", action="store_true", help="predict the largest batch per method")
    ap.add_argument("--peak_tflops", type=float, default=0.0, help="0: measure a bf16 matmul here")
    ap.add_argument("--timeout", type=int, default=600, help="per peer configuration")
    ap.add_argument("--remat", default="none",
                    help="comma list of remat policies to run each configuration with: none,elementwise,layer")
    ap.add_argument("--fuse_qkv", default="1", help="comma list: 1 (one [H,3H] matmul), 0 (three)")
    ap.add_argument("--dropout_bits", default="32", help="comma list: 32 (nn.Dropout), 16, 8")
    ap.add_argument("--dropout_impl", default="hash",
                    help="comma list: hash (masks from a keyed position hash), random (jax.random masks)")
    ap.add_argument("--lean", default="1",
                    help="comma list: 1 (LayerNorm/GELU backward from their bf16 inputs), 0 (autodiff's)")
    ap.add_argument("--mesh", default=None, help="run ours on a device mesh, e.g. data:2 (global batches)")
    ap.add_argument("--no_ours", action="store_true", help="only the peer")
    ap.add_argument("--report", nargs="+", default=None, help="only build OUT/bench.md from these jsonl files")
    ap.add_argument("--out", default="bench")
    a = ap.parse_args()
    for flag in ("fuse_qkv", "lean", "cls_only"):
        bad = set(getattr(a, flag).split(",")) - {"0", "1"}
        if bad:
            ap.error(f"--{flag} takes a comma list of 0 and 1, got {sorted(bad)}")
    if a.report:
        from jaxpeft import benchmark

        recs = [json.loads(x) for f in a.report for x in Path(f).read_text().splitlines() if x.strip()]
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        head = next((r for r in recs if r.get("framework") == "jaxpeft" and "device" in r), {})
        text = benchmark.markdown_report(recs, f"# Benchmark\n\n{head.get('device', '?')}, attention "
                                         f"`{head.get('attention_impl', '?')}`, jax {head.get('jax', '?')}, "
                                         f"bf16 matmul {head.get('peak_tflops', 0):.0f} TFLOP/s measured")
        (out / "bench.md").write_text(text)
        print(text)
        return 0

    import jax

    from jaxpeft import benchmark, methods

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = jax.devices()[0]
    # our own kernel on one GPU; on a mesh it is tested on CPU devices only, so cuDNN's there
    gpu_default = "cudnn" if a.mesh else "pallas"
    impls = (a.attention_impl or (gpu_default if dev.platform == "gpu" else "xla")).split(",")
    # likewise our sublayer-output kernels (on the CPU they would run in Pallas's interpreter)
    if a.norm_impl is None:
        a.norm_impl = "pallas" if dev.platform == "gpu" and not a.mesh else "xla"
    impl = ",".join(impls)
    peak = a.peak_tflops or (benchmark.matmul_peak_tflops() if dev.platform == "gpu" else 1.0)
    print(f"# {dev.device_kind}: bf16 matmul {peak:.0f} TFLOP/s, attention {impl}", flush=True)
    wanted = [m for m in a.methods.split(",") if m]
    skipped = [m for m in wanted if m not in methods.REGISTRY]
    if skipped:
        print(f"# skipping methods not in this build: {skipped}", flush=True)
    meths = [m for m in wanted if m in methods.REGISTRY]
    batches = [int(b) for b in a.batches.split(",")]
    peer_batches = [int(b) for b in (a.peer_batches or a.batches).split(",")]
    records: list[dict] = []
    jsonl = open(out / "bench.jsonl", "a")

    def emit(rec):
        records.append(rec)
        jsonl.write(json.dumps(rec) + "\n")
        jsonl.flush()
        who = f"{rec.get('framework', '')[:7]:>7} {rec.get('mode', ''):>7} {rec['size']:>6} {rec['method']:>10} " \
              f"b{rec['batch']:<5}" + (f" {benchmark.variant(rec):>18}" if "remat" in rec else "")
        if "error" in rec:
            print(f"{who} ERROR {rec['error'][:200]}", flush=True)
        elif rec.get("capacity"):
            print(f"{who} largest batch ~{rec['max_batch']:,}", flush=True)
        else:
            mem = rec.get("step_bytes") or rec.get("peak_bytes") or 0
            print(f"{who} {rec['seq_per_s']:>9,.0f} seq/s {rec['step_ms']:7.2f} ms {mem / 2**30:6.2f} GiB"
                  + (f" mfu {100 * rec['mfu']:4.1f}% compile {rec['compile_s']:.0f}s" if "mfu" in rec else ""),
                  flush=True)

    t0 = time.time()
    for size in a.sizes.split(","):
        for method in meths:
            variants = [(r, f == "1", int(d), lean == "1", di, att, tun, ni, nt, ai, c == "1")
                        for r in a.remat.split(",")
                        for f in a.fuse_qkv.split(",") for d in a.dropout_bits.split(",")
                        for lean in a.lean.split(",") for di in a.dropout_impl.split(",")
                        for att in impls for tun in (a.attention_tuning.split(",") if att == "pallas" else [""])
                        for ni in a.norm_impl.split(",")
                        for nt in (a.norm_tuning.split(",") if ni == "pallas" else [""])
                        for ai in a.activation_impl.split(",") for c in a.cls_only.split(",")]
            for batch, (remat, fuse, bits, lean, dimpl, att, tun, ni, nt, ai, cls) in \
                    [(b, v) for b in ([] if a.no_ours else batches) for v in variants]:
                bc = benchmark.BenchConfig(size=size, method=method, batch=batch, seq=a.seq, dtype=a.dtype,
                                           attention_impl=att, steps=a.steps, repeats=a.repeats,
                                           peak_tflops=peak, prng_impl=a.prng_impl, dropout=a.dropout,
                                           mesh=a.mesh, remat=remat, fuse_qkv=fuse, dropout_bits=bits,
                                           dropout_impl=dimpl, lean_residuals=lean, attention_tuning=tun,
                                           norm_impl=ni, norm_tuning=nt, activation_impl=ai, cls_only=cls)
                try:
                    rec = {"framework": "jaxpeft", **benchmark.run(bc)}
                except Exception as e:  # record and go on (e.g. out of memory)
                    rec = {"framework": "jaxpeft", "size": size, "method": method, "batch": batch,
                           "seq": a.seq, "error": f"{type(e).__name__}: {str(e)[:300]}"}
                emit(rec)
            for mode in [m for m in a.peer.split(",") if m]:
                for batch in peer_batches:
                    emit(peer(size, method, batch, a.seq, mode, a.steps, a.repeats, a.timeout))
            if a.capacity:
                limit = (dev.memory_stats() or {}).get("bytes_limit")
                cap = benchmark.predict_capacity(records, size, method, limit) if limit else None
                if cap:
                    emit(cap)
    text = benchmark.markdown_report(
        records, f"# Benchmark\n\n{dev.device_kind}, bf16 matmul {peak:.0f} TFLOP/s measured, attention "
        f"`{impl}`, prng `{a.prng_impl}`, seq {a.seq}, jax {jax.__version__}, {time.strftime('%Y-%m-%d')}")
    (out / "bench.md").write_text(text)
    print(text)
    print(f"# {time.time() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
