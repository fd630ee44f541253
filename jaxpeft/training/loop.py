"""The one host loop: every run, single- or multi-task, of every task kind, trains through it.

A run supplies a :class:`Job`: its batches, its loss function, its initial trainable and frozen
params, its optimizer, its evaluation and its export (:mod:`jaxpeft.training.single` and
:mod:`jaxpeft.training.multitask`). :func:`run` does the rest, the same way for all of them:

* the train state and the frozen params on the device mesh (:mod:`jaxpeft.training.sharding`);
* every program the run needs compiled before the first step, several at once, through the
  persistent compilation cache; programs an earlier process stored (:mod:`program_store`) are
  loaded without tracing, and programs of an earlier run in the same process are reused;
* many train steps per device call (:func:`jaxpeft.training.steps.make_train_loop`: a scan whose
  learning rate comes from the step counter on the device), a call stopping where an evaluation
  or a checkpoint falls; the losses of a call are read while the next one runs;
* evaluation, checkpoints (:mod:`jaxpeft.training.checkpoint`) and exact resume, ``log.jsonl``,
  ``results.json`` (with the run's time split ``*_seconds``), the learning curves and the export.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from jaxpeft import compute as compute_lib
from jaxpeft import runtime
from jaxpeft.data.batches import order_digest
from jaxpeft.errors import UserError
from jaxpeft.training import optim, program_store, steps
from jaxpeft.training.checkpoint import Cadence, Checkpoints

#: train steps per device call when ``--steps_per_dispatch=0``
DEFAULT_STEPS_PER_DISPATCH = 32
#: The compiled programs of this process by :func:`program_key`: a later run in the same process
#: with the same model, method, optimizer constants, mesh and shapes (another learning rate, seed
#: or number of epochs: the schedule, the seed and the data are arguments of the programs) reuses
#: them, as the study's worker processes do. The oldest entries go beyond :data:`KEPT_PROGRAMS`.
_PROGRAMS: dict[str, tuple[dict, dict]] = {}
KEPT_PROGRAMS = 8


class Job:
    """What a run supplies to the loop (attributes set by the subclass).

    ``cfg`` (the :class:`~jaxpeft.config.TrainConfig`), ``out`` (the run folder), ``timers``,
    ``plan`` (the mesh), ``compute``, ``cache_dir``, ``is_main``, ``echo``; ``title`` (``bitfit on
    sst2``), ``main_metric`` (what ranks checkpoints); ``batches`` (training batches:
    ``epoch_steps(epoch)``, ``order(epoch)``, ``width(spec)``, ``batch(spec, rows)``,
    ``chunk(specs, rows)``, ``run_length``); ``total_steps``.
    """

    cfg: Any
    out: Path
    timers: runtime.Timers
    plan: Any
    compute: Any
    cache_dir: Path | None
    is_main: bool
    echo: Callable[[str], None]
    title: str
    main_metric: str
    batches: Any
    total_steps: int
    checkpoints: Checkpoints | None = None

    def loss_fn(self) -> steps.LossFn:
        raise NotImplementedError

    def predict_fn(self) -> Callable:
        """``predict(trainable, frozen, batch) -> outputs`` (pure)."""
        raise NotImplementedError

    def initial(self) -> tuple[Any, Any]:
        """``(trainable, frozen)`` before the first step."""
        raise NotImplementedError

    def optimizer(self) -> Any:
        raise NotImplementedError

    def eval_examples(self) -> list[dict]:
        """One host batch of every shape evaluation predicts (compiled up front)."""
        raise NotImplementedError

    def evaluate(self, predict: Callable, trainable: Any, frozen: Any) -> dict[str, float]:
        raise NotImplementedError

    def identity(self) -> Any:
        raise NotImplementedError

    def export(self, state: steps.TrainState, frozen: Any) -> dict[str, Any]:
        raise NotImplementedError

    def describe(self) -> str:
        """The first line a run prints (what trains)."""
        raise NotImplementedError

    def warm_modules(self) -> tuple[str, ...]:
        """Modules evaluation imports on first use (imported while XLA compiles)."""
        return ()

    def start_record(self) -> dict[str, Any]:
        """More fields of ``log.jsonl``'s ``start`` event."""
        return {}

    def results(self) -> dict[str, Any]:
        """More fields of ``results.json``."""
        return {}

    def use_remat(self, remat: str) -> bool:
        """Switches the model to ``--remat=remat`` for the programs compiled next (``--remat=auto``
        when the step does not fit); ``False``: this job cannot."""
        return False

    def program_parts(self) -> list:
        """What the compiled programs depend on besides shapes (the model module, the loss)."""
        raise NotImplementedError

    def config_record(self) -> dict[str, Any]:
        return {**self.cfg.to_flat(), "resolved_compute": self.compute.to_dict()}

    # -- positions in the data ------------------------------------------------------------------
    def position(self, step: int) -> tuple[int, int]:
        """``(epoch, batch)`` of global step ``step``."""
        epoch = 0
        while step >= self.batches.epoch_steps(epoch):
            step -= self.batches.epoch_steps(epoch)
            epoch += 1
        return epoch, step

    def epoch_end(self, step: int) -> bool:
        return step > 0 and self.position(step)[1] == 0

    def data_position(self, step: int) -> dict[str, Any]:
        """Where the batch iterator stands after ``step`` steps, and a hash of the batches left in
        that epoch (the order is a function of ``(seed, epoch)``; the hash checks it on resume)."""
        epoch, batch = self.position(step)
        return {"epoch": epoch, "batch": batch, "steps_per_epoch": self.batches.epoch_steps(epoch),
                "batch_order_sha256": order_digest(self.batches.order(epoch)[batch:])}

    def steps_per_dispatch(self) -> int:
        n = self.cfg.run.steps_per_dispatch or DEFAULT_STEPS_PER_DISPATCH
        n = min(n, getattr(self.batches, "run_length", n))
        return max(1, min(n, self.total_steps))

    def device_batch(self, batch: dict) -> dict:
        """A host batch as the predict step's input: what it reads, the processes' rows assembled
        into global arrays split over the mesh's batch axes."""
        return self.plan.global_batch(steps.predict_inputs(batch))

    def device_batch_of_whole(self, batch: dict) -> dict:
        """:meth:`device_batch` of a whole global batch built on every process (this process
        sends its rows)."""
        rows = self.plan.process_rows(len(batch["weights"]))
        return self.device_batch(batch if rows is None else {k: v[rows] for k, v in batch.items()})


