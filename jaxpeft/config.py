"""Run settings: library defaults < the method's config for the task < command-line flags.

:class:`TrainConfig` groups the settings: optimisation (:class:`Optim`), data (:class:`Data`), the
head (:class:`Head`), checkpoints and logs (:class:`Run`), devices (:class:`Devices`), how to compute
(``compute``: a preset of :mod:`jaxpeft.compute` plus per-field overrides) and the method's own
options (``method_options``, declared by each method in :mod:`jaxpeft.methods`). Every field is
declared once with :func:`jaxpeft.options.option` (help and check) and is one command-line flag
(``--learning_rate=3e-4``, ``--no-progress``, ``--dtype=bfloat16``, ``--num_virtual_tokens=10``).

A config file is Python with ``get_config(task: str) -> dict`` (big_vision style) whose keys are
flag names. Each registered method has one, shipped in the package (``jaxpeft/configs/``);
``--config=FILE`` takes another.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.resources
import importlib.util
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from jaxpeft import compute as compute_lib
from jaxpeft import methods, options
from jaxpeft.errors import UserError
from jaxpeft.models.bert import POOLINGS
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


@dataclasses.dataclass
class Data:
    """What is read and how it is batched."""

    data_dir: str | None = option(None, "local GLUE folder (SST-2/train.tsv, ...); default: $GLUE_DIR, "
                                  "else the hub's nyu-mll/glue")
    max_seq_length: int = option(128, "tokens per example, [CLS] and [SEP] included", at_least(8))
    max_train_examples: int = option(0, "use only the first N training examples (0: all)", non_negative)
    max_eval_examples: int = option(0, "use only the first N dev examples (0: all)", non_negative)
    eval_batch_size: int = option(128, "examples per prediction batch", positive)
    packing: bool = option(False, "pack several examples into each row (one compiled shape, no padding "
                                  "computed); full, frozen, bitfit, prefix, ptuning_v2, lora, adapter")

    def __post_init__(self):
        options.check(self)


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


@dataclasses.dataclass
class TrainConfig:
    method: str = option("bitfit", f"PEFT method: {', '.join(methods.REGISTRY)}")
    task: str = option("sst2", "GLUE task")
    model: str = option(DEFAULT_MODEL, "hub id or local folder of a BERT checkpoint")
    config: str | None = option(None, "config file with get_config(task) (default: the method's own)")
    random_init: bool = option(False, "the model's shape from config.json with random weights (benchmarks)")
    compute: str = option("auto", "how to compute: auto (the fastest path here), exact (float32, "
                          "transformers' math), fast (bfloat16 + our GPU kernels)", choices=compute_lib.PRESETS)
    tasks: str | None = option(None, "comma list of GLUE tasks to train at once, one adapter each, in mixed "
                               "batches (jaxpeft.training.multitask; the method's defaults are its first task's)")
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
    method = values.get("method", "bitfit")
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


def load_config_file(path: str | Path, task: str) -> dict[str, Any]:
    """Calls ``get_config(task)`` of a Python config file. The file's folder is importable while it
    loads, so a config can import a module beside it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} not found")
    spec = importlib.util.spec_from_file_location(f"jaxpeft_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.resolve().parent))
    try:
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        values = dict(module.get_config(task))
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"config file {path}: {type(e).__name__}: {e}") from None
    finally:
        sys.path.remove(str(path.resolve().parent))
    return values


def method_config_file(method: str) -> Path:
    """The method's config shipped in the package (``jaxpeft/configs/<method>.py``)."""
    p = Path(str(importlib.resources.files("jaxpeft.configs").joinpath(f"{method}.py")))
    if not p.is_file():
        raise UserError(f"method {method!r} has no config file (jaxpeft/configs/{method}.py): the "
                        "package is incomplete")
    return p


def build(overrides: Mapping[str, Any]) -> TrainConfig:
    """Defaults < the method's config file for the task < ``overrides`` (e.g. parsed CLI flags)."""
    method = overrides.get("method", "bitfit")
    task = overrides.get("task") or (overrides.get("tasks") or "sst2").split(",")[0].strip() or "sst2"
    if method not in methods.REGISTRY:
        raise UserError(f"unknown method {method!r}; known methods: {', '.join(methods.REGISTRY)}")
    path = overrides.get("config") or method_config_file(method)
    values: dict[str, Any] = dict(load_config_file(path, task))
    values["config"] = str(path)
    if overrides.get("tasks"):   # a config's packing and cosine read-out are for its single-task runs
        values.pop("packing", None)
        if values.get("pooling") == "cosine":
            values.pop("pooling")
    # a config file's keys must exist (here or in some method) like flags do
    try:
        from_flat({**values, "method": method})
    except UserError as e:
        raise UserError(f"config file {path}: {e}") from None
    values.update(overrides)
    return from_flat(values)


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
