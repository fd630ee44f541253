"""Several tasks trained at once, one adapter each, in mixed batches (``--tasks=sst2,cola,mrpc``).

    jaxpeft-train --method=bitfit --tasks=sst2,cola,mrpc

One frozen base model and K adapters of one method, each with its own head. Every batch holds rows
of several tasks; each row is computed under its own task's adapter
(:func:`jaxpeft.adapters.mixed.mixed_outputs`: the adapters' leaves stacked on a leading K axis,
gathered per row, the model vmapped over the rows). It runs through the one loop
(:mod:`jaxpeft.training.loop`): the device mesh, many steps per device call, stored programs,
checkpoints and exact resume, the learning curves.

* **Each task keeps its own config.** Its learning rate, head rate, epochs and sequence length come
  from its own config (``jaxpeft/configs/<method>.py`` for that task) unless a flag sets them for
  all: its adapter's updates are scaled to its rate (AdamW is elementwise, so each task's update is
  its own), it sees its own number of epochs, and its rows are encoded at its own length.
* **Sampling.** Each row's task is drawn with probability proportional to the rows its own run
  would train (examples x epochs; ``--task_sampling=proportional``), or to that to the power
  ``1/T`` (``temperature``). A mixture epoch holds as many rows as all tasks' examples together;
  the run lasts as many mixture epochs as all tasks' own runs together hold rows. Each task's
  examples are consumed in its own shuffled order, epoch after epoch. The order is a function of
  ``(seed, epoch)``, so a resumed run sees the same batches.
* **Loss.** The sum over tasks of each task's mean loss on its rows: task A's adapter gets exactly
  the gradient a single-task step on A's rows gives it (``tests/test_multitask.py``). Gradient
  clipping is per task, over that task's adapter and head, as in its own run.
* **Reparameterised methods** (P-tuning's prompt encoder, prefix tuning's MLP) compute each task's
  prompt or prefixes once per step, not once per row.
* **Evaluation** on each task's dev split(s), reported per task (``sst2/accuracy``, ...) and as
  ``average``, the mean of the tasks' main metrics, which ranks the checkpoints.
* **Export**: each task's adapter on its own, ``<output_dir>/adapters/<task>/``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxpeft import config as config_lib
from jaxpeft import masks, runtime, tasks
from jaxpeft.adapters import folder, mixed
from jaxpeft.data import batches as batching
from jaxpeft.data.encoding import Encoded
from jaxpeft.errors import UserError
from jaxpeft.methods.base import head_patterns
from jaxpeft.models import fingerprint
from jaxpeft.models.heads import head_modules
from jaxpeft.models.hf_weights import load_tokenizer
from jaxpeft.models.loading import build_module, frozen_in_dtype, init_params, load_model, model_dir_of, param_shapes
from jaxpeft.training import loop, optim, steps
from jaxpeft.training.checkpoint import RunIdentity, sha256_arrays
from jaxpeft.training.single import check_base_dtype, default_group_by_length, setup_runtime

ADAPTERS_DIR = "adapters"
#: the main metric of a multi-task run: the mean of the tasks' main metrics
AVERAGE = "average"
INDEX = mixed.INDEX_KEY


def parse_tasks(text: str, data: Any = None) -> list[tasks.Task]:
    """``sst2,cola,mrpc`` -> the tasks (known, no repeats, one kind)."""
    names = [t.strip() for t in str(text).split(",") if t.strip()]
    if not names:
        raise UserError("--tasks is empty")
    found = [tasks.get(n, data) for n in names]
    seen: set[str] = set()
    for t in found:
        if t.name in seen:
            raise UserError(f"--tasks={text}: {t.name} is listed twice")
        seen.add(t.name)
    kinds = {t.kind for t in found}
    if kinds != {"sequence"}:
        raise UserError(f"--tasks={text}: multi-task runs train sequence tasks (these are {', '.join(sorted(kinds))})")
    return found


def sampling_probs(sizes: Sequence[float], how: str = "proportional", temperature: float = 2.0) -> np.ndarray:
    """Each task's share of the rows: proportional to ``sizes``, or to ``size^(1/temperature)``.

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


