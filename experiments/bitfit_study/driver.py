"""Runs the runs of a study's :class:`~experiments.bitfit_study.study.Plan`, several processes at a
time on one device; resumable.

A task and setting's grid runs (its learning rates) run one after the other in one worker process,
and so do its other seeds once its learning rate is chosen: they share their compiled programs
(``jaxpeft.training.loop``'s program cache), so a group compiles once instead of once per run. Groups start
longest first. Every run's folder gets its ``spec.json`` (the run and its settings by flag name)
before it starts; the worker builds the run's ``jaxpeft.config.TrainConfig`` from it and trains it
(``jaxpeft.training.single.run``); its output goes to the run's ``output.log`` (the process's own to
``<task>/<setting>/worker.log``). The driver's own record is ``<out>/driver.jsonl``: when the study
started and ended, each learning rate chosen, and each run's wall time (the whole process, and the
run's ``wall_seconds`` from ``results.json``), metric and speed. The workers import
``experiments.bitfit_study`` as the driver does: run it from the repository root
(``python -m experiments.bitfit_study.run``).
"""

from __future__ import annotations

import heapq
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from experiments.bitfit_study.study import RESULTS, SPEC, Plan, Run, choose_lr, main_metric, read_results
from jaxpeft import config as config_lib

#: The repository root.
ROOT = Path(__file__).resolve().parents[2]


def worker_env(jobs: int, compile_cache: str | None) -> dict[str, str]:
    """Environment of a run: JAX takes GPU memory as needed (no preallocation) and at most its share
    of the device, so ``jobs`` runs share one GPU; compiled programs go to the persistent cache
    ``compile_cache`` (None: no cache), which the runs share."""
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{min(0.9, 0.9 / max(jobs, 1)):.3f}")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env["JAXPEFT_COMPILATION_CACHE"] = str(Path(compile_cache).resolve()) if compile_cache else "off"
    return env


_WORKER = ("import sys; from jaxpeft import cli; from experiments.bitfit_study import driver; "
           "sys.exit(cli.guarded(lambda: driver.run_many(sys.argv[1:])))")


def run_one(folder: str | Path) -> int:
    """Trains the run described by ``folder/spec.json`` (its output dir is ``folder``); the run
    exports the adapter to ``folder/adapter`` where one is due. No checkpoints are kept: an
    unfinished run is run again from the start."""
    from jaxpeft.training import single

    folder = Path(folder)
    spec = json.loads((folder / SPEC).read_text())
    cfg = config_lib.from_flat({**spec["config"], "export_adapter": bool(spec.get("save_adapter")),
                                "keep": 0})
    single.run(cfg)
    return 0


def stop(processes) -> None:
    """Terminates ``processes`` and waits for them (an interrupted driver leaves none behind)."""
    for p in processes:
        p.terminate()
    for p in processes:
        p.wait()


def run_many(folders: list[str]) -> int:
    """:func:`run_one` for each folder in turn, in this process, so that runs with the same programs
    (a group's learning rates and seeds) compile them once (``jaxpeft.training.loop``'s program cache).
    Each run's output goes to its ``output.log``; a failed run is recorded there and the next one
    still runs. Returns 1 if any run failed."""
    import contextlib
    import traceback

    failed = 0
    for folder in folders:
        with open(Path(folder) / "output.log", "a") as log, contextlib.redirect_stdout(log), \
                contextlib.redirect_stderr(log):
            try:
                run_one(folder)
            except BaseException as e:  # noqa: BLE001 -- recorded; the next run goes on
                if isinstance(e, KeyboardInterrupt):
                    raise
                failed = 1
                print(f"error: {e}" if e.__class__.__name__ == "UserError" else traceback.format_exc())
    return failed


