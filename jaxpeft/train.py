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

from jaxpeft import data, masks, methods, metrics
from jaxpeft.config import TrainConfig
from jaxpeft.errors import UserError
from jaxpeft.models.loading import LoadedModel, load_classifier

log = logging.getLogger(__name__)

_NO_DECAY = re.compile(r"(bias|scale|embedding)$|LayerNorm")


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    trainable: Any
    opt_state: Any
    rng: jax.Array


# ----------------------------------------------------------------------------- optimiser


def lr_schedule(peak: float, total_steps: int, warmup_ratio: float) -> optax.Schedule:
    """Linear warm-up to ``peak`` over ``warmup_ratio * total_steps``, then linear decay to 0."""
    warmup = int(round(warmup_ratio * total_steps))
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, max(warmup, 1)),
         optax.linear_schedule(peak, 0.0, max(total_steps - warmup, 1))], [warmup])


def decay_mask(tree: Any) -> Any:
    """Weight decay on kernels only (not biases, LayerNorm, embeddings), as BERT recipes do."""
    return jax.tree_util.tree_map_with_path(
        lambda kp, _: not _NO_DECAY.search(masks.path_str(kp)), tree)


def make_optimizer(cfg: TrainConfig, total_steps: int) -> tuple[optax.GradientTransformation,
                                                                optax.Schedule]:
    schedule = lr_schedule(cfg.learning_rate, total_steps, cfg.warmup_ratio)
    tx = optax.chain(
        optax.clip_by_global_norm(cfg.max_grad_norm) if cfg.max_grad_norm > 0 else optax.identity(),
        optax.adamw(schedule, b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps,
                    weight_decay=cfg.weight_decay, mask=decay_mask),
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
    """``step(state, frozen, batch) -> (state, metrics)``; pure, to be jitted by the caller."""

    def loss_fn(trainable, frozen, batch, rng):
        logits = _apply(module, masks.merge(trainable, frozen), batch, False, rng)
        return loss_and_outputs(logits, batch["labels"], batch["weights"], regression)

    def step(state: TrainState, frozen: Any, batch: dict) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(state.rng, state.step)
        loss, grads = jax.value_and_grad(loss_fn)(state.trainable, frozen, batch, rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        new = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state)
        return new, {"loss": loss, "grad_norm": optax.global_norm(grads)}

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


def _device_batch(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "index"}


def predict_logits(predict_fn: Callable, trainable: Any, frozen: Any, encoded: data.Encoded,
                   batch_size: int, buckets) -> np.ndarray:
    """Logits for every example of ``encoded``, in its original order."""
    out = None
    for idx in data.eval_order(encoded.lengths, batch_size):
        b = data.make_batch(encoded, idx, buckets)
        logits = np.asarray(predict_fn(trainable, frozen, _device_batch(b)))
        if out is None:
            out = np.zeros((len(encoded), logits.shape[-1]), np.float32)
        real = idx >= 0
        out[idx[real]] = logits[real]
    return out


def logits_to_predictions(logits: np.ndarray, regression: bool) -> np.ndarray:
    return logits[:, 0] if regression else logits.argmax(-1)


# ----------------------------------------------------------------------------- the run


class JsonLog:
    """Appends one JSON object per line to ``path``."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, **record: Any) -> None:
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

    def __init__(self, cfg: TrainConfig, echo: Callable[[str], None] = print):
        self.cfg = cfg
        self.echo = echo
        self.out = check_output_dir(cfg.output_dir)
        self.task = data.get_task(cfg.task)
        self.method = methods.create(cfg.method, cfg.to_dict())
        if cfg.batch_size <= 0 or cfg.eval_batch_size <= 0:
            raise UserError("batch sizes must be positive")
        if cfg.max_seq_length < 8:
            raise UserError(f"max_seq_length={cfg.max_seq_length} is too short")
        # Data files first: a missing split fails before the model is loaded.
        self.raw_train = data.load_split(self.task, "train", cfg.data_dir)
        self.raw_evals = {s: data.load_split(self.task, s, cfg.data_dir) for s in self.task.eval_splits}
        for s, ex in [("train", self.raw_train), *self.raw_evals.items()]:
            if ex.labels is None:
                raise UserError(f"{ex.source}: split {s!r} has no labels")
        self.model: LoadedModel = load_classifier(
            cfg.model, self.task.num_labels, adapter=self.method.adapter, seed=cfg.seed,
            dtype=cfg.dtype, attention_impl=cfg.attention_impl, remat=cfg.remat)
        need = cfg.max_seq_length + self.method.extra_positions()
        if need > self.model.config.max_position_embeddings:
            raise UserError(f"max_seq_length={cfg.max_seq_length} plus {self.method.extra_positions()} "
                            f"virtual tokens exceeds the model's max_position_embeddings="
                            f"{self.model.config.max_position_embeddings}")
        self.params = self.method.init_params(self.model.params, tokenizer=self.model.tokenizer,
                                              rng=jax.random.key(cfg.seed + 1))
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
            logits = predict_logits(predict_fn, trainable, frozen, enc, self.cfg.eval_batch_size,
                                    self.buckets)
            preds = logits_to_predictions(logits, self.task.is_regression)
            m = metrics.compute(self.task.name, preds, enc.labels)
            out.update(m if i == 0 else {f"{split}_{k}": v for k, v in m.items()})
        return out

    # -- state and batches (where sharding and checkpoint restore plug in) --------------------
    def make_state(self, tx: optax.GradientTransformation) -> tuple[TrainState, Any]:
        """The initial train state and the frozen params."""
        trainable, frozen = masks.split(self.params, self.mask)
        return init_state(trainable, tx, self.cfg.seed), frozen

    def device_batch(self, batch: dict) -> dict:
        """A host batch as the step's input (drops host-only keys)."""
        return _device_batch(batch)

    def on_step_end(self, step: int, state: TrainState) -> None:
        """Called after every train step (checkpointing hooks in here)."""

    def on_eval(self, step: int, state: TrainState, metrics_: dict[str, float], is_best: bool) -> None:
        """Called after every evaluation."""

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg, task = self.cfg, self.task
        self.out.mkdir(parents=True, exist_ok=True)
        self.jlog = jlog = JsonLog(self.out / "log.jsonl")
        report = self.param_report()
        self.echo(f"{cfg.method} on {task.name} with {cfg.model}: " + masks.describe(self.params, self.mask)
                  + f" (method {report['method_params']:,} = {report['method_pct']:.4f}%, "
                  f"head {report['head_params']:,})")
        total = self.total_steps()
        tx, schedule = make_optimizer(cfg, total)
        state, frozen = self.make_state(tx)
        step_fn = jax.jit(make_train_step(self.model.module, tx, task.is_regression), donate_argnums=(0,))
        predict_fn = jax.jit(make_predict_step(self.model.module))
        jlog.write(event="start", config=cfg.to_dict(), method_options=self.method.options(),
                   train_examples=len(self.train_data), total_steps=total, buckets=self.buckets,
                   devices=[str(d) for d in jax.devices()], **report)
        self.echo(f"{len(self.train_data):,} training examples, {total:,} steps of {cfg.batch_size}, "
                  f"buckets {list(self.buckets)}, devices {jax.device_count()}x {jax.devices()[0].platform}")

        spe = self.steps_per_epoch()
        best: dict[str, float] | None = None
        best_step, last_eval = 0, None
        eval_seconds, examples = 0.0, 0
        t_start = time.perf_counter()
        pending: list[tuple[int, dict]] = []
        window_t, window_ex = time.perf_counter(), 0
        step = int(state.step)
        bar = _progress(total, cfg.progress, initial=step)

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
            for batch in data.iterate(self.train_data, order, self.buckets, start=start):
                n_real = int(batch["weights"].sum())
                state, m = step_fn(state, frozen, self.device_batch(batch))
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
                                       grad_norm=float(mm["grad_norm"]), lr=float(schedule(s - 1)),
                                       examples_per_second=rate)
                    bar.set_postfix(loss=f"{float(m['loss']):.4f}", lr=f"{float(schedule(step - 1)):.2e}",
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
        }
        (self.out / "results.json").write_text(json.dumps(results, indent=2, default=_json_default) + "\n")
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
