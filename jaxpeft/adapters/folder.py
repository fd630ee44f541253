"""Adapter folders: the trained part of a model as a small portable folder, written and read.

A folder holds the two files Hugging Face peft uses (see :mod:`jaxpeft.adapters.peft_format`):

* ``adapter_model.safetensors``: float32 tensors under peft's names for the methods peft has and
  under transformers' names for the others -- what
  :meth:`Method.export_params <jaxpeft.methods.base.Method.export_params>` returns: the trainable
  leaves, or for methods with a reparameterisation the computed prompts/prefixes;
* ``adapter_config.json``: peft's fields and one ``"jaxpeft"`` object with ours: ``format``,
  ``format_version``, ``method`` and ``method_options`` (of ``Method.for_inference()``, whose
  params are exactly the saved tensors), ``trained_method`` and its options, the task
  (``task``, ``task_kind``, ``num_labels``, ``label_names``, ``main_metric``), ``base_model``,
  ``model_family``, ``fingerprint`` (:mod:`jaxpeft.models.fingerprint`), ``max_seq_length``,
  ``dtype``, ``base_dtype`` (how the frozen base was stored in training: the adapter itself is float32
  and loads on a base stored any way), ``step``, ``pooling``, ``modules_to_save``, ``num_params``,
  ``jaxpeft_version``.

:func:`read_adapter` reads three kinds of folder: this format; the previous jaxpeft format
(``adapter.safetensors`` with our param paths); and folders written by peft's ``save_pretrained``.
:func:`load_adapter` rebuilds the base model, checks it (the fingerprint, or for a peft folder its
shape fields and, where both are local, its recorded base), overlays the adapter and returns the model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np
import safetensors.numpy

import jaxpeft
from jaxpeft import masks, methods, tasks
from jaxpeft.adapters import peft_format
from jaxpeft.compute import Compute
from jaxpeft.errors import UserError
from jaxpeft.methods.base import Method, module_pattern
from jaxpeft.models import hf_weights
from jaxpeft.models.family import Family, name_table
from jaxpeft.models.fingerprint import check as check_base
from jaxpeft.models.fingerprint import fingerprint as base_fingerprint
from jaxpeft.models.fingerprint import same_base, to_host
from jaxpeft.models.heads import head_modules
from jaxpeft.models.loading import LoadedModel, load_model

ADAPTER_CONFIG = peft_format.CONFIG
ADAPTER_WEIGHTS = peft_format.WEIGHTS
#: The weights file of the previous format (``format_version`` 1).
LEGACY_WEIGHTS = "adapter.safetensors"
FORMAT = "jaxpeft-adapter"
FORMAT_VERSION = 3
#: Keys every ``"jaxpeft"`` object (and every version-1 config) has, with their JSON types.
REQUIRED: dict[str, type] = {
    "method": str, "method_options": dict, "task": str, "num_labels": int, "base_model": str,
    "fingerprint": dict}


def base_model_ref(model: str) -> str:
    """What to record as the base: the absolute path of a local folder, else the name as given."""
    p = Path(model).expanduser()
    return str(p.resolve()) if p.is_dir() else model


# ----------------------------------------------------------------------------- writing


def save_adapter(directory: str | Path, params: Any, method: Method, task: tasks.Task, *, family: Family,
                 model_config: Any, base_model: str, fingerprint: dict[str, Any], max_seq_length: int = 128,
                 compute: Compute | None = None, step: int | None = None, head: Any = None,
                 heads: Sequence[str] | None = None, write: bool = True) -> Path:
    """Writes ``method``'s export of ``params`` as an adapter folder; returns its path.

    ``head``: the run's :class:`jaxpeft.config.Head` (pooling, ``modules_to_save``), recorded and
    restored; ``heads``: the task head's top-level modules. The folder is written next to its
    destination and renamed into place, so an existing adapter is replaced only by a complete new
    one. ``write=False`` (other processes of a multi-process run) gathers the arrays but writes nothing.
    """
    inference = method.for_inference()
    if inference.name not in methods.REGISTRY:
        raise ValueError(f"{type(method).__name__}.for_inference() returns an unregistered method "
                         f"{inference.name!r}; an adapter could not be loaded again")
    modules = head.module_list() if head is not None else ()
    pooling = getattr(head, "pooling", "cls")
    heads = tuple(heads) if heads is not None else head_modules(family, task.head(pooling))
    arrays = {k: np.ascontiguousarray(to_host(v), dtype=np.float32)
              for k, v in method.export_params(params, family, heads, modules).items()}
    directory = Path(directory)
    if not write:
        return directory
    tensors = peft_format.to_tensors(arrays, method, family)
    base = base_model_ref(base_model)
    ours = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "jaxpeft_version": jaxpeft.__version__,
        "method": inference.name, "method_options": inference.options(),
        "trained_method": method.name, "trained_method_options": method.options(),
        **task.record(), "base_model": base, "model_family": family.name, "fingerprint": fingerprint,
        "max_seq_length": int(max_seq_length), "dtype": (compute or Compute()).dtype,
        "base_dtype": (compute or Compute()).frozen_dtype, "step": step,
        "pooling": pooling, "modules_to_save": list(modules),
        "num_params": int(sum(a.size for a in arrays.values())),
    }
    config = peft_format.peft_fields(method, family, model_config, base_model=base, task_kind=task.kind,
                                     modules_to_save=tuple(modules), heads=heads)
    config["jaxpeft"] = ours
    if directory.exists() and not directory.is_dir():
        raise UserError(f"adapter destination {directory} exists and is a file")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        # "pt": the tensors have PyTorch's names and layout ([out, in] weights), as peft writes them
        safetensors.numpy.save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        mode = 0o666 & ~_umask()   # safetensors creates its file owner-only; adapters are for sharing
        for f in (tmp / ADAPTER_WEIGHTS, tmp / ADAPTER_CONFIG):
            f.chmod(mode)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
        directory.rename(old)
        tmp.rename(directory)
        shutil.rmtree(old)
    else:
        tmp.rename(directory)
    return directory


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ----------------------------------------------------------------------------- reading


@dataclasses.dataclass
class AdapterFolder:
    """What an adapter folder says, whichever kind it is.

    ``kind``: ``jaxpeft`` (this format), ``jaxpeft-v1`` (the first one) or ``peft`` (written by
    peft). ``record``: our fields (the ``"jaxpeft"`` object; for a peft folder, those peft's config
    implies, with ``None`` for what it does not say). ``config``: ``adapter_config.json`` as read.
    """

    directory: Path
    kind: str
    config: dict[str, Any]
    record: dict[str, Any]
    method: Method
    weights: Path
    peft_type: str | None = None

    @property
    def task(self) -> str | None:
        return self.record.get("task")

    @property
    def base_model(self) -> str | None:
        return self.record.get("base_model")

    @property
    def max_seq_length(self) -> int | None:
        return self.record.get("max_seq_length")

    @property
    def modules_to_save(self) -> tuple[str, ...]:
        return tuple(self.record.get("modules_to_save") or ())

    @property
    def task_kind(self) -> str:
        if self.record.get("task_kind"):
            return self.record["task_kind"]
        inverse = {v: k for k, v in peft_format.TASK_TYPES.items()}
        return inverse.get(self.config.get("task_type"), "sequence")


def _check_record(rec: dict[str, Any], where: str, prefix: str = "") -> None:
    for key, kind in REQUIRED.items():
        if key not in rec:
            hint = (" (an adapter written without the base-model fingerprint: export it with "
                    "jaxpeft.adapters.save_adapter)" if key == "fingerprint" else "")
            raise UserError(f"{where}: missing key {prefix + key!r}{hint}")
        if not isinstance(rec[key], kind) or isinstance(rec[key], bool):
            raise UserError(f"{where}: {prefix + key!r} should be a {kind.__name__}, got {rec[key]!r}")
    if rec.get("format", FORMAT) != FORMAT:
        raise UserError(f"{where}: format {rec['format']!r} is not {FORMAT!r}")
    version = rec.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool):
        raise UserError(f"{where}: 'format_version' should be an int, got {version!r}")
    if version > FORMAT_VERSION:
        raise UserError(f"{where}: format version {version} is newer than this jaxpeft reads "
                        f"({FORMAT_VERSION}); upgrade jaxpeft")


def _method(rec: dict[str, Any], where: str) -> Method:
    try:
        return methods.create(rec["method"], rec["method_options"])
    except (UserError, TypeError, ValueError) as e:
        raise UserError(f"{where}: {e}") from None


def read_adapter(directory: str | Path) -> AdapterFolder:
    """Reads and checks an adapter folder's config and finds its weights (one-line
    :class:`UserError`s); the tensors are read by :func:`load_adapter`."""
    d = Path(directory)
    if not d.is_dir():
        raise UserError(f"adapter folder {d} not found" if not d.exists() else f"adapter {d} is not a folder")
    path = d / ADAPTER_CONFIG
    if not path.is_file():
        raise UserError(f"{d} is not an adapter folder: it has no {ADAPTER_CONFIG}")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: expected a JSON object")
    if "jaxpeft" in cfg:
        rec = cfg["jaxpeft"]
        if not isinstance(rec, dict):
            raise UserError(f"{path}: 'jaxpeft' should be an object, got {rec!r}")
        _check_record(rec, str(path), "jaxpeft.")
        weights = d / ADAPTER_WEIGHTS
        if not weights.is_file():
            raise UserError(f"adapter {d} has no {ADAPTER_WEIGHTS}")
        method = _method(rec, str(path))
        return AdapterFolder(d, "jaxpeft", cfg, rec, method, weights, method.peft_type)
    if "peft_type" in cfg:
        method, modules = peft_format.method_from_peft(cfg, str(path))
        weights = d / ADAPTER_WEIGHTS if (d / ADAPTER_WEIGHTS).is_file() else d / peft_format.WEIGHTS_BIN
        if not weights.is_file():
            raise UserError(f"adapter {d} has no {ADAPTER_WEIGHTS}")
        rec = {"method": method.name, "method_options": method.options(), "task": None, "num_labels": None,
               "base_model": cfg.get("base_model_name_or_path") or None, "fingerprint": None,
               "max_seq_length": None, "modules_to_save": list(modules), "peft_type": cfg["peft_type"]}
        return AdapterFolder(d, "peft", cfg, rec, method, weights, cfg["peft_type"])
    if "method" in cfg or cfg.get("format") == FORMAT:   # the first format
        _check_record(cfg, str(path))
        weights = d / LEGACY_WEIGHTS
        if not weights.is_file():
            raise UserError(f"adapter {d} has no {LEGACY_WEIGHTS}")
        return AdapterFolder(d, "jaxpeft-v1", cfg, cfg, _method(cfg, str(path)), weights)
    raise UserError(f"{path}: neither a jaxpeft nor a peft adapter config (no 'jaxpeft' object, no 'peft_type')")


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    """Our fields of an adapter folder (``method``, ``method_options``, ``task``, ``num_labels``,
    ``base_model``, ``fingerprint``, ...), whichever kind it is; see :class:`AdapterFolder`."""
    return read_adapter(directory).record


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    try:
        if path.suffix == ".bin":
            return hf_weights._read_torch_bin(path)
        return safetensors.numpy.load_file(str(path))
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 -- safetensors and torch raise several types for a damaged file
        raise UserError(f"{path} cannot be read ({type(e).__name__}: {str(e)[:200]})") from None


#: Param paths of earlier formats: the first jaxpeft format's prompt params and bottleneck adapters.
_RENAMED = (("adapter/", "prompt/"), ("/adapter/", "/bottleneck/"))


def adapter_arrays(folder: AdapterFolder, params: Any, config: Any) -> dict[str, np.ndarray]:
    """The adapter's arrays by our param paths (``params``: the model's, for transformers' names)."""
    tensors = read_tensors(folder.weights)
    if folder.kind == "jaxpeft-v1":
        out = {}
        for k, v in tensors.items():
            k = "prompt/" + k[len("adapter/"):] if k.startswith("adapter/") else k.replace("/adapter/", "/bottleneck/")
            out[k] = v
        return out
    if folder.record.get("method") == "adapter" or folder.record.get("trained_method") == "adapter":
        tensors = {k.replace(".adapter.", ".bottleneck."): v for k, v in tensors.items()}
    return peft_format.from_tensors(tensors, folder.method, config, name_table(masks.paths(params)),
                                    str(folder.weights))


