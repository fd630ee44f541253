#!/usr/bin/env python
"""The job benchmark: the real training command, timed end to end, against the PyTorch peer's loop.

Runs ``scripts/train.py`` (what ``jaxpeft-train`` runs) for a method and task in a child process,
first with an empty compilation cache and data cache (``cold``), then again with both filled
(``warm``), and reads the time split from each run's own ``results.json`` (start-up, data,
compilation, train steps, evaluation, checkpoints, adapter export, wall). Then, in the same run,
the peer (``benchmarks/peft_job.py``: transformers + peft, eager and ``torch.compile``) does the
same work: the same data, batch, learning rate and schedule, epochs and an evaluation every
epoch. Prints and writes (``OUT/job.md``, ``OUT/job.json``) the split, examples/s, real tokens/s,
the dev metric, the time to reach ``--target`` and the ratios. Run from the repository root:

    python -m benchmarks.job --method=bitfit --task=sst2 --data_dir=GLUE --out=job/
    python -m benchmarks.job --method=bitfit --task=sst2 --data_dir=GLUE --peer=eager,compile --out=job/ \\
        -- --packing          # flags after -- go to our training command only
    python -m benchmarks.job --method=lora --task=ner --data_dir=../shared/data/conll2003 --peer=eager
    python -m benchmarks.job --method=lora --task=squad --data_dir=../shared/data/squad --peer=eager

Token and span tasks (``pos``, ``ner``, ``squad``, your own tagging/QA files) time the same way; the
metric is the task's main one (entity F1, token accuracy, SQuAD F1). A method the peer cannot run on
a task (``benchmarks/peft_job.py`` lists them) shows as a failed peer row with its ``error:`` line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

SPLIT = ("startup", "data", "compile", "train", "eval", "checkpoint", "export")


def time_to(evals: list[dict], metric: str, target: float | None) -> float | None:
    """Wall seconds at the first evaluation whose ``metric`` reaches ``target``."""
    if target is None:
        return None
    for e in evals:
        if e.get(metric, float("-inf")) >= target:
            return e["wall_seconds"]
    return None


def run_ours(a, extra: list[str], out: Path, xla_cache: Path, data_cache: Path, label: str) -> dict:
    run_dir = out / f"ours-{label}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, str(REPO / "scripts" / "train.py"), f"--method={a.method}", f"--task={a.task}",
           f"--data_dir={a.data_dir}", f"--output_dir={run_dir}", "--no-progress",
           f"--compilation_cache={xla_cache}"] + ([f"--model={a.model}"] if a.model else []) + extra
    env = dict(os.environ, JAXPEFT_DATA_CACHE=str(data_cache))
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=a.timeout)
    outer = time.perf_counter() - t0
    if p.returncode != 0:
        return {"who": f"jaxpeft {label}", "error": (p.stderr or p.stdout)[-1500:]}
    r = json.loads((run_dir / "results.json").read_text())
    evals = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e.get("event") == "eval"]
    return {"who": f"jaxpeft {label}", "process_seconds": outer, "evals": evals, **r}


def run_peer(a, mode: str, cfg, out: Path) -> dict:
    from benchmarks.peft_job import peer_args

    flags = [f for f in peer_args(cfg) if not f.startswith("--num_epochs=")]
    cmd = [sys.executable, str(REPO / "benchmarks" / "peft_job.py"), *flags, f"--data_dir={a.data_dir}",
           f"--num_epochs={a.peer_epochs or cfg.optim.num_epochs}", f"--mode={mode}"] + \
        ([f"--model={a.model}"] if a.model else [])
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
    outer = time.perf_counter() - t0
    (out / f"peer-{mode}.log").write_text(p.stdout + p.stderr)
    for line in p.stdout.splitlines():
        if line.startswith("{"):
            return {"who": f"peft {mode}", "process_seconds": outer, **json.loads(line)}
    return {"who": f"peft {mode}", "error": (p.stderr or p.stdout)[-1500:]}


def table(rows: list[dict], metric: str, target: float | None, scale: float = 100.0) -> str:
    """The rows as markdown; the dev metric times ``scale`` (1 for SQuAD's EM/F1, already percent)."""
    head = ("| run | wall s | " + " | ".join(f"{s} s" for s in SPLIT)
            + f" | examples/s | real tokens/s | dev {metric} | to {target} s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['who']} | failed: {r['error'].splitlines()[-1][:120]} |")
            continue
        dev = (r.get("final_dev") or {}).get(metric)
        t = time_to(r.get("evals") or [], metric, target)
        cells = [f"{r[f'{s}_seconds']:.1f}" if f"{s}_seconds" in r else "—" for s in SPLIT]
        tok = f"{r['tokens_per_second']:,.0f}" if r.get("tokens_per_second") else "—"
        lines.append(f"| {r['who']} | {r['wall_seconds']:.1f} | " + " | ".join(cells)
                     + f" | {r['examples_per_second']:,.0f} | {tok} | {scale * dev:.2f} | "
                     + (f"{t:.1f}" if t is not None else "—") + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="bitfit")
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--data_dir", required=True)
    ap.add_argument("--model", default=None)
    ap.add_argument("--peer", default="eager,compile", help="comma list of peer modes (empty: none)")
    ap.add_argument("--peer_epochs", type=float, default=None,
                    help="epochs of the peer's run (default: ours); fewer gives its speed, not its wall time")
    ap.add_argument("--runs", default="cold,warm", help="ours: cold (empty caches), warm (filled caches)")
    ap.add_argument("--target", type=float, default=None, help="dev metric to time (e.g. 0.85)")
    ap.add_argument("--timeout", type=int, default=3600)
    ap.add_argument("--out", default="job")
    ap.add_argument("extra", nargs="*", help="flags for our training command (after --)")
    a = ap.parse_args()
    from jaxpeft import config, tasks

    # our settings, defaults and flags as the training command reads them: the peer gets the same
    cfg = config.parse_args([f"--method={a.method}", f"--task={a.task}", f"--data_dir={a.data_dir}", *a.extra])
    task = tasks.get(cfg.task, cfg.data, cfg.optim.seed)     # GLUE's, pos/ner/squad, your own files
    metric, scale = task.main_metric, 1.0 if task.kind == "span" else 100.0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as caches:
        xla, dat = Path(caches) / "xla", Path(caches) / "data"
        for label in [r for r in a.runs.split(",") if r]:
            if label == "cold":
                shutil.rmtree(xla, ignore_errors=True)
                shutil.rmtree(dat, ignore_errors=True)
            rows.append(run_ours(a, list(a.extra), out, xla, dat, label))
            print(table(rows[-1:], metric, a.target, scale).splitlines()[-1], flush=True)
    for mode in [m for m in a.peer.split(",") if m]:
        rows.append(run_peer(a, mode, cfg, out))
        print(table(rows[-1:], metric, a.target, scale).splitlines()[-1], flush=True)
    text = [f"# Job: {a.method} on {a.task}", "",
            f"{time.strftime('%Y-%m-%d')}, our flags: {' '.join(a.extra) or '(defaults)'}; the peer: lr "
            f"{cfg.optim.learning_rate}, batch {cfg.optim.batch_size}, {a.peer_epochs or cfg.optim.num_epochs:g} epochs, "
            f"length {cfg.data.max_seq_length}", "", table(rows, metric, a.target, scale), ""]
    ok = [r for r in rows if "error" not in r]
    ours = [r for r in ok if r["who"].startswith("jaxpeft")]
    peers = [r for r in ok if r["who"].startswith("peft")]
    same_work = not a.peer_epochs or a.peer_epochs == cfg.optim.num_epochs
    for o in ours:
        for p in peers:
            wall = f"{p['wall_seconds'] / o['wall_seconds']:.2f}x wall, " if same_work else ""
            text.append(f"- {o['who']} vs {p['who']}: {wall}"
                        f"{o['examples_per_second'] / p['examples_per_second']:.2f}x examples/s in the loop")
    (out / "job.md").write_text("\n".join(text) + "\n")
    (out / "job.json").write_text(json.dumps(rows, indent=1, default=str))
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
