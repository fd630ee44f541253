"""One task, one method, one model: the run behind ``jaxpeft-train --method=bitfit --task=sst2``.

:class:`SingleTask` reads the task's data, builds the model (the family from the checkpoint, the
method's hooks and prompt, the task's head), and supplies the loop (:mod:`jaxpeft.training.loop`)
with batches (length buckets, or packed rows), the task's loss, its evaluation and the adapter
export.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence

import jax

from jaxpeft import masks, runtime, tasks
from jaxpeft.adapters import folder
from jaxpeft.data import batches as batching
from jaxpeft.data import packing
from jaxpeft.errors import UserError
from jaxpeft.methods.base import head_patterns, module_pattern
from jaxpeft.models import fingerprint, quant, sizes
from jaxpeft.models.heads import head_modules
from jaxpeft.models.hf_weights import load_tokenizer
from jaxpeft.models.loading import LoadedModel, frozen_in_dtype, load_model, model_dir_of
from jaxpeft.training import loop, multihost, optim, sharding, steps
from jaxpeft.training.checkpoint import RunIdentity, sha256_arrays

ADAPTER_DIR = "adapter"


def check_output_dir(path: str) -> Path:
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"output dir {path!r} exists and is a file")
    return p


def make_plan(cfg: Any) -> sharding.MeshPlan:
    """Joins the other processes of a multi-process run, then builds the device mesh."""
    dv = cfg.devices
    multihost.initialize(dv.distributed, dv.coordinator_address, dv.num_processes, dv.process_id)
    plan = sharding.create_plan(dv.mesh, dv.fsdp_min_size)
    plan.check_batch_size(cfg.optim.batch_size, "batch_size")
    plan.check_batch_size(cfg.data.eval_batch_size, "eval_batch_size")
    return plan


def setup_runtime(job: loop.Job, cfg: Any, echo: Callable[[str], None], start: float | None) -> None:
    """What every job sets up first: timers, the output folder, the compilation cache, the mesh (and
    the other processes of a multi-process run) and the compute spec."""
    job.timers = runtime.Timers(start)
    job.cfg, job.echo = cfg, echo
    job.out = check_output_dir(cfg.run.output_dir)
    with job.timers.section("startup"):
        job.cache_dir = runtime.enable_compilation_cache(cfg.devices.compilation_cache)
        job.plan = make_plan(cfg)   # before anything else touches JAX (multi-process init)
        job.compute = cfg.resolve_compute(num_devices=job.plan.mesh.size)
        runtime.set_prng_impl(job.compute.prng_impl)
        job.is_main = multihost.is_main_process()
        if not job.is_main:
            job.echo = lambda s: None


def check_pooling(pooling: str, task: tasks.Task, packing_on: bool) -> None:
    """``--pooling`` reads sequences; ``cosine`` compares the two sentences of a pair, one unpacked
    row per example."""
    if task.kind != "sequence" and pooling != "cls":
        raise UserError(f"--pooling={pooling}: the {task.kind} head of {task.name} reads every token; --pooling "
                        "applies to sequence tasks")
    if pooling == "cosine":
        if task.kind != "sequence" or getattr(task, "num_texts", 1) != 2:
            raise UserError(f"--pooling=cosine compares the two sentences of a pair; {task.name} has "
                            f"{'one sentence' if task.kind == 'sequence' else task.kind + ' examples'} per example")
        if packing_on:
            raise UserError("--packing: --pooling=cosine encodes each pair's sentences apart, which packed rows "
                            "do not; use --no-packing or another --pooling")


def default_pooling(cfg: Any, echo: Callable[[str], None]) -> None:
    """A method config's ``pooling=cosine`` for a pair task (tuned on BERT-type pairs) falls back to
    ``cls`` on a family whose pairs have no token types to split them by (RoBERTa, MPNet); a
    ``--pooling=cosine`` the caller gave is left for :func:`check_pooling`'s model check to refuse."""
    if cfg.head.pooling != "cosine" or "pooling" in getattr(cfg, "given", {}) or sizes.is_random(cfg.model):
        return
    from jaxpeft.models import hf_weights

    family, _ = hf_weights.load_config(hf_weights.resolve_model_dir(cfg.model))
    if not family.pair_types:
        cfg.head.pooling = "cls"
        echo(f"pooling: cls (the {cfg.method} config's cosine pooling splits a pair by token types, which "
             f"{family.name}'s pairs do not have)")