def overlay(params: Any, arrays: dict[str, np.ndarray], source: str) -> Any:
    """``params`` with the leaves named in ``arrays`` replaced (shapes must match)."""
    flat = masks.flatten(params)
    unknown = sorted(set(arrays) - set(flat))
    if unknown:
        raise UserError(f"{source}: {len(unknown)} array(s) are not parameters of this model, e.g. "
                        f"{unknown[:2]} (an adapter of another model family or task?)")
    for k, v in arrays.items():
        if tuple(v.shape) != tuple(flat[k].shape):
            raise UserError(f"{source}: {k} has shape {tuple(v.shape)}, the model's is {tuple(flat[k].shape)} "
                            "(an adapter of another base model?)")
        flat[k] = jnp.asarray(v, dtype=flat[k].dtype)
    return masks.unflatten(flat, params)


def adapter_task(folder: AdapterFolder, task: str | None = None) -> tasks.Task:
    """The adapter's task: the recorded one, else ``task`` (``--task``); both must agree."""
    recorded = folder.task
    if recorded and task and task != recorded:
        raise UserError(f"--task={task}, but adapter {folder.directory} was trained on {recorded}")
    name = recorded or task
    if not name:
        raise UserError(f"adapter {folder.directory} does not record its task (a folder written by peft): "
                        "give --task")
    from jaxpeft.tasks import glue

    if name in glue.TASKS:
        return tasks.get(name)
    rebuilt = tasks.from_record(folder.record) if recorded else None
    if rebuilt is None:
        raise UserError(f"adapter {folder.directory}: task {name!r} is neither a known task nor described by "
                        "the adapter's record")
    return rebuilt