class JsonLog:
    """Appends one JSON object per line to ``path`` (when ``enabled``: process 0 of a multi-host run)."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled

    def write(self, **record: Any) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=json_default) + "\n")


def json_default(x: Any) -> Any:
    if isinstance(x, (np.generic, jax.Array)):
        a = np.asarray(x)
        return a.item() if a.ndim == 0 else a.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x)}")


def shape_key(batch: dict, processes: int = 1) -> tuple:
    """What decides a predict batch's compiled shape (``processes``: a host batch holds one
    process's share of the global rows)."""
    return tuple(sorted((k, (v.shape[0] * processes,) + tuple(v.shape[1:]), str(v.dtype))
                        for k, v in steps.predict_inputs(batch).items()))


def real_tokens(batch: dict) -> int:
    """The real (non-padding) tokens of a batch, or of stacked batches."""
    if "segment_ids" in batch:
        return int((batch["segment_ids"] > 0).sum())
    w = batch["weights"] > 0
    return int((batch["attention_mask"] * w.reshape(w.shape + (1,) * (batch["attention_mask"].ndim - w.ndim))).sum())


def progress_bar(total: int, enabled: bool, initial: int = 0):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, file=sys.stderr, unit="step")


# ----------------------------------------------------------------------------- compiling


def program_key(job: Job, state: Any, frozen: Any, n: int, train_examples: dict, eval_examples: dict) -> str:
    """What the train loop and predict programs are a function of: the job's model and loss
    (:meth:`Job.program_parts`), the optimizer's constants, the mesh, the steps per call, and the
    shapes, dtypes and shardings of every argument."""
    o = job.cfg.optim

    def avals(tree) -> str:
        leaves = [(tuple(x.shape), str(x.dtype), str(getattr(x, "sharding", None)))
                  for x in jax.tree_util.tree_leaves(tree)]
        return f"{jax.tree_util.tree_structure(tree)}{leaves}"

    inputs = {str(k): {name: (v.shape, str(v.dtype)) for name, v in steps.model_inputs(b).items()}
              for k, b in [*train_examples.items(), *eval_examples.items()]}
    parts = [*job.program_parts(), o.adam_b1, o.adam_b2, o.adam_eps, o.weight_decay, o.max_grad_norm,
             job.plan.describe(), [str(d) for d in jax.devices()], jax.process_count(), n,
             sorted(map(str, train_examples)), sorted(map(str, eval_examples)), inputs, avals(state), avals(frozen)]
    return hashlib.sha256(_stable_repr(parts).encode()).hexdigest()