def default_group_by_length(cfg: Any, kinds: Sequence[str]) -> None:
    """``--group_by_length`` unset: decided by the tasks' kinds (:func:`batches.groups_by_length`)."""
    if cfg.data.group_by_length is None:
        cfg.data.group_by_length = batching.groups_by_length(kinds)


#: effective training FLOP/s of one device on an encoder (as measured on MiniLM: an H100 reached
#: 1.1-1.5e14 in NER and SQuAD jobs; the 2-core CPU 1-2e11), and the seconds a 6-layer encoder's
#: program takes to trace and compile (H100: 11.2 s for 8 programs; 2-core CPU: about 4 s each)
DEVICE_RATES = {"gpu": (1.5e14, 1.4), "tpu": (1.5e14, 1.4), "cpu": (1.5e11, 4.0)}


def padding_costs(config: Any, platform: str | None = None) -> tuple[Callable[[int, bool], float], float]:
    """Expected seconds of one row at a padded width (training or prediction) and of one
    compiled program, for an encoder of ``config`` on one device of ``platform``: a row's
    FLOPs (``2 x`` the layers' weights per token forward, ``6 x`` training, and attention over the
    width) at the device's rate (:data:`DEVICE_RATES`); a program's seconds grow with the layers."""
    platform = platform or jax.devices()[0].platform
    rate, program = DEVICE_RATES.get(platform, DEVICE_RATES["gpu"])
    layers, h, inter = config.num_hidden_layers, config.hidden_size, config.intermediate_size
    weights = 4 * h * h + 2 * h * inter

    def row_seconds(width: int, train: bool) -> float:
        per_token = layers * ((6 if train else 2) * weights + (12 if train else 4) * h * width)
        return width * per_token / rate

    return row_seconds, program * layers / 6


def check_base_dtype(method: Any, compute: Any) -> None:
    """A quantized base must be frozen: a method that trains the matrices refuses it."""
    if compute.quantized and method.trains_matrices:
        raise UserError(f"--base_dtype={compute.base_dtype}: --method={method.name} trains the weight matrices, "
                        "which a quantized base cannot hold; use --base_dtype=bfloat16 or float32, or a PEFT method")


