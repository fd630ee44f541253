"""The task model's module and params: a family's model with a method's hooks and a task's head,
its params initialised by one traced, jitted init (created directly on their shardings)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Iterable

import flax.linen as nn
import jax
from jax.extend import core as jax_core

from jaxpeft import masks
from jaxpeft.compute import EXACT, Compute
from jaxpeft.errors import UserError
from jaxpeft.models.family import Family
from jaxpeft.models.heads import Head, TaskModel, dummy_inputs
from jaxpeft.models.layers import NO_HOOKS


@dataclasses.dataclass
class LoadedModel:
    """A run's model: its module, full params (pretrained encoder, fresh head and method params)
    and tokenizer.

    ``shapes``: for a random encoder of a named size (``random:base``, :mod:`jaxpeft.models.sizes`),
    the float params' shape structs; its ``params`` hold the frozen base already stored as
    ``--base_dtype`` (quantized kernels as single leaves), so masks, parameter counts and the
    fingerprint read ``shapes``. ``None`` for a checkpoint's model (its params are float32).
    """

    name: str
    model_dir: Path
    family: Family
    config: Any
    module: TaskModel
    params: Any
    tokenizer: Any
    compute: Compute = EXACT
    shapes: Any = None

    @property
    def stored(self) -> bool:
        """Whether ``params`` hold the frozen base already as stored (a random size)."""
        return self.shapes is not None

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
