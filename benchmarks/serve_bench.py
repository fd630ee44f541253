"""``jaxpeft-serve`` against its PyTorch peer (``benchmarks/serve_peer.py``): throughput and latency
with K = 1, 8 and 64 LoRA adapters, and with 64 adapters of three families; a markdown table.

    python benchmarks/serve_bench.py --duration=20 --output=serve_bench.json

What it does:

1. makes the adapters once (``--workdir``): 64 LoRA adapters (r=8 on query/value, SST-2's two
   labels), 21 BitFit and 21 prefix-tuning adapters on the bundled MiniLM, each the fresh init
   moved by its own noise (the numbers do not depend on what the adapters learned);
2. starts ``jaxpeft-serve`` (the JAX engine) with all of them, and the peer, which holds the 64
   LoRA adapters in ONE ``peft.PeftModel`` and mixes them in a batch with ``adapter_names=``.
   Both run the same app and batcher with the same flags (``--max_batch``, one bucket of
   ``--words`` + 2 tokens, ``--max_wait_ms``). They are measured in turn, configuration by
   configuration (an idle server costs nothing), so a change in the machine's other load
   affects both alike: K LoRA adapters on each, then 22 LoRA + 21 BitFit + 21 prefix adapters on
   ``jaxpeft-serve`` (three groups: one device call per group present in a batch);
3. per configuration (``benchmarks/load.py``): the *saturation* throughput, a closed loop of
   ``--concurrency`` clients for ``--saturate`` seconds, then an *open loop* of Poisson arrivals
   at half that rate for ``--duration`` seconds: the throughput answered and the p50/p99 latency.
   Requests go evenly to the K adapters, one sequence each.

The load generator runs on the same machine as the server (on a 2-core CPU it takes a share of
it); ``achieved_rate`` and ``send_lag_ms`` in the JSON say whether it kept its schedule, and the
table shows the machine's 1-minute load average when each measurement began. Before
measuring, the two servers' answers to the same inputs are compared (max difference of the
probabilities), so both compute the same thing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import load  # noqa: E402  (benchmarks/load.py)

FAMILIES = {"lora": ({"lora_r": 8}, 64), "bitfit": ({}, 21), "prefix": ({"num_virtual_tokens": 8, "prefix_projection": False}, 21)}


def make_adapters(root: Path, model_dir: Path, length: int) -> dict[str, list[Path]]:
    """The benchmark's adapters under ``root/<method>/<method>NN`` (made once, reused)."""
    import jax
    import numpy as np

    from jaxpeft import masks, methods
    from jaxpeft.adapters.folder import save_adapter
    from jaxpeft.models import fingerprint
    from jaxpeft.models.heads import head_modules
    from jaxpeft.models.loading import load_model
    from jaxpeft.tasks import glue

    task = glue.task("sst2")
    out: dict[str, list[Path]] = {}
    for method, (options, n) in FAMILIES.items():
        dirs = [root / method / f"{method}{k:02d}" for k in range(n)]
        out[method] = dirs
        if all((d / "adapter_config.json").is_file() for d in dirs):
            continue
        m = methods.create(method, options)
        loaded = load_model(str(model_dir), task.head(), m)
        params = m.init_params(loaded.params, loaded.family, tokenizer=loaded.tokenizer, rng=jax.random.key(0))
        flat = masks.flatten(params)
        own = masks.trainable_paths(m.mask(params, loaded.family, head_modules(loaded.family, task.head())))
        fp = fingerprint.fingerprint(loaded.params, str(model_dir), exclude=m.added, prefix=loaded.family.prefix)
        for k, d in enumerate(dirs):
            rng = np.random.default_rng(k)
            moved = dict(flat)
            for p in own:
                x = np.asarray(flat[p])
                moved[p] = x + 0.5 * rng.standard_normal(x.shape).astype(np.float32) * (x.std() or 1.0)
            save_adapter(d, masks.unflatten(moved, params), m, task, family=loaded.family, model_config=loaded.config,
                         base_model=str(model_dir), fingerprint=fp, max_seq_length=length)
        print(f"made {n} {method} adapters in {root / method}", file=sys.stderr, flush=True)
    return out


