"""Run settings: library defaults < the method's config for the task < command-line flags.

:class:`TrainConfig` groups the settings: optimisation (:class:`Optim`), data (:class:`Data`), the
head (:class:`Head`), checkpoints and logs (:class:`Run`), devices (:class:`Devices`), how to compute
(``compute``: a preset of :mod:`jaxpeft.compute` plus per-field overrides) and the method's own
options (``method_options``, declared by each method in :mod:`jaxpeft.methods`). Every field is
declared once with :func:`jaxpeft.options.option` (help and check) and is one command-line flag
(``--learning_rate=3e-4``, ``--no-progress``, ``--dtype=bfloat16``, ``--num_virtual_tokens=10``).

A config file is Python with ``get_config(task: str) -> dict`` (big_vision style) whose keys are
flag names. A method may have one, shipped in the package (``jaxpeft/configs/``); ``--config=FILE``
takes another.

Which settings a resumed run must share with its checkpoint is declared with each field
(``resume=False`` in its :func:`~jaxpeft.options.option` for those that do not change what the steps
compute: where results go, logging, devices); :meth:`TrainConfig.resume_settings` collects them.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.resources
import importlib.util
import inspect
from pathlib import Path
from typing import Any, Mapping, Sequence

from jaxpeft import compute as compute_lib
from jaxpeft import methods, options
from jaxpeft.errors import UserError
from jaxpeft.models.heads import POOLINGS
from jaxpeft.models.hf_weights import DEFAULT_MODEL
from jaxpeft.options import at_least, in_range, non_negative, option, positive


@dataclasses.dataclass
class Optim:
    """Optimisation: AdamW after global-norm clipping, linear warm-up then linear decay."""

    learning_rate: float = option(1e-3, "peak learning rate", positive)
    head_learning_rate: float | None = option(
        None, "peak learning rate of the task head and modules_to_save (default: learning_rate)", positive)
    batch_size: int = option(32, "examples per step", positive)
    num_epochs: float = option(3.0, "passes over the training data", positive)
    max_steps: int = option(0, "stop after this many steps (0: num_epochs decides)", non_negative)
    warmup_ratio: float = option(0.06, "share of the steps that warm the learning rate up", in_range(0, 1))
    weight_decay: float = option(0.0, "AdamW weight decay (kernels only)", non_negative)
    max_grad_norm: float = option(1.0, "clip the gradient's global norm to this (0: no clipping)", non_negative)
    adam_b1: float = option(0.9, "Adam's first-moment decay", in_range(0, 1, hi_open=True))
    adam_b2: float = option(0.999, "Adam's second-moment decay", in_range(0, 1, hi_open=True))
    adam_eps: float = option(1e-8, "Adam's epsilon", positive)
    seed: int = option(0, "seed of the head's init, dropout and the data order", non_negative)

    def __post_init__(self):
        options.check(self)


def check_length_buckets(v: str) -> str | None:
    if v in ("auto", "all"):
        return None
    parts = [p.strip() for p in str(v).split(",")]
    if not all(p.isdigit() and int(p) >= 1 for p in parts):
        return "must be auto, all, or positive lengths separated by commas, such as 64,128"
    return None


@dataclasses.dataclass
class Data:
    """What is read and how it is batched."""

    data_dir: str | None = option(None, "local folder of a named task's data (GLUE: SST-2/train.tsv, ...; "
                                  "pos: UD_English-EWT/; ner: eng.train ...; squad: dev-v1.1.json); default: "
                                  "$GLUE_DIR for GLUE, else the hub", resume=False)
    train_file: str | None = option(None, "your own training data: CSV, TSV, JSON or JSON Lines (tagging: "
                                    "CoNLL columns or JSON tokens/tags; QA: SQuAD JSON)", resume=False)
    validation_file: str | None = option(None, "your own validation data (default: a seeded "
                                         "--validation_fraction of --train_file)", resume=False)
    test_file: str | None = option(None, "your own test data (predicted at the end, labels optional)", resume=False)
    text_columns: str | None = option(None, "the text column, or two comma-separated for pairs (default: "
                                      "'text', or 'sentence1,sentence2')")
    label_column: str = option("label", "the label column of your own data")
    task_type: str = option("auto", "your own data's task: auto (classification or regression from the "
                            "labels), classification, regression, tagging, qa",
                            choices=("auto", "classification", "regression", "tagging", "qa"))
    dataset: str | None = option(None, "NAME[:CONFIG] of a Hugging Face dataset (or a local dataset folder) "
                                 "holding your own data", resume=False)
    validation_fraction: float = option(0.1, "share of --train_file held out for validation when no "
                                        "--validation_file is given", in_range(0, 1, hi_open=True))
    doc_stride: int = option(128, "QA: context tokens shared by consecutive windows of a long context", positive)
    max_seq_length: int = option(128, "tokens per example, [CLS] and [SEP] included", at_least(8))
    max_train_examples: int = option(0, "use only the first N training examples (0: all)", non_negative)
    max_eval_examples: int = option(0, "use only the first N dev examples (0: all)", non_negative)
    eval_batch_size: int = option(128, "examples per prediction batch", positive, resume=False)
    length_buckets: str = option("auto", "lengths batches are padded to: auto (the fewest expected seconds, "
                                 "compiling against padding, for this run on this device), all (every power "
                                 "of two up to --max_seq_length), or a comma list such as 64,128 (the "
                                 "longest length is always added)", check_length_buckets, resume=False)
    packing: bool = option(False, "pack several examples into each row (one compiled shape, no padding "
                                  "computed); full, frozen, bitfit, prefix, ptuning_v2, lora, adapter")
    group_by_length: bool | None = option(
        None, "unpacked training batches hold examples of similar lengths (less padding); "
        "--no-group_by_length: random batches, as transformers' Trainer by default; unset: random for "
        "tagging (its loss is a mean over the batch's words, which length-grouped batches skew towards "
        "short sentences), grouped otherwise")

    def __post_init__(self):
        options.check(self)
        if self.length_buckets not in ("auto", "all"):
            longer = [int(p) for p in self.length_buckets.split(",") if int(p) > self.max_seq_length]
            if longer:
                raise UserError(f"--length_buckets={self.length_buckets}: {longer[0]} is longer than "
                                f"--max_seq_length={self.max_seq_length}")


@dataclasses.dataclass
class Head:
    """How the task head reads the encoder, and which modules train fully under any method."""

    pooling: str = option("cls", "cls: the pooler on [CLS] (BERT's head); mean: the mean of the last "
                          "layer's token outputs (sentence-embedding models); cosine (sentence pairs): the "
                          "cosine of the two sentences' means, each encoded apart",
                          choices=POOLINGS)
    modules_to_save: str | None = option(
        None, "comma list of modules that train fully under any method, peft's name (pooler; "
        "classifier always trains)")

    def __post_init__(self):
        options.check(self)

    def module_list(self) -> tuple[str, ...]:
        return tuple(m.strip() for m in (self.modules_to_save or "").split(",") if m.strip())


@dataclasses.dataclass
class Run:
    """Where results go, logging, evaluation and checkpoints."""

    output_dir: str | None = option(None, "run folder (default: runs/METHOD-TASK)")
    eval_every: int = option(0, "evaluate every N steps (0: every epoch)", non_negative)
    log_every: int = option(50, "log the loss every N steps", positive)
    steps_per_dispatch: int = option(0, "train steps per device call (0: automatic)", non_negative)
    progress: bool = option(True, "progress bar")
    save_every: int = option(0, "checkpoint every N steps (0: by time, --save_minutes); always at every "
                             "evaluation", non_negative)
    save_minutes: float = option(10.0, "with --save_every=0: checkpoint when this many minutes of training "
                                 "passed since the last checkpoint (0: at evaluations only)", non_negative)
    keep: int = option(2, "keep the N latest checkpoints plus the best by the dev metric (0: none)",
                       non_negative)
    resume: bool | None = option(None, "resume from output_dir's latest checkpoint (default: when it has "
                                 "one; --resume: must; --no-resume: must not)")
    export_adapter: bool = option(True, "write output_dir/adapter/ at the end")
    plot: bool = option(True, "draw the learning curves next to results.json (when matplotlib is installed)")

    def __post_init__(self):
        options.check(self)


@dataclasses.dataclass
class Devices:
    """Devices, processes and the compilation cache."""

    mesh: str | None = option(None, 'device mesh, e.g. "data:4,fsdp:2" (default: every device on data)')
    fsdp_min_size: int = option(65536, "leaves this big (elements) or bigger shard over fsdp", non_negative)
    distributed: str = option("auto", "jax.distributed.initialize(): auto (TPU VMs, SLURM, Open MPI), "
                              "on, off", choices=("auto", "on", "off"))
    coordinator_address: str | None = option(None, "HOST:PORT of process 0 (explicit multi-process runs)")
    num_processes: int | None = option(None, "processes of an explicit multi-process run", positive)
    process_id: int | None = option(None, "this process's index in an explicit multi-process run",
                                    non_negative)
    compilation_cache: str | None = option(
        None, "folder of the persistent compilation cache and the stored programs, or 'off' (default: "
        "$JAXPEFT_COMPILATION_CACHE, else ~/.cache/jaxpeft/xla)")

    def __post_init__(self):
        options.check(self)


#: group name -> dataclass; each field of each group is one flag
GROUPS: dict[str, type] = {"optim": Optim, "data": Data, "head": Head, "run": Run, "devices": Devices}
#: groups whose settings a resumed run may change (where results go, logging, devices)
NOT_RESUMED = ("run", "devices")


@dataclasses.dataclass
class TrainConfig:
    method: str = option("bitfit", f"PEFT method: {', '.join(methods.REGISTRY)}")
    task: str = option("sst2", "the task: a GLUE task (sst2, cola, mrpc, stsb, qqp, mnli, qnli, rte, wnli), pos, "
                       "ner, squad, or with your own files (--train_file) a name for them")
    model: str = option(DEFAULT_MODEL, "hub id or local folder of an encoder checkpoint", resume=False)
    config: str | None = option(None, "config file with get_config(task) (default: the method's own)",
                                resume=False)
    random_init: bool = option(False, "the model's shape from config.json with random weights (benchmarks)")
    compute: str = option("auto", "how to compute: auto (the fastest path here), exact (float32, "
                          "transformers' math), fast (bfloat16 + our GPU kernels)", choices=compute_lib.PRESETS,
                          resume=False)
    tasks: str | None = option(None, "comma list of tasks to train at once, one adapter each, in mixed batches, "
                               "each with its own config's rate, epochs and length (jaxpeft.training.multitask)")
    task_sampling: str = option("proportional", "how --tasks share a batch: proportional (to each task's "
                                "training examples) or temperature (to size^(1/sampling_temperature))",
                                choices=("proportional", "temperature"))
    sampling_temperature: float = option(2.0, "T of --task_sampling=temperature (1: proportional; larger: "
                                         "closer to uniform)", positive)
    optim: Optim = dataclasses.field(default_factory=Optim)
    data: Data = dataclasses.field(default_factory=Data)
    head: Head = dataclasses.field(default_factory=Head)
    run: Run = dataclasses.field(default_factory=Run)
    devices: Devices = dataclasses.field(default_factory=Devices)
    #: per-field overrides of the compute preset (``jaxpeft.compute.Compute`` field -> value)
    compute_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: the method's options (fields of its class in ``jaxpeft.methods``)
    method_options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        options.check(self)
        if self.method not in methods.REGISTRY:
            raise UserError(f"unknown method {self.method!r}; known methods: {', '.join(methods.REGISTRY)}")
        compute_lib.check_overrides(self.compute_overrides)
        methods.create(self.method, self.method_options)   # checks the options
        if self.run.output_dir is None:
            self.run.output_dir = f"runs/{self.method}-{self.tasks.replace(',', '+') if self.tasks else self.task}"

    # -- views -----------------------------------------------------------------------------------
    def method_obj(self) -> methods.Method:
        return methods.create(self.method, self.method_options)

    def resolve_compute(self, **platform: Any) -> compute_lib.Compute:
        """The compute spec of this run on this runtime (``platform``: see ``compute.resolve``)."""
        return compute_lib.resolve(self.compute, self.compute_overrides, **platform)

    def to_flat(self) -> dict[str, Any]:
        """Every setting by its flag name (groups flattened; method options and compute overrides
        included): what ``results.json`` and checkpoints record."""
        out = {k: getattr(self, k) for k in _TOP}
        for g in GROUPS:
            out.update(dataclasses.asdict(getattr(self, g)))
        out.update(self.compute_overrides)
        out.update(self.method_options)
        return out

    def to_dict(self) -> dict[str, Any]:
        return self.to_flat()

    def resume_settings(self, compute: compute_lib.Compute) -> dict[str, Any]:
        """The settings a resumed run must share with its checkpoint: every field not declared
        ``resume=False`` (nor in a group of :data:`NOT_RESUMED`), and the compute fields that change
        the trajectory."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name in _TOP and f.metadata.get("resume", True)}
        for g in GROUPS:
            if g in NOT_RESUMED:
                continue
            group = getattr(self, g)
            out.update({f.name: getattr(group, f.name) for f in dataclasses.fields(group)
                        if f.metadata.get("resume", True)})
        out.update(compute.trajectory())
        return out


