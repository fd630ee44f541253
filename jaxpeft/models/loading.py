"""Build a sequence classifier from a pretrained HF BERT checkpoint."""

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
from jaxpeft.models.bert import NO_EXTRAS, BertConfig, BertForSequenceClassification, Extras, check_compute

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LoadedModel:
    """A classifier module, its full params (pretrained encoder, fresh head/adapter) and tokenizer."""

    name: str
    model_dir: Path
    config: BertConfig
    module: BertForSequenceClassification
    params: Any
    tokenizer: Any
    compute: Compute = EXACT


def dummy_inputs(batch: int = 1, length: int = 8) -> dict[str, jax.Array]:
    ids = jnp.zeros((batch, length), jnp.int32)
    return {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "token_type_ids": ids}


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


def pretrained_tensors(shapes: Any, state_dict: dict[str, np.ndarray], source: str,
                       added: str | None = None) -> dict[str, np.ndarray]:
    """``{param path: host array}`` of the checkpoint tensors for the ``bert/`` leaves of ``shapes``
    (a params tree or its ``jax.eval_shape``), in the params' dtypes.

    Every encoder tensor must be in the checkpoint, except those whose path matches ``added`` (a
    method's own modules inside the layers, such as LoRA); a missing pooler is tolerated (kept
    random, with a warning) because some checkpoints ship without one.
    """
    flat = masks.flatten(shapes)
    expected = {p[len("bert/"):]: v for p, v in flat.items() if p.startswith("bert/")
                and not (added and re.search(added, p))}
    loaded = hf_weights.convert_state_dict(state_dict, expected, source)
    missing = sorted(set(expected) - set(loaded))
    missing_encoder = [p for p in missing if not p.startswith("pooler/")]
    if missing_encoder:
        raise UserError(f"{source}: checkpoint lacks {len(missing_encoder)} encoder tensor(s), e.g. "
                        f"{missing_encoder[:3]} (not a BERT checkpoint of this shape?)")
    if missing:
        log.warning("%s has no pooler weights; the pooler starts from random init", source)
    return {"bert/" + p: np.asarray(a, dtype=flat["bert/" + p].dtype) for p, a in loaded.items()}


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


def overlay_pretrained(params: Any, state_dict: dict[str, np.ndarray], source: str) -> Any:
    """Replaces the ``bert/`` leaves of ``params`` with the checkpoint's tensors, on the same
    shardings (see :func:`pretrained_tensors` for what must be in the checkpoint)."""
    shardings = jax.tree_util.tree_map(lambda x: x.sharding, params)
    return place_tensors(params, pretrained_tensors(params, state_dict, source), params, shardings)


def load_classifier(name_or_path: str, num_labels: int, *,
                    adapter: Callable[[BertConfig], nn.Module | None] | None = None,
                    extras: Callable[[BertConfig], Extras] | None = None, added: str | None = None,
                    compute: Compute = EXACT, seed: int = 0, with_weights: bool = True,
                    param_shardings: Callable[[Any], Any] | None = None, pooling: str = "cls") -> LoadedModel:
    """Loads config, tokenizer and weights of ``name_or_path`` into a classifier.

    ``adapter(config)`` builds the method's input-level module (prompts, prefixes), if any;
    ``extras(config)`` its modules inside the layers (LoRA, bottleneck adapters), whose params
    match the regex ``added`` and start from their own init. ``compute`` says how to compute;
    ``pooling`` how the head reads the encoder (``cls`` or ``mean``).
    ``with_weights=False`` keeps the random init (benchmarks of a model's shape).
    ``param_shardings(abstract_params)`` places the params on a device mesh as they are created
    (see :func:`init_params`); pretrained tensors go from the host to each device's slice.
    Encoder weights the checkpoint provides are never randomly initialised.
    """
    model_dir = hf_weights.resolve_model_dir(name_or_path)
    config = hf_weights.load_config(model_dir)
    try:
        check_compute(config, compute)
    except ValueError as e:
        raise UserError(f"{name_or_path}: {e}") from None
    module = BertForSequenceClassification(config, num_labels=num_labels,
                                           adapter=adapter(config) if adapter else None,
                                           compute=compute, extras=extras(config) if extras else NO_EXTRAS,
                                           pooling=pooling)
    traced = trace_init(module)
    shapes = traced.shapes
    tensors = (pretrained_tensors(shapes, hf_weights.load_state_dict(model_dir), str(model_dir), added)
               if with_weights else {})
    # random init only for what the checkpoint lacks (head, adapter, maybe the pooler): XLA drops
    # the rest of the init, which keeps its compilation short
    params = init_params(module, jax.random.key(seed), param_shardings, skip=tensors, traced=traced)
    params = place_tensors(params, tensors, shapes, param_shardings(shapes) if param_shardings else None)
    tokenizer = hf_weights.load_tokenizer(model_dir)
    return LoadedModel(name_or_path, model_dir, config, module, params, tokenizer, compute)
