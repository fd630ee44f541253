"""The training loop and the jitted steps.

The train step differentiates only the trainable part of the params: ``masks.split`` turns the
params into a trainable tree and a frozen tree (holes are ``optax.MaskedNode``), ``jax.grad`` is
taken w.r.t. the trainable tree, and the optimizer (``adamw`` after global-norm clipping) is
initialised on it -- so frozen weights get neither weight gradients nor optimizer state. This is
``masks.multi_transform(tx, mask)`` on the full tree, minus the zero updates of frozen leaves
(``tests/test_train_step.py`` checks the two agree).
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxpeft import data, masks, methods, metrics, multihost, sharding
from jaxpeft.checkpoint import TrainerCheckpoints
from jaxpeft.config import TrainConfig
from jaxpeft.errors import UserError
from jaxpeft.models.bert import kernels_in_compute_dtype
from jaxpeft.models.loading import LoadedModel, load_classifier

log = logging.getLogger(__name__)

_NO_DECAY = re.compile(r"(bias|scale|embeddings?|prefix_keys|prefix_values)$|LayerNorm")


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    trainable: Any
    opt_state: Any
    rng: jax.Array


# ----------------------------------------------------------------------------- optimiser


def lr_schedule(peak: float, total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    """Linear warm-up to ``peak`` over ``warmup_ratio * total_steps``, then linear decay to 0.

    Returns the learning rate of update number ``step`` (0-based) as a Python float, the same values
    as ``optax.join_schedules`` of two ``optax.linear_schedule``s. It is evaluated on the host and
    passed to the jitted step as an argument, so runs that differ only in learning rate or length
    share one compiled step (and the persistent compilation cache).

    >>> f = lr_schedule(1.0, total_steps=10, warmup_ratio=0.2)
    >>> [round(f(s), 3) for s in (0, 1, 2, 6, 10)]
    [0.0, 0.5, 1.0, 0.5, 0.0]
    """
    warmup = int(round(warmup_ratio * total_steps))

    def lr(step: int) -> float:
        if step < warmup:
            return peak * step / warmup
        return peak * max(0.0, (total_steps - step) / max(total_steps - warmup, 1))

    return lr


def decay_mask(tree: Any) -> Any:
    """Weight decay on kernels only (not biases, LayerNorm, embeddings), as BERT recipes do."""
    return jax.tree_util.tree_map_with_path(
        lambda kp, _: not _NO_DECAY.search(masks.path_str(kp)), tree)


# leaves of at most this many elements go into one concatenated reduction in ``grad_norm``
_NORM_GROUP_SIZE = 1 << 16


def grad_norm(tree: Any) -> jax.Array:
    """The global L2 norm of ``tree``, as ``optax.tree.norm`` (float32 sums), with all small leaves
    (biases, LayerNorm params, prompts, the head) squared and summed as one concatenated vector.

    One reduction per leaf is one kernel per leaf: over a hundred tiny kernels per step for BERT's
    biases and LayerNorms, each costing more in launch than in work. The sum's order differs from
    ``optax.tree.norm``'s, so the two agree to float32 rounding, not bitwise.
    """
    leaves = jax.tree_util.tree_leaves(tree)
    small = [x.reshape(-1).astype(jnp.float32) for x in leaves if x.size <= _NORM_GROUP_SIZE]
    sums = [jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves if x.size > _NORM_GROUP_SIZE]
    if small:
        sums.append(jnp.sum(jnp.square(jnp.concatenate(small))))
    return jnp.sqrt(sum(sums)) if sums else jnp.zeros((), jnp.float32)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """``optax.clip_by_global_norm`` (same state, same formula) with :func:`grad_norm`."""

    def update(updates, state, params=None):
        del params
        norm = grad_norm(updates)
        keep = norm < max_norm
        return jax.tree_util.tree_map(
            lambda t: jax.lax.select(keep, t, (t / norm.astype(t.dtype)) * max_norm), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(cfg: TrainConfig, total_steps: int) -> tuple[optax.GradientTransformation,
                                                                Callable[[int], float]]:
    """AdamW after global-norm clipping, *without* the learning rate, plus the lr schedule.

    ``tx`` ends with ``scale(-1)``: the train step multiplies its updates by the step's learning
    rate, which makes ``tx`` + schedule exactly ``optax.adamw(schedule, ...)``.
    """
    schedule = lr_schedule(cfg.learning_rate, total_steps, cfg.warmup_ratio)
    tx = optax.chain(
        clip_by_global_norm(cfg.max_grad_norm) if cfg.max_grad_norm > 0 else optax.identity(),
        optax.scale_by_adam(b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps),
        optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask) if cfg.weight_decay
        else optax.identity(),
        optax.scale(-1.0),
        head_rate_scale(cfg))
    return tx, schedule


def head_rate_scale(cfg: TrainConfig) -> optax.GradientTransformation:
    """Scales the task head's updates by ``head_learning_rate / learning_rate`` (same schedule,
    other peak), so reparameterised prompt methods can train their encoder slowly and the head at
    a usual rate. Identity when ``head_learning_rate`` is unset."""
    if cfg.head_learning_rate is None or cfg.head_learning_rate == cfg.learning_rate:
        return optax.identity()
    if cfg.head_learning_rate <= 0 or cfg.learning_rate <= 0:
        raise UserError("learning_rate and head_learning_rate must be positive")
    head = re.compile(methods.HEAD_PATTERN)
    return optax.masked(optax.scale(cfg.head_learning_rate / cfg.learning_rate),
                        lambda tree: jax.tree_util.tree_map_with_path(
                            lambda kp, _: bool(head.search(masks.path_str(kp))), tree))


# ----------------------------------------------------------------------------- steps


def loss_and_outputs(logits: jax.Array, labels: jax.Array, weights: jax.Array,
                     regression: bool) -> jax.Array:
    """Mean loss over the real rows (``weights`` 1) of a batch: cross-entropy, or MSE for regression."""
    if regression:
        per = (logits[:, 0] - labels.astype(jnp.float32)) ** 2
    else:
        per = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.sum(per * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def _apply(module, params, batch, deterministic, rng=None):
    rngs = None if rng is None else {"dropout": rng}
    return module.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                        batch["token_type_ids"], deterministic=deterministic, rngs=rngs)


def make_train_step(module, tx: optax.GradientTransformation, regression: bool) -> Callable:
    """``step(state, frozen, batch, lr) -> (state, metrics)``; pure, to be jitted by the caller.

    ``lr`` is this update's learning rate (a scalar), see :func:`make_optimizer`.
    """

    def loss_fn(trainable, frozen, batch, rng):
        logits = _apply(module, masks.merge(trainable, frozen), batch, False, rng)
        return loss_and_outputs(logits, batch["labels"], batch["weights"], regression)

    def step(state: TrainState, frozen: Any, batch: dict, lr: jax.Array) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(state.rng, state.step)
        loss, grads = jax.value_and_grad(loss_fn)(state.trainable, frozen, batch, rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        updates = jax.tree_util.tree_map(lambda u: (lr * u).astype(u.dtype), updates)
        trainable = optax.apply_updates(state.trainable, updates)
        new = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state)
        return new, {"loss": loss, "grad_norm": grad_norm(grads)}

    return step


def make_predict_step(module) -> Callable:
    """``predict(trainable, frozen, batch) -> logits`` (no dropout)."""

    def predict(trainable, frozen, batch):
        return _apply(module, masks.merge(trainable, frozen), batch, True)

    return predict


def init_state(trainable: Any, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """A fresh state; ``trainable`` is copied, so donating the state leaves the caller's arrays alive."""
    trainable = jax.tree_util.tree_map(jnp.copy, trainable)
    return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, opt_state=tx.init(trainable),
                      rng=jax.random.key_data(jax.random.key(seed)))


PRNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")


def set_prng_impl(name: str) -> str:
    """Selects JAX's default PRNG (used for dropout). ``auto``: ``rbg`` on accelerators, where
    threefry's integer arithmetic makes dropout masks expensive, ``threefry2x32`` on CPU."""
    if name == "auto":
        name = "threefry2x32" if jax.default_backend() == "cpu" else "rbg"
    if name not in PRNG_IMPLS:
        raise UserError(f"unknown prng_impl {name!r}; known: auto, {', '.join(PRNG_IMPLS)}")
    jax.config.update("jax_default_prng_impl", name)
    return name


def _device_batch(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "index"}


def predict_logits(predict_fn: Callable, trainable: Any, frozen: Any, encoded: data.Encoded,
                   batch_size: int, buckets, device_batch: Callable[[np.ndarray], dict] | None = None
                   ) -> np.ndarray:
    """Logits for every example of ``encoded``, in its original order.

    ``device_batch(idx)`` builds the model input of the global batch ``idx`` (default: the whole
    batch from the host); ``predict_fn`` must return the logits of the whole batch.
    """
    if device_batch is None:
        device_batch = lambda idx: _device_batch(data.make_batch(encoded, idx, buckets))  # noqa: E731
    out = None
    for idx in data.eval_order(encoded.lengths, batch_size):
        logits = np.asarray(predict_fn(trainable, frozen, device_batch(idx)))
        if out is None:
            out = np.zeros((len(encoded), logits.shape[-1]), np.float32)
        real = idx >= 0
        out[idx[real]] = logits[real]
    return out