_FUNCTION_AT = re.compile(r"(<function (?:(?!<locals>|<lambda>)[^ >])+) at 0x[0-9a-fA-F]+>")


def _stable_repr(x: Any) -> str:
    """``repr(x)`` with the addresses of module-level functions left out (a model module's repr
    names its family's functions; their addresses differ from process to process, and a later
    process must find the programs an earlier one stored). Their code is in the program store's
    key (:func:`program_store.source_digest`); closures and lambdas keep their addresses."""
    return _FUNCTION_AT.sub(r"\1>", repr(x))


def compile_all(job: Job, loop_jit, predict_jit, state, frozen, n: int) -> tuple[dict, dict, dict]:
    """Compiles the train loop for every batch shape of the first epoch and the predict step for
    every evaluation shape, several at once; returns ``(loops, predicts, info)`` by shape key."""
    train_examples: dict[Any, dict] = {}
    epoch = job.position(int(state.step))[0]
    for spec in job.batches.order(epoch):
        key = job.batches.width(spec)
        if key not in train_examples:
            train_examples[key] = job.batches.batch(spec, job.plan.process_rows(len(spec)))
    eval_examples = {shape_key(b): b for b in job.eval_examples()}
    pc = jax.process_count()
    program = program_key(job, state, frozen, n, train_examples, eval_examples)
    info: dict[str, Any] = {"programs_reused": program in _PROGRAMS, "programs_loaded": False, "compile_split": {}}
    if info["programs_reused"]:
        loops, predicts = _PROGRAMS[program]
        return dict(loops), dict(predicts), info
    store = program_store.ProgramStore.beside(job.cache_dir)
    if store is not None:
        t0 = time.perf_counter()
        stored = store.load(program)
        if stored is not None and set(stored.get("train", ())) == set(train_examples) \
                and set(stored.get("predict", ())) == set(eval_examples):
            info.update(programs_loaded=True, compile_split={"load_seconds": round(time.perf_counter() - t0, 4)})
            _remember(program, stored["train"], stored["predict"])
            return dict(stored["train"]), dict(stored["predict"]), info
    sched = optim.Schedule.create(1.0, 1, 0.0).as_array()
    jobs: list[tuple[str, Any, Callable[[], Any]]] = []
    for key, b in train_examples.items():
        abstract = {k: jax.ShapeDtypeStruct((n, v.shape[0] * pc) + v.shape[1:], v.dtype,
                                            sharding=job.plan.stacked_batch_sharding)
                    for k, v in steps.model_inputs(b).items()}
        jobs.append(("train", key, lambda a=abstract: loop_jit.lower(state, frozen, a, np.ones(n, bool), sched)))
    for key, b in eval_examples.items():
        abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=job.plan.batch_sharding)
                    for k, v in steps.predict_inputs(b).items()}
        jobs.append(("predict", key, lambda a=abstract: predict_jit.lower(state.trainable, frozen, a)))
    loops, predicts = {}, {}
    lowering = 0.0
    t0 = time.perf_counter()
    # XLA compiles outside the interpreter lock: each program compiles while the next one is traced
    # and lowered, and the shapes compile side by side
    with program_store.watch_cache_hits() as hits, \
            concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(jobs))) as pool:
        futures = []
        for kind, key, lower in jobs:
            t = time.perf_counter()
            low = lower()
            lowering += time.perf_counter() - t
            futures.append((kind, key, pool.submit(low.compile)))
        for kind, key, fut in futures:
            (loops if kind == "train" else predicts)[key] = fut.result()
    info["compile_split"] = {"lower_seconds": round(lowering, 4),
                             "xla_wait_seconds": round(time.perf_counter() - t0 - lowering, 4)}
    if store is not None and not hits.count:    # only fresh executables (see program_store)
        t0 = time.perf_counter()
        store.save(program, {"train": loops, "predict": predicts})
        info["compile_split"]["store_seconds"] = round(time.perf_counter() - t0, 4)
    _remember(program, loops, predicts)
    return loops, predicts, info


