"""Adapter folders: the trained leaves of a PEFT run, without the frozen base weights.

A folder holds ``adapter_config.json`` (``method``, ``method_options``, ``task``, ``num_labels``,
``base_model``; readers ignore keys they do not know) and ``adapter.safetensors``, whose keys are
``/``-joined param paths (``bert/encoder/layer_0/attention/self/query/bias``, ``classifier/kernel``)
and whose tensors are float32.

>>> import tempfile, numpy as np
>>> d = tempfile.mkdtemp() + "/a"
>>> _ = save(d, {"classifier/bias": np.zeros(2)}, method="bitfit", method_options={},
...          task="rte", num_labels=2, base_model="m")
>>> cfg, arrays = load(d)
>>> cfg["task"], list(arrays), arrays["classifier/bias"].dtype
('rte', ['classifier/bias'], dtype('float32'))
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from jaxpeft.errors import UserError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"
REQUIRED_KEYS = ("method", "method_options", "task", "num_labels", "base_model")


def save(folder: str | Path, arrays: Mapping[str, Any], *, method: str, method_options: Mapping[str, Any],
         task: str, num_labels: int, base_model: str) -> Path:
    """Writes the folder (into a temporary sibling first, so a killed write leaves no half folder)."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    config = dict(method=method, method_options=dict(method_options), task=task,
                  num_labels=int(num_labels), base_model=base_model)
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for k, v in arrays.items()},
              str(tmp / WEIGHTS_FILE))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def load(folder: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(config, {path: float32 array})`` of an adapter folder; :class:`UserError` when it is not one."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"adapter folder {str(folder)!r} does not exist")
    cfg_path, weights = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not cfg_path.is_file() or not weights.is_file():
        raise UserError(f"{folder} is not an adapter folder: it needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {cfg_path}: {e}") from None
    missing = [k for k in REQUIRED_KEYS if not isinstance(config, dict) or k not in config]
    if missing:
        raise UserError(f"{cfg_path} lacks {', '.join(missing)}")
    try:
        arrays = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise UserError(f"cannot read {weights}: {type(e).__name__}: {e}") from None
    return config, {k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()}
