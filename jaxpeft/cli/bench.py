"""``jaxpeft-bench``: train-step benchmark of every method, with the PyTorch + peft peer in the same run.

    jaxpeft-bench --sizes=base --methods=full,bitfit --batches=64,256 --out=bench/
    jaxpeft-bench --sizes=base --peer=eager,compile --out=bench/          # needs torch, transformers, peft
    jaxpeft-bench --compute=exact --methods=bitfit --out=bench-exact/    # another compute spec

Writes OUT/bench.jsonl (one record per configuration and framework, appended as they finish)
and OUT/bench.md (speed and memory tables). Our configurations run in this process (memory is
XLA's analysis of the compiled step); the peer runs in a child process per configuration. The
compute spec comes from the same flags as training: ``--compute=auto|exact|fast`` plus per-field
overrides (``--attention_impl=cudnn``). For the whole job users run, see ``benchmarks/job.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path



def peer(size, method, batch, seq, mode, steps, repeats, timeout) -> dict:
    base = {"framework": "torch", "mode": mode, "size": size, "method": method, "batch": batch, "seq": seq}
    cmd = [sys.executable, "-m", "jaxpeft.bench.peer", f"--size={size}", f"--method={method}", f"--batch={batch}",
           f"--seq={seq}", f"--mode={mode}", f"--steps={steps}", f"--repeats={repeats}"]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ))
    except subprocess.TimeoutExpired:
        return {**base, "error": f"timeout after {timeout}s"}
    for line in p.stdout.splitlines():
        if line.startswith("{"):
            return {**base, **json.loads(line)}
    return {**base, "error": " | ".join((p.stderr or "").strip().splitlines()[-2:])[-300:]}


def _field_value(kv: str) -> tuple[str, object]:
    """``"norm_impl=xla"`` -> ``("norm_impl", "xla")``, typed as the compute field."""
    from jaxpeft import compute, options
    from jaxpeft.errors import UserError

    k, sep, v = kv.strip().partition("=")
    if not sep or k not in compute.fields():
        raise UserError(f"--variants: {kv!r} is not FIELD=VALUE of a compute field ({', '.join(compute.fields())})")
    kind = options.field_type(compute.Compute, k)
    return k, options.parse_bool(v) if kind is bool else kind(v)


def parser() -> argparse.ArgumentParser:
    from jaxpeft import compute, options

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="base", help="comma list: base, large, minilm, tiny")
    ap.add_argument("--methods", default="full,frozen,bitfit,prompt,ptuning,prefix,ptuning_v2,lora,adapter")
    ap.add_argument("--batches", default="64,256")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--compute", default="auto", choices=compute.PRESETS)
    options.add_flags(ap.add_argument_group("compute (each overrides the --compute preset)"), compute.Compute)
    ap.add_argument("--variants", default="",
                    help="';'-separated variants of the compute spec, each a comma list of FIELD=VALUE "
                         "overrides (an empty one: the spec itself), e.g. ';norm_impl=xla;attention_impl=cudnn'")
    ap.add_argument("--dropout", type=float, default=None, help="override BERT's dropout (0.1)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--peer", default="", help="comma list of peer modes: eager,compile")
    ap.add_argument("--peer_batches", default=None, help="batches for the peer (default: --batches)")
    ap.add_argument("--capacity", action="store_true", help="predict the largest batch per method")
    ap.add_argument("--peak_tflops", type=float, default=0.0, help="0: measure a bf16 matmul here")
    ap.add_argument("--timeout", type=int, default=600, help="per peer configuration")
    ap.add_argument("--mesh", default=None, help="run ours on a device mesh, e.g. data:2 (global batches)")
    ap.add_argument("--no_ours", action="store_true", help="only the peer")
    ap.add_argument("--report", nargs="+", default=None, help="only build OUT/bench.md from these jsonl files")
    ap.add_argument("--out", default="bench")
    return ap


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    if a.report:
        from jaxpeft.bench import step

        recs = [json.loads(x) for f in a.report for x in Path(f).read_text().splitlines() if x.strip()]
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        head = next((r for r in recs if r.get("framework") == "jaxpeft" and "device" in r), {})
        text = step.markdown_report(recs, f"# Benchmark\n\n{head.get('device', '?')}, jax "
                                         f"{head.get('jax', '?')}, bf16 matmul {head.get('peak_tflops', 0):.0f} "
                                         "TFLOP/s measured")
        (out / "bench.md").write_text(text)
        print(text)
        return 0

    import jax

    from jaxpeft import compute, methods
    from jaxpeft.bench import step
    from jaxpeft.errors import UserError

    try:
        overrides = {k: getattr(a, k) for k in compute.fields() if hasattr(a, k)}
        spec = compute.resolve(a.compute, overrides, num_devices=len(jax.devices()) if a.mesh else 1)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        specs = [spec]
        if a.variants:
            specs = [spec.replace(**dict(_field_value(kv) for kv in v.split(",") if kv.strip()))
                     for v in a.variants.split(";")]
            platform, _, nvidia = compute.platform_info()
            for sp in specs:
                sp.check_platform(platform, nvidia=nvidia)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = jax.devices()[0]
    peak = a.peak_tflops or (step.matmul_peak_tflops() if dev.platform == "gpu" else 1.0)
    print(f"# {dev.device_kind}: bf16 matmul {peak:.0f} TFLOP/s, compute {spec}", flush=True)
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
              f"b{rec['batch']:<5}"
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
            for batch, sp in [(b, sp) for b in ([] if a.no_ours else batches) for sp in specs]:
                bc = step.BenchConfig(size=size, method=method, batch=batch, seq=a.seq, compute=sp,
                                           steps=a.steps, repeats=a.repeats, peak_tflops=peak,
                                           dropout=a.dropout, mesh=a.mesh)
                try:
                    rec = {"framework": "jaxpeft", **step.run(bc)}
                except Exception as e:  # record and go on (e.g. out of memory)
                    rec = {"framework": "jaxpeft", "size": size, "method": method, "batch": batch,
                           "seq": a.seq, "error": f"{type(e).__name__}: {str(e)[:300]}"}
                emit(rec)
            for mode in [m for m in a.peer.split(",") if m]:
                for batch in peer_batches:
                    emit(peer(size, method, batch, a.seq, mode, a.steps, a.repeats, a.timeout))
            if a.capacity:
                limit = (dev.memory_stats() or {}).get("bytes_limit")
                cap = step.predict_capacity(records, size, method, limit) if limit else None
                if cap:
                    emit(cap)
    text = step.markdown_report(
        records, f"# Benchmark\n\n{dev.device_kind}, bf16 matmul {peak:.0f} TFLOP/s measured, compute "
        f"`{step.variant(spec.to_dict())}`, seq {a.seq}, jax {jax.__version__}, {time.strftime('%Y-%m-%d')}")
    (out / "bench.md").write_text(text)
    print(text)
    print(f"# {time.time() - t0:.0f}s", flush=True)
    return 0