def _remember(program: str, loops: dict, predicts: dict) -> None:
    _PROGRAMS[program] = (dict(loops), dict(predicts))
    while len(_PROGRAMS) > KEPT_PROGRAMS:
        del _PROGRAMS[next(iter(_PROGRAMS))]


# ----------------------------------------------------------------------------- the loop


def _metric_line(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, (int, float)))


def run(job: Job) -> dict[str, Any]:
    """Trains ``job``, evaluates it, saves its checkpoints and exports it; returns ``results.json``.

    Running out of device memory ends the run with one :class:`UserError` line naming where, the
    peak and what to change (XLA's ``RESOURCE_EXHAUSTED`` error stays the cause, not the message).
    """
    where = ["while placing the weights and the optimizer state"]
    try:
        return _run(job, where)
    except RuntimeError as e:
        if not compute_lib.is_out_of_memory(e):
            raise
        raise UserError(compute_lib.out_of_memory_message(where[0], runtime.peak_memory(),
                                                          compute_lib.device_memory())) from e


def _run(job: Job, where: list[str]) -> dict[str, Any]:
    cfg, timers = job.cfg, job.timers
    job.out.mkdir(parents=True, exist_ok=True)
    jlog = JsonLog(job.out / "log.jsonl", enabled=job.is_main)
    job.echo(job.describe())
    total = job.total_steps
    tx = job.optimizer()
    schedule = optim.Schedule.create(cfg.optim.learning_rate, total, cfg.optim.warmup_ratio)
    with timers.section("startup"):
        trainable, frozen = job.initial()
        state, _ = job.plan.init(lambda t: steps.init_state(t, tx, cfg.optim.seed), trainable,
                                 shardings=job.plan.state_shardings)
        del trainable
        state_sh, frozen_sh = job.plan.state_shardings(state), job.plan.tree_shardings(frozen)
        state, frozen = job.plan.put(state, state_sh), job.plan.put(frozen, frozen_sh)
    with timers.section("checkpoint"):
        job.checkpoints = checkpoints = Checkpoints(
            cfg.run.output_dir, job.identity(), keep=cfg.run.keep, save_every=cfg.run.save_every,
            resume=cfg.run.resume, main_metric=job.main_metric, data_position=job.data_position,
            echo=job.echo, log=jlog.write)
        state = checkpoints.resume(state)
    n = job.steps_per_dispatch()
    xla = job.compute.compiler_options()

    def jits():
        return (job.plan.jit_train_loop(steps.make_train_loop(job.loss_fn(), tx), state_sh, frozen_sh,
                                        compiler_options=xla),
                job.plan.jit_predict(job.predict_fn(), state_sh.trainable, frozen_sh, compiler_options=xla))

    loop_jit, predict_jit = jits()
    # what later parts of the run import, while XLA compiles (it leaves the interpreter free)
    warming = runtime.prewarm(("orbax.checkpoint",) + job.warm_modules()
                              + (("matplotlib.pyplot",) if cfg.run.plot else ()))
    where[0] = "while compiling"
    with timers.section("compile"):
        loops, predicts, compile_info = compile_all(job, loop_jit, predict_jit, state, frozen, n)
        # done before the run uses them: a module imported from two threads at once can be seen
        # half-initialised (matplotlib.pyplot was, after programs reused from an earlier run)
        warming.join()
    limit = compute_lib.device_memory()
    remat = job.compute.remat
    if remat == "auto":   # none where the step fits, else recompute each layer
        remat = compute_lib.choose_remat((compute_lib.programs_memory(loops) or {}).get("total"), limit)
        if remat != "none" and job.use_remat(remat):
            loop_jit, predict_jit = jits()
            with timers.section("compile"):
                loops, predicts, compile_info = compile_all(job, loop_jit, predict_jit, state, frozen, n)
        else:
            remat = "none"
    memory = {**compute_lib.check_programs_memory(
        compute_lib.programs_memory(loops), compute_lib.programs_memory(predicts), limit, cfg.optim.batch_size,
        cfg.data.eval_batch_size, job.plan.data_parallel_size, job.compute.remat), "remat": remat}
    shapes = {"train": [str(k) for k in loops], "predict": [str(k) for k in predicts]}

    def predict_fn(trainable_, frozen_, batch):
        key = shape_key(batch)
        if key not in predicts:
            with timers.section("compile"):
                predicts[key] = predict_jit.lower(trainable_, frozen_, batch).compile()
        return predicts[key](trainable_, frozen_, batch)

    jlog.write(event="start", config=job.config_record(), train_steps=total, steps_per_dispatch=n,
               compiled_shapes=shapes, devices=[str(d) for d in jax.devices()], mesh=job.plan.describe(),
               processes=jax.process_count(), compilation_cache=job.cache_dir, **job.start_record())
    best, best_step = checkpoints.best, checkpoints.best_step
    last_eval: dict[str, float] | None = None
    examples, tokens = 0, 0
    step = int(state.step)
    bar = progress_bar(total, cfg.run.progress and job.is_main, initial=step)
    pending: list[tuple[int, int, dict]] = []   # (first step, active steps, device metrics)
    window = [time.perf_counter(), 0]
    sched_arr = schedule.as_array()

    def drain(keep: int) -> None:
        """Reads the metrics of finished calls (all but the last ``keep``) and logs them."""
        while len(pending) > keep:
            first, count, m = pending.pop(0)
            host = {k: np.asarray(v) for k, v in m.items()}
            rate = window[1] / max(time.perf_counter() - window[0], 1e-9)
            for j in range(count):
                s = first + j + 1
                if s % cfg.run.log_every == 0 or s == total:
                    extra = {k: job.named(k, v[j]) if hasattr(job, "named") else v[j]
                             for k, v in host.items() if k not in ("loss", "grad_norm", "lr")}
                    jlog.write(event="train", step=s, loss=float(host["loss"][j]),
                               grad_norm=float(host["grad_norm"][j]), lr=float(host["lr"][j]),
                               examples_per_second=rate, wall_seconds=timers.elapsed(), **extra)
            bar.update(count)
            bar.set_postfix(loss=f"{float(host['loss'][count - 1]):.4f}", lr=f"{float(host['lr'][count - 1]):.2e}",
                            ex_s=f"{rate:.0f}")

    def do_eval():
        nonlocal best, best_step, last_eval
        where[0] = f"while evaluating at step {step}"
        with timers.section("eval"):
            last_eval = job.evaluate(predict_fn, state.trainable, frozen)
        is_best = best is None or last_eval[job.main_metric] > best[job.main_metric]
        if is_best:
            best, best_step = dict(last_eval), step
        jlog.write(event="eval", step=step, epoch=_epochs(job, step), wall_seconds=timers.elapsed(), **last_eval)
        job.echo(f"step {step}: " + _metric_line(last_eval))
        with timers.section("checkpoint"):
            checkpoints.after_eval(step, state, last_eval, is_best)
        cadence.saved()

    t_loop = time.perf_counter()
    cadence = Cadence(total, job.epoch_end, cfg.run.eval_every, cfg.run.save_every, cfg.run.save_minutes)
    elsewhere_before = timers.seconds["eval"] + timers.seconds["checkpoint"] + timers.seconds["compile"]
    while step < total:
        where[0] = f"at train step {step + 1}"
        epoch, start = job.position(step)
        order = job.batches.order(epoch)
        stop = min(total, step + len(order) - start)
        if cfg.run.eval_every > 0:
            stop = min(stop, (step // cfg.run.eval_every + 1) * cfg.run.eval_every)
        if cfg.run.save_every > 0 and cfg.run.keep > 0:
            stop = min(stop, (step // cfg.run.save_every + 1) * cfg.run.save_every)
        specs = [order[start]]
        key = job.batches.width(order[start])
        while len(specs) < min(n, stop - step) and job.batches.width(order[start + len(specs)]) == key:
            specs.append(order[start + len(specs)])
        count = len(specs)
        chunk = job.batches.chunk(specs, job.plan.process_rows(len(specs[0])))
        real = int((chunk["weights"] > 0).sum())
        tokens += real_tokens(chunk)
        inputs = steps.model_inputs(chunk)
        stacked = {k: np.concatenate([v, np.zeros((n - count,) + v.shape[1:], v.dtype)]) if count < n else v
                   for k, v in inputs.items()}
        active = np.arange(n) < count
        if key not in loops:
            with timers.section("compile"):
                loops[key] = loop_jit.lower(state, frozen, job.plan.global_batch(stacked, stacked=True), active,
                                            sched_arr).compile()
        state, m = loops[key](state, frozen, job.plan.global_batch(stacked, stacked=True), active, sched_arr)
        pending.append((step, count, m))
        examples += real
        window[1] += real
        step += count
        drain(keep=1)
        if cadence.eval_due(step):
            drain(keep=0)
            do_eval()
            window[:] = [time.perf_counter(), 0]
        due = cadence.save_due(step)
        if due:
            drain(keep=0)
            with timers.section("checkpoint"):
                cadence.save(due, step, state, checkpoints)
    drain(keep=0)
    jax.block_until_ready(state.trainable)
    elsewhere = timers.seconds["eval"] + timers.seconds["checkpoint"] + timers.seconds["compile"] - elsewhere_before
    timers.add("train", time.perf_counter() - t_loop - elsewhere)
    bar.close()
    do_eval()
    job.final_state, job.frozen = state, frozen
    with timers.section("checkpoint"):
        ckpt = checkpoints.close()
    with timers.section("export"):
        export = job.export(state, frozen)
        curves = _plot(job) if job.is_main and cfg.run.plot else {}
    train_seconds = timers.seconds["train"]
    peak = runtime.peak_memory()
    results = {
        **job.results(), "compute": job.compute.to_dict(), "main_metric": job.main_metric, "best_dev": best,
        "best_step": best_step, "final_dev": last_eval, "steps": step, "epochs": _epochs(job, step),
        "steps_per_dispatch": n, "compiled_shapes": shapes, **compile_info,
        "examples_per_second": examples / max(train_seconds, 1e-9),
        "tokens_per_second": tokens / max(train_seconds, 1e-9), "seed": cfg.optim.seed,
        "config": job.config_record(), "devices": f"{jax.device_count()}x {jax.devices()[0].device_kind}",
        "mesh": job.plan.describe(), "processes": jax.process_count(),
        "compilation_cache": None if job.cache_dir is None else str(job.cache_dir),
        **({"peak_device_memory_bytes": peak} if peak is not None else {}), "memory": memory,
        **ckpt, **export, **curves, **timers.report(),
    }
    if job.is_main:
        (job.out / "results.json").write_text(json.dumps(results, indent=2, default=json_default) + "\n")
    jlog.write(event="end", steps=step, **timers.report(), examples_per_second=results["examples_per_second"])
    metric = job.main_metric
    job.echo(f"done: best {metric}={best[metric]:.4f} at step {best_step}, final {last_eval[metric]:.4f}; "
             f"{step} steps in {train_seconds:.1f}s ({results['examples_per_second']:.1f} examples/s), "
             f"{results['wall_seconds']:.1f}s in all (compile {results['compile_seconds']:.1f}s); results in "
             f"{job.out / 'results.json'}")
    return results


def _epochs(job: Job, step: int) -> float:
    epoch, batch = job.position(step)
    return epoch + batch / max(job.batches.epoch_steps(epoch), 1)


def _plot(job: Job) -> dict[str, Any]:
    from jaxpeft.training import curves

    path = curves.plot_run(job.out, title=job.title, metric=job.main_metric)
    return {} if path is None else {"learning_curves": str(path)}