def execute(plan: Plan, jobs: int = 1, compile_cache: str | None = None,
            echo: Callable[[str], None] = print, poll_s: float = 0.2) -> dict[str, Any]:
    """Runs every unfinished run of ``plan``, ``jobs`` at a time; returns a summary."""
    plan.check_not_stale()
    plan.out.mkdir(parents=True, exist_ok=True)
    env = worker_env(jobs, compile_cache)
    queue: list[tuple[float, str, tuple[Run, ...]]] = []
    waiting = {g: set(plan.grid_runs(g)) for g in plan.groups()}
    done, failed, skipped, blocked = [], [], [], []
    log = open(plan.out / "driver.jsonl", "a")

    def note(**rec):
        log.write(json.dumps(rec) + "\n")
        log.flush()

    def push(runs: list[Run]):
        """Queues ``runs`` (one group's) to run one after the other in one process."""
        todo_runs = []
        for run in runs:
            if plan.is_complete(run):
                skipped.append(run)
                finished(run)
            else:
                todo_runs.append(run)
        if todo_runs:
            heapq.heappush(queue, (-sum(map(plan.cost, todo_runs)), todo_runs[0].rel, tuple(todo_runs)))

    def finished(run: Run):
        g = run.group
        if g in waiting and run in waiting[g]:
            waiting[g].discard(run)
            if not waiting[g]:
                del waiting[g]
                lr = choose_lr(plan.grid_metrics(g))
                echo(f"{g[0]}/{g[1]}: learning rate {lr:g} chosen on dev (seed {plan.study.selection_seed})")
                note(event="chosen", task=g[0], setting=g[1], learning_rate=lr)
                push(plan.seed_runs(g, lr))

    all_runs = plan.all_runs()
    todo = sum(1 for r in all_runs if not plan.is_complete(r))
    echo(f"study: {len(all_runs)} runs in {plan.out} ({todo} to run), {jobs} processes at a time")
    note(event="start", time=time.time(), jobs=jobs, runs=len(all_runs), to_run=todo)
    for g in plan.groups():
        lr = plan.known_lr(g)
        if lr is None:
            push(plan.grid_runs(g))
        else:  # one rate: its seeds go in the same process (one compilation)
            del waiting[g]
            push(plan.grid_runs(g) + plan.seed_runs(g, lr))
    running: dict[subprocess.Popen, tuple[tuple[Run, ...], float]] = {}
    t0 = time.perf_counter()
    try:
        while queue or running:
            while queue and len(running) < jobs:
                _, _, batch = heapq.heappop(queue)
                for run in batch:
                    d = plan.folder(run)
                    if d.exists():
                        shutil.rmtree(d)  # an unfinished earlier attempt
                    d.mkdir(parents=True)
                    (d / SPEC).write_text(json.dumps(plan.spec(run), indent=2) + "\n")
                with open(plan.folder(batch[0]).parent / "worker.log", "a") as wlog:
                    p = subprocess.Popen([sys.executable, "-c", _WORKER,
                                          *[str(plan.folder(r)) for r in batch]],
                                         stdout=wlog, stderr=subprocess.STDOUT, env=env)
                running[p] = (batch, time.perf_counter())
            time.sleep(poll_s)
            for p in [p for p in running if p.poll() is not None]:
                batch, start = running.pop(p)
                secs = time.perf_counter() - start
                for run in batch:
                    if plan.is_complete(run):
                        res = read_results(plan.folder(run) / RESULTS)
                        done.append(run)
                        echo(f"[{len(done) + len(failed)}/{todo}] {run.rel}: {res['main_metric']}="
                             f"{main_metric(res):.4f} ({res.get('wall_seconds', 0):.0f}s)")
                        note(event="done", run=run.rel, seconds=res.get("wall_seconds"), metric=main_metric(res),
                             process_seconds=secs, process_runs=len(batch),
                             wall_seconds=res.get("wall_seconds"), compile_seconds=res.get("compile_seconds"),
                             train_seconds=res["train_seconds"], examples_per_second=res["examples_per_second"])
                        finished(run)
                    else:
                        failed.append(run)
                        output = plan.folder(run) / "output.log"
                        tail = output.read_text().strip().splitlines()[-1:] if output.is_file() else []
                        echo(f"[{len(done) + len(failed)}/{todo}] {run.rel}: FAILED (exit {p.returncode}): "
                             f"{tail[0] if tail else ''} -- see {output}")
                        note(event="failed", run=run.rel, seconds=secs, returncode=p.returncode)
                        if run.group in waiting:
                            blocked.append(run.group)
                            del waiting[run.group]
    except KeyboardInterrupt:
        stop(running)
        raise
    finally:
        wall = time.perf_counter() - t0
        note(event="end", wall_seconds=wall, done=len(done), failed=len(failed))
        log.close()
    echo(f"study: {len(done)} run(s) done, {len(skipped)} already there, {len(failed)} failed "
         f"in {wall:.0f}s" + (f"; seeds not run for {', '.join('/'.join(g) for g in blocked)}"
                              if blocked else ""))
    return {"done": done, "skipped": skipped, "failed": failed, "blocked": blocked, "wall_seconds": wall}


# ----------------------------------------------------------------------------- the PyTorch peer

PEER_SCRIPT = ROOT / "benchmarks" / "peft_job.py"


