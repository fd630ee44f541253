"""The training run: data, model, compiled steps, the loop, evaluation, checkpoints, the adapter.

The loop sends many train steps to the device per call (``steps.make_train_loop``: a scan whose
learning rate comes from the step counter on the device), stopping a call where an evaluation or
a checkpoint falls, and returns to the host only for those and to read the losses of the previous
call (while the next one runs). Every shape the run needs is compiled before the first step,
several at once, through the persistent compilation cache (``jaxpeft.runtime``); a run whose
programs an earlier process stored (``jaxpeft.training.program_store``) loads them without tracing.
``results.json`` records the run's time split (``*_seconds``).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from jaxpeft import masks, runtime
from jaxpeft.adapters import folder
from jaxpeft.data import batches, encoding, packing
from jaxpeft.tasks import glue, metrics
from jaxpeft.models import fingerprint
from jaxpeft.training import multihost, optim, program_store, sharding, steps
from jaxpeft.training.checkpoint import Cadence, Checkpoints, RunIdentity, sha256_arrays
from jaxpeft.config import TrainConfig
from jaxpeft.errors import UserError
from jaxpeft.methods.base import HEAD_PATTERN, module_pattern
from jaxpeft.models.bert import kernels_in_compute_dtype
from jaxpeft.models.loading import LoadedModel, load_classifier

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
#: train steps per device call when ``--steps_per_dispatch=0``
DEFAULT_STEPS_PER_DISPATCH = 32

#: The compiled programs of this process by :meth:`Trainer.program_key`: a later run in the same
#: process with the same model, method, optimizer constants, mesh and shapes (another learning rate,
#: seed or number of epochs: the schedule, the seed and the data are arguments of the programs)
#: reuses them instead of tracing and compiling again, as the study's worker processes do. The
#: oldest entries go beyond :data:`KEPT_PROGRAMS`.
_PROGRAMS: dict[str, tuple[dict, dict]] = {}
KEPT_PROGRAMS = 8


class JsonLog:
    """Appends one JSON object per line to ``path`` (when ``enabled``: process 0 of a multi-host run)."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled

    def write(self, **record: Any) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=_json_default) + "\n")


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.generic, jax.Array)):
        return np.asarray(x).item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x)}")


def check_pooling(cfg: TrainConfig, task: glue.GlueTask) -> None:
    """``--pooling=cosine`` compares the two sentences of a pair, one unpacked row per example."""
    if cfg.head.pooling != "cosine":
        return
    if len(task.tsv_texts) != 2:
        raise UserError(f"--pooling=cosine compares the two sentences of a pair; {task.name} has one sentence "
                        "per example")
    if cfg.data.packing:
        raise UserError("--packing: --pooling=cosine encodes each pair's sentences apart, which packed rows "
                        "do not; use --no-packing or another --pooling")


def check_output_dir(path: str) -> Path:
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"output dir {path!r} exists and is a file")
    return p


def trajectory_settings(cfg: TrainConfig, compute: Any) -> dict[str, Any]:
    """The settings a resumed run must share with its checkpoint: everything that changes what
    the steps compute (not where results go, logging, devices or speed-only compute fields)."""
    out = {"method": cfg.method, "task": cfg.task, "random_init": cfg.random_init}
    o, d, h = cfg.optim, cfg.data, cfg.head
    out.update({k: getattr(o, k) for k in ("learning_rate", "head_learning_rate", "batch_size", "num_epochs",
                                           "max_steps", "warmup_ratio", "weight_decay", "max_grad_norm",
                                           "adam_b1", "adam_b2", "adam_eps", "seed")})
    out.update({k: getattr(d, k) for k in ("max_seq_length", "max_train_examples", "max_eval_examples",
                                           "packing")})
    out.update({"pooling": h.pooling, "modules_to_save": h.modules_to_save})
    out.update(compute.trajectory())
    return out


