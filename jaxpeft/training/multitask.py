"""Several GLUE tasks trained at once, one adapter each, in mixed batches (``--tasks=sst2,cola,mrpc``).

    jaxpeft-train --method=bitfit --tasks=sst2,cola,mrpc --task_sampling=temperature

One frozen base model and K adapters of one method (BitFit, prompt tuning, P-tuning, prefix
tuning, P-tuning v2), each with its own head. Every batch holds rows of several tasks; each row is
computed under its own task's adapter (:func:`jaxpeft.adapters.mixed.mixed_logits`: the adapters'
leaves stacked on a leading K axis, gathered per row, the model vmapped over the rows).

* **Sampling.** Each row's task is drawn with probability proportional to the task's training
  examples (``--task_sampling=proportional``) or to ``size^(1/T)`` (``temperature``,
  ``--sampling_temperature=T``: T=1 is proportional, larger T is closer to uniform, so small tasks
  get more rows). Each task's examples are consumed in its own shuffled order, epoch after epoch.
  Within a pool of 50 batches each batch keeps its drawn mix of tasks, and each task's rows are
  handed out shortest first, so a batch holds short rows of every task or long rows of every task
  (less padding, still mixed); the batches are then shuffled. An "epoch" is as many rows as all tasks' training examples together. The order is a
  function of ``(seed, epoch)``, so a resumed run sees the same batches.
* **Loss.** The sum over tasks of each task's mean loss on its rows (cross-entropy on its own
  labels, or MSE for STS-B): task A's adapter gets exactly the gradient a single-task step on A's
  rows gives it (``tests/test_multitask.py``). Gradient clipping (``--max_grad_norm``) is per task,
  over that task's adapter and head, as in its own run; AdamW is elementwise, so each task's
  update is its own. One learning-rate schedule for all tasks.
* **Reparameterised methods** (P-tuning's prompt encoder, prefix tuning's MLP) compute each task's
  prompt or prefixes once per step (``export_params`` vmapped over the K adapters), not once per
  row; the rows then read the computed prompts as the exported adapters would. P-tuning v2's
  dropout on its prefixes is applied per row to the gathered prefixes.
* **Evaluation** on each task's dev split(s), reported per task (``sst2/accuracy``,
  ``cola/matthews_correlation``, ...) and as ``average``, the mean of the tasks' main metrics,
  which ranks the checkpoints.
* **Checkpoints and resume** as in single-task runs (:class:`jaxpeft.training.checkpoint.Checkpoints`: the
  stacked trainable leaves and their optimizer state; the same settings, tasks, sampling and data
  to resume).
* **Export**: each task's adapter on its own, ``<output_dir>/adapters/<task>/``, a normal adapter
  folder (``jaxpeft-predict --adapter=DIR``; or all of them at once with
  ``--adapter=NAME=DIR ...``).

Simpler than the single-task loop (:mod:`jaxpeft.training.trainer`): one device, a plain jitted step per
batch (no scanned multi-step device calls), no packing, no learning-curve plot.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxpeft import masks, runtime
from jaxpeft.adapters import folder, mixed
from jaxpeft.data import batches, encoding
from jaxpeft.tasks import glue, metrics
from jaxpeft.models import fingerprint
from jaxpeft.training import optim, steps
from jaxpeft.training.checkpoint import Cadence, Checkpoints, RunIdentity, sha256_arrays
from jaxpeft.compute import EXACT
from jaxpeft.config import TrainConfig
from jaxpeft.errors import UserError
from jaxpeft.methods.base import HEAD_PATTERN, module_pattern
from jaxpeft.models.bert import BertForSequenceClassification, kernels_in_compute_dtype
from jaxpeft.models.loading import init_params, load_classifier, param_shapes
from jaxpeft.training.optim import grad_norm

ADAPTERS_DIR = "adapters"
#: the main metric of a multi-task run: the mean of the tasks' main metrics
AVERAGE = "average"
INDEX = mixed.INDEX_KEY


def parse_tasks(text: str) -> list[glue.GlueTask]:
    """``sst2,cola,mrpc`` -> the tasks (known, no repeats)."""
    names = [t.strip() for t in str(text).split(",") if t.strip()]
    if not names:
        raise UserError("--tasks is empty")
    tasks = [glue.get_task(n) for n in names]
    seen = set()
    for t in tasks:
        if t.name in seen:
            raise UserError(f"--tasks={text}: {t.name} is listed twice")
        seen.add(t.name)
    return tasks


def sampling_probs(sizes: Sequence[int], how: str = "proportional", temperature: float = 2.0) -> np.ndarray:
    """Each task's share of the rows: proportional to its size, or to ``size^(1/temperature)``.

    >>> sampling_probs([300, 100]).round(3).tolist(), sampling_probs([300, 100], "temperature", 2.0).round(3).tolist()
    ([0.75, 0.25], [0.634, 0.366])
    """
    n = np.asarray(sizes, np.float64)
    if how == "temperature":
        n = n ** (1.0 / temperature)
    elif how != "proportional":
        raise UserError(f"--task_sampling={how}: choose one of proportional, temperature")
    return n / n.sum()


# ----------------------------------------------------------------------------- batches


def concat_encoded(parts: Sequence[encoding.Encoded]) -> tuple[encoding.Encoded, np.ndarray]:
    """One :class:`~jaxpeft.data.encoding.Encoded` of all tasks' examples (labels float32 if any task is
    regression) and each example's task."""
    labels = [p.labels for p in parts]
    dtype = np.float32 if any(lb.dtype.kind == "f" for lb in labels) else np.int32
    enc = encoding.Encoded(np.concatenate([p.input_ids for p in parts]),
                       np.concatenate([p.token_type_ids for p in parts]),
                       np.concatenate([p.lengths for p in parts]),
                       np.concatenate([lb.astype(dtype) for lb in labels]))
    return enc, np.concatenate([np.full(len(p), k, np.int32) for k, p in enumerate(parts)])