def concat_encoded(parts: Sequence[Encoded], width: int) -> tuple[Encoded, np.ndarray]:
    """One :class:`Encoded` of all tasks' examples (each at its own length, padded to ``width``;
    labels float32 if any task is regression) and each example's task."""
    labels = [p.labels for p in parts]
    dtype = np.float32 if any(lb.dtype.kind == "f" for lb in labels) else np.int32

    def pad(a):
        return np.pad(a, [(0, 0), (0, width - a.shape[1])])
    enc = Encoded(np.concatenate([pad(p.input_ids) for p in parts]),
                  np.concatenate([pad(p.token_type_ids) for p in parts]),
                  np.concatenate([p.lengths for p in parts]),
                  np.concatenate([lb.astype(dtype) for lb in labels]))
    return enc, np.concatenate([np.full(len(p), k, np.int32) for k, p in enumerate(parts)])


class TaskBatches:
    """Mixed training batches (see the module docstring), deterministic in ``(seed, epoch)``, in runs
    of one length bucket (a device call each). ``group_by_length``: each task's rows are sorted by
    length inside pools of :attr:`POOL` batches (less padding); off, a batch holds the rows as drawn."""

    POOL = 50
    run_length = batching.BucketBatches.RUN

    def __init__(self, parts: Sequence[Encoded], batch_size: int, max_length: int, seed: int, probs: np.ndarray,
                 *, group_by_length: bool = True):
        self.group_by_length = group_by_length
        self.data, self.task_of = concat_encoded(parts, max_length)
        self.sizes = [len(p) for p in parts]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)
        self.batch_size, self.seed, self.probs = batch_size, seed, np.asarray(probs)
        self.buckets = batching.length_buckets(max_length)
        self.steps_per_epoch = max(1, -(-len(self.data) // batch_size))
        self._counts: dict[int, np.ndarray] = {}      # rows drawn per task in each epoch
        self._cache: dict[int, list[np.ndarray]] = {}

    def epoch_steps(self, epoch: int) -> int:
        return self.steps_per_epoch

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
        """The epoch's batches as global example indices, in runs of one width."""
        if epoch not in self._cache:
            draws, cursor = self._draws(epoch), self._cursor(epoch)
            rows = np.empty(len(draws), np.int64)
            for k in range(len(self.sizes)):
                sel = np.flatnonzero(draws == k)
                rows[sel] = self._stream(k, int(cursor[k]), len(sel))
            b, pool = self.batch_size, self.batch_size * (self.POOL if self.group_by_length else 1)
            batches = []
            for s in range(0, len(rows), pool):
                chunk, which = rows[s:s + pool], draws[s:s + pool]
                for k in range(len(self.sizes)):   # each task's rows of the pool, shortest to the first batches
                    slots = np.flatnonzero(which == k)
                    chunk[slots] = chunk[slots][np.argsort(self.data.lengths[chunk[slots]], kind="stable")]
                batches += [chunk[i:i + b] for i in range(0, len(chunk), b)]
            np.random.default_rng([self.seed, epoch, 8]).shuffle(batches)
            self._cache = {epoch: batching.in_runs(batches, [self.width(x) for x in batches], self.run_length,
                                                   self.seed, epoch)}
        return self._cache[epoch]

    def width(self, idx: np.ndarray) -> int:
        return batching.bucket_for(int(self.data.lengths[idx].max(initial=1)), self.buckets)

    def batch(self, idx: np.ndarray, rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
        b = batching.make_batch(self.data, idx, self.buckets, rows)
        b[INDEX] = self.task_of[idx if rows is None else idx[rows]].astype(np.int32)
        return b

    def chunk(self, specs: Sequence[np.ndarray], rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
        idx = np.stack(specs)
        if rows is not None:
            idx = idx[:, rows]
        n, b = idx.shape
        flat = self.batch(idx.reshape(-1))
        return {k: v.reshape((n, b) + v.shape[1:]) for k, v in flat.items()}

    def eval_batches(self, k: int, enc: Encoded, batch_size: int, max_length: int):
        """Every example of task ``k``'s ``enc`` once, routed to adapter ``k``."""
        buckets = batching.length_buckets(max_length)
        for idx in batching.eval_order(enc.lengths, batch_size):
            b = batching.make_batch(enc, idx, buckets)
            b[INDEX] = np.full(len(idx), k, np.int32)
            yield b


# ----------------------------------------------------------------------------- loss and optimizer


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


def _per_task(scale: jax.Array, t: jax.Array) -> jax.Array:
    return t * scale.reshape((-1,) + (1,) * (t.ndim - 1)).astype(t.dtype)


def clip_per_task(max_norm: float) -> optax.GradientTransformation:
    """Clips each task's slice of the stacked gradients to ``max_norm`` by its own global norm (what
    its single-task run's clipping does)."""

    def update(updates, state, params=None):
        del params
        norms = task_grad_norms(updates)
        scale = jnp.where(norms < max_norm, 1.0, max_norm / jnp.maximum(norms, 1e-30))
        return jax.tree_util.tree_map(lambda t: _per_task(scale, t), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def scale_per_task(rates: Sequence[float], head_rates: Sequence[float], head: Sequence[str]
                   ) -> optax.GradientTransformation:
    """Scales each task's slice of the updates by its own rate (relative to the schedule's peak),
    and its head's by its own head rate."""
    rates, head_rates = jnp.asarray(rates, jnp.float32), jnp.asarray(head_rates, jnp.float32)
    head_rx = re.compile("|".join(f"(?:{p})" for p in head)) if head else None

    def update(updates, state, params=None):
        del params

        def one(kp, t):
            path = masks.path_str(kp)
            return _per_task(head_rates if head_rx is not None and head_rx.search(path) else rates, t)
        return jax.tree_util.tree_map_with_path(one, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


# ----------------------------------------------------------------------------- the job


class MultiTask(loop.Job):
    """One multi-task run (see the module docstring)."""

    #: the latest evaluation (after the run: the final one, per task in ``results.json``)
    last_eval: dict[str, float] | None = None

    def __init__(self, cfg: Any, echo: Callable[[str], None] = print, start: float | None = None):
        self.tasks = parse_tasks(cfg.tasks, cfg.data)
        self.names = [t.name for t in self.tasks]
        default_group_by_length(cfg, [t.kind for t in self.tasks])   # random batches where a task tags
        self.method = cfg.method_obj()
        inference = self.method.for_inference()
        if inference.mix is None:
            raise UserError(f"--tasks: --method={cfg.method} cannot train several tasks in one batch; "
                            f"these can: {mixed.mixable_methods()}")
        if cfg.data.packing:
            raise UserError("--tasks: --packing is not supported in multi-task runs")
        if cfg.data.length_buckets not in ("auto", "all"):
            raise UserError(f"--tasks: --length_buckets={cfg.data.length_buckets} is not supported in multi-task "
                            "runs (their batches are padded to every power of two)")
        if cfg.head.pooling == "cosine":
            raise UserError("--tasks: --pooling=cosine is not supported in multi-task runs (a batch's rows are "
                            "its examples there)")
        self.own = config_lib.task_configs(cfg, self.names)
        self.modules_to_save = cfg.head.module_list()
        setup_runtime(self, cfg, echo, start)
        check_base_dtype(self.method, self.compute)
        self.title = f"{cfg.method} on {'+'.join(self.names)}"
        self.main_metric = AVERAGE
        self.length = max(c["max_seq_length"] for c in self.own.values())
        d = cfg.data
        with self.timers.section("data"):
            self.raw_train, self.raw_evals = [], []
            for t in self.tasks:
                tr = t.read("train")
                ev = {s: t.read(s) for s in t.eval_splits}
                for s, ex in [("train", tr), *ev.items()]:
                    if not t.labelled(ex):
                        raise UserError(f"{ex.source}: split {s!r} has no labels")
                self.raw_train.append(t.take(tr, d.max_train_examples) if d.max_train_examples else tr)
                self.raw_evals.append({s: t.take(ex, d.max_eval_examples) if d.max_eval_examples else ex
                                       for s, ex in ev.items()})
        self.width = max(t.num_labels for t in self.tasks)
        head = self.tasks[0].head(cfg.head.pooling)
        head = dataclasses.replace(head, num_labels=self.width)
        with self.timers.section("startup"):
            m, o = self.method, cfg.optim
            # the splits tokenize in a background thread while the weights load (see single.py)
            model_dir = model_dir_of(cfg.model)
            encoding = runtime.Background(lambda: self.encode(load_tokenizer(model_dir)), "jaxpeft-tokenize")
            self.model = load_model(cfg.model, head, m, compute=self.compute, seed=o.seed,
                                    with_weights=not cfg.random_init,
                                    param_shardings=self.plan.tree_shardings if self.plan.mesh.size > 1 else None,
                                    model_dir=model_dir)
            family = self.model.family
            m.check_model(self.model.params, family)
            self.heads = head_modules(family, head)
            limit = getattr(self.model.config, "max_position_embeddings", None)
            if limit is not None and self.length + m.extra_positions() > limit:
                raise UserError(f"max_seq_length={self.length} plus {m.extra_positions()} virtual tokens exceeds "
                                f"the model's max_position_embeddings={limit}")
            self.mask = m.mask(self.model.params, family, self.heads, self.modules_to_save)
            per_task = [self.task_params(k) for k in range(len(self.tasks))]
            trainables = [masks.split(p, self.mask)[0] for p in per_task]
            self.trainable = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trainables)
            self.frozen_train = masks.split(self.model.params, self.mask)[1]
            self.inf_module, self.inf_frozen = self.inference_model(head)
        with self.timers.section("data"):   # what is left of the tokenizing once the weights are loaded
            self.train_data, self.eval_data = encoding.result()
            rows = [len(e) * self.own[t.name]["num_epochs"] for t, e in zip(self.tasks, self.train_data)]
            self.probs = sampling_probs(rows, cfg.task_sampling, cfg.sampling_temperature)
            self.batches = TaskBatches(self.train_data, o.batch_size, self.length, o.seed, self.probs,
                                       group_by_length=cfg.data.group_by_length)
            self.mixture_epochs = sum(rows) / max(1, sum(len(e) for e in self.train_data))
        self.total_steps = o.max_steps if o.max_steps > 0 else max(
            1, int(np.ceil(self.mixture_epochs * self.batches.steps_per_epoch)))

    def encode(self, tok: Any) -> tuple[list[Any], list[dict[str, Any]]]:
        """Each task's training data and evaluation splits, encoded at its own length."""
        return ([t.encode(tok, ex, self.own[t.name]["max_seq_length"]) for t, ex in zip(self.tasks, self.raw_train)],
                [{s: t.encode(tok, ex, self.own[t.name]["max_seq_length"]) for s, ex in evs.items()}
                 for t, evs in zip(self.tasks, self.raw_evals)])

    # -- building -----------------------------------------------------------------------------------
    def task_params(self, k: int) -> Any:
        """Task ``k``'s starting params: the base, with what the checkpoint does not provide (head,
        prompt params, a method's added leaves) initialised from its own seed."""
        base, family = self.model.params, self.model.family
        if k == 0:
            params = base
        else:
            prefix = family.prefix + "/"
            pretrained = [p for p in masks.flatten(base) if p.startswith(prefix)
                          and not (self.method.added and re.search(self.method.added, p))]
            fresh = masks.flatten(init_params(self.model.module, jax.random.key(self.cfg.optim.seed + 1000 * k),
                                              skip=pretrained))
            params = masks.unflatten({**masks.flatten(base), **fresh}, base)
        return self.method.init_params(params, family, tokenizer=self.model.tokenizer,
                                       rng=jax.random.key(self.cfg.optim.seed + 1 + 1000 * k))

    def inference_model(self, head: Any) -> tuple[Any, Any]:
        """The exported method's model (the rows run through it) and its frozen params (the base's
        leaves, holes at the exported paths; matmul kernels in the compute dtype)."""
        family, config = self.model.family, self.model.config
        inference = self.method.for_inference()
        module = build_module(family, config, head, inference, self.compute)
        exported = jax.eval_shape(lambda p: self.method.export_params(p, family, self.heads, self.modules_to_save),
                                  self.model.params)
        shapes = param_shapes(module)
        base = masks.flatten(self.model.params)
        inf_frozen = masks.unflatten({p: base[p] for p in masks.flatten(shapes) if p not in exported}, shapes)
        store = self.compute.frozen_dtype
        if store != "float32":
            inf_frozen = jax.jit(lambda f: frozen_in_dtype(f, store, family.prefix))(inf_frozen)
        return module, inf_frozen

    def export_stacked(self, trainable: Any, frozen: Any) -> dict[str, jax.Array]:
        """Each task's exported leaves (what its adapter folder holds), stacked: ``{path: [K, ...]}``."""
        family = self.model.family
        return jax.vmap(lambda t: self.method.export_params(masks.merge(t, frozen), family, self.heads,
                                                            self.modules_to_save))(trainable)

    # -- the loop's parts ---------------------------------------------------------------------------
    def initial(self) -> tuple[Any, Any]:
        # the frozen part holds both the training base (for export_params) and the inference base
        return self.trainable, {"train": self.frozen_train, "inference": self.inf_frozen}

    def loss_fn(self) -> steps.LossFn:
        rate = float(getattr(self.method, "prefix_dropout", 0.0) or 0.0)
        dropout = {"prompt/prefix_keys": rate, "prompt/prefix_values": rate} if rate > 0 else {}
        num_labels = tuple(t.num_labels for t in self.tasks)
        regression = tuple(t.is_regression for t in self.tasks)

        def loss(trainable, frozen, batch, rng):
            stacked = self.export_stacked(trainable, frozen["train"])
            logits = mixed.mixed_outputs(self.inf_module, stacked, frozen["inference"], batch, deterministic=False,
                                         rng=rng, leaf_dropout=dropout)
            total, per_task = task_losses(logits, batch["labels"], batch["weights"], batch[INDEX], num_labels,
                                          regression)
            return total, {"task_loss": per_task}

        return loss

    def predict_fn(self) -> Callable:
        def predict(trainable, frozen, batch):
            stacked = self.export_stacked(trainable, frozen["train"])
            return mixed.mixed_outputs(self.inf_module, stacked, frozen["inference"], batch)
        return predict

    def optimizer(self) -> Any:
        o = self.cfg.optim
        head = head_patterns(self.heads, self.modules_to_save)
        rates = [self.own[n]["learning_rate"] / o.learning_rate for n in self.names]
        head_rates = [(self.own[n]["head_learning_rate"] or self.own[n]["learning_rate"]) / o.learning_rate
                      for n in self.names]
        inner = optim.make_optimizer(dataclasses.replace(o, max_grad_norm=0.0, head_learning_rate=None))
        chain = [clip_per_task(o.max_grad_norm)] if o.max_grad_norm > 0 else []
        return optax.chain(*chain, inner, scale_per_task(rates, head_rates, head))

    def eval_batches(self, k: int, enc: Encoded):
        return self.batches.eval_batches(k, enc, self.cfg.data.eval_batch_size, self.length)

    def eval_examples(self) -> list[dict]:
        return [b for k, evs in enumerate(self.eval_data) for enc in evs.values() for b in self.eval_batches(k, enc)]

    def evaluate(self, predict: Callable, trainable: Any, frozen: Any) -> dict[str, float]:
        out: dict[str, float] = {}
        for k, task in enumerate(self.tasks):
            for i, (split, enc) in enumerate(self.eval_data[k].items()):
                logits = steps.predict_outputs(predict, trainable, frozen, self.eval_batches(k, enc), len(enc),
                                               self.device_batch_of_whole)
                m = task.evaluate(logits[:, :task.num_labels], enc, self.raw_evals[k][split])
                out.update({f"{task.name}/{name if i == 0 else f'{split}_{name}'}": v for name, v in m.items()})
        out[AVERAGE] = float(np.mean([out[f"{t.name}/{t.main_metric}"] for t in self.tasks]))
        self.last_eval = out
        return out

    def rows_trained(self, step: int) -> dict[str, int]:
        """The rows of each task in the first ``step`` steps."""
        counts = np.zeros(len(self.names), np.int64)
        epoch = 0
        while step > 0:
            order = self.batches.order(epoch)
            for idx in order[:step]:
                counts += np.bincount(self.batches.task_of[idx[idx >= 0]], minlength=len(self.names))
            step -= len(order)
            epoch += 1
        return dict(zip(self.names, counts.tolist()))

    def named(self, key: str, value: Any) -> Any:
        """Per-task metrics of the log by task name."""
        if key == "task_loss":
            return dict(zip(self.names, np.asarray(value).tolist()))
        return value

    def warm_modules(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(m for t in self.tasks for m in t.warm_modules()))

    def describe(self) -> str:
        per = masks.count(self.model.params, self.mask)[0]
        shares = ", ".join(f"{n} {p:.1%} ({self.own[n]['num_epochs']:g} epochs at {self.own[n]['learning_rate']:g})"
                           for n, p in zip(self.names, self.probs))
        return (f"{self.cfg.method} on {', '.join(self.names)} with {self.cfg.model}: one adapter per task, "
                f"{per:,} trainable parameters each; rows sampled {shares}\n"
                f"{sum(map(len, self.train_data)):,} training examples, {self.total_steps:,} steps of "
                f"{self.cfg.optim.batch_size} mixed rows; compute {self.compute.dtype}/{self.compute.attention_impl}; "
                f"devices {jax.device_count()}x {jax.devices()[0].platform} (mesh {self.plan.describe()})")

    def start_record(self) -> dict[str, Any]:
        return {"method_options": self.method.options(), "tasks": self.names, "task_configs": self.own,
                "train_examples": {n: len(e) for n, e in zip(self.names, self.train_data)},
                "sampling": dict(zip(self.names, self.probs.tolist()))}

    def identity(self) -> RunIdentity:
        td = self.batches.data
        self.fingerprint = fingerprint.fingerprint(self.model.params, self.cfg.model, str(self.model.model_dir),
                                                   exclude=self.method.added, prefix=self.model.prefix)
        settings = {**self.cfg.resume_settings(self.compute), "task_configs": self.own}
        return RunIdentity(
            settings=settings, config=self.config_record(), method=self.method.name,
            method_options=self.method.options(), task=",".join(self.names), num_labels=self.width,
            fingerprint=self.fingerprint, train_examples=len(td),
            train_data_sha256=sha256_arrays(td.input_ids, td.token_type_ids, td.lengths, td.labels,
                                            self.batches.task_of),
            total_steps=self.total_steps, steps_per_epoch=self.batches.steps_per_epoch)

    def program_parts(self) -> list:
        return [repr(self.inf_module), repr(self.model.module), self.names,
                [self.own[n] for n in self.names], self.modules_to_save, "multitask"]

    def export(self, state: steps.TrainState, frozen: Any) -> dict[str, Any]:
        """Each task's adapter as its own folder (``--export_adapter``): ``adapters/<task>/``."""
        if not self.cfg.run.export_adapter:
            return {}
        dirs = {}
        for k, task in enumerate(self.tasks):
            own = jax.tree_util.tree_map(lambda a: a[k], state.trainable)
            flat = masks.flatten(masks.merge(own, frozen["train"]))
            for p in list(flat):
                if p.split("/", 1)[0] in self.heads and p.endswith(("/kernel", "/bias")) \
                        and flat[p].shape[-1] == self.width:
                    flat[p] = flat[p][..., :task.num_labels]
            module = self.model.module.clone(head=dataclasses.replace(self.model.module.head, num_labels=task.num_labels))
            params = masks.unflatten(flat, param_shapes(module))
            written = folder.save_adapter(
                self.out / ADAPTERS_DIR / task.name, params, self.method, task, family=self.model.family,
                model_config=self.model.config, base_model=self.cfg.model, fingerprint=self.fingerprint,
                max_seq_length=self.own[task.name]["max_seq_length"], compute=self.compute, step=int(state.step),
                head=self.cfg.head, heads=self.heads, write=self.is_main)
            dirs[task.name] = str(written)
        return {"adapter_dirs": dirs}

    def results(self) -> dict[str, Any]:
        final = self.last_eval or {}
        by_task = {n: {k.split("/", 1)[1]: v for k, v in final.items() if k.startswith(n + "/")} for n in self.names}
        return {"method": self.cfg.method, "tasks": self.names, "model": self.cfg.model,
                "method_options": self.method.options(), "task_configs": self.own,
                "trainable_params_per_task": masks.count(self.model.params, self.mask)[0],
                "train_examples": {n: len(e) for n, e in zip(self.names, self.train_data)},
                "task_sampling": self.cfg.task_sampling, "sampling": dict(zip(self.names, self.probs.tolist())),
                "final_dev_by_task": by_task, "rows_trained": self.rows_trained(int(self.final_state.step))}


def run(cfg: Any, echo: Callable[[str], None] = print, start: float | None = None) -> dict[str, Any]:
    """Trains ``cfg.method`` on every task of ``cfg.tasks`` at once (also in ``results.json``)."""
    return loop.run(MultiTask(cfg, echo, start))