class SingleTask(loop.Job):
    """One run of one method on one task (see the module docstring)."""

    def __init__(self, cfg: Any, echo: Callable[[str], None] = print, start: float | None = None):
        self.task = tasks.get(cfg.task, cfg.data, cfg.optim.seed)
        self.method = cfg.method_obj()
        self.modules_to_save = cfg.head.module_list()
        if cfg.data.packing and not self.method.supports_packing:
            raise UserError(f"--packing: --method={cfg.method} puts its prompt into every row's input; "
                            "packed rows need the prompt per example, which it does not support")
        default_pooling(cfg, echo)
        default_group_by_length(cfg, [self.task.kind])
        check_pooling(cfg.head.pooling, self.task, cfg.data.packing)
        setup_runtime(self, cfg, echo, start)
        check_base_dtype(self.method, self.compute)
        if getattr(self.task, "note", ""):
            self.echo(self.task.note)
        self.title = f"{cfg.method} on {self.task.name}"
        self.main_metric = self.task.main_metric
        d = cfg.data
        with self.timers.section("data"):
            # data files first: a missing split fails before the model is loaded
            self.raw_train = self.task.read("train")
            self.raw_evals = {s: self.task.read(s) for s in self.task.eval_splits}
            for s, ex in [("train", self.raw_train), *self.raw_evals.items()]:
                if not self.task.labelled(ex):
                    raise UserError(f"{getattr(ex, 'source', s)}: split {s!r} has no labels")
        with self.timers.section("startup"):
            # the splits tokenize in a background thread, with a tokenizer of their own, while the
            # weights load (the tokenizers library encodes outside the interpreter lock)
            model_dir = model_dir_of(cfg.model)
            encoding = runtime.Background(lambda: self.encode(load_tokenizer(model_dir)), "jaxpeft-tokenize")
            self.model: LoadedModel = load_model(
                cfg.model, self.task.head(cfg.head.pooling), self.method, compute=self.compute,
                seed=cfg.optim.seed, with_weights=not cfg.random_init,
                param_shardings=self.plan.tree_shardings if self.plan.mesh.size > 1 else None,
                modules_to_save=self.modules_to_save, model_dir=model_dir)
            family = self.model.family
            self.method.check_model(self.model.shapes if self.model.stored else self.model.params, family)
            self.heads = head_modules(family, self.task.head(cfg.head.pooling))
            limit = getattr(self.model.config, "max_position_embeddings", None)
            need = d.max_seq_length + self.method.extra_positions()
            if limit is not None and need > limit:
                raise UserError(f"max_seq_length={d.max_seq_length} plus {self.method.extra_positions()} "
                                f"virtual tokens exceeds the model's max_position_embeddings={limit}")
            self.params = self.plan.put(self.method.init_params(
                self.model.params, family, tokenizer=self.model.tokenizer, rng=jax.random.key(cfg.optim.seed + 1)))
            for module in self.modules_to_save:
                if not masks.trainable_paths(masks.match(self.param_tree, include=module_pattern(module),
                                                         allow_empty=True)):
                    raise UserError(f"--modules_to_save={cfg.head.modules_to_save}: this model has no module "
                                    f"{module!r}" + (f" (--pooling={cfg.head.pooling} reads no pooler)" if
                                                     cfg.head.pooling != "cls" else ""))
            self.mask = self.method.mask(self.param_tree, family, self.heads, self.modules_to_save)
            if self.model.stored:   # a random size: a prompt read from the stored vocabulary is float32 again
                self.params = sizes.restore_float(self.params, self.model.shapes, self.mask)
        with self.timers.section("data"):   # what is left of the tokenizing once the weights are loaded
            self.train_data, self.eval_raw, self.eval_data = encoding.result()
            self.batches = self.make_batches()
        self.total_steps = self._total_steps()

    # -- data ---------------------------------------------------------------------------------------
    def encode(self, tok: Any) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        """``(train, raw evaluation splits, encoded evaluation splits)``, as many examples as the
        run takes."""
        d = self.cfg.data
        train = self.task.take(self.raw_train, d.max_train_examples) if d.max_train_examples else self.raw_train
        eval_raw = {s: self.task.take(ex, d.max_eval_examples) if d.max_eval_examples else ex
                    for s, ex in self.raw_evals.items()}
        return (self.task.encode(tok, train, d.max_seq_length), eval_raw,
                {s: self.task.encode(tok, ex, d.max_seq_length) for s, ex in eval_raw.items()})

    def make_batches(self) -> batching.BucketBatches | packing.PackedBatches:
        o, d = self.cfg.optim, self.cfg.data
        if d.packing:
            epochs = max(1, math.ceil(o.num_epochs)) if o.max_steps <= 0 else max(
                1, math.ceil(o.max_steps / max(1, math.ceil(len(self.train_data) / o.batch_size))))
            return packing.PackedBatches(self.train_data, o.batch_size, d.max_seq_length, o.seed, epochs,
                                         row_multiple=self.plan.data_parallel_size)
        batches = batching.BucketBatches(self.train_data, o.batch_size, d.max_seq_length, o.seed,
                                         group_by_length=d.group_by_length)
        if d.length_buckets == "auto":
            batches.use_buckets(self.plan_buckets(batches))
        elif d.length_buckets != "all":
            batches.use_buckets([int(b) for b in d.length_buckets.split(",")] + [batches.ladder[-1]])
        return batches

    def plan_buckets(self, batches: batching.BucketBatches) -> tuple[int, ...]:
        """``--length_buckets=auto``: :func:`jaxpeft.data.batches.plan_buckets` with this run's rows
        (every epoch's training batches, every evaluation's) and this device's expected costs
        (:func:`padding_costs`)."""
        o, r = self.cfg.optim, self.cfg.run
        epochs = (o.max_steps / batches.steps_per_epoch) if o.max_steps > 0 else o.num_epochs
        train = {w: n * epochs for w, n in batches.ladder_rows(0).items()}
        steps_total = epochs * batches.steps_per_epoch
        evals = math.ceil(steps_total / r.eval_every) if r.eval_every > 0 else math.ceil(epochs)   # the last: the final
        ev: dict[int, float] = {}
        for enc in self.eval_data.values():
            for w, n in batches.eval_ladder_rows(enc, self.cfg.data.eval_batch_size).items():
                ev[w] = ev.get(w, 0) + n * evals
        # as on one device: a mesh of any size pads (and so computes, dropout included) as one device does
        row_seconds, program_seconds = padding_costs(self.model.config)
        return batching.plan_buckets(train, ev, batches.ladder, row_seconds, program_seconds)

    def _total_steps(self) -> int:
        o = self.cfg.optim
        if o.max_steps > 0:
            return o.max_steps
        whole = int(o.num_epochs)
        total = sum(self.batches.epoch_steps(e) for e in range(whole))
        frac = o.num_epochs - whole
        if frac > 0:
            total += math.ceil(frac * self.batches.epoch_steps(whole))
        return max(1, total)

    def eval_batches(self, encoded) -> Any:
        """Evaluation batches, packed like training (one output per slot, or per-token outputs cut
        back into their examples) or padded to the run's lengths."""
        return self.batches.eval_batches(encoded, self.cfg.data.eval_batch_size)

    def eval_examples(self) -> list[dict]:
        return [b for enc in self.eval_data.values() for b in self.eval_batches(enc)]

    @property
    def param_tree(self) -> Any:
        """What masks and parameter counts read: the params, or for a random size (whose frozen base
        is stored quantized) their float shape structs."""
        return self.model.shapes if self.model.stored else self.params

    def use_remat(self, remat: str) -> bool:
        """Recomputes the encoder's layers as ``remat`` says from now on (``--remat=auto``)."""
        self.compute = self.compute.replace(remat=remat)
        self.model.module = self.model.module.clone(compute=self.compute)
        self.model.compute = self.compute
        return True

    # -- the loop's parts ---------------------------------------------------------------------------
    def loss_fn(self) -> steps.LossFn:
        return steps.model_loss(self.model.module, self.task.loss)

    def predict_fn(self) -> Callable:
        return steps.make_predict_step(self.model.module)

    def initial(self) -> tuple[Any, Any]:
        """The trainable part and the frozen params; frozen matmul kernels stored as ``--base_dtype``
        says (default: the compute dtype)."""
        if self.model.stored:   # a random size: the frozen base was made as it is stored
            return quant.split(self.params, self.mask)
        trainable, frozen = masks.split(self.params, self.mask)
        store = self.compute.frozen_dtype
        if store != "float32":   # one program for all the casts / quantizations
            frozen = jax.jit(lambda f: frozen_in_dtype(f, store, self.model.prefix))(frozen)
        return trainable, frozen

    def optimizer(self) -> Any:
        return optim.make_optimizer(self.cfg.optim, head_patterns(self.heads, self.modules_to_save))

    def evaluate(self, predict: Callable, trainable: Any, frozen: Any) -> dict[str, float]:
        out: dict[str, float] = {}
        for i, (split, enc) in enumerate(self.eval_data.items()):
            outputs = steps.predict_outputs(predict, trainable, frozen, self.eval_batches(enc), len(enc),
                                            self.device_batch_of_whole, length=enc.max_length,
                                            per_token=self.task.kind != "sequence")
            m = self.task.evaluate(outputs, enc, self.eval_raw[split])
            out.update(m if i == 0 else {f"{split}_{k}": v for k, v in m.items()})
        return out

    def warm_modules(self) -> tuple[str, ...]:
        return self.task.warm_modules()

    def param_report(self) -> dict[str, Any]:
        t, n = masks.count(self.param_tree, self.mask)
        head = masks.match(self.param_tree, include=head_patterns(self.heads, self.modules_to_save), allow_empty=True)
        head_t, _ = masks.count(self.param_tree, head)
        return {"trainable_params": t, "total_params": n, "trainable_pct": 100.0 * t / n, "head_params": head_t,
                "method_params": t - head_t, "method_pct": 100.0 * (t - head_t) / n}

    def describe(self) -> str:
        r = self.param_report()
        packed = (f", packed {self.batches.rows_per_step} rows x {self.batches.slots} slots"
                  if isinstance(self.batches, packing.PackedBatches) else
                  f", padded to {','.join(map(str, self.batches.buckets))} tokens")
        return (f"{self.cfg.method} on {self.task.name} with {self.cfg.model} ({self.model.family.name}): "
                + masks.describe(self.param_tree, self.mask)
                + f" (method {r['method_params']:,} = {r['method_pct']:.4f}%, head {r['head_params']:,})\n"
                f"{len(self.train_data):,} training rows, {self.total_steps:,} steps of {self.cfg.optim.batch_size}"
                f"{packed}; compute {self.compute.dtype}/{self.compute.attention_impl}/{self.compute.norm_impl}; "
                f"devices {jax.device_count()}x {jax.devices()[0].platform} (mesh {self.plan.describe()}, "
                f"{jax.process_count()} process(es))")

    def start_record(self) -> dict[str, Any]:
        return {"method_options": self.method.options(), "task": self.task.record(),
                "train_examples": len(self.train_data), **self.param_report()}

    def identity(self) -> RunIdentity:
        td = self.train_data
        if self.model.stored:
            self.fingerprint = sizes.fingerprint(self.cfg.model, self.cfg.optim.seed, self.model.shapes,
                                                 exclude=self.method.added, prefix=self.model.prefix)
        else:
            self.fingerprint = fingerprint.fingerprint(self.model.params, self.cfg.model, str(self.model.model_dir),
                                                       exclude=self.method.added, prefix=self.model.prefix)
        labels = () if td.labels is None else (td.labels,)
        return RunIdentity(
            settings=self.cfg.resume_settings(self.compute), config=self.config_record(),
            method=self.method.name, method_options=self.method.options(), task=self.task.name,
            num_labels=self.task.num_labels, fingerprint=self.fingerprint, train_examples=len(td),
            train_data_sha256=sha256_arrays(td.input_ids, td.token_type_ids, td.lengths, *labels,
                                            *[td.extra[k] for k in sorted(td.extra)]),
            total_steps=self.total_steps, steps_per_epoch=self.batches.epoch_steps(0))

    def program_parts(self) -> list:
        o = self.cfg.optim
        head_scale = (o.head_learning_rate / o.learning_rate
                      if o.head_learning_rate is not None and o.head_learning_rate != o.learning_rate else None)
        return [repr(self.model.module), self.task.kind, self.task.is_regression, head_scale, self.modules_to_save]

    def export(self, state: steps.TrainState, frozen: Any) -> dict[str, Any]:
        """Writes the final params as an adapter folder (``--export_adapter``)."""
        if not self.cfg.run.export_adapter:
            return {}
        params = masks.merge(state.trainable, frozen)
        written = folder.save_adapter(
            self.out / ADAPTER_DIR, params, self.method, self.task, family=self.model.family,
            model_config=self.model.config, base_model=self.cfg.model, fingerprint=self.fingerprint,
            max_seq_length=self.cfg.data.max_seq_length, compute=self.compute, step=int(state.step),
            head=self.cfg.head, heads=self.heads, write=self.is_main)
        return {"adapter_dir": str(written)}

    def results(self) -> dict[str, Any]:
        r = self.param_report()
        return {"method": self.cfg.method, "task": self.task.name, "task_kind": self.task.kind,
                "model": self.cfg.model, "model_family": self.model.family.name,
                "method_options": self.method.options(),
                **{k: r[k] for k in ("trainable_params", "total_params", "trainable_pct")},
                "train_examples": len(self.train_data)}


def run(cfg: Any, echo: Callable[[str], None] = print, start: float | None = None) -> dict[str, Any]:
    """Trains ``cfg.method`` on ``cfg.task`` and returns the results (also in ``results.json``)."""
    return loop.run(SingleTask(cfg, echo, start))
