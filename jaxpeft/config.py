"""Run configuration: library defaults < ``configs/<method>.py`` for the task < command-line flags.

A config file is Python with ``get_config(task: str) -> dict`` (big_vision style); its keys are
:class:`TrainConfig` fields. Every field is a command-line flag of ``scripts/train.py``
(``--learning_rate=3e-4``, ``--no-progress``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence

from jaxpeft.errors import UserError
from jaxpeft.models.hf_weights import DEFAULT_MODEL

#: ``configs/`` next to the package (a source checkout or an editable install).
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclasses.dataclass
class TrainConfig:
    # what
    method: str = "bitfit"
    task: str = "sst2"
    model: str = DEFAULT_MODEL
    random_init: bool = False   # benchmarks: the model's shape from config.json, weights random
    data_dir: str | None = None
    output_dir: str | None = None
    config: str | None = None
    # optimisation
    learning_rate: float = 1e-3
    batch_size: int = 32
    num_epochs: float = 3.0
    max_steps: int = 0
    warmup_ratio: float = 0.06
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    seed: int = 0
    # data
    max_seq_length: int = 128
    max_train_examples: int = 0
    max_eval_examples: int = 0
    eval_batch_size: int = 128
    # compute
    dtype: str = "float32"
    attention_impl: str = "dense"
    remat: str = "none"       # what the backward pass recomputes: none | elementwise | layer
    dropout_bits: int = 32    # random bits per hidden-dropout mask element: 32 (exact) | 16 | 8 (faster)
    dropout_impl: str = "hash"  # hidden-dropout masks: hash (keyed position hash) | random (jax.random)
    norm_impl: str = "xla"    # sublayer outputs (bias, dropout, residual, LayerNorm): xla | pallas
    activation_impl: str = "xla"  # feed-forward bias + GELU: xla | pallas
    prng_impl: str = "auto"   # dropout RNG: auto = rbg on GPU/TPU (fast), threefry2x32 on CPU
    # bookkeeping
    eval_every: int = 0
    log_every: int = 50
    progress: bool = True
    # method options: bitfit
    bitfit_terms: str | None = None
    # method options: prompt methods (prompt, ptuning, prefix, ptuning_v2)
    num_virtual_tokens: int = 20               # virtual tokens (prompt, ptuning) or prefix length
    prompt_init: str = "random"                # prompt: random | sample_vocab | text
    prompt_init_text: str | None = None        # prompt: text for prompt_init=text
    encoder_type: str = "lstm"                 # ptuning: lstm | mlp
    encoder_hidden_size: int | None = None     # ptuning encoder / prefix MLP width (None: method default)
    encoder_num_layers: int = 2                # ptuning: LSTM layers
    prefix_projection: bool | None = None      # prefix: MLP reparameterisation (None: prefix on, ptuning_v2 off)
    prefix_dropout: float | None = None        # prefix: dropout on prefixes (None: prefix 0.0, ptuning_v2 0.1)
    head_learning_rate: float | None = None    # peak lr of the task head (None: learning_rate)
    # checkpoints and adapters
    save_every: int = 500           # checkpoint every N steps (and at every evaluation); 0: evaluations only
    keep: int = 2                   # keep the N latest checkpoints plus the best by the dev metric; 0: none
    resume: bool | None = None      # None: resume when output_dir holds a checkpoint; True: must; False: must not
    export_adapter: bool = True     # write output_dir/adapter/ (final params) at the end
    # devices and sharding
    mesh: str | None = None                # "data:4,fsdp:2"; default: every device on "data"
    fsdp_min_size: int = 65536             # leaves this big (elements) or bigger shard over "fsdp"
    distributed: str = "auto"              # auto | on | off: jax.distributed.initialize()
    coordinator_address: str | None = None  # HOST:PORT of process 0 (explicit multi-process runs)
    num_processes: int | None = None
    process_id: int | None = None

    def __post_init__(self):
        from jaxpeft.models.bert import ATTENTION_IMPLS, DROPOUT_BITS, DROPOUT_IMPLS, KERNEL_IMPLS, REMAT_POLICIES

        if self.output_dir is None:
            self.output_dir = f"runs/{self.method}-{self.task}"
        if isinstance(self.remat, bool):  # configs written before remat had policies
            self.remat = "layer" if self.remat else "none"
        if self.remat not in REMAT_POLICIES:
            raise UserError(f"--remat={self.remat}: choose one of {', '.join(REMAT_POLICIES)}")
        if self.dropout_bits not in DROPOUT_BITS:
            raise UserError(f"--dropout_bits={self.dropout_bits}: choose one of "
                            f"{', '.join(map(str, DROPOUT_BITS))}")
        if self.dropout_impl not in DROPOUT_IMPLS:
            raise UserError(f"--dropout_impl={self.dropout_impl}: choose one of {', '.join(DROPOUT_IMPLS)}")
        if self.dropout_bits != 32 and self.dropout_impl != "random":
            raise UserError(f"--dropout_bits={self.dropout_bits} needs --dropout_impl=random "
                            f"(--dropout_impl={self.dropout_impl} draws no random bits per element)")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise UserError(f"--attention_impl={self.attention_impl}: choose one of {', '.join(ATTENTION_IMPLS)}")
        if self.norm_impl not in KERNEL_IMPLS:
            raise UserError(f"--norm_impl={self.norm_impl}: choose one of {', '.join(KERNEL_IMPLS)}")
        if self.activation_impl not in KERNEL_IMPLS:
            raise UserError(f"--activation_impl={self.activation_impl}: choose one of {', '.join(KERNEL_IMPLS)}")
        if self.norm_impl == "pallas" and self.dropout_impl != "hash":
            raise UserError(f"--norm_impl=pallas needs --dropout_impl=hash (its kernels recompute the "
                            f"hashed masks), got --dropout_impl={self.dropout_impl}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(TrainConfig)
    out = {}
    for name, t in hints.items():
        args = [a for a in typing.get_args(t) if a is not type(None)]
        out[name] = args[0] if (typing.get_origin(t) in (typing.Union, types.UnionType) and args) else t
    return out


def load_config_file(path: str | Path, task: str) -> dict[str, Any]:
    """Calls ``get_config(task)`` of a Python config file and checks its keys. The file's folder is
    importable while it loads, so configs can share a module (``configs/prompt_common.py``)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} not found")
    spec = importlib.util.spec_from_file_location(f"jaxpeft_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.resolve().parent))
    try:
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        values = dict(module.get_config(task))
    except Exception as e:
        raise UserError(f"config file {path}: {type(e).__name__}: {e}") from None
    finally:
        sys.path.remove(str(path.resolve().parent))
    unknown = sorted(set(values) - set(_field_types()))
    if unknown:
        raise UserError(f"config file {path}: unknown keys {unknown}")
    return values


def default_config_file(method: str) -> Path | None:
    p = CONFIG_DIR / f"{method}.py"
    return p if p.is_file() else None


def build(overrides: Mapping[str, Any]) -> TrainConfig:
    """Defaults < the method's config file for the task < ``overrides`` (e.g. parsed CLI flags)."""
    method = overrides.get("method", TrainConfig.method)
    task = overrides.get("task", TrainConfig.task)
    path = overrides.get("config") or default_config_file(method)
    values: dict[str, Any] = {}
    if path is not None:
        values.update(load_config_file(path, task))
        values["config"] = str(path)
    values.update(overrides)
    return TrainConfig(**values)


def _parse_bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {s!r}")


def _none_or(kind):
    def parse(s: str):
        return None if s.strip().lower() in ("", "none", "null") else kind(s)
    parse.__name__ = kind.__name__
    return parse


def make_parser(description: str = "") -> argparse.ArgumentParser:
    """An argparse parser with one ``--flag`` per :class:`TrainConfig` field; unset flags are absent
    from the parsed namespace, so config files are only overridden by what the user typed."""
    p = argparse.ArgumentParser(description=description, argument_default=argparse.SUPPRESS)
    defaults = TrainConfig(output_dir="")
    for name, kind in _field_types().items():
        default = getattr(defaults, name)
        if kind is bool:
            p.add_argument(f"--{name}", action=argparse.BooleanOptionalAction,
                           help=f"(default: {default})")
        else:
            p.add_argument(f"--{name}", type=_none_or(kind), metavar=kind.__name__.upper(),
                           help=f"(default: {default})")
    return p


def parse_args(argv: Sequence[str] | None = None, description: str = "") -> TrainConfig:
    ns = make_parser(description).parse_args(argv)
    return build(vars(ns))