_TOP = ("method", "task", "model", "config", "random_init", "compute", "tasks", "task_sampling",
        "sampling_temperature")


def _owner() -> dict[str, str]:
    """flag name -> where it lives: ``top``, a group name, or ``compute``."""
    out = {k: "top" for k in _TOP}
    for g, cls in GROUPS.items():
        for f in dataclasses.fields(cls):
            out[f.name] = g
    for name in compute_lib.fields():
        out[name] = "compute"
    return out


def from_flat(values: Mapping[str, Any]) -> TrainConfig:
    """A :class:`TrainConfig` from flag-named ``values``. Names that are no setting and no option of
    any method are errors; an option of another method is an error naming the chosen method and the
    options it takes."""
    owner = _owner()
    method = methods.ALIASES.get(values.get("method", "bitfit"), values.get("method", "bitfit"))
    values = {**values, "method": method}
    if method not in methods.REGISTRY:
        raise UserError(f"unknown method {method!r}; known methods: {', '.join(methods.REGISTRY)}")
    method_cls = methods.REGISTRY[method]
    own = {f.name for f in dataclasses.fields(method_cls)}
    all_method_opts = methods.all_options()
    top: dict[str, Any] = {}
    groups: dict[str, dict[str, Any]] = {g: {} for g in GROUPS}
    comp: dict[str, Any] = {}
    mopts: dict[str, Any] = {}
    for k, v in values.items():
        where = owner.get(k)
        if where == "top":
            top[k] = v
        elif where == "compute":
            comp[k] = v
        elif where is not None:
            groups[where][k] = options.coerce(GROUPS[where], k, v)
        elif k in own:
            mopts[k] = options.coerce(method_cls, k, v)
        elif k in all_method_opts:
            takes = ", ".join(f"--{n}" for n in sorted(own)) or "none"
            raise UserError(f"--{k} is not an option of --method={method} (its options: {takes})")
        else:
            raise UserError(f"unknown setting {k!r}")
    return TrainConfig(**top, **{g: GROUPS[g](**kv) for g, kv in groups.items()},
                       compute_overrides=comp, method_options=mopts)


