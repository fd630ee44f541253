"""The device state of the serving engine: one :class:`Group` per set of adapters that share a
batch, with room for a fixed number of them and its programs compiled up front.

A group is what :mod:`jaxpeft.adapters.mixed` computes in one call: adapters of one mixing family
(:attr:`Method.mix <jaxpeft.methods.base.Method.mix>`) and one task kind, whose
:attr:`~jaxpeft.methods.base.Method.mix_same` options, pooling and ``modules_to_save`` agree, and
whose own leaves fit the group's (a BitFit adapter of other bias terms than the group's is of
another group). It holds:

* ``stacked``: ``{param path: [capacity, ...]}``, the adapters' own leaves (what their method
  trains and exports, the task head), one *slot* per adapter. The capacity is declared
  (``max_adapters_per_family``) and allocated at once; a free slot holds the base's values;
* ``frozen``: everything else, the frozen base, with holes at the stacked paths. Its encoder
  leaves are the engine's one copy of the base weights, shared by every group;
* the slot table: which adapter is in which slot;
* the programs: the mixed forward (:func:`jaxpeft.adapters.mixed.mixed_outputs`: every row gathers
  its slot's leaves, the model is vmapped over the rows, the frozen matmuls stay one matmul per
  call) for each bucket length and batch size, and the program writing one slot. All are compiled
  by :meth:`Group.warm_up` when the group is made, so loading an adapter is one call of the slot
  writer -- the slot index is an argument, not a constant -- and removing one only frees its slot:
  neither traces nor compiles anything.

The head is the widest one: ``max_labels`` outputs (2 for spans) whatever each adapter's own label
count, so the head's shape is the same for every adapter of the group; an adapter's head is
zero-padded to it when written, and its rows' outputs are cut back to its own labels.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft import masks
from jaxpeft.adapters import mixed
from jaxpeft.errors import UserError
from jaxpeft.models.heads import Head, head_modules
from jaxpeft.models.loading import build_module, frozen_in_dtype, init_params, trace_init


@dataclasses.dataclass(frozen=True)
class GroupKey:
    """What adapters of one group share (besides their own leaves' paths and shapes)."""

    mix: str                       # the mixing family: bitfit, prompt, prefix, lora, ia3, bottleneck
    kind: str                      # the task kind: sequence, token, span
    pooling: str
    modules_to_save: tuple[str, ...]
    options: str                   # the mix_same values, as sorted JSON

    def __str__(self) -> str:
        return f"{self.mix}/{self.kind}"


class TraceCounter:
    """Counts the Python-level traces of the programs it wraps (each trace precedes a compilation;
    once warm, serving, adding and removing adapters must add none)."""

    def __init__(self):
        self.count = 0
        self._lock = threading.Lock()

    def wrap(self, fn: Callable) -> Callable:
        def traced(*args):
            with self._lock:
                self.count += 1
            return fn(*args)

        return traced


class Group:
    """One group's device state and programs (see the module docstring)."""

    def __init__(self, gid: int, key: GroupKey, method: Any, base: Any, *, capacity: int, width: int,
                 buckets: Sequence[int], batch_sizes: Sequence[int], counter: TraceCounter, seed: int = 0):
        self.gid, self.key, self.method, self.base = gid, key, method, base
        self.capacity, self.width = capacity, width
        family, config, compute = base.family, base.config, base.compute
        self.head = Head(key.kind, width, key.pooling)
        self.module = build_module(family, config, self.head, method, compute)
        self.heads = head_modules(family, self.head)
        self.extra_positions = method.extra_positions()
        positions = getattr(config, "max_position_embeddings", None)
        self.buckets = tuple(b for b in buckets if positions is None or b + self.extra_positions <= positions)
        if not self.buckets:
            raise UserError(f"a {key} adapter adds {self.extra_positions} virtual tokens: no bucket "
                            f"({', '.join(map(str, buckets))}) leaves room for them in the model's {positions} positions")
        self.batch_sizes = tuple(sorted(set(batch_sizes)))
        traced = trace_init(self.module)
        tensors = base.device_tensors(traced.shapes, getattr(method, "added", None))
        fresh = init_params(self.module, jax.random.key(seed), skip=tensors, traced=traced)
        flat = {**masks.flatten(fresh), **tensors}
        self.params = masks.unflatten(flat, traced.shapes)   # the template: base + fresh method/head leaves
        self.shapes = {p: (tuple(v.shape), v.dtype) for p, v in flat.items()}
        self.paths: tuple[str, ...] = ()
        self.slots: list[str | None] = [None] * capacity
        self.stacked: dict[str, jax.Array] = {}
        self.frozen: Any = None
        self.counter = counter
        self._forward: Callable | None = None
        self._write: Callable | None = None

    # ------------------------------------------------------------------ layout

    def own_paths(self, method: Any, modules: Sequence[str]) -> set[str]:
        """The paths an adapter of ``method`` owns in this group's model (its trained leaves and head)."""
        mask = method.mask(self.params, self.base.family, self.heads, tuple(modules))
        return set(masks.trainable_paths(mask))

    def allocate(self, paths: Sequence[str]) -> None:
        """Fixes the stacked paths (the first adapter's own) and allocates ``[capacity, ...]`` of
        each, every slot holding the base's value; the rest becomes ``frozen``."""
        flat = masks.flatten(self.params)
        self.paths = tuple(sorted(paths))
        device = self.base.device
        self.stacked = {p: jax.device_put(jnp.broadcast_to(flat[p], (self.capacity, *flat[p].shape)), device)
                        for p in self.paths}
        frozen = masks.unflatten({p: v for p, v in flat.items() if p not in self.stacked}, self.params)
        store = self.base.compute.frozen_dtype
        if store != "float32":   # the frozen base stored as the compute spec says, as jaxpeft-predict does
            frozen = jax.jit(lambda f: frozen_in_dtype(f, store, self.base.family.prefix))(frozen)
        self.frozen = frozen
        self.base_leaves = {p: flat[p] for p in self.paths}

    def leaves_for(self, own: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
        """One slot's leaves from an adapter's arrays: a leaf it lacks is the base's; a head narrower
        than the group's is zero-padded on its last axis. Raises :class:`UserError` for a shape
        that does not fit."""
        out = {}
        for p in self.paths:
            target, dtype = self.shapes[p]
            if p not in own:
                out[p] = np.asarray(self.base_leaves[p])
                continue
            a = np.asarray(own[p], dtype=dtype)
            if a.shape != target:
                narrower = (a.ndim == len(target) and a.shape[:-1] == target[:-1] and a.shape[-1] <= target[-1]
                            and p.split("/", 1)[0] in self.heads)
                if not narrower:
                    raise UserError(f"{where}: {p} has shape {a.shape}, the served model's is {target} "
                                    "(an adapter of another base model or of other options?)")
                a = np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, target[-1] - a.shape[-1])])
            out[p] = a
        return out

    # ------------------------------------------------------------------ programs

    def _programs(self) -> None:
        module, compute = self.module, self.base.compute

        def forward(stacked, frozen, batch):
            return mixed.mixed_outputs(module, stacked, frozen, batch)

        def write(stacked, slot, leaves):
            return {p: jax.lax.dynamic_update_index_in_dim(stacked[p], leaves[p].astype(stacked[p].dtype), slot, 0)
                    for p in stacked}

        options = compute.compiler_options()
        self._forward = jax.jit(self.counter.wrap(forward), compiler_options=options)
        self._write = jax.jit(self.counter.wrap(write), donate_argnums=(0,), compiler_options=options)

    def warm_up(self) -> None:
        """Compiles every program: the forward at each bucket and batch size, the slot writer."""
        self._programs()
        for length in self.buckets:
            for b in self.batch_sizes:
                ids = np.zeros((b, length), np.int32)
                lengths = np.ones((b,), np.int32)
                self.forward(ids, ids, lengths, np.zeros((b,), np.int32))
        self.write(0, {p: np.asarray(v) for p, v in self.base_leaves.items()})

    def write(self, slot: int, leaves: dict[str, np.ndarray]) -> None:
        """Puts one adapter's leaves into ``slot`` (no tracing: the slot is an argument)."""
        leaves = {p: jax.device_put(np.asarray(leaves[p], dtype=self.shapes[p][1]), self.base.device)
                  for p in self.paths}
        index = jax.device_put(np.asarray(slot, np.int32), self.base.device)
        self.stacked = self._write(self.stacked, index, leaves)

    def batch_size(self, n: int) -> int:
        return next(b for b in self.batch_sizes if b >= n)

    def forward(self, ids: np.ndarray, types: np.ndarray, lengths: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """The outputs ``[n, ...]`` of ``n`` rows (``[n, L]`` ids and token types of one bucket
        length ``L``, real lengths, slots), in one device call padded to a compiled batch size."""
        n, length = ids.shape
        b = self.batch_size(n)
        if b > n:   # filler rows repeat the first row; their outputs are dropped
            fill = np.zeros(b - n, np.int64)
            ids, types = np.concatenate([ids, ids[fill]]), np.concatenate([types, types[fill]])
            lengths, slots = np.concatenate([lengths, lengths[fill]]), np.concatenate([slots, slots[fill]])
        mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
        batch = {"input_ids": ids.astype(np.int32), "token_type_ids": types.astype(np.int32),
                 "attention_mask": mask, mixed.INDEX_KEY: slots.astype(np.int32)}
        batch = jax.device_put(batch, self.base.device)
        out = self._forward(self.stacked, self.frozen, batch)
        return np.asarray(jax.device_get(out), np.float32)[:n]

    # ------------------------------------------------------------------ slots

    def free_slot(self) -> int | None:
        return next((i for i, s in enumerate(self.slots) if s is None), None)

    @property
    def used(self) -> int:
        return sum(s is not None for s in self.slots)
