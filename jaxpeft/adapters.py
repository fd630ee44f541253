"""Adapters: the trained part of a model as a small portable folder, and prediction with it.

An adapter folder holds two files:

* ``adapter.safetensors``: ``{param path: float32 array}`` with ``/``-joined param paths as keys
  (``bert/encoder/layer_0/attention/self/query/bias``, ``classifier/kernel``, ``adapter/...``):
  what :meth:`Method.export_params <jaxpeft.methods.base.Method.export_params>` returns -- the
  trainable leaves, or for prompt methods with a reparameterisation the computed prompts;
* ``adapter_config.json``: ``format``, ``format_version``, ``method`` and ``method_options`` (of
  ``Method.for_inference()``, whose params are exactly the saved keys), ``trained_method`` and
  ``trained_method_options`` (the method that trained it), ``task``, ``num_labels``,
  ``label_names``, ``base_model`` (hub id or absolute folder), ``fingerprint`` (see
  :mod:`jaxpeft.fingerprint`), ``max_seq_length``, ``dtype``, ``step``, ``num_params``,
  ``jaxpeft_version``.

:func:`load_adapter` rebuilds the base model from its source, checks it against the fingerprint
and overlays the adapter; :func:`predict` returns logits for raw texts. Readers need ``method``,
``method_options``, ``task``, ``num_labels``, ``base_model`` and ``fingerprint``, and ignore keys
they do not know.
"""

from __future__ import annotations

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
from jaxpeft import data, masks, methods
from jaxpeft.fingerprint import check as check_base
from jaxpeft.fingerprint import fingerprint as base_fingerprint
from jaxpeft.fingerprint import to_host
from jaxpeft.errors import UserError
from jaxpeft import steps
from jaxpeft.compute import Compute
from jaxpeft.methods.base import Method
from jaxpeft.models.loading import LoadedModel, load_classifier

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter.safetensors"
FORMAT = "jaxpeft-adapter"
FORMAT_VERSION = 1
#: Keys every adapter_config.json has, with their JSON types.
REQUIRED: dict[str, type] = {
    "method": str, "method_options": dict, "task": str, "num_labels": int, "base_model": str,
    "fingerprint": dict}


def base_model_ref(model: str) -> str:
    """What to record as the base: the absolute path of a local folder, else the name as given."""
    p = Path(model).expanduser()
    return str(p.resolve()) if p.is_dir() else model


# ----------------------------------------------------------------------------- writing