def _local_model_dir(name: str | None) -> Path | None:
    """The folder ``name`` resolves to without the network, or ``None``."""
    if not name:
        return None
    p = Path(name).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        return p
    if name in hf_weights.BUNDLED_ALIASES:
        return hf_weights.bundled_model_dir()
    return None


def _folder_fingerprint(model_dir: Path) -> dict[str, Any]:
    from jaxpeft.models.heads import Head
    from jaxpeft.models.loading import build_module, param_shapes, pretrained_tensors

    family, config = hf_weights.load_config(model_dir)
    shapes = param_shapes(build_module(family, config, Head()))
    flat = pretrained_tensors(shapes, hf_weights.load_state_dict(model_dir), str(model_dir), family.prefix)
    return base_fingerprint(flat, str(model_dir), prefix=family.prefix)


def _check_recorded_base(folder: AdapterFolder, model: str | None) -> None:
    """A peft folder loaded with ``--model``: where the base it records is on this machine too,
    both must be the same model (same weights, by fingerprint)."""
    recorded = _local_model_dir(folder.base_model)
    if model is None or recorded is None:
        return
    given = hf_weights.resolve_model_dir(model)
    if given.resolve() == recorded.resolve():
        return
    expected, actual = _folder_fingerprint(recorded), _folder_fingerprint(given)
    if not same_base(expected, actual):
        kind = ("another architecture or size" if expected["structure_sha256"] != actual["structure_sha256"]
                else "other weights")
        raise UserError(f"adapter {folder.directory} was made for base model {folder.base_model}, but "
                        f"--model={model} is another model ({kind}); leave out --model or give that model")


