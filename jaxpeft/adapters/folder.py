"""Adapters: the trained part of a model as a small portable folder, and prediction with it.

An adapter folder holds the two files Hugging Face peft uses (see :mod:`jaxpeft.adapters.peft_format`):

* ``adapter_model.safetensors``: float32 tensors under peft's names for the methods peft has
  (``prompt_embeddings``, ``base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight``,
  ``base_model.model.classifier.weight``, ...) and under transformers' names for the others
  (``bert.encoder.layer.0.attention.self.query.bias``, ``classifier.weight``): what
  :meth:`Method.export_params <jaxpeft.methods.base.Method.export_params>` returns -- the trainable
  leaves, or for methods with a reparameterisation the computed prompts/prefixes;
* ``adapter_config.json``: peft's fields (``peft_type``, ``task_type``, ``r``, ``lora_alpha``,
  ``target_modules``, ``num_virtual_tokens``, ``token_dim``, ``base_model_name_or_path``, ...) and
  one ``"jaxpeft"`` object with ours: ``format``, ``format_version``, ``method`` and
  ``method_options`` (of ``Method.for_inference()``, whose params are exactly the saved tensors),
  ``trained_method`` and ``trained_method_options``, ``task``, ``num_labels``, ``label_names``,
  ``base_model`` (hub id or absolute folder), ``fingerprint`` (see :mod:`jaxpeft.models.fingerprint`),
  ``max_seq_length``, ``dtype``, ``step``, ``pooling``, ``modules_to_save``, ``num_params``,
  ``jaxpeft_version``.

:func:`load_adapter` reads three kinds of folder: this format; the previous jaxpeft format
(``adapter.safetensors`` with our param paths and a config with ``"format": "jaxpeft-adapter"``
at the top level); and folders written by peft's ``save_pretrained`` for LORA, PROMPT_TUNING,
P_TUNING and PREFIX_TUNING (the task and, where the folder does not name it, the base model come
from the caller). It rebuilds the base model, checks it (the fingerprint, or for a peft folder its
shape fields and, where both are local, its recorded base), overlays the adapter and returns the
model; :func:`predict` returns logits for raw texts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

import jaxpeft
from jaxpeft import masks, methods
from jaxpeft.data import batches, encoding
from jaxpeft.tasks import glue
from jaxpeft.adapters import peft_format
from jaxpeft.models.fingerprint import check as check_base
from jaxpeft.models.fingerprint import fingerprint as base_fingerprint
from jaxpeft.models.fingerprint import same_base, to_host
from jaxpeft.errors import UserError
from jaxpeft.training import steps
from jaxpeft.compute import Compute
from jaxpeft.methods.base import Method
from jaxpeft.models import hf_weights
from jaxpeft.models.bert import BertConfig
from jaxpeft.models.loading import LoadedModel, load_classifier

ADAPTER_CONFIG = peft_format.CONFIG
ADAPTER_WEIGHTS = peft_format.WEIGHTS
#: The weights file of the previous format (``format_version`` 1).
LEGACY_WEIGHTS = "adapter.safetensors"
FORMAT = "jaxpeft-adapter"
FORMAT_VERSION = 2
#: Keys every ``"jaxpeft"`` object (and every version-1 config) has, with their JSON types.
REQUIRED: dict[str, type] = {
    "method": str, "method_options": dict, "task": str, "num_labels": int, "base_model": str,
    "fingerprint": dict}


def base_model_ref(model: str) -> str:
    """What to record as the base: the absolute path of a local folder, else the name as given."""
    p = Path(model).expanduser()
    return str(p.resolve()) if p.is_dir() else model


# ----------------------------------------------------------------------------- writing


def _model_shape(model_config: BertConfig | None, base_model: str, fingerprint: dict[str, Any]
                 ) -> tuple[int | None, int | None, int | None]:
    """``(hidden_size, num_layers, num_attention_heads)`` of the base: from ``model_config``, else
    from its local ``config.json`` (never the network), else what the fingerprint knows."""
    if model_config is None:
        d = _local_model_dir(base_model)
        if d is not None:
            try:
                model_config = hf_weights.load_config(d)
            except UserError:
                model_config = None
    if model_config is not None:
        return model_config.hidden_size, model_config.num_hidden_layers, model_config.num_attention_heads
    return fingerprint.get("hidden_size"), fingerprint.get("num_layers"), None


def save_adapter(directory: str | Path, params: Any, method: Method, task: glue.GlueTask, *,
                 base_model: str, fingerprint: dict[str, Any], max_seq_length: int = 128,
                 compute: Compute | None = None, step: int | None = None, head: Any = None,
                 write: bool = True, model_config: BertConfig | None = None) -> Path:
    """Writes ``method``'s export of ``params`` as an adapter folder; returns its path.

    ``head``: the run's :class:`jaxpeft.config.Head` (pooling, ``modules_to_save``), recorded and
    restored. ``model_config``: the base model's architecture, for peft's shape fields (default:
    read from the base's local folder). The folder is written next to its destination and renamed
    into place, so an existing adapter is replaced only by a complete new one. ``write=False``
    (other processes of a multi-process run) gathers the arrays but writes nothing.
    """
    inference = method.for_inference()
    if inference.name not in methods.REGISTRY:
        raise ValueError(f"{type(method).__name__}.for_inference() returns an unregistered method "
                         f"{inference.name!r}; an adapter could not be loaded again")
    modules = head.module_list() if head is not None else ()
    arrays = {k: np.ascontiguousarray(to_host(v), dtype=np.float32)
              for k, v in method.export_params(params, modules).items()}
    directory = Path(directory)
    if not write:
        return directory
    peft_type = peft_format.PEFT_TYPES.get(method.name)
    tensors = peft_format.to_tensors(arrays, peft_type)
    dtype = (compute or Compute()).dtype
    base = base_model_ref(base_model)
    hidden, layers, heads = _model_shape(model_config, base_model, fingerprint)
    ours = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "jaxpeft_version": jaxpeft.__version__,
        "method": inference.name, "method_options": inference.options(),
        "trained_method": method.name, "trained_method_options": method.options(),
        "task": task.name, "num_labels": task.num_labels,
        "label_names": None if task.label_names is None else list(task.label_names),
        "base_model": base, "fingerprint": fingerprint,
        "max_seq_length": int(max_seq_length), "dtype": dtype, "step": step,
        "pooling": getattr(head, "pooling", "cls"), "modules_to_save": list(modules),
        "num_params": int(sum(a.size for a in arrays.values())),
    }
    config = peft_format.peft_fields(method, hidden_size=hidden, num_layers=layers, num_attention_heads=heads,
                                     base_model=base, modules_to_save=tuple(modules))
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

    ``kind``: ``jaxpeft`` (this format), ``jaxpeft-v1`` (the previous one) or ``peft`` (written by
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
    :class:`UserError`s); the tensors are read by :func:`read_adapter_weights`."""
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
        peft_type = cfg.get("peft_type")
        if peft_type is not None and peft_type not in peft_format.SUPPORTED:
            raise UserError(f"{path}: peft_type {peft_type!r} is not supported")
        return AdapterFolder(d, "jaxpeft", cfg, rec, _method(rec, str(path)), weights, peft_type)
    if "peft_type" in cfg:
        method, modules = peft_format.method_from_peft(cfg, str(path))
        weights = d / ADAPTER_WEIGHTS if (d / ADAPTER_WEIGHTS).is_file() else d / peft_format.WEIGHTS_BIN
        if not weights.is_file():
            raise UserError(f"adapter {d} has no {ADAPTER_WEIGHTS}")
        rec = {"method": method.name, "method_options": method.options(), "task": None, "num_labels": None,
               "base_model": cfg.get("base_model_name_or_path") or None, "fingerprint": None,
               "max_seq_length": None, "modules_to_save": list(modules), "peft_type": cfg["peft_type"]}
        return AdapterFolder(d, "peft", cfg, rec, method, weights, cfg["peft_type"])
    if "method" in cfg or cfg.get("format") == FORMAT:   # the previous format
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


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    try:
        if path.suffix == ".bin":
            return hf_weights._read_torch_bin(path)
        return safetensors.numpy.load_file(str(path))
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 -- safetensors and torch raise several types for a damaged file
        raise UserError(f"{path} cannot be read ({type(e).__name__}: {str(e)[:200]})") from None


def read_adapter_weights(directory: str | Path | AdapterFolder, num_layers: int | None = None
                         ) -> dict[str, np.ndarray]:
    """The adapter's arrays by our param paths (``bert/.../bias``, ``classifier/kernel``,
    ``adapter/prompt_embeddings``), whichever kind of folder it is. ``num_layers`` splits a peft
    prefix (default: from the folder's config)."""
    folder = directory if isinstance(directory, AdapterFolder) else read_adapter(directory)
    tensors = _read_tensors(folder.weights)
    if folder.kind == "jaxpeft-v1":
        return tensors
    if num_layers is None:
        num_layers = folder.config.get("num_layers") or (folder.record.get("fingerprint") or {}).get("num_layers")
    return peft_format.from_tensors(tensors, folder.peft_type, num_layers, str(folder.weights))


def overlay(params: Any, arrays: dict[str, np.ndarray], source: str) -> Any:
    """``params`` with the leaves named in ``arrays`` replaced (shapes must match)."""
    flat = masks.flatten(params)
    unknown = sorted(set(arrays) - set(flat))
    if unknown:
        raise UserError(f"{source}: {len(unknown)} array(s) are not parameters of this model, e.g. "
                        f"{unknown[:2]}")
    for k, v in arrays.items():
        if tuple(v.shape) != tuple(flat[k].shape):
            raise UserError(f"{source}: {k} has shape {tuple(v.shape)}, the model's is {tuple(flat[k].shape)}")
        flat[k] = jnp.asarray(v, dtype=flat[k].dtype)
    return masks.unflatten(flat, params)


def adapter_task(folder: AdapterFolder, task: str | None = None) -> glue.GlueTask:
    """The adapter's task: the recorded one, else ``task`` (``--task``); both must agree."""
    recorded = folder.task
    if recorded and task and glue.get_task(task).name != glue.get_task(recorded).name:
        raise UserError(f"--task={task}, but adapter {folder.directory} was trained on {recorded}")
    name = recorded or task
    if not name:
        raise UserError(f"adapter {folder.directory} does not record its task (a folder written by peft): "
                        "give --task")
    return glue.get_task(name)


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
    flat = {}
    for name, arr in hf_weights.load_state_dict(model_dir).items():
        mapped = hf_weights.hf_name_to_path(name)
        if mapped is not None and not mapped[0].startswith("classifier/"):
            flat["bert/" + mapped[0]] = arr.T if mapped[1] else arr
    return base_fingerprint(flat, str(model_dir))


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
                 compute: Compute | None = None) -> tuple[LoadedModel, Any, Method, glue.GlueTask]:
    """Loads the base model and overlays the adapter in ``directory`` (any kind, see
    :func:`read_adapter`).

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
    num_labels = folder.record.get("num_labels")
    if num_labels is not None and task_obj.num_labels != num_labels:
        raise UserError(f"{where}: num_labels={num_labels} but task {task_obj.name} has {task_obj.num_labels}")
    source = model or folder.base_model
    if not source:
        raise UserError(f"adapter {folder.directory} does not name its base model: give --model")
    model_config = hf_weights.load_config(hf_weights.resolve_model_dir(source))
    if folder.kind == "peft":
        _check_recorded_base(folder, model)
        peft_format.check_shapes(folder.config, model_config, source, str(where))
    arrays = read_adapter_weights(folder, model_config.num_hidden_layers)
    head = arrays.get("classifier/kernel")
    if head is not None and head.ndim == 2 and head.shape[1] != task_obj.num_labels:
        raise UserError(f"{folder.weights}: the classifier has {head.shape[1]} outputs, but task "
                        f"{task_obj.name} has {task_obj.num_labels} labels")
    if compute is None:
        from jaxpeft import compute as compute_lib

        compute = compute_lib.resolve("auto")
    pooling = folder.record.get("pooling") or "cls"     # how the head reads the encoder, as trained
    loaded = load_classifier(source, task_obj.num_labels, adapter=method.adapter, extras=method.extras,
                             added=method.added, compute=compute, pooling=pooling)
    if folder.kind != "peft":
        check_base(folder.record["fingerprint"], base_fingerprint(loaded.params, source, str(loaded.model_dir),
                                                                  exclude=method.added), f"adapter {directory}")
    params = overlay(loaded.params, arrays, str(folder.weights))
    missing = sorted(set(masks.trainable_paths(method.mask(params, _present(params, folder.modules_to_save))))
                     - set(arrays))
    if missing:
        raise UserError(f"adapter {directory} lacks {len(missing)} trained array(s) of method "
                        f"{method.name}, e.g. {missing[:2]}")
    return loaded, params, method, task_obj


def _present(params: Any, modules: Sequence[str]) -> tuple[str, ...]:
    """The ``modules_to_save`` that name a module of this model (peft lists ``score`` for every
    classifier, for instance)."""
    import re

    from jaxpeft.methods.base import module_pattern

    paths = masks.paths(params)
    return tuple(m for m in modules if any(re.search(module_pattern(m), p) for p in paths))


# ----------------------------------------------------------------------------- prediction


def examples_from_lines(lines: Iterable[str], task: glue.GlueTask) -> encoding.Examples:
    """One example per non-empty line; for sentence-pair tasks the two texts are tab-separated."""
    n = len(task.hub_texts)
    texts: tuple[list[str], ...] = tuple([] for _ in range(n))
    for i, line in enumerate(lines, 1):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        parts = line.split("\t", n - 1) if n > 1 else [line]
        if len(parts) != n:
            raise UserError(f"line {i}: task {task.name} needs {n} texts separated by a tab")
        for out, t in zip(texts, parts):
            out.append(t)
    if not texts[0]:
        raise UserError("no text to predict")
    return encoding.Examples(texts, None, "<text>")


def predict(loaded: LoadedModel, params: Any, method: Method, examples: encoding.Examples, *,
            max_seq_length: int = 128, batch_size: int = 64) -> np.ndarray:
    """Logits ``[n, num_labels]`` for ``examples``, in their order."""
    if max_seq_length + method.extra_positions() > loaded.config.max_position_embeddings:
        raise UserError(f"max_seq_length={max_seq_length} plus {method.extra_positions()} virtual tokens "
                        f"exceeds the model's {loaded.config.max_position_embeddings} positions")
    enc = encoding.encode(loaded.tokenizer, examples, max_seq_length)
    trainable, frozen = masks.split(params, method.mask(params))
    fn = jax.jit(steps.make_predict_step(loaded.module), compiler_options=loaded.module.compute.compiler_options())
    eval_batches = batches.BucketBatches(enc, batch_size, max_seq_length, 0).eval_batches(enc, batch_size)
    return steps.predict_logits(fn, trainable, frozen, eval_batches, len(enc))


def scores(logits: np.ndarray, task: glue.GlueTask) -> np.ndarray:
    """Class probabilities ``[n, num_labels]``, or the predicted value ``[n]`` for regression."""
    if task.is_regression:
        return logits[:, 0]
    return np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1))


def labels(logits: np.ndarray, task: glue.GlueTask) -> list[str]:
    """Predicted label names (or values, for regression)."""
    if task.is_regression:
        return [f"{v:.6g}" for v in logits[:, 0]]
    return [task.label_names[i] for i in logits.argmax(-1)]


def prediction_rows(logits: np.ndarray, task: glue.GlueTask) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a predictions TSV: ``index, prediction`` (GLUE submission layout), then
    one ``prob_<label>`` column per class."""
    header = ["index", "prediction"]
    pred = labels(logits, task)
    if task.is_regression:
        return header, [[str(i), p] for i, p in enumerate(pred)]
    probs = scores(logits, task)
    header += [f"prob_{name}" for name in task.label_names]
    return header, [[str(i), p, *(f"{x:.6f}" for x in row)] for i, (p, row) in enumerate(zip(pred, probs))]


def write_tsv(path: str | Path, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Writes a TSV next to ``path`` and renames it into place (an existing file is replaced only
    by a complete one)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"output {path} is a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\t".join(header) + "\n")
        for r in rows:
            f.write("\t".join(r) + "\n")
    os.replace(tmp, path)
