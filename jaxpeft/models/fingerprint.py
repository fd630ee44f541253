"""Base-model fingerprints: which pretrained encoder a checkpoint or an adapter belongs to.

Checkpoints and adapters hold only the trainable part of a model; the frozen encoder is reloaded
from its source. A fingerprint of the encoder (the leaves under its prefix, ``bert/``: the task head and a method's
added parameters are not part of the base) is recorded next to them and checked on restore, so a
subtree is never overlaid on another base -- another size (tree structure, shapes, dtypes differ)
or other weights (a hash of a few leaves differs).

>>> import numpy as np
>>> base = {"bert": {"dense": {"kernel": np.ones((4, 2), np.float32)}}, "classifier": {"bias": np.zeros(2)}}
>>> fp = fingerprint(base, "my-bert")
>>> fp["num_params"], fp["model"]
(8, 'my-bert')
>>> other = {"bert": {"dense": {"kernel": np.full((4, 2), 2, np.float32)}}}
>>> check(fp, fingerprint(other, "my-bert"), "checkpoint x")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
jaxpeft.errors.UserError: checkpoint x was trained on base model my-bert (8 params, ...
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxpeft import masks
from jaxpeft.errors import UserError

#: The encoder's prefix when none is given (BERT's).
BASE_PREFIX = "bert"
#: How many leaves the weight hash reads, and at most how many numbers of each.
HASHED_LEAVES = 6
HASHED_NUMBERS = 65536

_LAYER = re.compile(r"/layer_(\d+)/")


def to_host(x: Any) -> np.ndarray:
    """A numpy copy of an array, gathering its shards when they live on several processes."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _hashed_paths(paths: list[str]) -> list[str]:
    """A few leaves spread over the encoder; the pooler is skipped (some checkpoints lack it, and
    then it is randomly initialised)."""
    cand = [p for p in paths if "/pooler/" not in p] or paths
    if len(cand) <= HASHED_LEAVES:
        return cand
    idx = np.linspace(0, len(cand) - 1, HASHED_LEAVES).round().astype(int)
    return [cand[i] for i in sorted(set(idx.tolist()))]


def fingerprint(params: Any, model: str, model_dir: str | None = None,
                exclude: str | None = None, prefix: str = BASE_PREFIX) -> dict[str, Any]:
    """The fingerprint of the base encoder in ``params`` (a full params tree or its ``bert/`` part).

    ``model`` / ``model_dir`` name where the base comes from (hub id or folder); they are recorded
    for messages and for reloading, not compared. Leaves matching the regex ``exclude`` (a
    method's own modules inside the encoder, such as LoRA) are not part of the base.
    """
    flat = {p: v for p, v in masks.flatten(params).items() if p.startswith(prefix + "/")
            and not (exclude and re.search(exclude, p))}
    if not flat:
        raise ValueError(f"no {prefix + '/'!r} leaves in the params tree")
    paths = sorted(flat)
    structure = hashlib.sha256()
    for p in paths:
        v = flat[p]
        structure.update(f"{p}:{tuple(v.shape)}:{np.dtype(v.dtype).name}\n".encode())
    weights = hashlib.sha256()
    for p in _hashed_paths(paths):
        x = to_host(flat[p]).ravel()
        stride = max(1, x.size // HASHED_NUMBERS)
        weights.update(p.encode())
        weights.update(np.ascontiguousarray(x[::stride]).tobytes())
    layers = {int(m.group(1)) for p in paths if (m := _LAYER.search(p))}
    words = [v for p, v in flat.items() if re.search(r"(word|tok)_embeddings/embedding$", p)]
    return {
        "model": model,
        "family": prefix,
        "model_dir": None if model_dir is None else str(model_dir),
        "num_params": int(sum(int(np.prod(flat[p].shape)) for p in paths)),
        "num_layers": len(layers),
        "hidden_size": int(words[0].shape[-1]) if words else None,
        "structure_sha256": structure.hexdigest()[:16],
        "weights_sha256": weights.hexdigest()[:16],
    }


def describe(fp: dict[str, Any]) -> str:
    """``name (6 layers, hidden 384, 22.6M params, weights 1a2b3c4d)``."""
    parts = []
    if fp.get("num_layers"):
        parts.append(f"{fp['num_layers']} layers")
    if fp.get("hidden_size"):
        parts.append(f"hidden {fp['hidden_size']}")
    n = fp.get("num_params", 0)
    parts.append(f"{n / 1e6:.1f}M params" if n >= 1e5 else f"{n} params")
    parts.append(f"weights {str(fp.get('weights_sha256', '?'))[:8]}")
    return f"{fp.get('model')} ({', '.join(parts)})"


def same_base(expected: dict[str, Any], actual: dict[str, Any]) -> bool:
    return (expected.get("structure_sha256") == actual.get("structure_sha256")
            and expected.get("weights_sha256") == actual.get("weights_sha256"))


def check(expected: dict[str, Any], actual: dict[str, Any], what: str) -> None:
    """Raises :class:`UserError` (one line) unless ``actual`` is the base ``expected`` names."""
    if not isinstance(expected, dict) or "structure_sha256" not in expected:
        raise UserError(f"{what} records no base-model fingerprint")
    if same_base(expected, actual):
        return
    kind = ("another architecture or size" if expected["structure_sha256"] != actual["structure_sha256"]
            else "other weights")
    model = str(expected.get("model"))
    where = expected.get("model_dir") or model if Path(model).expanduser().is_dir() else model
    raise UserError(f"{what} was trained on base model {describe(expected)}, but the base loaded now is "
                    f"{describe(actual)} ({kind}); use --model={where}")