# ----------------------------------------------------------------------------- config files


def load_config_file(path: str | Path, task: str, model: str | None = None) -> dict[str, Any]:
    """Calls ``get_config(task)`` of a Python config file; a ``get_config(task, hidden_size)`` also
    gets the width of ``model`` (``--model``; ``None`` where it cannot be read)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} not found")
    spec = importlib.util.spec_from_file_location(f"jaxpeft_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        if "hidden_size" in inspect.signature(module.get_config).parameters:
            from jaxpeft.models import loading

            values = dict(module.get_config(task, hidden_size=loading.hidden_size_of(model)))
        else:
            values = dict(module.get_config(task))
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"config file {path}: {type(e).__name__}: {e}") from None
    return values


def method_config_file(method: str) -> Path | None:
    """The method's config shipped in the package (``jaxpeft/configs/<method>.py``), if it has one."""
    p = Path(str(importlib.resources.files("jaxpeft.configs").joinpath(f"{method}.py")))
    return p if p.is_file() else None


def config_values(method: str, task: str, path: str | Path | None = None,
                  model: str | None = None) -> dict[str, Any]:
    """What the config (``path``, else the method's own) says for ``task`` (and the width of
    ``model``, where the config asks for it): flag name -> value; a method without a config runs
    on the library defaults and its kind's schedule."""
    from jaxpeft import configs

    path = path or method_config_file(method)
    if path is None:
        return configs.for_task(task, methods.REGISTRY[method].schedule, {})
    values = dict(load_config_file(path, task, model))
    values["config"] = str(path)
    return values