def start(cmd: list[str], timeout: float = 900.0) -> tuple[subprocess.Popen, str]:
    """Starts a server command (``--port=0``); returns it and its URL once it listens."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stderr], daemon=True).start()
    t0, seen = time.monotonic(), []
    while time.monotonic() - t0 < timeout:
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        m = re.search(r" on (http://\S+)", line)
        if m:
            print(f"  started in {time.monotonic() - t0:.0f} s: {line.strip()}", file=sys.stderr, flush=True)
            return proc, m.group(1)
    proc.kill()
    raise SystemExit("error: the server did not start:\n" + "".join(seen[-20:]))


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def probe(url: str, adapters: list[str], words: int) -> dict[str, Any]:
    """The answers of a few adapters to a few fixed inputs."""
    import random

    rng = random.Random(7)
    texts = [load.make_input("sequence", n, rng) for n in (5, 20, words)]
    with httpx.Client(base_url=url, timeout=120) as client:
        return {a: client.post("/v1/predict", json={"adapter": a, "inputs": texts}).raise_for_status().json()["outputs"]
                for a in adapters}


def measure(url: str, adapters: list[str], args: argparse.Namespace) -> dict[str, Any]:
    sat = asyncio.run(load.run_closed(url, concurrency=args.concurrency, duration=args.saturate, adapters=adapters,
                                      words=args.words))
    rate = max(0.5, 0.5 * sat["throughput"])
    run = asyncio.run(load.run_load(url, rate=rate, duration=args.duration, adapters=adapters, words=args.words,
                                    max_in_flight=args.concurrency * 8, timeout=120))
    print(f"  K={len(adapters)}: saturation {sat['throughput']:.1f}/s; at {rate:.1f}/s: {run['throughput']:.1f}/s, "
          f"p50 {run['latency_ms']['p50']:.0f} ms, p99 {run['latency_ms']['p99']:.0f} ms, errors {run['errors']}",
          file=sys.stderr, flush=True)
    return {"saturation": sat, "open_loop": run}


def serve_flags(args: argparse.Namespace, model_dir: Path) -> list[str]:
    return [f"--model={model_dir}", "--port=0", "--log_level=warning", f"--max_batch={args.max_batch}",
            f"--buckets={args.words + 2}", f"--max_wait_ms={args.max_wait_ms}", "--max_queue_rows=4096"]


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| server | adapters | saturation (seq/s) | offered (req/s) | throughput (seq/s) | p50 (ms) | p99 (ms) "
             "| errors | load avg |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        sat, run = r["saturation"], r["open_loop"]
        lines.append(f"| {r['server']} | {r['config']} | {sat['throughput']:.1f} | {run['achieved_rate']:.1f} | "
                     f"{run['throughput']:.1f} | {run['latency_ms']['p50']:.0f} | {run['latency_ms']['p99']:.0f} | "
                     f"{sum(run['errors'].values()) + sum(sat['errors'].values())} | "
                     f"{r['loadavg_1min'][0]:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "jaxpeft-serve-bench"))
    p.add_argument("--model", help="the base model (default: the bundled MiniLM)")
    p.add_argument("--ks", default="1,8,64", help="numbers of LoRA adapters to spread the load over")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of open-loop arrivals per configuration")
    p.add_argument("--saturate", type=float, default=10.0, help="seconds of the closed loop finding saturation")
    p.add_argument("--concurrency", type=int, default=32, help="clients of the closed loop")
    p.add_argument("--words", type=int, default=62, help="words per input (one token each: --words + 2 tokens)")
    p.add_argument("--max_batch", type=int, default=16)
    p.add_argument("--max_wait_ms", type=float, default=5.0)
    p.add_argument("--servers", default="jaxpeft,peer", help="which servers to measure")
    p.add_argument("--compute", default="auto", help="jaxpeft-serve's --compute (auto: exact on a CPU)")
    p.add_argument("--output", help="write every measurement here as JSON")
    args = p.parse_args(argv)
    from jaxpeft.models.hf_weights import bundled_model_dir, resolve_model_dir

    model_dir = resolve_model_dir(args.model) if args.model else bundled_model_dir()
    root = Path(args.workdir)
    dirs = make_adapters(root, model_dir, args.words + 2)
    lora = [d.name for d in dirs["lora"]]
    ks = [int(k) for k in args.ks.split(",")]
    mixed = lora[:22] + [d.name for d in dirs["bitfit"]] + [d.name for d in dirs["prefix"]]
    results, answers = [], {}
    servers = args.servers.split(",")
    commands = {
        "jaxpeft": [sys.executable, "-m", "jaxpeft.serving", f"--adapters_dir={root / 'lora'}",
                    *[f"--adapter={d.name}={d}" for fam in ("bitfit", "prefix") for d in dirs[fam]],
                    "--max_adapters_per_family=64", f"--compute={args.compute}", *serve_flags(args, model_dir)],
        "peer": [sys.executable, str(REPO / "benchmarks" / "serve_peer.py"), f"--adapters_dir={root / 'lora'}",
                 *serve_flags(args, model_dir)],
    }
    shown = {"jaxpeft": "jaxpeft-serve", "peer": "transformers + peft"}
    procs: dict[str, tuple[subprocess.Popen, str]] = {}
    try:
        for server in servers:    # both up at once (an idle one costs nothing), measured in turn
            print(f"starting {server}", file=sys.stderr, flush=True)
            procs[server] = start(commands[server])
            answers[server] = probe(procs[server][1], lora[:2], args.words)
            asyncio.run(load.run_closed(procs[server][1], concurrency=args.concurrency, duration=3,
                                        adapters=lora[:8], words=args.words))
        configs = [(f"{k} LoRA", lora[:k], servers) for k in ks]
        if "jaxpeft" in servers:
            configs.append(("64 mixed: 22 LoRA + 21 BitFit + 21 prefix", mixed, ["jaxpeft"]))
        for name, adapters, which in configs:
            for server in which:
                print(f"{shown[server]}, {name}:", file=sys.stderr, flush=True)
                load_before = os.getloadavg()[0]
                got = measure(procs[server][1], adapters, args)
                results.append({"server": shown[server], "config": name, "loadavg_1min": [load_before, os.getloadavg()[0]],
                                **got})
    finally:
        for proc, _ in procs.values():
            stop(proc)
    if len(answers) == 2:
        a, b = answers.values()
        diff = max(abs(x["scores"][k] - y["scores"][k]) for n in a for x, y in zip(a[n], b[n]) for k in x["scores"])
        same = all(x["label"] == y["label"] for n in a for x, y in zip(a[n], b[n]))
        print(f"the two servers' answers: same labels {same}, max |p difference| {diff:.2e}", file=sys.stderr)
    text = table(results)
    print(text)
    if args.output:
        Path(args.output).write_text(json.dumps({"results": results, "answers": answers, "args": vars(args)},
                                                indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