class Trainer:
    """Holds everything of one run; ``run()`` trains, evaluates and writes ``results.json``.

    ``start``: ``time.perf_counter()`` when the command began (default: now), so the reported wall
    time includes the imports before the trainer existed.
    """

    checkpoints: Checkpoints | None = None

    def __init__(self, cfg: TrainConfig, echo: Callable[[str], None] = print, start: float | None = None):
        self.timers = runtime.Timers(start)
        self.cfg = cfg
        self.echo = echo
        self.out = check_output_dir(cfg.run.output_dir)
        self.task = glue.get_task(cfg.task)
        self.method = cfg.method_obj()
        self.modules_to_save = cfg.head.module_list()
        if cfg.data.packing and not self.method.supports_packing:
            raise UserError(f"--packing: --method={cfg.method} puts its prompt into every row's input; "
                            "packed rows need the prompt per example, which it does not support")
        check_pooling(cfg, self.task)
        with self.timers.section("startup"):
            self.cache_dir = runtime.enable_compilation_cache(cfg.devices.compilation_cache)
            self.plan = self.make_plan()   # before anything else touches JAX (multi-process init)
            self.compute = cfg.resolve_compute(num_devices=self.plan.mesh.size)
            runtime.set_prng_impl(self.compute.prng_impl)
            self.is_main = multihost.is_main_process()
            if not self.is_main:
                self.echo = lambda s: None
        with self.timers.section("data"):
            # Data files first: a missing split fails before the model is loaded.
            self.raw_train = glue.load_split(self.task, "train", cfg.data.data_dir)
            self.raw_evals = {s: glue.load_split(self.task, s, cfg.data.data_dir) for s in self.task.eval_splits}
            for s, ex in [("train", self.raw_train), *self.raw_evals.items()]:
                if ex.labels is None:
                    raise UserError(f"{ex.source}: split {s!r} has no labels")
        with self.timers.section("startup"):
            self.model: LoadedModel = load_classifier(
                cfg.model, self.task.num_labels, adapter=self.method.adapter, extras=self.method.extras,
                added=self.method.added, compute=self.compute, seed=cfg.optim.seed,
                with_weights=not cfg.random_init, pooling=cfg.head.pooling,
                param_shardings=self.plan.tree_shardings if self.plan.mesh.size > 1 else None)
            need = cfg.data.max_seq_length + self.method.extra_positions()
            if need > self.model.config.max_position_embeddings:
                raise UserError(f"max_seq_length={cfg.data.max_seq_length} plus {self.method.extra_positions()} "
                                f"virtual tokens exceeds the model's max_position_embeddings="
                                f"{self.model.config.max_position_embeddings}")
            self.params = self.plan.put(self.method.init_params(
                self.model.params, tokenizer=self.model.tokenizer, rng=jax.random.key(cfg.optim.seed + 1)))
            for module in self.modules_to_save:
                if not masks.trainable_paths(masks.match(self.params, include=module_pattern(module),
                                                         allow_empty=True)):
                    raise UserError(f"--modules_to_save={cfg.head.modules_to_save}: this model has no module "
                                    f"{module!r}" + (f" (--pooling={cfg.head.pooling} reads no pooler)" if
                                                     cfg.head.pooling != "cls" else ""))
            self.mask = self.method.mask(self.params, self.modules_to_save)
        with self.timers.section("data"):
            d = cfg.data
            train = self.raw_train.take(d.max_train_examples) if d.max_train_examples else self.raw_train
            self.train_data = encoding.encode_cached(self.model.tokenizer, train, d.max_seq_length)
            self.eval_data = {
                s: encoding.encode_cached(self.model.tokenizer, ex.take(d.max_eval_examples) if d.max_eval_examples
                                      else ex, d.max_seq_length)
                for s, ex in self.raw_evals.items()}
            self.batches = self.make_batches()

    # -- bookkeeping -------------------------------------------------------------------------
    def param_report(self) -> dict[str, Any]:
        t, n = masks.count(self.params, self.mask)
        head = masks.match(self.params, include=[HEAD_PATTERN] + [module_pattern(m) for m in self.modules_to_save])
        head_t, _ = masks.count(self.params, head)
        return {"trainable_params": t, "total_params": n, "trainable_pct": 100.0 * t / n,
                "head_params": head_t, "method_params": t - head_t,
                "method_pct": 100.0 * (t - head_t) / n}

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.train_data) / self.cfg.optim.batch_size)

    def total_steps(self) -> int:
        o = self.cfg.optim
        if o.max_steps > 0:
            return o.max_steps
        return max(1, math.ceil(o.num_epochs * self.steps_per_epoch()))

    def make_batches(self) -> batches.BucketBatches | packing.PackedBatches:
        o, d = self.cfg.optim, self.cfg.data
        if d.packing:
            epochs = math.ceil(self.total_steps() / self.steps_per_epoch())
            return packing.PackedBatches(self.train_data, o.batch_size, d.max_seq_length, o.seed, epochs,
                                         row_multiple=self.plan.data_parallel_size)
        return batches.BucketBatches(self.train_data, o.batch_size, d.max_seq_length, o.seed)

    def evaluate(self, predict_fn, trainable, frozen) -> dict[str, float]:
        out: dict[str, float] = {}
        for i, (split, enc) in enumerate(self.eval_data.items()):
            batches = self.batches.eval_batches(enc, self.cfg.data.eval_batch_size)
            logits = steps.predict_logits(predict_fn, trainable, frozen, batches, len(enc),
                                          self.device_batch_of_whole)
            preds = steps.logits_to_predictions(logits, self.task.is_regression)
            m = metrics.compute(self.task.name, preds, enc.labels)
            out.update(m if i == 0 else {f"{split}_{k}": v for k, v in m.items()})
        return out

    # -- devices -----------------------------------------------------------------------------
    def make_plan(self) -> sharding.MeshPlan:
        """Joins the other processes of a multi-process run, then builds the device mesh."""
        dv, o = self.cfg.devices, self.cfg.optim
        multihost.initialize(dv.distributed, dv.coordinator_address, dv.num_processes, dv.process_id)
        plan = sharding.create_plan(dv.mesh, dv.fsdp_min_size)
        plan.check_batch_size(o.batch_size, "batch_size")
        plan.check_batch_size(self.cfg.data.eval_batch_size, "eval_batch_size")
        return plan

    def device_batch(self, batch: dict) -> dict:
        """A host batch as the step's input: host-only keys dropped, the processes' rows assembled
        into global arrays split over the mesh's batch axes."""
        return self.plan.global_batch(steps.model_inputs(batch))

    def device_batch_of_whole(self, batch: dict) -> dict:
        """:meth:`device_batch` of a whole global batch built on every process (this process
        sends its rows)."""
        rows = self.plan.process_rows(len(batch["weights"]))
        return self.device_batch(batch if rows is None else {k: v[rows] for k, v in batch.items()})

    def host_rows(self, spec: np.ndarray) -> np.ndarray | None:
        return self.plan.process_rows(len(spec))

    # -- state -------------------------------------------------------------------------------
    def make_state(self, tx) -> tuple[steps.TrainState, Any]:
        """The initial train state and the frozen params, on the mesh. Frozen matmul kernels are
        kept in the compute dtype (``kernels_in_compute_dtype``)."""
        trainable, frozen = masks.split(self.params, self.mask)
        if self.compute.dtype != "float32":   # one program for all the casts
            frozen = jax.jit(lambda f: kernels_in_compute_dtype(f, self.compute))(frozen)
        state, _ = self.plan.init(lambda t: steps.init_state(t, tx, self.cfg.optim.seed), trainable,
                                  shardings=self.plan.state_shardings)
        return state, frozen

    def identity(self) -> RunIdentity:
        td = self.train_data
        self.fingerprint = fingerprint.fingerprint(self.model.params, self.cfg.model, str(self.model.model_dir),
                                                   exclude=self.method.added)
        return RunIdentity(
            settings=trajectory_settings(self.cfg, self.compute), config=self.config_record(),
            method=self.method.name, method_options=self.method.options(), task=self.task.name,
            num_labels=self.task.num_labels, fingerprint=self.fingerprint, train_examples=len(td),
            train_data_sha256=sha256_arrays(td.input_ids, td.token_type_ids, td.lengths, td.labels),
            total_steps=self.total_steps(), steps_per_epoch=self.steps_per_epoch())

    def config_record(self) -> dict[str, Any]:
        return {**self.cfg.to_flat(), "resolved_compute": self.compute.to_dict()}

    def data_position(self, step: int) -> dict[str, Any]:
        """Where the batch iterator stands after ``step`` steps, and a hash of the batches left in
        that epoch: the loop derives the position from the step because the order is a function of
        ``(seed, epoch)``; the hash checks that on resume."""
        spe = self.steps_per_epoch()
        epoch, batch = divmod(step, spe)
        rest = self.batches.order(epoch)[batch:]
        return {"epoch": epoch, "batch": batch, "steps_per_epoch": spe,
                "batch_order_sha256": batches.order_digest(rest)}

    # -- compiling ---------------------------------------------------------------------------
    def compile_all(self, loop_jit, predict_jit, state, frozen, n: int) -> tuple[dict, dict]:
        """Compiles the train loop for every batch shape of the first epoch and the predict step
        for every evaluation shape, several at once; returns ``(loops, predicts)`` by shape key."""
        train_examples: dict[Any, dict] = {}
        for spec in self.batches.order(int(state.step) // self.steps_per_epoch()):
            key = self.batches.width(spec)
            if key not in train_examples:
                train_examples[key] = self.batches.batch(spec, self.host_rows(spec))
        eval_examples: dict[Any, dict] = {}
        for enc in self.eval_data.values():
            for b in self.batches.eval_batches(enc, self.cfg.data.eval_batch_size):
                eval_examples.setdefault(_shape_key(b), b)
        pc = jax.process_count()
        program = self.program_key(state, frozen, n, train_examples, eval_examples)
        self.programs_reused = program in _PROGRAMS
        self.programs_loaded = False
        self.compile_split = {}
        if self.programs_reused:
            loops, predicts = _PROGRAMS[program]
            return dict(loops), dict(predicts)
        store = program_store.ProgramStore.beside(self.cache_dir)
        if store is not None:
            t0 = time.perf_counter()
            stored = store.load(program)
            if stored is not None and set(stored.get("train", ())) == set(train_examples) \
                    and set(stored.get("predict", ())) == set(eval_examples):
                self.programs_loaded = True
                self.compile_split = {"load_seconds": round(time.perf_counter() - t0, 4)}
                self._remember(program, stored["train"], stored["predict"])
                return dict(stored["train"]), dict(stored["predict"])
        sched = optim.Schedule.create(1.0, 1, 0.0).as_array()
        jobs: list[tuple[str, Any, Callable[[], Any]]] = []
        for key, b in train_examples.items():
            abstract = {k: jax.ShapeDtypeStruct((n, v.shape[0] * pc) + v.shape[1:], v.dtype,
                                                sharding=self.plan.stacked_batch_sharding)
                        for k, v in steps.model_inputs(b).items()}
            jobs.append(("train", key, lambda a=abstract: loop_jit.lower(state, frozen, a, np.ones(n, bool), sched)))
        for key, b in eval_examples.items():
            abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                                sharding=self.plan.batch_sharding)
                        for k, v in steps.model_inputs(b).items()}
            jobs.append(("predict", key, lambda a=abstract: predict_jit.lower(state.trainable, frozen, a)))
        loops, predicts = {}, {}
        lowering = 0.0
        t0 = time.perf_counter()
        # XLA compiles outside the interpreter lock: each program compiles while the next one is
        # traced and lowered, and the shapes compile side by side
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
        self.compile_split = {"lower_seconds": round(lowering, 4),
                              "xla_wait_seconds": round(time.perf_counter() - t0 - lowering, 4)}
        if store is not None and not hits.count:    # only fresh executables (see program_store)
            t0 = time.perf_counter()
            store.save(program, {"train": loops, "predict": predicts})
            self.compile_split["store_seconds"] = round(time.perf_counter() - t0, 4)
        self._remember(program, loops, predicts)
        return loops, predicts

    @staticmethod
    def _remember(program: str, loops: dict, predicts: dict) -> None:
        _PROGRAMS[program] = (dict(loops), dict(predicts))
        while len(_PROGRAMS) > KEPT_PROGRAMS:
            del _PROGRAMS[next(iter(_PROGRAMS))]

    def program_key(self, state, frozen, n: int, train_examples: dict, eval_examples: dict) -> str:
        """What the train loop and predict programs are a function of: the model module (its config,
        compute spec, method modules, head), the loss, the optimizer's constants, the mesh, the
        steps per call, and the shapes, dtypes and shardings of every argument."""
        o = self.cfg.optim
        head_scale = (o.head_learning_rate / o.learning_rate
                      if o.head_learning_rate is not None and o.head_learning_rate != o.learning_rate else None)

        def avals(tree) -> str:
            leaves = [(tuple(x.shape), str(x.dtype), str(getattr(x, "sharding", None)))
                      for x in jax.tree_util.tree_leaves(tree)]
            return f"{jax.tree_util.tree_structure(tree)}{leaves}"

        inputs = {str(k): {name: (v.shape, str(v.dtype)) for name, v in steps.model_inputs(b).items()}
                  for k, b in [*train_examples.items(), *eval_examples.items()]}
        parts = [repr(self.model.module), self.task.is_regression, o.adam_b1, o.adam_b2, o.adam_eps,
                 o.weight_decay, o.max_grad_norm, head_scale, self.modules_to_save, self.plan.describe(),
                 [str(d) for d in jax.devices()], jax.process_count(), n, sorted(map(str, train_examples)),
                 sorted(map(str, eval_examples)), inputs, avals(state), avals(frozen)]
        return hashlib.sha256(repr(parts).encode()).hexdigest()

    # -- the loop ----------------------------------------------------------------------------
    def steps_per_dispatch(self) -> int:
        n = self.cfg.run.steps_per_dispatch or DEFAULT_STEPS_PER_DISPATCH
        if isinstance(self.batches, batches.BucketBatches):
            n = min(n, batches.BucketBatches.RUN)
        return max(1, min(n, self.total_steps()))

    def run(self) -> dict[str, Any]:
        cfg, task, timers = self.cfg, self.task, self.timers
        o = cfg.optim
        self.out.mkdir(parents=True, exist_ok=True)
        self.jlog = jlog = JsonLog(self.out / "log.jsonl", enabled=self.is_main)
        report = self.param_report()
        self.echo(f"{cfg.method} on {task.name} with {cfg.model}: " + masks.describe(self.params, self.mask)
                  + f" (method {report['method_params']:,} = {report['method_pct']:.4f}%, "
                  f"head {report['head_params']:,})")
        total, spe = self.total_steps(), self.steps_per_epoch()
        head = [HEAD_PATTERN] + [module_pattern(m) for m in self.modules_to_save]
        tx = optim.make_optimizer(o, head)
        schedule = optim.Schedule.create(o.learning_rate, total, o.warmup_ratio)
        with timers.section("startup"):
            state, frozen = self.make_state(tx)
            state_sh, frozen_sh = self.plan.state_shardings(state), self.plan.tree_shardings(frozen)
            state, frozen = self.plan.put(state, state_sh), self.plan.put(frozen, frozen_sh)
        with timers.section("checkpoint"):
            self.checkpoints = Checkpoints(
                cfg.run.output_dir, self.identity(), keep=cfg.run.keep, save_every=cfg.run.save_every,
                resume=cfg.run.resume, main_metric=task.main_metric, data_position=self.data_position,
                echo=self.echo, log=jlog.write)
            state = self.checkpoints.resume(state)
        n = self.steps_per_dispatch()
        xla = self.compute.compiler_options()
        loop_jit = self.plan.jit_train_loop(steps.make_train_loop(self.model.module, tx, task.is_regression),
                                            state_sh, frozen_sh, compiler_options=xla)
        predict_jit = self.plan.jit_predict(steps.make_predict_step(self.model.module), state_sh.trainable,
                                            frozen_sh, compiler_options=xla)
        # what later parts of the run import, while XLA compiles (it leaves the interpreter free)
        warming = runtime.prewarm(metrics.HEAVY_IMPORTS + ("orbax.checkpoint",)
                                  + (("matplotlib.pyplot",) if cfg.run.plot else ()))
        with timers.section("compile"):
            loops, predicts = self.compile_all(loop_jit, predict_jit, state, frozen, n)
            # done before the run uses them: a module imported from two threads at once can be seen
            # half-initialised (matplotlib.pyplot was, after programs reused from an earlier run)
            warming.join()
        shapes = {"train": [str(k) for k in loops], "predict": [str(k) for k in predicts]}

        def predict_fn(trainable, frozen_, batch):
            key = _shape_key(batch)
            if key not in predicts:
                with timers.section("compile"):
                    predicts[key] = predict_jit.lower(trainable, frozen_, batch).compile()
            return predicts[key](trainable, frozen_, batch)

        jlog.write(event="start", config=self.config_record(), method_options=self.method.options(),
                   train_examples=len(self.train_data), total_steps=total, steps_per_dispatch=n,
                   compiled_shapes=shapes, devices=[str(d) for d in jax.devices()], mesh=self.plan.describe(),
                   processes=jax.process_count(), compilation_cache=self.cache_dir, **report)
        packed = f", packed {self.batches.rows_per_step} rows x {self.batches.slots} slots" \
            if isinstance(self.batches, packing.PackedBatches) else ""
        self.echo(f"{len(self.train_data):,} training examples, {total:,} steps of {o.batch_size}{packed}, "
                  f"{n} per device call; compute {self.compute.dtype}/{self.compute.attention_impl}/"
                  f"{self.compute.norm_impl}; devices {jax.device_count()}x {jax.devices()[0].platform}"
                  f" (mesh {self.plan.describe()}, {jax.process_count()} process(es))")

        best, best_step = self.checkpoints.best, self.checkpoints.best_step
        last_eval = None
        examples, tokens = 0, 0
        step = int(state.step)
        bar = _progress(total, cfg.run.progress and self.is_main, initial=step)
        pending: list[tuple[int, int, dict]] = []   # (first step, active steps, device metrics)
        window = [time.perf_counter(), 0]
        sched_arr = schedule.as_array()

        def drain(keep: int) -> None:
            """Reads the metrics of finished calls (all but the last ``keep``) and logs them."""
            while len(pending) > keep:
                first, count, m = pending.pop(0)
                host = {k: np.asarray(v) for k, v in m.items()}
                now = time.perf_counter()
                rate = window[1] / max(now - window[0], 1e-9)
                for j in range(count):
                    s = first + j + 1
                    if s % cfg.run.log_every == 0 or s == total:
                        jlog.write(event="train", step=s, loss=float(host["loss"][j]),
                                   grad_norm=float(host["grad_norm"][j]), lr=float(host["lr"][j]),
                                   examples_per_second=rate, wall_seconds=timers.elapsed())
                bar.update(count)
                bar.set_postfix(loss=f"{float(host['loss'][count - 1]):.4f}",
                                lr=f"{float(host['lr'][count - 1]):.2e}", ex_s=f"{rate:.0f}")

        def do_eval():
            nonlocal best, best_step, last_eval
            with timers.section("eval"):
                last_eval = self.evaluate(predict_fn, state.trainable, frozen)
            is_best = best is None or last_eval[task.main_metric] > best[task.main_metric]
            if is_best:
                best, best_step = dict(last_eval), step
            jlog.write(event="eval", step=step, epoch=step / spe, wall_seconds=timers.elapsed(), **last_eval)
            self.echo(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in last_eval.items()))
            with timers.section("checkpoint"):
                self.checkpoints.after_eval(step, state, last_eval, is_best)
            cadence.saved()

        t_loop = time.perf_counter()
        cadence = Cadence.of(cfg.run, total, spe)
        eval_time_before = timers.seconds["eval"] + timers.seconds["checkpoint"] + timers.seconds["compile"]
        while step < total:
            epoch, start = divmod(step, spe)
            order = self.batches.order(epoch)
            stop = min(total, (epoch + 1) * spe)
            if cfg.run.eval_every > 0:
                stop = min(stop, (step // cfg.run.eval_every + 1) * cfg.run.eval_every)
            if cfg.run.save_every > 0 and cfg.run.keep > 0:
                stop = min(stop, (step // cfg.run.save_every + 1) * cfg.run.save_every)
            specs = [order[start]]
            key = self.batches.width(order[start])
            while len(specs) < min(n, stop - step) and self.batches.width(order[start + len(specs)]) == key:
                specs.append(order[start + len(specs)])
            count = len(specs)
            chunk = self.batches.chunk(specs, self.host_rows(specs[0]))
            real = int((chunk["weights"] > 0).sum())
            tokens += _real_tokens(chunk)
            stacked = {k: np.concatenate([v, np.zeros((n - count,) + v.shape[1:], v.dtype)]) if count < n else v
                       for k, v in steps.model_inputs(chunk).items()}
            active = np.arange(n) < count
            if key not in loops:
                with timers.section("compile"):
                    loops[key] = loop_jit.lower(state, frozen, self.plan.global_batch(stacked, stacked=True),
                                                active, sched_arr).compile()
            state, m = loops[key](state, frozen, self.plan.global_batch(stacked, stacked=True), active, sched_arr)
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
                    cadence.save(due, step, state, self.checkpoints)
        drain(keep=0)
        jax.block_until_ready(state.trainable)
        spent_elsewhere = timers.seconds["eval"] + timers.seconds["checkpoint"] + timers.seconds["compile"] \
            - eval_time_before
        timers.add("train", time.perf_counter() - t_loop - spent_elsewhere)
        bar.close()
        do_eval()
        self.final_state, self.frozen = state, frozen
        with timers.section("checkpoint"):
            ckpt = self.checkpoints.close()
        with timers.section("export"):
            export = self.export(state, frozen)
            if self.is_main and cfg.run.plot:
                from jaxpeft.training import curves

                curves.plot_run(self.out, title=f"{cfg.method} on {task.name}", metric=task.main_metric)
        train_seconds = timers.seconds["train"]
        results = {
            "method": cfg.method, "task": task.name, "model": cfg.model,
            "method_options": self.method.options(), "compute": self.compute.to_dict(),
            **{k: report[k] for k in ("trainable_params", "total_params", "trainable_pct")},
            "main_metric": task.main_metric, "best_dev": best, "best_step": best_step,
            "final_dev": last_eval, "steps": step, "epochs": step / spe,
            "train_examples": len(self.train_data), "steps_per_dispatch": n, "compiled_shapes": shapes,
            "programs_reused": self.programs_reused,
            "programs_loaded": self.programs_loaded, "compile_split": self.compile_split,
            "examples_per_second": examples / max(train_seconds, 1e-9),
            "tokens_per_second": tokens / max(train_seconds, 1e-9),
            "seed": o.seed, "config": self.config_record(),
            "devices": f"{jax.device_count()}x {jax.devices()[0].device_kind}",
            "mesh": self.plan.describe(), "processes": jax.process_count(),
            "compilation_cache": None if self.cache_dir is None else str(self.cache_dir),
            **ckpt, **export, **timers.report(),
        }
        if self.is_main:
            text = json.dumps(results, indent=2, default=_json_default) + "\n"
            (self.out / "results.json").write_text(text)
        jlog.write(event="end", steps=step, **timers.report(),
                   examples_per_second=results["examples_per_second"])
        self.echo(f"done: best {task.main_metric}={best[task.main_metric]:.4f} at step {best_step}, "
                  f"final {last_eval[task.main_metric]:.4f}; {step} steps in {train_seconds:.1f}s "
                  f"({results['examples_per_second']:.1f} examples/s), {results['wall_seconds']:.1f}s in all "
                  f"(compile {results['compile_seconds']:.1f}s); results in {self.out / 'results.json'}")
        return results

    def export(self, state: steps.TrainState, frozen: Any) -> dict[str, Any]:
        """Writes the final params as an adapter (``--export_adapter``); entries for ``results.json``."""
        if not self.cfg.run.export_adapter:
            return {}
        params = masks.merge(state.trainable, frozen)
        path = Path(self.cfg.run.output_dir) / ADAPTER_DIR
        written = folder.save_adapter(
            path, params, self.method, self.task, base_model=self.cfg.model, fingerprint=self.fingerprint,
            max_seq_length=self.cfg.data.max_seq_length, compute=self.compute, step=int(state.step),
            head=self.cfg.head, write=self.is_main, model_config=self.model.config)
        return {"adapter_dir": str(written)}


def _shape_key(batch: dict, processes: int = 1) -> tuple:
    """What decides a batch's compiled shape (``processes``: a host batch holds one process's
    share of the global rows)."""
    return tuple(sorted((k, (v.shape[0] * processes,) + tuple(v.shape[1:]))
                        for k, v in batch.items() if k in steps.MODEL_INPUTS))


def _real_tokens(batch: dict) -> int:
    """The real (non-padding) tokens of a batch, or of stacked batches."""
    if "segment_ids" in batch:
        return int((batch["segment_ids"] > 0).sum())
    return int((batch["attention_mask"] * (batch["weights"] > 0)[..., None]).sum())


def _progress(total: int, enabled: bool, initial: int = 0):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, file=sys.stderr,
                unit="step")


def run(cfg: TrainConfig, echo: Callable[[str], None] = print, start: float | None = None) -> dict[str, Any]:
    """Trains ``cfg.method`` on ``cfg.task`` and returns the results (also in ``results.json``)."""
    return Trainer(cfg, echo, start).run()