def build(overrides: Mapping[str, Any]) -> TrainConfig:
    """Defaults < the method's config file for the task < ``overrides`` (e.g. parsed CLI flags)."""
    method = methods.ALIASES.get(overrides.get("method", "bitfit"), overrides.get("method", "bitfit"))
    overrides = dict(overrides)
    own = overrides.get("train_file") or overrides.get("dataset")
    if own and not overrides.get("task"):   # your own data is named after its file (or dataset)
        overrides["task"] = Path(str(own).split(":")[0]).name.split(".")[0] or "custom"
    task = overrides.get("task") or (overrides.get("tasks") or "sst2").split(",")[0].strip() or "sst2"
    if method not in methods.REGISTRY:
        raise UserError(f"unknown method {method!r}; known methods: {', '.join(methods.REGISTRY)}")
    values = config_values(method, task, overrides.get("config"), overrides.get("model"))
    if overrides.get("tasks"):   # each task's own values come from task_configs(); these are the first's
        for k in MULTITASK_PER_TASK + ("packing", "pooling"):
            values.pop(k, None)
    # a config file's keys must exist (here or in some method) like flags do
    try:
        from_flat({**values, "method": method})
    except UserError as e:
        raise UserError(f"config file {values.get('config')}: {e}") from None
    values.update(overrides)
    values["method"] = method
    cfg = from_flat(values)
    cfg.given = dict(overrides)   # what the caller set (a multi-task run applies these to every task)
    return cfg