def load_adapter(directory: str | Path, model: str | None = None, *, task: str | None = None,
                 compute: Compute | None = None) -> tuple[LoadedModel, Any, Method, tasks.Task]:
    """Loads the base model and overlays the adapter in ``directory`` (any kind, see :func:`read_adapter`).

    ``model`` overrides the recorded base (e.g. the same checkpoint in another folder); it must have
    the recorded fingerprint (a peft folder: fit its shape fields and, where its recorded base is on
    this machine, be that model). ``task``: the task of a folder that does not record one (peft's);
    it must agree with a recorded one. ``compute``: how to compute (default: ``auto`` on this
    platform). Returns ``(loaded_model, params, method, task)`` where ``method`` is the inference
    method the params belong to.
    """
    folder = read_adapter(directory)
    where = folder.directory / ADAPTER_CONFIG
    method = folder.method
    task_obj = adapter_task(folder, task)
    if task_obj.kind != folder.task_kind:
        raise UserError(f"{where}: a {folder.task_kind} adapter, but task {task_obj.name} is a {task_obj.kind} task")
    num_labels = folder.record.get("num_labels")
    if num_labels is not None and task_obj.num_labels != num_labels:
        raise UserError(f"{where}: num_labels={num_labels} but task {task_obj.name} has {task_obj.num_labels}")
    source = model or folder.base_model
    if not source:
        raise UserError(f"adapter {folder.directory} does not name its base model: give --model")
    family, model_config = hf_weights.load_config(hf_weights.resolve_model_dir(source))
    recorded_family = folder.record.get("model_family")
    if recorded_family and recorded_family != family.name:
        raise UserError(f"adapter {folder.directory} was trained on a {recorded_family} model, but {source} is a "
                        f"{family.name} model; give --model of the adapter's base")
    if folder.kind == "peft":
        _check_recorded_base(folder, model)
        peft_format.check_shapes(folder.config, model_config, source, str(where))
    if compute is None:
        from jaxpeft import compute as compute_lib

        compute = compute_lib.resolve("auto")
    pooling = folder.record.get("pooling") or "cls"     # how the head reads the encoder, as trained
    loaded = load_model(source, task_obj.head(pooling), method, compute=compute)
    if folder.kind != "peft":
        check_base(folder.record["fingerprint"], base_fingerprint(loaded.params, source, str(loaded.model_dir),
                                                                  exclude=method.added, prefix=family.prefix),
                   f"adapter {directory}")
    arrays = adapter_arrays(folder, loaded.params, model_config)
    heads = head_modules(family, task_obj.head(pooling))
    outputs = task_obj.head(pooling).num_labels
    for h in heads:
        kernel = arrays.get(f"{h}/kernel")
        if kernel is not None and kernel.ndim == 2 and kernel.shape[1] != outputs:
            raise UserError(f"{folder.weights}: the {h} has {kernel.shape[1]} outputs, but task {task_obj.name} "
                            f"has {outputs} labels")
    params = overlay(loaded.params, arrays, str(folder.weights))
    modules = _present(params, folder.modules_to_save)
    missing = sorted(set(masks.trainable_paths(method.mask(params, family, heads, modules))) - set(arrays))
    if missing:
        raise UserError(f"adapter {directory} lacks {len(missing)} trained array(s) of method "
                        f"{method.name}, e.g. {missing[:2]}")
    return loaded, params, method, task_obj


def _present(params: Any, modules: Sequence[str]) -> tuple[str, ...]:
    """The ``modules_to_save`` that name a module of this model (peft lists ``score`` for every
    classifier, for instance)."""
    import re

    paths = masks.paths(params)
    return tuple(m for m in modules if any(re.search(module_pattern(m), p) for p in paths))
