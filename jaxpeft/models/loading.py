"""Build a run's model from a pretrained checkpoint: the family from ``config.json``, the method's
hooks and prompt, the task's head; pretrained tensors placed directly on their devices."""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Any, Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jax_core

from jaxpeft import masks
from jaxpeft.compute import EXACT, Compute
from jaxpeft.errors import UserError
from jaxpeft.models import hf_weights
from jaxpeft.models.family import Family
from jaxpeft.models.heads import Head, TaskModel, dummy_inputs
from jaxpeft.models.layers import NO_HOOKS

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LoadedModel:
    """A run's model: its module, full params (pretrained encoder, fresh head and method params)
    and tokenizer."""

    name: str
    model_dir: Path
    family: Family
    config: Any
    module: TaskModel
    params: Any
    tokenizer: Any
    compute: Compute = EXACT

    @property
    def prefix(self) -> str:
        """The encoder's parameter root (``bert``)."""
        return self.family.prefix


def init_params(module: nn.Module, rng: jax.Array, param_shardings: Callable[[Any], Any] | None = None,
                skip: Iterable[str] = (), traced: "TracedInit | None" = None,
                on_host: bool | None = None) -> Any:
    """Random params of ``module`` (jitted init, so no op-by-op dispatch).

    ``param_shardings(abstract_params)`` gives each leaf's sharding; the params are then created
    directly on their shardings, never whole on one device. Paths in ``skip`` (those a checkpoint
    provides) come back as ``optax.MaskedNode`` holes and are never computed. ``traced``:
    :func:`trace_init` of ``module``, whose trace is reused instead of tracing the model again.

    ``on_host``: compute the params with the CPU backend, then place them. The default does so on
    an accelerator in a single process when ``skip`` is given: the fresh params of a pretrained
    model (a head, an adapter, a prompt encoder) are small, and their init -- random bits, the
    orthogonal QR of an LSTM's recurrent kernels -- compiles far faster for the CPU than for a GPU.
    """
    skip = frozenset(skip)
    full = traced.fn if traced is not None else (lambda r: module.init(r, **dummy_inputs())["params"])

    def fn(r):
        params = full(r)
        if not skip:
            return params
        return masks.unflatten({p: v for p, v in masks.flatten(params).items() if p not in skip}, params)

    if on_host is None:
        on_host = bool(skip) and jax.default_backend() != "cpu" and jax.process_count() == 1
    if on_host:
        cpu = jax.devices("cpu")[0]
        with jax.default_device(cpu):
            params = jax.jit(fn)(jax.device_put(rng, cpu))
        target = param_shardings(jax.eval_shape(fn, rng)) if param_shardings is not None else jax.devices()[0]
        return jax.device_put(params, target)
    if param_shardings is None:
        return jax.jit(fn)(rng)
    return jax.jit(fn, out_shardings=param_shardings(jax.eval_shape(fn, rng)))(rng)


@dataclasses.dataclass(frozen=True)
class TracedInit:
    """``module.init`` traced once: ``fn(rng)`` replays the trace (no Flax module code runs),
    ``shapes`` are the params' shapes and dtypes."""

    fn: Callable[[jax.Array], Any]
    shapes: Any


def trace_init(module: nn.Module) -> TracedInit:
    """Traces ``module``'s init once (tracing a model is the slow part of initialising it)."""
    closed, shapes = jax.make_jaxpr(lambda r: module.init(r, **dummy_inputs())["params"],
                                    return_shape=True)(jax.random.key(0))
    tree = jax.tree_util.tree_structure(shapes)
    replay = jax_core.jaxpr_as_fun(closed)
    return TracedInit(lambda r: jax.tree_util.tree_unflatten(tree, replay(r)), shapes)


def param_shapes(module: nn.Module) -> Any:
    """Shapes/dtypes of ``module``'s params without allocating them."""
    return jax.eval_shape(lambda r: module.init(r, **dummy_inputs())["params"], jax.random.key(0))


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


def build_module(family: Family, config: Any, head: Head, method: Any = None, compute: Compute = EXACT) -> TaskModel:
    """The task model of ``family``/``config`` with ``method``'s hooks and prompt module
    (``method.hooks(family, config)``, ``method.prompt_module(family, config)``; ``None``: no method)."""
    try:
        if family.check_compute is not None:
            family.check_compute(config, compute)
    except ValueError as e:
        raise UserError(str(e)) from None
    hooks = method.hooks(family, config) if method is not None else NO_HOOKS
    prompt = method.prompt_module(family, config) if method is not None else None
    return TaskModel(family, config, head, compute=compute, hooks=hooks, prompt=prompt)


def load_model(name_or_path: str, head: Head, method: Any = None, *, compute: Compute = EXACT, seed: int = 0,
               with_weights: bool = True, param_shardings: Callable[[Any], Any] | None = None) -> LoadedModel:
    """Loads config, tokenizer and weights of ``name_or_path`` into the task model.

    ``method`` gives the hooks and prompt module (see :func:`build_module`) and the regex ``added``
    of its params inside the encoder, which start from their own init. ``with_weights=False`` keeps
    the random init (benchmarks of a model's shape). ``param_shardings(abstract_params)`` places
    the params on a device mesh as they are created (see :func:`init_params`); pretrained tensors
    go from the host to each device's slice. Encoder weights the checkpoint provides are never
    randomly initialised.
    """
    model_dir = hf_weights.resolve_model_dir(name_or_path)
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
    matmul kernels (``prefix/.../kernel``) in ``dtype``.

    Every one of them is cast to the compute dtype right before its matmul, so the model computes
    exactly the same with them stored cast. For frozen params that takes a cast per matrix off
    every train step and, under bfloat16, half of their memory. Embedding tables, biases and norm
    params are used in float32 and stay as they are.
    """
    dtype = jnp.dtype(dtype)

    def cast(path, x):
        names = [str(getattr(k, "key", k)) for k in path]
        is_kernel = len(names) > 1 and names[0] == prefix and names[-1] == "kernel"
        if is_kernel and getattr(x, "ndim", 0) == 2 and jnp.issubdtype(x.dtype, jnp.floating):
            return x.astype(dtype)
        return x

    if dtype == jnp.float32:
        return params
    return jax.tree_util.tree_map_with_path(cast, params)


def load_classifier(name_or_path: str, num_labels: int, method: Any = None, *, pooling: str = "cls",
                    **kw: Any) -> LoadedModel:
    """:func:`load_model` with a sequence-classification head of ``num_labels`` outputs (1: regression)."""
    return load_model(name_or_path, Head("sequence", num_labels, pooling), method, **kw)