#: What each task of a multi-task run takes from its own config (the rest is shared).
MULTITASK_PER_TASK = ("learning_rate", "head_learning_rate", "num_epochs", "max_seq_length")


def task_configs(cfg: TrainConfig, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """For a multi-task run: each task's own values of :data:`MULTITASK_PER_TASK` from its config,
    where the caller set none (what the caller set applies to every task)."""
    flags = getattr(cfg, "given", {})
    out = {}
    for name in names:
        values = config_values(cfg.method, name, cfg.config if cfg.config and "jaxpeft/configs" not in cfg.config
                               else None, cfg.model)
        own = {}
        for k in MULTITASK_PER_TASK:
            group = next(g for g in ("optim", "data") if hasattr(getattr(cfg, g), k))
            own[k] = flags[k] if k in flags else values.get(k, getattr(GROUPS[group](), k))
        out[name] = own
    return out


# ----------------------------------------------------------------------------- the command line


def make_parser(description: str = "") -> argparse.ArgumentParser:
    """One ``--flag`` per setting, compute field and method option; unset flags are absent from
    the parsed namespace, so config files are only overridden by what the user typed."""
    p = argparse.ArgumentParser(description=description, argument_default=argparse.SUPPRESS,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    options.add_flags(p, TrainConfig, skip=("optim", "data", "head", "run", "devices", "compute_overrides",
                                            "method_options"))
    for g, cls in GROUPS.items():
        options.add_flags(p.add_argument_group(g), cls)
    options.add_flags(p.add_argument_group("compute (each overrides the --compute preset)"),
                      compute_lib.Compute)
    seen: set[str] = set()
    for name, cls in methods.REGISTRY.items():
        fresh = [f.name for f in dataclasses.fields(cls) if f.name not in seen]
        if fresh:
            options.add_flags(p.add_argument_group(f"method options ({name})"), cls,
                              skip=[f.name for f in dataclasses.fields(cls) if f.name in seen])
            seen.update(fresh)
    return p


def parse_args(argv: Sequence[str] | None = None, description: str = "") -> TrainConfig:
    ns = make_parser(description).parse_args(argv)
    return build(vars(ns))
