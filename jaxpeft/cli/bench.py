"""``jaxpeft-bench``: train-step benchmark of every method, with the PyTorch + peft peer in the same run.

    jaxpeft-bench --sizes=base --methods=full,bitfit --batches=64,256 --out=bench/
    jaxpeft-bench --sizes=base --peer=eager,compile --out=bench/          # needs torch, transformers, peft
    jaxpeft-bench --compute=exact --methods=bitfit --out=bench-exact/    # another compute spec
    jaxpeft-bench --memory_table --sizes=base,large,1.3b,3.5b,10.7b --out=memory/   # memory against size
    jaxpeft-bench --families=bert,roberta,modernbert --methods=full,lora --peer=compile --out=bench/  # families

Writes OUT/bench.jsonl (one record per configuration and framework, appended as they finish)
and OUT/bench.md (speed and memory tables). Our configurations run in this process (memory is
XLA's analysis of the compiled step); the peer runs in a child process per configuration. The
compute spec comes from the same flags as training: ``--compute=auto|exact|fast`` plus per-field
overrides (``--attention_impl=cudnn``). For the whole job users run, see ``benchmarks/job.py``.

``--families`` (default ``bert``) runs other encoder families too: ``bert`` at the ``--sizes``, every
other family (roberta, xlm-roberta, electra, distilbert, mpnet, deberta-v2, modernbert) with random
weights of its base checkpoint's shapes (``--family_size=tiny`` for tests), our encoder and the
peer's built from one transformers config (:func:`jaxpeft.bench.step.family_config`). A method a
family refuses (BitFit on ModernBERT, which has no biases) is recorded as skipped with the family's
reason, the peer's rows with it.

``--memory_table`` measures memory instead (:mod:`jaxpeft.bench.memory`): every size x method x
``--base_dtypes`` x ``--remats`` at ``--memory_batch`` rows of ``--seq`` tokens, each in its own process,
with the largest batch that fits and, with ``--peer=eager``, the PyTorch peer's peak. It writes
OUT/memory.jsonl (appended; configurations already there are skipped, so a stopped run continues),
OUT/bench.md, OUT/memory.png and OUT/memory_table.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path



def peer(size, method, batch, seq, mode, steps, repeats, timeout, family="bert") -> dict:
    base = {"framework": "torch", "mode": mode, "family": family, "size": size, "method": method, "batch": batch,
            "seq": seq}
    cmd = [sys.executable, "-m", "jaxpeft.bench.peer", f"--size={size}", f"--method={method}", f"--batch={batch}",
           f"--seq={seq}", f"--mode={mode}", f"--steps={steps}", f"--repeats={repeats}", f"--family={family}"]
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
    ap.add_argument("--sizes", default=None, help="comma list of jaxpeft.models.sizes: tiny, minilm, base, large, "
                    "1.3b, 3.5b, 10.7b (default: base; with --memory_table base to 10.7b); BERT's")
    ap.add_argument("--families", default="bert",
                    help="comma list of encoder families: bert (at --sizes), roberta, xlm-roberta, electra, "
                         "distilbert, mpnet, deberta-v2, modernbert (each at --family_size)")
    ap.add_argument("--family_size", default="base", choices=("base", "tiny"),
                    help="the shapes of the families but bert: base (each base checkpoint's) or tiny (tests)")
    ap.add_argument("--methods", default=None, help="comma list (default: full,frozen,bitfit,prompt,ptuning,prefix,"
                    "ptuning_v2,lora,ia3,bottleneck; with --memory_table full,frozen,bitfit,lora,ia3,prompt,prefix,bottleneck)")
    ap.add_argument("--batches", default="64,256")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--compute", default="auto", choices=compute.PRESETS)
    options.add_flags(ap.add_argument_group("compute (each overrides the --compute preset)"), compute.Compute)
    ap.add_argument("--variants", default="",
                    help="';'-separated variants of the compute spec, each a comma list of FIELD=VALUE "
                         "overrides (an empty one: the spec itself), e.g. ';norm_impl=xla;attention_impl=cudnn'")
    ap.add_argument("--dropout", type=float, default=None,
                    help="override the encoder's dropout (each family's own by default; BERT's 0.1)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--peer", default="", help="comma list of peer modes: eager,compile")
    ap.add_argument("--peer_batches", default=None, help="batches for the peer (default: --batches)")
    ap.add_argument("--capacity", action="store_true", help="predict the largest batch per method")
    ap.add_argument("--peak_tflops", type=float, default=0.0, help="0: measure a bf16 matmul here")
    ap.add_argument("--timeout", type=int, default=None, help="seconds per configuration run in a child process "
                    "(default: 600 per peer configuration; 3600 with --memory_table)")
    g = ap.add_argument_group("the memory table (--memory_table)")
    g.add_argument("--memory_table", action="store_true", help="measure memory by size, method, base dtype and remat")
    g.add_argument("--base_dtypes", default="bfloat16,int8,nf4", help="frozen base dtypes (--base_dtype of a run)")
    g.add_argument("--remats", default="none,layer", help="comma list of --remat values: none, layer, dots, auto")
    g.add_argument("--memory_batch", type=int, default=8, help="the fixed batch (rows of --seq tokens)")
    g.add_argument("--max_batch", default="affine", choices=("affine", "search", "none"),
                   help="how the largest batch that fits is found from compiled steps' memory analyses")
    g.add_argument("--memory_limit_gib", type=float, default=None,
                   help="the device memory to plan for (default: what the device reports)")
    ap.add_argument("--mesh", default=None, help="run ours on a device mesh, e.g. data:2 (global batches)")
    ap.add_argument("--no_ours", action="store_true", help="only the peer")
    ap.add_argument("--report", nargs="+", default=None, help="only build OUT/bench.md from these jsonl files")
    ap.add_argument("--out", default="bench")
    return ap


def memory_table(a, spec) -> int:
    """``--memory_table``: every configuration in a child process, then the report."""
    import jax

    from jaxpeft.bench import memory
    from jaxpeft.errors import UserError
    from jaxpeft.models import sizes

    size_list = (a.sizes or ",".join(memory.TABLE_SIZES)).split(",")
    dtypes, remats = a.base_dtypes.split(","), a.remats.split(",")
    meths = (a.methods or ",".join(memory.METHODS)).split(",")
    for s in size_list:
        sizes.size_of(s)
    from jaxpeft import methods

    for what, given, known in (("--base_dtypes", dtypes, memory.BASE_DTYPES + ("float32",)),
                               ("--remats", remats, ("none", "layer", "dots", "auto")),
                               ("--methods", meths, tuple(methods.REGISTRY))):
        bad = [x for x in given if x not in known]
        if bad:
            raise UserError(f"{what}: unknown {bad[0]!r}; choose from {', '.join(known)}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "memory.jsonl"
    records = [json.loads(x) for x in jsonl.read_text().splitlines() if x.strip()] if jsonl.exists() else []
    done = {(r.get("framework", "")[:5], r.get("mode"), memory.key_of(r)) for r in records if "error" not in r}
    limit = int(a.memory_limit_gib * 2 ** 30) if a.memory_limit_gib else None
    timeout = a.timeout or 3600
    dev = jax.devices()[0]
    print(f"# {dev.device_kind}: memory table, compute {spec}", flush=True)
    with open(jsonl, "a") as f:
        def emit(rec):
            records.append(rec)
            f.write(json.dumps(rec, default=str) + "\n")
            f.flush()
            gib = lambda x: "—" if x is None else f"{x / 2 ** 30:.2f}"   # noqa: E731
            state = (rec.get("skipped") or rec.get("error") or rec.get("oom") or
                     ("does not fit" if rec.get("fits") is False else f"{rec.get('seq_per_s') or 0:,.0f} seq/s"))
            print(f"{rec.get('framework', '')[:7]:>7} {rec['size']:>6} {rec['method']:>10} {rec['base_dtype']:>8} "
                  f"remat={rec['remat']:<5} step {gib(rec.get('step_bytes'))} GiB peak {gib(rec.get('peak_bytes'))} "
                  f"GiB largest batch {rec.get('max_batch', '—')}: {str(state)[:160]}", flush=True)

        for size in size_list:
            for method in meths:
                for dtype in dtypes:
                    for remat in remats:
                        mc = memory.MemoryConfig(size, method, dtype, remat, a.memory_batch, a.seq, spec.to_dict(),
                                                 a.max_batch, limit, a.steps, a.repeats, a.mesh)
                        if ("jaxpe", None, mc.key()) not in done:
                            emit(memory.run_child(mc, timeout))
                        for mode in [m for m in a.peer.split(",") if m]:
                            if ("torch", mode, mc.key()) not in done:
                                emit(memory.run_peer(mc, timeout, mode))
    memory.report(records, out, f"# Memory table\n\n{dev.device_kind}, jax {jax.__version__}, compute "
                                 f"`{spec}`, batch {a.memory_batch} x seq {a.seq}, {time.strftime('%Y-%m-%d')}")
    print(f"# wrote {out / 'bench.md'}, {out / 'memory.png'}, {out / 'memory_table.json'}", flush=True)
    return 0


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    if a.report and a.memory_table:
        from jaxpeft.bench import memory

        recs = [json.loads(x) for f in a.report for x in Path(f).read_text().splitlines() if x.strip()]
        print(memory.report(recs, Path(a.out), "# Memory table"))
        return 0
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
    if a.memory_table:
        if a.families != "bert":
            print("error: --memory_table measures BERT's sizes (--sizes); --families is for the step benchmark",
                  file=sys.stderr)
            return 2
        try:
            return memory_table(a, spec)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    a.sizes, a.timeout = a.sizes or "base", a.timeout or 600
    a.methods = a.methods or "full,frozen,bitfit,prompt,ptuning,prefix,ptuning_v2,lora,ia3,bottleneck"
    families = [f.strip() for f in a.families.split(",") if f.strip()]
    wanted = [methods.ALIASES.get(m, m) for m in a.methods.split(",") if m]
    bad = [m for m in wanted if m not in methods.REGISTRY]
    if bad or not wanted:
        print(f"error: --methods: unknown method {bad[0] if bad else a.methods!r}; known methods: "
              f"{', '.join(methods.REGISTRY)}", file=sys.stderr)
        return 2
    unknown = [f for f in families if f not in step.FAMILY_NAMES]
    if unknown or not families:
        print(f"error: --families: unknown family {unknown[0] if unknown else a.families!r}; the families: "
              f"{', '.join(step.FAMILY_NAMES)}", file=sys.stderr)
        return 2
    # (family, size) of every configuration: BERT at --sizes, the others at --family_size
    shapes = [(f, s) for f in families for s in (a.sizes.split(",") if f == "bert" else [a.family_size])]
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
    meths = wanted
    batches = [int(b) for b in a.batches.split(",")]
    peer_batches = [int(b) for b in (a.peer_batches or a.batches).split(",")]
    records: list[dict] = []
    jsonl = open(out / "bench.jsonl", "a")

    def emit(rec):
        records.append(rec)
        jsonl.write(json.dumps(rec) + "\n")
        jsonl.flush()
        who = f"{rec.get('framework', '')[:7]:>7} {rec.get('mode', ''):>7} {rec.get('family', 'bert'):>11} " \
              f"{rec['size']:>6} {rec['method']:>10} b{rec['batch']:<5}"
        if "error" in rec:
            print(f"{who} ERROR {rec['error'][:200]}", flush=True)
        elif "skipped" in rec:
            print(f"{who} SKIPPED {rec['skipped'][:200]}", flush=True)
        elif rec.get("capacity"):
            print(f"{who} largest batch ~{rec['max_batch']:,}", flush=True)
        else:
            mem = rec.get("step_bytes") or rec.get("peak_bytes") or 0
            print(f"{who} {rec['seq_per_s']:>9,.0f} seq/s {rec['step_ms']:7.2f} ms {mem / 2**30:6.2f} GiB"
                  + (f" mfu {100 * rec['mfu']:4.1f}% compile {rec['compile_s']:.0f}s" if "mfu" in rec else ""),
                  flush=True)

    t0 = time.time()
    for family, size in shapes:
        for method in meths:
            refused = []   # the reasons our step was not run (the family refuses the method)
            ran = False
            for batch, sp in [(b, sp) for b in ([] if a.no_ours else batches) for sp in specs]:
                bc = step.BenchConfig(size=size, method=method, batch=batch, seq=a.seq, compute=sp,
                                      steps=a.steps, repeats=a.repeats, peak_tflops=peak,
                                      dropout=a.dropout, mesh=a.mesh, family=family)
                base = {"framework": "jaxpeft", "family": family, "size": size, "method": method, "batch": batch,
                        "seq": a.seq}
                try:
                    rec = {"framework": "jaxpeft", **step.run(bc)}
                    ran = True
                except UserError as e:  # what the family (or the compute spec, the mesh) cannot run: one line
                    refused.append(str(e))
                    rec = {**base, "skipped": str(e)}
                except Exception as e:  # record and go on (e.g. out of memory)
                    ran = True
                    rec = {**base, "error": f"{type(e).__name__}: {str(e)[:300]}"}
                emit(rec)
            for mode in [m for m in a.peer.split(",") if m]:
                for batch in peer_batches:
                    if refused and not ran:   # not the same method on the peer's side either
                        emit({"framework": "torch", "mode": mode, "family": family, "size": size, "method": method,
                              "batch": batch, "seq": a.seq, "skipped": refused[0]})
                    else:
                        emit(peer(size, method, batch, a.seq, mode, a.steps, a.repeats, a.timeout, family))
            if a.capacity:
                limit = (dev.memory_stats() or {}).get("bytes_limit")
                cap = step.predict_capacity(records, size, method, limit, family=family) if limit else None
                if cap:
                    emit(cap)
    text = step.markdown_report(
        records, f"# Benchmark\n\n{dev.device_kind}, bf16 matmul {peak:.0f} TFLOP/s measured, compute "
        f"`{step.variant(spec.to_dict())}`, seq {a.seq}, jax {jax.__version__}, {time.strftime('%Y-%m-%d')}")
    (out / "bench.md").write_text(text)
    print(text)
    print(f"# {time.time() - t0:.0f}s", flush=True)
    return 0