def logits_to_predictions(logits: np.ndarray, regression: bool) -> np.ndarray:
    return logits[:, 0] if regression else logits.argmax(-1)


# ----------------------------------------------------------------------------- the run


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


def check_output_dir(path: str) -> Path:
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"output dir {path!r} exists and is a file")
    return p


class Trainer:
    """Holds everything of one run; ``run()`` trains, evaluates and writes ``results.json``."""

    checkpoints: TrainerCheckpoints | None = None  # opened by resume()

    def __init__(self, cfg: TrainConfig, echo: Callable[[str], None] = print):
        self.cfg = cfg
        self.echo = echo
        self.out = check_output_dir(cfg.output_dir)
        self.task = data.get_task(cfg.task)
        self.method = methods.create(cfg.method, cfg.to_dict())
        if cfg.prng_impl not in ("auto",) + PRNG_IMPLS:
            raise UserError(f"unknown prng_impl {cfg.prng_impl!r}; known: auto, {', '.join(PRNG_IMPLS)}")
        if cfg.batch_size <= 0 or cfg.eval_batch_size <= 0:
            raise UserError("batch sizes must be positive")
        if cfg.max_seq_length < 8:
            raise UserError(f"max_seq_length={cfg.max_seq_length} is too short")
        self.plan = self.make_plan()   # before anything else touches JAX (multi-process init)
        self.prng_impl = set_prng_impl(cfg.prng_impl)
        self.is_main = multihost.is_main_process()
        if not self.is_main:
            self.echo = lambda s: None
        # Data files first: a missing split fails before the model is loaded.
        self.raw_train = data.load_split(self.task, "train", cfg.data_dir)
        self.raw_evals = {s: data.load_split(self.task, s, cfg.data_dir) for s in self.task.eval_splits}
        for s, ex in [("train", self.raw_train), *self.raw_evals.items()]:
            if ex.labels is None:
                raise UserError(f"{ex.source}: split {s!r} has no labels")
        self.model: LoadedModel = load_classifier(
            cfg.model, self.task.num_labels, adapter=self.method.adapter, seed=cfg.seed,
            dtype=cfg.dtype, attention_impl=cfg.attention_impl, remat=cfg.remat, dropout_bits=cfg.dropout_bits,
            dropout_impl=cfg.dropout_impl, norm_impl=cfg.norm_impl, activation_impl=cfg.activation_impl,
            with_weights=not cfg.random_init, param_shardings=self.plan.tree_shardings)
        need = cfg.max_seq_length + self.method.extra_positions()
        if need > self.model.config.max_position_embeddings:
            raise UserError(f"max_seq_length={cfg.max_seq_length} plus {self.method.extra_positions()} "
                            f"virtual tokens exceeds the model's max_position_embeddings="
                            f"{self.model.config.max_position_embeddings}")
        self.params = self.plan.put(self.method.init_params(
            self.model.params, tokenizer=self.model.tokenizer, rng=jax.random.key(cfg.seed + 1)))
        self.mask = self.method.mask(self.params)
        self.buckets = data.length_buckets(cfg.max_seq_length)
        train = self.raw_train.take(cfg.max_train_examples) if cfg.max_train_examples else self.raw_train
        self.train_data = data.encode(self.model.tokenizer, train, cfg.max_seq_length)
        self.eval_data = {
            s: data.encode(self.model.tokenizer, ex.take(cfg.max_eval_examples) if cfg.max_eval_examples
                           else ex, cfg.max_seq_length)
            for s, ex in self.raw_evals.items()}

    # -- bookkeeping -------------------------------------------------------------------------
    def param_report(self) -> dict[str, Any]:
        t, n = masks.count(self.params, self.mask)
        head_t, _ = masks.count(self.params, masks.match(self.params, include=methods.HEAD_PATTERN))
        return {"trainable_params": t, "total_params": n, "trainable_pct": 100.0 * t / n,
                "head_params": head_t, "method_params": t - head_t,
                "method_pct": 100.0 * (t - head_t) / n}

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.train_data) / self.cfg.batch_size)

    def total_steps(self) -> int:
        if self.cfg.max_steps > 0:
            return self.cfg.max_steps
        return max(1, math.ceil(self.cfg.num_epochs * self.steps_per_epoch()))

    def evaluate(self, predict_fn, trainable, frozen) -> dict[str, float]:
        out: dict[str, float] = {}
        for i, (split, enc) in enumerate(self.eval_data.items()):
            to_device = lambda idx, e=enc: self.device_batch(self.host_batch(e, idx))  # noqa: E731
            logits = predict_logits(predict_fn, trainable, frozen, enc, self.cfg.eval_batch_size,
                                    self.buckets, to_device)
            preds = logits_to_predictions(logits, self.task.is_regression)
            m = metrics.compute(self.task.name, preds, enc.labels)
            out.update(m if i == 0 else {f"{split}_{k}": v for k, v in m.items()})
        return out

    # -- state and batches (where sharding and checkpoint restore plug in) --------------------
    def make_plan(self) -> sharding.MeshPlan:
        """Joins the other processes of a multi-process run, then builds the device mesh."""
        cfg = self.cfg
        multihost.initialize(cfg.distributed, cfg.coordinator_address, cfg.num_processes, cfg.process_id)
        plan = sharding.create_plan(cfg.mesh, cfg.fsdp_min_size)
        plan.check_batch_size(cfg.batch_size, "batch_size")
        plan.check_batch_size(cfg.eval_batch_size, "eval_batch_size")
        return plan

    def make_state(self, tx: optax.GradientTransformation) -> tuple[TrainState, Any]:
        """The initial train state and the frozen params, on the mesh (``self.plan.state_shardings``
        and ``self.plan.tree_shardings`` say where; a restored state must be placed the same way).
        Frozen matmul kernels are kept in the compute dtype (``kernels_in_compute_dtype``)."""
        trainable, frozen = masks.split(self.params, self.mask)
        frozen = kernels_in_compute_dtype(frozen, self.model.config)
        state, _ = self.plan.init(lambda t: init_state(t, tx, self.cfg.seed), trainable,
                                  shardings=self.plan.state_shardings)
        return self.resume(state), frozen

    def resume(self, state: TrainState) -> TrainState:
        """Opens ``output_dir/checkpoints``; returns the latest complete checkpoint's state when
        resuming, else ``state``. ``state`` (freshly built, on the mesh) gives the target shapes and
        shardings of the restore."""
        self.checkpoints = TrainerCheckpoints(self)
        return self.checkpoints.resume(state)

    def host_batch(self, encoded: data.Encoded, idx: np.ndarray) -> dict:
        """This process's rows of the global batch ``idx`` (all of them in a one-process run)."""
        return data.make_batch(encoded, idx, self.buckets, rows=self.plan.process_rows(len(idx)))

    def device_batch(self, batch: dict) -> dict:
        """A host batch as the step's input: host-only keys dropped, the processes' rows assembled
        into global arrays split over the mesh's batch axes."""
        return self.plan.global_batch(_device_batch(batch))

    def on_step_end(self, step: int, state: TrainState) -> None:
        """Called after every train step: a checkpoint every ``save_every`` steps."""
        if self.checkpoints is not None:
            self.checkpoints.after_step(step, state)

    def on_eval(self, step: int, state: TrainState, metrics_: dict[str, float], is_best: bool) -> None:
        """Called after every evaluation: a checkpoint ranked by the dev metric."""
        if self.checkpoints is not None:
            self.checkpoints.after_eval(step, state, metrics_, is_best)

    def resumed_best(self) -> tuple[dict[str, float] | None, int]:
        """The best dev metrics and their step so far: ``(None, 0)``, or those of the resumed run."""
        if self.checkpoints is None:
            return None, 0
        return self.checkpoints.best, self.checkpoints.best_step

    def on_train_end(self, state: TrainState, frozen: Any) -> dict[str, Any]:
        """Called after the final evaluation: waits for checkpoint writes, exports the adapter;
        returns entries for ``results.json``."""
        return {} if self.checkpoints is None else self.checkpoints.finish(state, frozen)

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg, task = self.cfg, self.task
        self.out.mkdir(parents=True, exist_ok=True)
        self.jlog = jlog = JsonLog(self.out / "log.jsonl", enabled=self.is_main)
        report = self.param_report()
        self.echo(f"{cfg.method} on {task.name} with {cfg.model}: " + masks.describe(self.params, self.mask)
                  + f" (method {report['method_params']:,} = {report['method_pct']:.4f}%, "
                  f"head {report['head_params']:,})")
        total = self.total_steps()
        tx, schedule = make_optimizer(cfg, total)
        state, frozen = self.make_state(tx)
        # one compilation per bucket length at most (the plan raises beyond that)
        state_sh, frozen_sh = self.plan.state_shardings(state), self.plan.tree_shardings(frozen)
        state, frozen = self.plan.put(state, state_sh), self.plan.put(frozen, frozen_sh)  # no-op if placed
        step_fn = self.plan.jit_train_step(make_train_step(self.model.module, tx, task.is_regression),
                                           state_sh, frozen_sh, max_traces=len(self.buckets))
        predict_fn = self.plan.jit_predict(make_predict_step(self.model.module), state_sh.trainable,
                                           frozen_sh, max_traces=len(self.buckets))
        jlog.write(event="start", config=cfg.to_dict(), method_options=self.method.options(),
                   train_examples=len(self.train_data), total_steps=total, buckets=self.buckets,
                   devices=[str(d) for d in jax.devices()], mesh=self.plan.describe(),
                   processes=jax.process_count(), **report)
        self.echo(f"{len(self.train_data):,} training examples, {total:,} steps of {cfg.batch_size}, "
                  f"buckets {list(self.buckets)}, devices {jax.device_count()}x {jax.devices()[0].platform}"
                  f" (mesh {self.plan.describe()}, {jax.process_count()} process(es))")

        spe = self.steps_per_epoch()
        best, best_step = self.resumed_best()
        last_eval = None
        eval_seconds, examples = 0.0, 0
        t_start = time.perf_counter()
        pending: list[tuple[int, dict]] = []
        window_t, window_ex = time.perf_counter(), 0
        step = int(state.step)
        bar = _progress(total, cfg.progress and self.is_main, initial=step)

        def do_eval():
            nonlocal best, best_step, last_eval, eval_seconds
            t0 = time.perf_counter()
            last_eval = self.evaluate(predict_fn, state.trainable, frozen)
            eval_seconds += time.perf_counter() - t0
            is_best = best is None or last_eval[task.main_metric] > best[task.main_metric]
            if is_best:
                best, best_step = dict(last_eval), step
            jlog.write(event="eval", step=step, epoch=step / spe, **last_eval)
            self.echo(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in last_eval.items()))
            self.on_eval(step, state, last_eval, is_best)

        while step < total:
            epoch, start = divmod(step, spe)
            order = data.epoch_order(self.train_data.lengths, cfg.batch_size, cfg.seed, epoch)
            for idx in order[start:]:
                n_real = int((idx >= 0).sum())
                state, m = step_fn(state, frozen, self.device_batch(self.host_batch(self.train_data, idx)),
                                   np.float32(schedule(step)))
                step += 1
                examples += n_real
                window_ex += n_real
                pending.append((step, m))
                bar.update(1)
                if step % cfg.log_every == 0 or step == total:
                    jax.block_until_ready(m)
                    now = time.perf_counter()
                    rate = window_ex / max(now - window_t, 1e-9)
                    for s, mm in pending:
                        if s % cfg.log_every == 0 or s == total:
                            jlog.write(event="train", step=s, loss=float(mm["loss"]),
                                       grad_norm=float(mm["grad_norm"]), lr=schedule(s - 1),
                                       examples_per_second=rate)
                    bar.set_postfix(loss=f"{float(m['loss']):.4f}", lr=f"{schedule(step - 1):.2e}",
                                    ex_s=f"{rate:.0f}")
                    pending.clear()
                    window_t, window_ex = time.perf_counter(), 0
                epoch_end = step % spe == 0
                if step < total and ((cfg.eval_every > 0 and step % cfg.eval_every == 0)
                                     or (cfg.eval_every <= 0 and epoch_end)):
                    do_eval()
                    window_t = time.perf_counter()
                self.on_step_end(step, state)
                if step >= total:
                    break
        jax.block_until_ready(state.trainable)
        train_seconds = time.perf_counter() - t_start - eval_seconds
        bar.close()
        do_eval()
        self.final_state, self.frozen = state, frozen
        results = {
            "method": cfg.method, "task": task.name, "model": cfg.model,
            "method_options": self.method.options(),
            **{k: report[k] for k in ("trainable_params", "total_params", "trainable_pct")},
            "main_metric": task.main_metric, "best_dev": best, "best_step": best_step,
            "final_dev": last_eval, "steps": step, "epochs": step / spe,
            "train_examples": len(self.train_data),
            "train_seconds": train_seconds, "examples_per_second": examples / max(train_seconds, 1e-9),
            "seed": cfg.seed, "config": cfg.to_dict(),
            "devices": f"{jax.device_count()}x {jax.devices()[0].device_kind}",
            "mesh": self.plan.describe(), "processes": jax.process_count(),
            **self.on_train_end(state, frozen),
        }
        if self.is_main:
            text = json.dumps(results, indent=2, default=_json_default) + "\n"
            (self.out / "results.json").write_text(text)
        jlog.write(event="end", **{k: results[k] for k in ("steps", "train_seconds", "examples_per_second")})
        self.echo(f"done: best {task.main_metric}={best[task.main_metric]:.4f} at step {best_step}, "
                  f"final {last_eval[task.main_metric]:.4f}; {step} steps in {train_seconds:.1f}s "
                  f"({results['examples_per_second']:.1f} examples/s); results in {self.out / 'results.json'}")
        return results


def _progress(total: int, enabled: bool, initial: int = 0):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, file=sys.stderr,
                unit="step")


def run(cfg: TrainConfig, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Trains ``cfg.method`` on ``cfg.task`` and returns the results (also in ``results.json``)."""
    return Trainer(cfg, echo).run()
