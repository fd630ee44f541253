#!/usr/bin/env python
"""Where a training run's compilation time goes: XLA's own phases, from a profiler trace.

    python benchmarks/profile_compile.py --out=prof -- --method=bitfit --task=sst2 --data_dir=GLUE

Runs the training command's flags (after ``--``) for a few steps with an empty compilation cache
(``--cache`` keeps one: a second call then shows the warm path), traces the compilation of the
run's programs (``jaxpeft.training.loop.compile_all``) with ``jax.profiler.trace``, and reads the host events
back: the time per XLA phase (HLO passes, autotuning, LLVM, PTX assembly, Triton...) summed over
the threads that compiled, the longest single events, and the split between tracing/lowering in
Python and XLA's compilation. Writes ``OUT/compile_profile.md`` and ``OUT/compile_profile.json``.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path


def host_events(trace_dir: Path) -> list[tuple[str, str, float, float]]:
    """``(thread, name, start_ns, duration_ns)`` of every host event in the trace."""
    from jax.profiler import ProfileData

    out = []
    for pb in sorted(trace_dir.rglob("*.xplane.pb")):
        data = ProfileData.from_file(str(pb))
        for plane in data.planes:
            if not plane.name.startswith("/host"):
                continue
            for line in plane.lines:
                for ev in line.events:
                    out.append((line.name, ev.name, ev.start_ns, ev.duration_ns))
    return out


def summarise(events: list[tuple[str, str, float, float]], top: int = 40) -> dict:
    """Total and count per event name (nested events counted in their own name too), and the
    longest single events."""
    total: dict[str, float] = collections.defaultdict(float)
    count: dict[str, int] = collections.Counter()
    for _, name, _, dur in events:
        key = name.split("#")[0].strip()[:120]
        total[key] += dur / 1e9
        count[key] += 1
    by_total = sorted(total.items(), key=lambda kv: -kv[1])[:top]
    longest = sorted(events, key=lambda e: -e[3])[:top]
    return {"by_name": [{"name": n, "seconds": round(s, 3), "count": count[n]} for n, s in by_total],
            "longest": [{"thread": t, "name": n[:160], "seconds": round(d / 1e9, 3)} for t, n, _, d in longest]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="compile_profile")
    ap.add_argument("--cache", default=None, help="compilation cache folder (default: a new empty one)")
    ap.add_argument("--max_steps", type=int, default=64)
    ap.add_argument("flags", nargs="*", help="the training command's flags (after --)")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    import jax

    from jaxpeft import config
    from jaxpeft.training import loop

    with tempfile.TemporaryDirectory() as tmp:
        cache = a.cache or str(Path(tmp) / "xla")
        cfg = config.parse_args([*a.flags, f"--max_steps={a.max_steps}", f"--output_dir={Path(tmp) / 'run'}",
                                 f"--compilation_cache={cache}", "--no-progress", "--no-plot"])
        if cfg.tasks:
            from jaxpeft.training.multitask import MultiTask as Job
        else:
            from jaxpeft.training.single import SingleTask as Job
        job = Job(cfg, echo=lambda s: None)
        compile_all = loop.compile_all
        window = {}

        def traced(*args, **kwargs):
            options = jax.profiler.ProfileOptions()
            options.python_tracer_level = 0   # XLA's phases only: Python frames would dwarf them
            options.host_tracer_level = 2
            with jax.profiler.trace(str(out / "trace"), profiler_options=options):
                window["t0"] = time.perf_counter()
                result = compile_all(*args, **kwargs)
                window["t1"] = time.perf_counter()
            return result

        loop.compile_all = traced
        try:
            results = loop.run(job)
        finally:
            loop.compile_all = compile_all
    summary = summarise(host_events(out / "trace"))
    summary.update(compile_seconds=results["compile_seconds"], compile_split=results["compile_split"],
                   traced_seconds=round(window["t1"] - window["t0"], 3), flags=a.flags,
                   devices=results["devices"], jax=jax.__version__)
    (out / "compile_profile.json").write_text(json.dumps(summary, indent=1))
    lines = [f"# Compilation profile: {' '.join(a.flags)}", "",
             f"{results['devices']}, jax {jax.__version__}; compile {results['compile_seconds']:.2f} s "
             f"(tracing and lowering {results['compile_split'].get('lower_seconds', 0):.2f} s, "
             f"then waiting for XLA {results['compile_split'].get('xla_wait_seconds', 0):.2f} s)", "",
             "| event (summed over threads) | s | count |", "|---|---:|---:|"]
    lines += [f"| `{e['name']}` | {e['seconds']:.3f} | {e['count']} |" for e in summary["by_name"]]
    lines += ["", "| longest single events | thread | s |", "|---|---|---:|"]
    lines += [f"| `{e['name']}` | {e['thread']} | {e['seconds']:.3f} |" for e in summary["longest"][:20]]
    (out / "compile_profile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