class TaskBatches:
    """Mixed training batches (see the module docstring), deterministic in ``(seed, epoch)``."""

    POOL = 50

    def __init__(self, parts: Sequence[encoding.Encoded], batch_size: int, max_length: int, seed: int,
                 probs: np.ndarray):
        self.data, self.task_of = concat_encoded(parts)
        self.sizes = [len(p) for p in parts]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)
        self.batch_size, self.seed, self.probs = batch_size, seed, np.asarray(probs)
        self.buckets = batches.length_buckets(max_length)
        self.steps_per_epoch = max(1, -(-len(self.data) // batch_size))
        self._counts: dict[int, np.ndarray] = {}      # rows drawn per task in each epoch
        self._cache: dict[int, list[np.ndarray]] = {}

    def _draws(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch, 7])
        return rng.choice(len(self.sizes), size=self.steps_per_epoch * self.batch_size, p=self.probs)

    def _cursor(self, epoch: int) -> np.ndarray:
        """How many examples of each task the epochs before ``epoch`` used."""
        total = np.zeros(len(self.sizes), np.int64)
        for e in range(epoch):
            if e not in self._counts:
                self._counts[e] = np.bincount(self._draws(e), minlength=len(self.sizes))
            total += self._counts[e]
        return total

    def _stream(self, k: int, start: int, n: int) -> np.ndarray:
        """Examples ``start .. start+n-1`` of task ``k``'s stream (its shuffled passes, one after
        another), as global indices."""
        size = self.sizes[k]
        pos = start + np.arange(n)
        out = np.empty(n, np.int64)
        for r in np.unique(pos // size):
            perm = np.random.default_rng([self.seed, k, int(r), 9]).permutation(size)
            sel = pos // size == r
            out[sel] = perm[pos[sel] % size]
        return out + self.offsets[k]

    def order(self, epoch: int) -> list[np.ndarray]:
        """The epoch's batches as global example indices."""
        if epoch not in self._cache:
            draws, cursor = self._draws(epoch), self._cursor(epoch)
            rows = np.empty(len(draws), np.int64)
            for k in range(len(self.sizes)):
                sel = np.flatnonzero(draws == k)
                rows[sel] = self._stream(k, int(cursor[k]), len(sel))
            b, pool = self.batch_size, self.batch_size * self.POOL
            batches = []
            for s in range(0, len(rows), pool):
                chunk, tasks = rows[s:s + pool], draws[s:s + pool]
                for k in range(len(self.sizes)):   # each task's rows of the pool, shortest to the first batches
                    slots = np.flatnonzero(tasks == k)
                    chunk[slots] = chunk[slots][np.argsort(self.data.lengths[chunk[slots]], kind="stable")]
                batches += [chunk[i:i + b] for i in range(0, len(chunk), b)]
            np.random.default_rng([self.seed, epoch, 8]).shuffle(batches)
            self._cache = {epoch: batches}
        return self._cache[epoch]

    def width(self, idx: np.ndarray) -> int:
        return batches.bucket_for(int(self.data.lengths[idx].max(initial=1)), self.buckets)

    def batch(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        b = batches.make_batch(self.data, idx, self.buckets)
        b[INDEX] = self.task_of[idx].astype(np.int32)
        return b

    def eval_batches(self, k: int, enc: encoding.Encoded, batch_size: int):
        """Every example of task ``k``'s ``enc`` once, routed to adapter ``k``."""
        for idx in batches.eval_order(enc.lengths, batch_size):
            b = batches.make_batch(enc, idx, self.buckets)
            b[INDEX] = np.full(len(idx), k, np.int32)
            yield b


# ----------------------------------------------------------------------------- loss and step


def task_losses(logits: jax.Array, labels: jax.Array, weights: jax.Array, index: jax.Array,
                num_labels: Sequence[int], regression: Sequence[bool]) -> tuple[jax.Array, jax.Array]:
    """``(sum over tasks of each task's mean loss, the per-task means [K])``.

    Row ``b`` belongs to task ``index[b]``: cross-entropy over that task's own labels (the padded
    logits of a wider head are left out), or MSE on logit 0 for a regression task. A task without
    rows in the batch adds 0.
    """
    k, width = len(num_labels), logits.shape[-1]
    own = jnp.asarray(num_labels)[index]
    is_reg = jnp.asarray(regression)[index]
    valid = jnp.arange(width)[None, :] < own[:, None]
    classes = jnp.clip(jnp.where(is_reg, 0, labels), 0, width - 1).astype(jnp.int32)
    ce = optax.softmax_cross_entropy_with_integer_labels(jnp.where(valid, logits, -1e30), classes)
    mse = (logits[:, 0] - labels.astype(jnp.float32)) ** 2
    per_row = jnp.where(is_reg, mse, ce)
    w = weights[:, None] * (index[:, None] == jnp.arange(k)[None, :])          # [B, K]
    per_task = jnp.sum(w * per_row[:, None], axis=0) / jnp.maximum(jnp.sum(w, axis=0), 1.0)
    return jnp.sum(per_task), per_task


def task_grad_norms(tree: Any) -> jax.Array:
    """Each task's global gradient norm ``[K]`` (leaves stacked on a leading task axis)."""
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)).reshape(x.shape[0], -1), axis=1)
                        for x in leaves))