def save_adapter(directory: str | Path, params: Any, method: Method, task: data.GlueTask, *,
                 base_model: str, fingerprint: dict[str, Any], max_seq_length: int = 128,
                 compute: Compute | None = None, step: int | None = None, head: Any = None,
                 write: bool = True) -> Path:
    """Writes ``method``'s export of ``params`` as an adapter folder; returns its path.

    ``head``: the run's :class:`jaxpeft.config.Head` (pooling, ``modules_to_save``), recorded and
    restored. The folder is written next to its destination and renamed into place, so an existing
    adapter is replaced only by a complete new one. ``write=False`` (other processes of a
    multi-process run) gathers the arrays but writes nothing.
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
    dtype = (compute or Compute()).dtype
    config = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "jaxpeft_version": jaxpeft.__version__,
        "method": inference.name, "method_options": inference.options(),
        "trained_method": method.name, "trained_method_options": method.options(),
        "task": task.name, "num_labels": task.num_labels,
        "label_names": None if task.label_names is None else list(task.label_names),
        "base_model": base_model_ref(base_model), "fingerprint": fingerprint,
        "max_seq_length": int(max_seq_length), "dtype": dtype, "step": step,
        "pooling": getattr(head, "pooling", "cls"), "modules_to_save": list(modules),
        "num_params": int(sum(a.size for a in arrays.values())),
    }
    if directory.exists() and not directory.is_dir():
        raise UserError(f"adapter destination {directory} exists and is a file")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        safetensors.numpy.save_file(arrays, str(tmp / ADAPTER_WEIGHTS), metadata={"format": FORMAT})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
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


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    """The checked ``adapter_config.json`` of an adapter folder (one-line :class:`UserError`s)."""
    d = Path(directory)
    if not d.is_dir():
        raise UserError(f"adapter folder {d} not found" if not d.exists() else f"adapter {d} is not a folder")
    path = d / ADAPTER_CONFIG
    if not path.is_file():
        raise UserError(f"{d} is not an adapter folder: it has no {ADAPTER_CONFIG}")
    if not (d / ADAPTER_WEIGHTS).is_file():
        raise UserError(f"adapter {d} has no {ADAPTER_WEIGHTS}")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: expected a JSON object")
    for key, kind in REQUIRED.items():
        if key not in cfg:
            hint = (" (an adapter written without the base-model fingerprint: export it with "
                    "jaxpeft.adapters.save_adapter)" if key == "fingerprint" else "")
            raise UserError(f"{path}: missing key {key!r}{hint}")
        if not isinstance(cfg[key], kind) or isinstance(cfg[key], bool):
            raise UserError(f"{path}: {key!r} should be a {kind.__name__}, got {cfg[key]!r}")
    if cfg.get("format", FORMAT) != FORMAT:
        raise UserError(f"{path}: format {cfg['format']!r} is not {FORMAT!r}")
    version = cfg.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool):
        raise UserError(f"{path}: 'format_version' should be an int, got {version!r}")
    if version > FORMAT_VERSION:
        raise UserError(f"{path}: format version {cfg['format_version']} is newer than this jaxpeft "
                        f"reads ({FORMAT_VERSION}); upgrade jaxpeft")
    return cfg


def read_adapter_weights(directory: str | Path) -> dict[str, np.ndarray]:
    path = Path(directory) / ADAPTER_WEIGHTS
    try:
        return safetensors.numpy.load_file(str(path))
    except Exception as e:  # noqa: BLE001 -- safetensors raises several types for a damaged file
        raise UserError(f"{path} cannot be read ({type(e).__name__}: {str(e)[:200]})") from None


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


def load_adapter(directory: str | Path, model: str | None = None, *, compute: Compute | None = None
                 ) -> tuple[LoadedModel, Any, Method, data.GlueTask]:
    """Loads the base model and overlays the adapter in ``directory``.

    ``model`` overrides the recorded base (e.g. the same checkpoint in another folder); it must have
    the recorded fingerprint. ``compute``: how to compute (default: ``auto`` on this platform).
    Returns ``(loaded_model, params, method, task)`` where ``method`` is the inference method the
    params belong to.
    """
    cfg = read_adapter_config(directory)
    where = Path(directory) / ADAPTER_CONFIG
    try:
        method = methods.create(cfg["method"], cfg["method_options"])
        task = data.get_task(cfg["task"])
    except (UserError, TypeError, ValueError) as e:
        raise UserError(f"{where}: {e}") from None
    if task.num_labels != cfg["num_labels"]:
        raise UserError(f"{where}: num_labels={cfg['num_labels']} but task {task.name} has {task.num_labels}")
    arrays = read_adapter_weights(directory)
    source = model or cfg["base_model"]
    if compute is None:
        from jaxpeft import compute as compute_lib

        compute = compute_lib.resolve("auto")
    loaded = load_classifier(source, task.num_labels, adapter=method.adapter, extras=method.extras,
                             added=method.added, compute=compute)
    check_base(cfg["fingerprint"], base_fingerprint(loaded.params, source, str(loaded.model_dir),
                                                    exclude=method.added), f"adapter {directory}")
    params = overlay(loaded.params, arrays, str(Path(directory) / ADAPTER_WEIGHTS))
    missing = sorted(set(masks.trainable_paths(method.mask(params, cfg.get("modules_to_save") or ())))
                     - set(arrays))
    if missing:
        raise UserError(f"adapter {directory} lacks {len(missing)} trained array(s) of method "
                        f"{method.name}, e.g. {missing[:2]}")
    return loaded, params, method, task


# ----------------------------------------------------------------------------- prediction


def examples_from_lines(lines: Iterable[str], task: data.GlueTask) -> data.Examples:
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
    return data.Examples(texts, None, "<text>")


def predict(loaded: LoadedModel, params: Any, method: Method, examples: data.Examples, *,
            max_seq_length: int = 128, batch_size: int = 64) -> np.ndarray:
    """Logits ``[n, num_labels]`` for ``examples``, in their order."""
    if max_seq_length + method.extra_positions() > loaded.config.max_position_embeddings:
        raise UserError(f"max_seq_length={max_seq_length} plus {method.extra_positions()} virtual tokens "
                        f"exceeds the model's {loaded.config.max_position_embeddings} positions")
    enc = data.encode(loaded.tokenizer, examples, max_seq_length)
    trainable, frozen = masks.split(params, method.mask(params))
    fn = jax.jit(steps.make_predict_step(loaded.module))
    batches = data.BucketBatches(enc, batch_size, max_seq_length, 0).eval_batches(enc, batch_size)
    return steps.predict_logits(fn, trainable, frozen, batches, len(enc))


def scores(logits: np.ndarray, task: data.GlueTask) -> np.ndarray:
    """Class probabilities ``[n, num_labels]``, or the predicted value ``[n]`` for regression."""
    if task.is_regression:
        return logits[:, 0]
    return np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1))


def labels(logits: np.ndarray, task: data.GlueTask) -> list[str]:
    """Predicted label names (or values, for regression)."""
    if task.is_regression:
        return [f"{v:.6g}" for v in logits[:, 0]]
    return [task.label_names[i] for i in logits.argmax(-1)]


def prediction_rows(logits: np.ndarray, task: data.GlueTask) -> tuple[list[str], list[list[str]]]:
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
