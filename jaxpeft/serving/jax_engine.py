"""The serving engine: one frozen base model, loaded once, and any number of adapters on it,
predicting mixed batches (:class:`JaxEngine`, the :class:`~jaxpeft.serving.engine.Engine` of
``jaxpeft-serve``).

The design
----------
**One base.** The base model's weights are read once (``--model``, else the base the first adapter
records) and put on the device once; every adapter must be of that base: its recorded fingerprint
(:mod:`jaxpeft.models.fingerprint`) is checked against the loaded one, as ``jaxpeft-predict``
checks it, and an adapter of another base, another model family, an unservable method or a broken
folder is refused with one line while the loaded adapters keep serving.

**Groups.** Adapters that can share a device call form a *group* (:mod:`jaxpeft.serving.groups`):
one mixing family (``Method.mix``: ``bitfit``, ``prompt``, ``prefix``, ``lora``, ``ia3``,
``bottleneck``) and one task kind, with the options the family needs to agree (``mix_same``: the
LoRA rank and targets, the number of virtual tokens, ...). The adapters of one group are mixed in
one call, each row routed to its adapter's slot; rows of different groups go to separate calls.
So a batch the server hands :meth:`JaxEngine.run` (one bucket length, any adapters) is split by
group there, one device call per group present.

**Fixed shapes.** Each group allocates ``max_adapters_per_family`` slots at once and compiles its
programs when it is made: the forward for every bucket length and batch size, and the slot writer.
Adding an adapter to a group writes its leaves into a free slot; removing one frees the slot;
neither compiles anything (:attr:`JaxEngine.traces` counts the traces). Heads are padded to
``max_labels`` outputs, so adapters of different label counts share a group. The first adapter of a
new group (at start, or a hot-added one of a family or options not yet served) makes the group,
and compiles its programs before it is answered.

**Rows.** :meth:`JaxEngine.prepare` tokenizes each input as its task does for ``jaxpeft-predict``
and picks the smallest bucket holding it; :meth:`JaxEngine.run` pads each group's rows to the
smallest compiled batch size (filler rows repeat a real one) and decodes each row's outputs with
its task's ``predictions`` (:mod:`jaxpeft.serving.inputs`). A call's batch sizes are the powers of
two up to ``max_batch`` unless ``batch_sizes`` says otherwise: a lone row is not computed 32 times.

Threads (see :mod:`jaxpeft.serving.engine`): ``add``, ``remove`` and ``run`` come one at a time from
the device thread; ``prepare`` and ``adapters`` read the adapter table from the prepare thread.
The table is a dict replaced, never mutated, so a reader always sees a whole one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import threading
from typing import Any, Sequence

import jax
import numpy as np

from jaxpeft import compute as compute_lib
from jaxpeft import masks
from jaxpeft.adapters import folder as folders
from jaxpeft.adapters.mixed import mixable_methods
from jaxpeft.adapters.peft_format import check_shapes
from jaxpeft.errors import UserError
from jaxpeft.models import hf_weights
from jaxpeft.models.fingerprint import describe, fingerprint, same_base
from jaxpeft.models.heads import Head
from jaxpeft.models.loading import build_module, param_shapes, pretrained_tensors
from jaxpeft.serving import inputs as io
from jaxpeft.serving.engine import InputError, Row, UnknownAdapter
from jaxpeft.serving.groups import Group, GroupKey, TraceCounter
from jaxpeft.tasks.base import Task

log = logging.getLogger("jaxpeft.serving")


class Base:
    """The frozen base model: config, tokenizer, fingerprint and its encoder weights on the device
    (one copy, shared by every group)."""

    def __init__(self, source: str, compute: compute_lib.Compute):
        self.source, self.compute = source, compute
        self.model_dir = hf_weights.resolve_model_dir(source)
        self.family, self.config = hf_weights.load_config(self.model_dir)
        self.tokenizer = hf_weights.load_tokenizer(self.model_dir)
        self.device = jax.devices()[0]
        shapes = param_shapes(build_module(self.family, self.config, Head(), None, compute))
        tensors = pretrained_tensors(shapes, hf_weights.load_state_dict(self.model_dir), str(self.model_dir),
                                     self.family.prefix)
        self.tensors = {p: jax.device_put(a, self.device) for p, a in tensors.items()}
        self._fingerprints: dict[str, dict[str, Any]] = {}
        self.fingerprint = self.fingerprint_for("sequence")

    def fingerprint_for(self, kind: str) -> dict[str, Any]:
        """The fingerprint an adapter of task ``kind`` records for this base (the encoder's leaves
        of that kind's model: a tagging or QA model has no pooler)."""
        if kind not in self._fingerprints:
            prefix = self.family.prefix
            head = Head(kind, 2)
            shapes = param_shapes(build_module(self.family, self.config, head, None, self.compute))
            encoder = {p: np.asarray(self.tensors[p]) if p in self.tensors else np.zeros(v.shape, v.dtype)
                       for p, v in masks.flatten(shapes).items() if p.startswith(prefix + "/")}
            self._fingerprints[kind] = fingerprint(encoder, self.source, str(self.model_dir), prefix=prefix)
        return self._fingerprints[kind]

    def device_tensors(self, shapes: Any, added: str | None) -> dict[str, jax.Array]:
        """The base's device arrays for the encoder leaves of ``shapes`` (a group's model), the
        method's own (``added``) left out."""
        out = {}
        for p, v in masks.flatten(shapes).items():
            if not p.startswith(self.family.prefix + "/") or (added and re.search(added, p)) or p not in self.tensors:
                continue
            if tuple(self.tensors[p].shape) != tuple(v.shape):
                raise UserError(f"{p}: the base has shape {self.tensors[p].shape}, the model {v.shape}")
            out[p] = self.tensors[p]
        return out


@dataclasses.dataclass
class Served:
    """One loaded adapter: its task, its group and slot, its row limit."""

    name: str
    directory: str
    method: str
    task: Task
    group: Group
    slot: int
    limit: int

    def info(self) -> dict[str, Any]:
        t = self.task
        labels = list(t.label_names) if t.label_names is not None else []
        return {"name": self.name, "method": self.method, "task": t.kind, "labels": labels,
                "family": self.group.key.mix, "task_name": t.name, "group": f"{self.group.key}#{self.group.gid}",
                "slot": self.slot, "max_tokens": self.limit, "path": self.directory}


def powers_of_two(top: int) -> tuple[int, ...]:
    """1, 2, 4, ... below ``top``, then ``top``.

    >>> powers_of_two(12)
    (1, 2, 4, 8, 12)
    """
    out, b = [], 1
    while b < top:
        out.append(b)
        b *= 2
    return tuple(out + [top])


class JaxEngine:
    """The :class:`~jaxpeft.serving.engine.Engine` over one base model (see the module docstring)."""

    def __init__(self, model: str | None = None, *, compute: str | compute_lib.Compute = "auto",
                 max_batch: int = 16, buckets: Sequence[int] = (16, 32, 64, 128), max_adapters_per_family: int = 16,
                 max_labels: int = 32, batch_sizes: Sequence[int] | None = None, seed: int = 0):
        self.compute = compute_lib.resolve(compute) if isinstance(compute, str) else compute
        self.max_batch, self.buckets = int(max_batch), tuple(sorted(set(int(b) for b in buckets)))
        self.max_adapters_per_family, self.max_labels = int(max_adapters_per_family), int(max_labels)
        self.batch_sizes = tuple(sorted(set(batch_sizes))) if batch_sizes else powers_of_two(self.max_batch)
        if self.max_batch < 1 or not self.buckets or self.buckets[0] < 8 or self.max_labels < 1:
            raise UserError("max_batch and max_labels must be >= 1 and every bucket >= 8")
        if self.max_adapters_per_family < 1:
            raise UserError(f"max_adapters_per_family={self.max_adapters_per_family}: must be >= 1")
        if self.batch_sizes[0] < 1 or self.batch_sizes[-1] != self.max_batch:
            raise UserError(f"batch sizes {list(self.batch_sizes)}: positive, the largest = max_batch ({self.max_batch})")
        self.seed = seed
        self.counter = TraceCounter()
        self.groups: list[Group] = []
        self._table: dict[str, Served] = {}
        self._lock = threading.Lock()
        self.base: Base | None = Base(model, self.compute) if model else None

    @property
    def traces(self) -> int:
        """How many times a program was traced (each is a compilation); constant once warm."""
        return self.counter.count

    # ------------------------------------------------------------------ adapters

    def adapters(self) -> list[dict[str, Any]]:
        return [s.info() for s in self._table.values()]

    def add(self, name: str, directory: str) -> dict[str, Any]:
        if name in self._table:
            raise InputError(f"adapter {name} is already loaded", status=409)
        try:
            folder = folders.read_adapter(directory)
            if not folder.task:
                raise UserError(f"{directory} records no task (a folder written by peft); save it in jaxpeft's "
                                "format first: jaxpeft.load(DIR, task=TASK).save(NEW_DIR)")
            task = folders.adapter_task(folder)
        except UserError as e:
            raise UserError(f"adapter {name}: {e}") from None
        method, kind = folder.method, folder.task_kind
        if task.kind != kind:
            raise UserError(f"adapter {name}: a {kind} adapter, but task {task.name} is a {task.kind} task")
        if method.mix is None:
            raise UserError(f"adapter {name} is a {method.name} adapter; served methods: {mixable_methods()}")
        pooling = folder.record.get("pooling") or "cls"
        if pooling == "cosine":
            raise UserError(f"adapter {name} reads the cosine of a pair's two sentences encoded apart; "
                            "the server computes one row per input")
        if kind != "span" and task.num_labels > self.max_labels:
            raise UserError(f"adapter {name} has {task.num_labels} labels; this server's heads have "
                            f"{self.max_labels} (--max_labels)")
        base = self._base_for(name, folder)
        recorded_family = folder.record.get("model_family")
        if recorded_family and recorded_family != base.family.name:
            raise UserError(f"adapter {name} was trained on a {recorded_family} model; this server holds "
                            f"{base.source}, a {base.family.name} model")
        if folder.kind == "peft":
            check_shapes(folder.config, base.config, base.source, f"adapter {name}")
        else:
            fp = folder.record["fingerprint"]
            mine = base.fingerprint_for(kind)
            if not isinstance(fp, dict) or not same_base(fp, mine):
                shown = describe(fp) if isinstance(fp, dict) else "an unrecorded base"
                raise UserError(f"adapter {name} was trained on base model {shown}; this server holds {describe(mine)}")
        modules = tuple(sorted(folder.modules_to_save))
        key = GroupKey(method.mix, kind, pooling, modules,
                       json.dumps(method.mix_values(base.family), sort_keys=True, default=str))
        group, slot, leaves = self._place(name, folder, method, task, key)
        group.write(slot, leaves)
        limit = min(int(folder.max_seq_length or 128), group.buckets[-1])
        served = Served(name, str(directory), method.name, task, group, slot, limit)
        with self._lock:
            group.slots[slot] = name
            self._table = {**self._table, name: served}
        log.info("adapter %s (%s, %s) in group %s#%d, slot %d", name, method.name, task.name, key, group.gid, slot)
        return served.info()

    def _base_for(self, name: str, folder: folders.AdapterFolder) -> Base:
        if self.base is None:
            source = folder.base_model
            if not source:
                raise UserError(f"adapter {name} does not name its base model: start the server with --model")
            self.base = Base(source, self.compute)
        return self.base

    def _place(self, name: str, folder: folders.AdapterFolder, method: Any, task: Task, key: GroupKey
               ) -> tuple[Group, int, dict[str, np.ndarray]]:
        """The group and slot for a new adapter and its slot's leaves; makes (and compiles) a new
        group where none of its key has the adapter's leaves."""
        where = f"adapter {name}"
        same = [g for g in self.groups if g.key == key]
        if same:
            own, arrays = self._own(same[0], folder, method, task, where)
            fits = [g for g in same if own <= set(g.paths)]
            for g in fits:
                slot = g.free_slot()
                if slot is not None:
                    return g, slot, g.leaves_for(arrays, where)
            if fits:
                raise InputError(f"the {key} adapters are at capacity ({self.max_adapters_per_family}, "
                                 "--max_adapters_per_family); remove one first", status=409)
        width = 2 if key.kind == "span" else self.max_labels
        group = Group(len(self.groups), key, method, self.base, capacity=self.max_adapters_per_family, width=width,
                      buckets=self.buckets, batch_sizes=self.batch_sizes, counter=self.counter, seed=self.seed)
        own, arrays = self._own(group, folder, method, task, where)
        group.allocate(own)
        leaves = group.leaves_for(arrays, where)
        log.info("new group %s#%d (%d stacked leaves): compiling %d programs", key, group.gid, len(group.paths),
                 len(group.buckets) * len(group.batch_sizes) + 1)
        group.warm_up()
        self.groups.append(group)
        return group, 0, leaves

    def _own(self, group: Group, folder: folders.AdapterFolder, method: Any, task: Task, where: str
             ) -> tuple[set[str], dict[str, np.ndarray]]:
        """The paths an adapter owns in ``group``'s model and its arrays by path, checked as
        :func:`jaxpeft.adapters.folder.load_adapter` checks them."""
        try:
            arrays = folders.adapter_arrays(folder, group.params, self.base.config)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        unknown = sorted(set(arrays) - set(group.shapes))
        if unknown:
            raise UserError(f"{where}: {len(unknown)} array(s) are not parameters of the served model, e.g. "
                            f"{unknown[:2]} (an adapter of another model family or task?)")
        outputs = 2 if task.kind == "span" else task.num_labels
        for h in group.heads:
            kernel = arrays.get(f"{h}/kernel")
            if kernel is not None and kernel.ndim == 2 and kernel.shape[1] != outputs:
                raise UserError(f"{where}: the {h} has {kernel.shape[1]} outputs, but task {task.name} has {outputs}")
        modules = folders._present(group.params, folder.modules_to_save)
        own = group.own_paths(method, modules)
        missing = sorted(own - set(arrays))
        if missing:
            raise UserError(f"{where} lacks {len(missing)} trained array(s) of method {method.name}, e.g. {missing[:2]}")
        return own | set(arrays), arrays

    def remove(self, name: str) -> None:
        with self._lock:
            served = self._table.get(name)
            if served is None:
                raise UnknownAdapter(f"no adapter named {name}")
            served.group.slots[served.slot] = None    # its leaves stay until the slot is written again
            self._table = {k: v for k, v in self._table.items() if k != name}
        log.info("adapter %s removed (group %s#%d, slot %d)", name, served.group.key, served.group.gid, served.slot)

    # ------------------------------------------------------------------ rows

    def prepare(self, adapter: str, inputs: list[Any]) -> list[Row]:
        served = self._table.get(adapter)
        if served is None:
            raise UnknownAdapter(f"no adapter named {adapter}")
        rows = []
        for i, x in enumerate(inputs):
            p = io.prepare(served.task, self.base.tokenizer, x, served.limit, f"inputs[{i}]", adapter)
            rows.append(Row(adapter, next(b for b in served.group.buckets if b >= p.length), p))
        return rows

    def run(self, rows: list[Row]) -> list[dict[str, Any]]:
        table = self._table
        if not rows or len(rows) > self.max_batch or len({r.length for r in rows}) != 1:
            raise ValueError(f"a call of {len(rows)} rows of lengths {sorted({r.length for r in rows})}")
        length = rows[0].length
        by_group: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            if r.adapter not in table:
                raise RuntimeError(f"a row of adapter {r.adapter}, which is not loaded")
            by_group.setdefault(table[r.adapter].group.gid, []).append(i)
        results: list[dict[str, Any] | None] = [None] * len(rows)
        for gid, idx in by_group.items():
            group = self.groups[gid]
            encs = [rows[i].data.enc for i in idx]
            out = group.forward(np.stack([e.input_ids[0, :length] for e in encs]),
                                np.stack([e.token_type_ids[0, :length] for e in encs]),
                                np.array([e.lengths[0] for e in encs], np.int32),
                                np.array([table[rows[i].adapter].slot for i in idx], np.int32))
            for i, o in zip(idx, out):
                results[i] = io.decode(table[rows[i].adapter].task, o, rows[i].data)
        return results   # type: ignore[return-value]


def factory(*, model: str | None = None, compute: str | None = None, max_batch: int | None = None,
            buckets: Sequence[int] | None = None, max_adapters_per_family: int | None = None,
            max_labels: int | None = None, batch_sizes: Sequence[int] | None = None,
            compilation_cache: str | None = None) -> JaxEngine:
    """The engine ``jaxpeft-serve`` builds by default (its flags of the same names); compiled
    programs go to the persistent compilation cache (``$JAXPEFT_COMPILATION_CACHE``), so a restart
    compiles little."""
    from jaxpeft import runtime

    runtime.enable_compilation_cache(compilation_cache)
    given = {"max_batch": max_batch, "buckets": buckets, "max_adapters_per_family": max_adapters_per_family,
             "max_labels": max_labels, "batch_sizes": batch_sizes}
    return JaxEngine(model, compute=compute or "auto", **{k: v for k, v in given.items() if v is not None})