def peer_file(plan: Plan, run: Run) -> Path:
    """Where the peer's result for ``run``'s config goes: ``<task>/<setting>/peer-lr<lr>-seed<seed>.json``."""
    return plan.out / run.task / run.setting / f"peer-lr{run.learning_rate:g}-seed{run.seed}.json"


def peer_runs(plan: Plan, seeds: tuple[int, ...] | None = None) -> list[Run]:
    """The runs the peer repeats: every group whose grid is done (or has only one rate), at its
    chosen learning rate, for ``seeds`` (default: the selection seed), costliest first."""
    out = []
    for g in plan.groups():
        lr = plan.known_lr(g)
        if lr is None:
            if not all(map(plan.is_complete, plan.grid_runs(g))):
                continue
            lr = choose_lr(plan.grid_metrics(g))
        out += [Run(*g, lr, s) for s in (seeds or (plan.study.selection_seed,))]
    return sorted(out, key=plan.cost, reverse=True)


def execute_peers(plan: Plan, jobs: int = 1, seeds: tuple[int, ...] | None = None,
                  echo: Callable[[str], None] = print, poll_s: float = 0.5,
                  time_limit: float = 0.0) -> dict[str, Any]:
    """Runs the PyTorch peer (``benchmarks/peft_job.py``: transformers + peft, eager) of every run
    :func:`peer_runs` names whose peer file is missing, ``jobs`` at a time, each with the flags that
    mirror the run's config (``peer_args``). Writes the peer's JSON line to :func:`peer_file`.
    ``time_limit`` (seconds, 0: none) pauses each peer run that is still training then, its state
    kept beside its peer file (``peer-...state.pt``); the next call resumes it."""
    from benchmarks.peft_job import PAUSED, peer_args

    env = worker_env(jobs, None)
    runs = [r for r in peer_runs(plan, seeds) if not peer_file(plan, r).is_file()]
    echo(f"peer: {len(runs)} run(s) to repeat, {jobs} at a time")
    running: dict[subprocess.Popen, tuple[Run, float, Any]] = {}
    done, failed, paused = [], [], []
    t0 = time.perf_counter()
    try:
        while runs or running:
            if runs and time_limit and time.perf_counter() - t0 > time_limit:
                echo(f"peer: time is up; {len(runs)} run(s) not started")
                runs = []
            while runs and len(running) < jobs:
                run = runs.pop(0)
                cfg = plan.config(run)
                cmd = [sys.executable, str(PEER_SCRIPT), *peer_args(cfg), f"--model={plan.model}",
                       f"--state={peer_file(plan, run).with_suffix('.state.pt')}"] + \
                    ([f"--data_dir={plan.data_dir}"] if plan.data_dir else []) + \
                    ([f"--time_limit={time_limit - (time.perf_counter() - t0)}"] if time_limit else [])
                peer_file(plan, run).parent.mkdir(parents=True, exist_ok=True)
                log = open(peer_file(plan, run).with_suffix(".log"), "a")
                running[subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)] = \
                    (run, time.perf_counter(), log)
            time.sleep(poll_s)
            for p in [p for p in running if p.poll() is not None]:
                run, start, log = running.pop(p)
                log.close()
                lines = [x for x in (p.stdout.read() if p.stdout else "").splitlines() if x.startswith("{")]
                if p.returncode == 0 and lines:
                    peer_file(plan, run).write_text(lines[-1] + "\n")
                    res = json.loads(lines[-1])
                    done.append(run)
                    echo(f"peer {run.rel}: {res['main_metric']}={res['final_dev'][res['main_metric']]:.4f} "
                         f"({time.perf_counter() - start:.0f}s)")
                elif p.returncode == PAUSED and lines:
                    paused.append(run)      # its evaluations so far, for a look before it resumes
                    peer_file(plan, run).with_suffix(".paused.json").write_text(lines[-1] + "\n")
                    echo(f"peer {run.rel}: paused at step {json.loads(lines[-1])['step']} "
                         f"({time.perf_counter() - start:.0f}s); the next call resumes it")
                else:
                    failed.append(run)
                    echo(f"peer {run.rel}: FAILED (exit {p.returncode}) -- see "
                         f"{peer_file(plan, run).with_suffix('.log')}")
    except KeyboardInterrupt:
        stop(running)
        raise
    echo(f"peer: {len(done)} done, {len(failed)} failed" + (f", {len(paused)} paused" if paused else "")
         + f" in {time.perf_counter() - t0:.0f}s")
    return {"done": done, "failed": failed, "paused": paused}