def clip_per_task(max_norm: float) -> optax.GradientTransformation:
    """Clips each task's slice of the stacked gradients to ``max_norm`` by its own global norm (what
    its single-task run's ``clip_by_global_norm`` does)."""

    def update(updates, state, params=None):
        del params
        norms = task_grad_norms(updates)
        scale = jnp.where(norms < max_norm, 1.0, max_norm / jnp.maximum(norms, 1e-30))
        return jax.tree_util.tree_map(
            lambda t: (t * scale.reshape((-1,) + (1,) * (t.ndim - 1)).astype(t.dtype)), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(o: Any, head_patterns: Sequence[str]) -> optax.GradientTransformation:
    """:func:`jaxpeft.training.optim.make_optimizer` with the clipping done per task."""
    inner = optim.make_optimizer(dataclasses.replace(o, max_grad_norm=0.0), head_patterns)
    return optax.chain(clip_per_task(o.max_grad_norm), inner) if o.max_grad_norm > 0 else inner


@dataclasses.dataclass
class MixedModel:
    """What a multi-task step computes with: the training method (its trainable leaves stacked per
    task), the inference model the rows run through, and the settings of the loss."""

    method: Any
    module: Any                   # the inference method's classifier, the widest head
    modules_to_save: tuple[str, ...]
    num_labels: tuple[int, ...]
    regression: tuple[bool, ...]
    leaf_dropout: dict[str, float]

    def export(self, trainable: Any, frozen: Any) -> dict[str, jax.Array]:
        """Each task's exported leaves (what its adapter folder holds), stacked: ``{path: [K, ...]}``."""
        return jax.vmap(lambda t: self.method.export_params(masks.merge(t, frozen), self.modules_to_save))(trainable)

    def loss(self, trainable, frozen, inf_frozen, batch, rng):
        stacked = self.export(trainable, frozen)
        logits = mixed.mixed_logits(self.module, stacked, inf_frozen, batch, deterministic=rng is None,
                                            rng=rng, leaf_dropout=self.leaf_dropout if rng is not None else None)
        return task_losses(logits, batch["labels"], batch["weights"], batch[INDEX], self.num_labels,
                           self.regression)

    def train_step(self, tx: optax.GradientTransformation) -> Callable:
        """``step(state, frozen, inf_frozen, batch, lr) -> (state, metrics)`` (pure)."""

        def step(state, frozen, inf_frozen, batch, lr):
            rng = jax.random.fold_in(state.rng, state.step)
            (loss, per_task), grads = jax.value_and_grad(self.loss, has_aux=True)(
                state.trainable, frozen, inf_frozen, batch, rng)
            updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
            updates = jax.tree_util.tree_map(lambda u: (lr * u).astype(u.dtype), updates)
            new = state.replace(step=state.step + 1, trainable=optax.apply_updates(state.trainable, updates),
                                opt_state=opt_state)
            return new, {"loss": loss, "task_loss": per_task, "task_grad_norm": task_grad_norms(grads),
                         "grad_norm": grad_norm(grads), "lr": jnp.asarray(lr, jnp.float32)}

        return step


def build_mixed(method: Any, config: Any, params: Any, tasks: Sequence[glue.GlueTask], *, compute: Any = EXACT,
                pooling: str = "cls", modules_to_save: Sequence[str] = ()) -> tuple[MixedModel, Any]:
    """The mixed model of ``method`` for ``tasks`` and the frozen params of its inference classifier
    (``params``' base leaves; holes at the exported paths; matmul kernels in the compute dtype).

    ``params``: a full params tree of ``method``'s training classifier (the base, one task's
    adapter): it gives the shapes of what a task's adapter exports.
    """
    width = max(t.num_labels for t in tasks)
    inference = method.for_inference()
    module = BertForSequenceClassification(config, width, adapter=inference.adapter(config), compute=compute,
                                           extras=inference.extras(config), pooling=pooling)
    exported = jax.eval_shape(lambda p: method.export_params(p, tuple(modules_to_save)), params)
    shapes = param_shapes(module)
    base = masks.flatten(params)
    inf_frozen = masks.unflatten({p: base[p] for p in masks.flatten(shapes) if p not in exported}, shapes)
    if compute.dtype != "float32":
        inf_frozen = jax.jit(lambda f: kernels_in_compute_dtype(f, compute))(inf_frozen)
    rate = float(getattr(method, "prefix_dropout", 0.0) or 0.0)
    dropout = {"adapter/prefix_keys": rate, "adapter/prefix_values": rate} if rate > 0 else {}
    mixed = MixedModel(method, module, tuple(modules_to_save), tuple(t.num_labels for t in tasks),
                       tuple(t.is_regression for t in tasks), dropout)
    return mixed, inf_frozen


# ----------------------------------------------------------------------------- the run


class MultiTaskTrainer:
    """One multi-task run; ``run()`` trains, evaluates, exports and writes ``results.json``."""

    checkpoints: Checkpoints | None = None

    def __init__(self, cfg: TrainConfig, echo: Callable[[str], None] = print, start: float | None = None):
        from jaxpeft.training.trainer import check_output_dir

        self.timers = runtime.Timers(start)
        self.cfg, self.echo = cfg, echo
        self.tasks = parse_tasks(cfg.tasks)
        self.method = cfg.method_obj()
        inference = self.method.for_inference()
        if mixed.family_of(inference.name) is None:
            raise UserError(f"--tasks: --method={cfg.method} cannot train several tasks in one batch; "
                            f"these can: {mixed.supported_methods()}")
        if cfg.data.packing:
            raise UserError("--tasks: --packing is not supported in multi-task runs")
        if cfg.head.pooling == "cosine":
            raise UserError("--tasks: --pooling=cosine is not supported in multi-task runs (a batch's rows are "
                            "its examples there)")
        if cfg.devices.mesh or (cfg.devices.num_processes or 1) > 1:
            raise UserError("--tasks: multi-task runs use one device (no --mesh, no multi-process runs)")
        self.out = check_output_dir(cfg.run.output_dir)
        self.modules_to_save = cfg.head.module_list()
        with self.timers.section("startup"):
            self.cache_dir = runtime.enable_compilation_cache(cfg.devices.compilation_cache)
            self.compute = cfg.resolve_compute(num_devices=1)
            runtime.set_prng_impl(self.compute.prng_impl)
        d = cfg.data
        with self.timers.section("data"):
            raw_train, raw_evals = [], []
            for t in self.tasks:
                tr = glue.load_split(t, "train", d.data_dir)
                ev = {s: glue.load_split(t, s, d.data_dir) for s in t.eval_splits}
                for s, ex in [("train", tr), *ev.items()]:
                    if ex.labels is None:
                        raise UserError(f"{ex.source}: split {s!r} has no labels")
                raw_train.append(tr.take(d.max_train_examples) if d.max_train_examples else tr)
                raw_evals.append({s: ex.take(d.max_eval_examples) if d.max_eval_examples else ex
                                  for s, ex in ev.items()})
        self.width = max(t.num_labels for t in self.tasks)
        with self.timers.section("startup"):
            m, o = self.method, cfg.optim
            self.model = load_classifier(cfg.model, self.width, adapter=m.adapter, extras=m.extras, added=m.added,
                                         compute=self.compute, seed=o.seed, with_weights=not cfg.random_init,
                                         pooling=cfg.head.pooling)
            need = d.max_seq_length + m.extra_positions()
            if need > self.model.config.max_position_embeddings:
                raise UserError(f"max_seq_length={d.max_seq_length} plus {m.extra_positions()} virtual tokens "
                                f"exceeds the model's max_position_embeddings={self.model.config.max_position_embeddings}")
            self.mask = m.mask(self.model.params, self.modules_to_save)
            per_task = [self.task_params(k) for k in range(len(self.tasks))]
            trainables = [masks.split(p, self.mask)[0] for p in per_task]
            self.trainable = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trainables)
            self.frozen = masks.split(self.model.params, self.mask)[1]
            self.mixed, self.inf_frozen = build_mixed(
                m, self.model.config, self.model.params, self.tasks, compute=self.compute,
                pooling=cfg.head.pooling, modules_to_save=self.modules_to_save)
        with self.timers.section("data"):
            tok = self.model.tokenizer
            self.train_data = [encoding.encode_cached(tok, ex, d.max_seq_length) for ex in raw_train]
            self.eval_data = [{s: encoding.encode_cached(tok, ex, d.max_seq_length) for s, ex in evs.items()}
                              for evs in raw_evals]
            self.probs = sampling_probs([len(e) for e in self.train_data], cfg.task_sampling,
                                        cfg.sampling_temperature)
            self.batches = TaskBatches(self.train_data, o.batch_size, d.max_seq_length, o.seed, self.probs)

    # -- building -----------------------------------------------------------------------------
    def task_params(self, k: int) -> Any:
        """Task ``k``'s starting params: the base, with what the checkpoint does not provide (head,
        prompt or prefix params, a method's added leaves) initialised from its own seed."""
        base = self.model.params
        if k == 0:
            params = base
        else:
            pretrained = [p for p in masks.flatten(base) if p.startswith("bert/")
                          and not (self.method.added and re.search(self.method.added, p))]
            fresh = masks.flatten(init_params(self.model.module, jax.random.key(self.cfg.optim.seed + 1000 * k),
                                              skip=pretrained))
            params = masks.unflatten({**masks.flatten(base), **fresh}, base)
        return self.method.init_params(params, tokenizer=self.model.tokenizer,
                                       rng=jax.random.key(self.cfg.optim.seed + 1 + 1000 * k))

    # -- bookkeeping -----------------------------------------------------------------------------
    def total_steps(self) -> int:
        o = self.cfg.optim
        if o.max_steps > 0:
            return o.max_steps
        return max(1, math.ceil(o.num_epochs * self.batches.steps_per_epoch))

    def settings(self) -> dict[str, Any]:
        from jaxpeft.training.trainer import trajectory_settings

        out = trajectory_settings(self.cfg, self.compute)
        out.update(tasks=",".join(t.name for t in self.tasks), task_sampling=self.cfg.task_sampling,
                   sampling_temperature=self.cfg.sampling_temperature)
        return out

    def config_record(self) -> dict[str, Any]:
        return {**self.cfg.to_flat(), "resolved_compute": self.compute.to_dict()}

    def identity(self) -> RunIdentity:
        td = self.batches.data
        self.fingerprint = fingerprint.fingerprint(self.model.params, self.cfg.model, str(self.model.model_dir),
                                                   exclude=self.method.added)
        return RunIdentity(
            settings=self.settings(), config=self.config_record(), method=self.method.name,
            method_options=self.method.options(), task=",".join(t.name for t in self.tasks),
            num_labels=self.width, fingerprint=self.fingerprint, train_examples=len(td),
            train_data_sha256=sha256_arrays(td.input_ids, td.token_type_ids, td.lengths, td.labels,
                                            self.batches.task_of),
            total_steps=self.total_steps(), steps_per_epoch=self.batches.steps_per_epoch)

    def data_position(self, step: int) -> dict[str, Any]:
        spe = self.batches.steps_per_epoch
        epoch, batch = divmod(step, spe)
        return {"epoch": epoch, "batch": batch, "steps_per_epoch": spe,
                "batch_order_sha256": batches.order_digest(self.batches.order(epoch)[batch:])}

    def evaluate(self, export_fn, predict_fn, trainable) -> dict[str, float]:
        stacked = export_fn(trainable, self.frozen)
        out: dict[str, float] = {}
        for k, task in enumerate(self.tasks):
            for i, (split, enc) in enumerate(self.eval_data[k].items()):
                batches = self.batches.eval_batches(k, enc, self.cfg.data.eval_batch_size)
                logits = steps.predict_logits(predict_fn, stacked, self.inf_frozen, batches, len(enc))
                preds = steps.logits_to_predictions(logits[:, :task.num_labels], task.is_regression)
                m = metrics.compute(task.name, preds, enc.labels)
                out.update({f"{task.name}/{name if i == 0 else f'{split}_{name}'}": v for name, v in m.items()})
        out[AVERAGE] = float(np.mean([out[f"{t.name}/{t.main_metric}"] for t in self.tasks]))
        return out

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        from jaxpeft.training.trainer import JsonLog

        cfg, timers, o = self.cfg, self.timers, self.cfg.optim
        names = [t.name for t in self.tasks]
        self.out.mkdir(parents=True, exist_ok=True)
        jlog = JsonLog(self.out / "log.jsonl")
        per_task_params = masks.count(self.model.params, self.mask)[0]
        self.echo(f"{cfg.method} on {', '.join(names)} with {cfg.model}: one adapter per task, "
                  f"{per_task_params:,} trainable parameters each; rows sampled "
                  + ", ".join(f"{n} {p:.1%}" for n, p in zip(names, self.probs)))
        total, spe = self.total_steps(), self.batches.steps_per_epoch
        head = [HEAD_PATTERN] + [module_pattern(m) for m in self.modules_to_save]
        tx = make_optimizer(o, head)
        schedule = optim.Schedule.create(o.learning_rate, total, o.warmup_ratio)
        with timers.section("startup"):
            state = steps.init_state(self.trainable, tx, o.seed)
        with timers.section("checkpoint"):
            self.checkpoints = Checkpoints(
                cfg.run.output_dir, self.identity(), keep=cfg.run.keep, save_every=cfg.run.save_every,
                resume=cfg.run.resume, main_metric=AVERAGE, data_position=self.data_position, echo=self.echo,
                log=jlog.write)
            state = self.checkpoints.resume(state)
        xla = self.compute.compiler_options()
        step_jit = jax.jit(self.mixed.train_step(tx), donate_argnums=(0,), compiler_options=xla)
        export_fn = jax.jit(self.mixed.export, compiler_options=xla)
        predict_fn = jax.jit(mixed.make_mixed_predict_step(self.mixed.module), compiler_options=xla)
        compiled: dict[int, Any] = {}
        jlog.write(event="start", config=self.config_record(), method_options=self.method.options(), tasks=names,
                   train_examples={n: len(e) for n, e in zip(names, self.train_data)},
                   sampling=dict(zip(names, self.probs.tolist())), total_steps=total,
                   trainable_params_per_task=per_task_params, devices=[str(dv) for dv in jax.devices()])
        self.echo(f"{sum(map(len, self.train_data)):,} training examples, {total:,} steps of {o.batch_size} mixed "
                  f"rows; compute {self.compute.dtype}/{self.compute.attention_impl}/{self.compute.norm_impl}")

        best, best_step = self.checkpoints.best, self.checkpoints.best_step
        last_eval = None
        step = int(state.step)
        rows_seen = np.zeros(len(names), np.int64)
        examples = 0
        bar = _progress_bar(total, cfg.run.progress, initial=step)
        pending: list[tuple[int, dict]] = []
        window = [time.perf_counter(), 0]

        def drain(keep: int) -> None:
            while len(pending) > keep:
                s, m = pending.pop(0)
                if s % cfg.run.log_every == 0 or s == total:
                    host = {k: np.asarray(v) for k, v in m.items()}
                    rate = window[1] / max(time.perf_counter() - window[0], 1e-9)
                    jlog.write(event="train", step=s, loss=float(host["loss"]), lr=float(host["lr"]),
                               grad_norm=float(host["grad_norm"]),
                               task_loss=dict(zip(names, host["task_loss"].tolist())),
                               task_grad_norm=dict(zip(names, host["task_grad_norm"].tolist())),
                               examples_per_second=rate, wall_seconds=timers.elapsed())
                    bar.set_postfix(loss=f"{float(host['loss']):.4f}", ex_s=f"{rate:.0f}")

        def do_eval():
            nonlocal best, best_step, last_eval
            with timers.section("eval"):
                last_eval = self.evaluate(export_fn, predict_fn, state.trainable)
            is_best = best is None or last_eval[AVERAGE] > best[AVERAGE]
            if is_best:
                best, best_step = dict(last_eval), step
            jlog.write(event="eval", step=step, epoch=step / spe, wall_seconds=timers.elapsed(), **last_eval)
            self.echo(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in last_eval.items()))
            with timers.section("checkpoint"):
                self.checkpoints.after_eval(step, state, last_eval, is_best)
            cadence.saved()

        t_loop = time.perf_counter()
        cadence = Cadence.of(cfg.run, total, spe)
        before = timers.seconds["eval"] + timers.seconds["checkpoint"] + timers.seconds["compile"]
        while step < total:
            epoch, b = divmod(step, spe)
            spec = self.batches.order(epoch)[b]
            batch = steps.model_inputs(self.batches.batch(spec))
            lr = np.float32(schedule(step))
            key = self.batches.width(spec)
            if key not in compiled:
                with timers.section("compile"):
                    compiled[key] = step_jit.lower(state, self.frozen, self.inf_frozen, batch, lr).compile()
            state, m = compiled[key](state, self.frozen, self.inf_frozen, batch, lr)
            rows_seen += np.bincount(batch[INDEX][batch["weights"] > 0], minlength=len(names))
            real = int((batch["weights"] > 0).sum())
            examples += real
            window[1] += real
            step += 1
            pending.append((step, m))
            drain(keep=1)
            bar.update(1)
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
        elsewhere = timers.seconds["eval"] + timers.seconds["checkpoint"] + timers.seconds["compile"] - before
        timers.add("train", time.perf_counter() - t_loop - elsewhere)
        bar.close()
        do_eval()
        self.final_state = state
        with timers.section("checkpoint"):
            ckpt = self.checkpoints.close()
        with timers.section("export"):
            exported = self.export(state)
        train_seconds = timers.seconds["train"]
        by_task = {n: {k.split("/", 1)[1]: v for k, v in last_eval.items() if k.startswith(n + "/")} for n in names}
        results = {
            "method": cfg.method, "tasks": names, "model": cfg.model, "method_options": self.method.options(),
            "compute": self.compute.to_dict(), "trainable_params_per_task": per_task_params,
            "total_params": masks.count(self.model.params, self.mask)[1],
            "main_metric": AVERAGE, "best_dev": best, "best_step": best_step, "final_dev": last_eval,
            "final_dev_by_task": by_task, "steps": step, "epochs": step / spe,
            "train_examples": {n: len(e) for n, e in zip(names, self.train_data)},
            "task_sampling": cfg.task_sampling, "sampling_temperature": cfg.sampling_temperature,
            "sampling": dict(zip(names, self.probs.tolist())),
            "rows_trained": dict(zip(names, rows_seen.tolist())),
            "examples_per_second": examples / max(train_seconds, 1e-9), "seed": o.seed,
            "config": self.config_record(), "devices": f"{jax.device_count()}x {jax.devices()[0].device_kind}",
            **ckpt, **exported, **timers.report(),
        }
        (self.out / "results.json").write_text(json.dumps(results, indent=2, default=_json_default) + "\n")
        jlog.write(event="end", steps=step, **timers.report(), examples_per_second=results["examples_per_second"])
        self.echo(f"done: {AVERAGE}={last_eval[AVERAGE]:.4f} (best {best[AVERAGE]:.4f} at step {best_step}); "
                  + ", ".join(f"{t.name} {t.main_metric}={last_eval[f'{t.name}/{t.main_metric}']:.4f}"
                              for t in self.tasks)
                  + f"; {step} steps in {train_seconds:.1f}s, {results['wall_seconds']:.1f}s in all; results in "
                  f"{self.out / 'results.json'}")
        return results

    def export(self, state: steps.TrainState) -> dict[str, Any]:
        """Each task's adapter as its own folder (``--export_adapter``): ``adapters/<task>/``."""
        if not self.cfg.run.export_adapter:
            return {}
        dirs = {}
        for k, task in enumerate(self.tasks):
            own = jax.tree_util.tree_map(lambda a: a[k], state.trainable)
            flat = masks.flatten(masks.merge(own, self.frozen))
            for p in ("classifier/kernel", "classifier/bias"):
                flat[p] = flat[p][..., :task.num_labels]
            written = folder.save_adapter(
                self.out / ADAPTERS_DIR / task.name, masks.unflatten(flat, self.model.params), self.method, task, base_model=self.cfg.model,
                fingerprint=self.fingerprint, max_seq_length=self.cfg.data.max_seq_length, compute=self.compute,
                step=int(state.step), head=self.cfg.head)
            dirs[task.name] = str(written)
        return {"adapter_dirs": dirs}


def _progress_bar(total: int, enabled: bool, initial: int = 0):
    import sys

    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, file=sys.stderr, unit="step")


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.generic, jax.Array)):
        return np.asarray(x).item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x)}")


def run(cfg: TrainConfig, echo: Callable[[str], None] = print, start: float | None = None) -> dict[str, Any]:
    """Trains ``cfg.method`` on every task of ``cfg.tasks`` at once (also in ``results.json``)."""
    return MultiTaskTrainer(cfg, echo, start).run()
