"""The device mesh, where every array lives on it, and the sharded jit of the steps.

One :class:`jax.sharding.Mesh` with two named axes, ``data`` and ``fsdp`` (``--mesh=data:4,fsdp:2``;
default: every device on ``data``). Both axes are data-parallel: a batch is split over
``("data", "fsdp")``, so every device sees ``batch_size / device_count`` rows. ``fsdp`` additionally
splits the weights (fully sharded data parallel): a leaf placed by the :data:`FSDP` rule is cut along
its largest axis that the ``fsdp`` size divides, and XLA gathers it where a matmul needs it. A batch
therefore costs the same on ``data:8`` and ``data:4,fsdp:2``; the second holds half the weights per
device and pays for the gathers.

Placement comes from a small rule table (:data:`DEFAULT_RULES`): ``(regex, placement)`` pairs, the
first regex found in a leaf's ``/``-joined path wins. A placement is :data:`REPLICATED`,
:data:`FSDP` (only for leaves with at least ``fsdp_min_size`` elements; smaller ones are replicated),
or an explicit :class:`~jax.sharding.PartitionSpec`. The same table serves frozen params, trainable
params and optimizer state: an optimizer moment has its param's path as a suffix and its shape, so it
lands where its param does. With the default threshold the trainable leaves of BitFit and the prompt
methods (biases, head, prompts) are replicated and only big frozen matrices shard; under full
fine-tuning the trainable matrices and their Adam moments shard too (ZeRO-3 style).

Placement never builds a full copy on one device: random or adapter params come out of a jitted
init with ``out_shardings``; pretrained tensors read on the host go to each device as that device's
slice (:func:`jax.make_array_from_callback`).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import re
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxpeft import masks
from jaxpeft.errors import UserError

AXES = ("data", "fsdp")
#: The batch dimension is split over both axes (both are data-parallel).
BATCH_AXES = ("data", "fsdp")

REPLICATED = "replicated"
FSDP = "fsdp"
#: ``(regex searched in the leaf path, placement)``; the first match wins. Regexes are searched, not
#: anchored, so they also match optimizer-state paths (``opt_state/1/0/mu/bert/...``).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    (r"(?i)norm[^/]*/(scale|bias)$", REPLICATED),   # read whole by every token; tiny
    (r".*", FSDP),                              # everything else: by size
)
#: Leaves smaller than this stay replicated under the FSDP rule (a BERT-base bias has 768-3072
#: elements, a 768x768 kernel 589,824).
DEFAULT_FSDP_MIN_SIZE = 2 ** 16


# ----------------------------------------------------------------------------- the mesh


def parse_mesh(spec: str | None, device_count: int) -> dict[str, int]:
    """``"data:4,fsdp:2"`` -> ``{"data": 4, "fsdp": 2}``; absent axes have size 1, one size may
    be ``-1`` (the devices left over); empty or ``None``: every device on ``data``.

    >>> parse_mesh("data:4,fsdp:2", 8)
    {'data': 4, 'fsdp': 2}
    >>> parse_mesh(None, 8), parse_mesh("fsdp:2,data:-1", 8)
    ({'data': 8, 'fsdp': 1}, {'data': 4, 'fsdp': 2})
    """
    shape = {a: 1 for a in AXES}
    if not spec or not spec.strip():
        shape["data"] = device_count
        return shape
    seen, rest = set(), None
    for part in spec.split(","):
        m = re.fullmatch(r"\s*([A-Za-z_]\w*)\s*:\s*(-?\d+)\s*", part)
        if not m:
            raise UserError(f"--mesh={spec!r}: expected AXIS:SIZE pairs like data:4,fsdp:2")
        axis, size = m.group(1), int(m.group(2))
        if axis not in AXES:
            raise UserError(f"--mesh={spec!r}: unknown axis {axis!r}; the axes are {', '.join(AXES)}")
        if axis in seen:
            raise UserError(f"--mesh={spec!r}: axis {axis!r} given twice")
        seen.add(axis)
        if size == -1:
            if rest is not None:
                raise UserError(f"--mesh={spec!r}: only one axis may have size -1")
            rest = axis
        elif size < 1:
            raise UserError(f"--mesh={spec!r}: axis sizes must be positive (or -1 for the rest)")
        else:
            shape[axis] = size
    fixed = math.prod(shape.values())
    if rest is not None:
        if device_count % fixed:
            raise UserError(f"--mesh={spec!r}: {device_count} devices cannot be split into "
                            f"{fixed}-device groups")
        shape[rest] = device_count // fixed
    if math.prod(shape.values()) != device_count:
        raise UserError(f"--mesh={spec!r} needs {math.prod(shape.values())} devices; this run has "
                        f"{device_count} (jax.device_count(), all processes)")
    return shape


def make_mesh(shape: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes :data:`AXES` (``jax.make_mesh`` picks a topology-aware device order)."""
    return jax.make_mesh(tuple(shape[a] for a in AXES), AXES,
                         axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


# ----------------------------------------------------------------------------- rules


def largest_divisible_axis(shape: Sequence[int], n: int) -> int | None:
    """The largest axis of ``shape`` that ``n`` divides (the first on ties), or ``None``.

    >>> largest_divisible_axis((30522, 384), 4), largest_divisible_axis((30522, 384), 2)
    (1, 0)
    """
    best = None
    for i, d in enumerate(shape):
        if d % n == 0 and (best is None or d > shape[best]):
            best = i
    return best


def partition_spec(path: str, shape: Sequence[int], rules: Sequence[tuple[str, Any]], fsdp_size: int,
                   fsdp_min_size: int) -> P:
    """The :class:`PartitionSpec` of the leaf at ``path`` with ``shape`` under ``rules``."""
    for pattern, placement in rules:
        if re.search(pattern, path):
            break
    else:
        raise ValueError(f"no sharding rule matches {path!r}")
    if isinstance(placement, P):
        return placement
    if placement == REPLICATED:
        return P()
    if placement != FSDP:
        raise ValueError(f"unknown placement {placement!r} for {pattern!r}")
    if fsdp_size == 1 or math.prod(shape) < max(fsdp_min_size, 1):
        return P()
    axis = largest_divisible_axis(shape, fsdp_size)
    if axis is None:
        return P()
    return P(*([None] * axis + ["fsdp"]))


@dataclasses.dataclass
class MeshPlan:
    """A mesh plus the rules that place params, optimizer state and batches on it."""

    mesh: Mesh
    rules: Sequence[tuple[str, Any]] = DEFAULT_RULES
    fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE
    #: How often each jitted function was traced (one trace = one compilation).
    traces: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def __post_init__(self):
        self._rows: dict[int, np.ndarray | None] = {}

    # -- sizes and simple shardings ------------------------------------------------------------
    @property
    def shape(self) -> dict[str, int]:
        return dict(self.mesh.shape)

    @property
    def data_parallel_size(self) -> int:
        return math.prod(self.mesh.shape[a] for a in BATCH_AXES)

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @property
    def batch_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, P(BATCH_AXES))

    @property
    def stacked_batch_sharding(self) -> NamedSharding:
        """Batches of several steps stacked on a leading step axis: the batch axis is the second."""
        return NamedSharding(self.mesh, P(None, BATCH_AXES))

    def describe(self) -> str:
        return ",".join(f"{a}:{n}" for a, n in self.shape.items())

    def check_batch_size(self, n: int, flag: str = "batch_size") -> None:
        dp = self.data_parallel_size
        if n % dp:
            raise UserError(f"--{flag}={n} is not divisible by the {dp} data-parallel devices of mesh "
                            f"{self.describe()}; use a multiple of {dp}")

    # -- params and state ----------------------------------------------------------------------
    def tree_shardings(self, tree: Any) -> Any:
        """A ``NamedSharding`` for every leaf of ``tree`` (arrays or shape structs), by rule;
        ``optax.MaskedNode`` holes are kept."""
        fsdp = self.mesh.shape["fsdp"]

        def one(kp, x):
            spec = partition_spec(masks.path_str(kp), x.shape, self.rules, fsdp, self.fsdp_min_size)
            return NamedSharding(self.mesh, spec)

        return jax.tree_util.tree_map_with_path(one, tree)

    def state_shardings(self, state: Any) -> Any:
        """Shardings of a train state: ``trainable`` and ``opt_state`` by rule, every other field
        (step, RNG, bookkeeping) replicated."""
        replicated = jax.tree_util.tree_map(lambda _: self.replicated, state)
        return replicated.replace(trainable=self.tree_shardings(state.trainable),
                                  opt_state=self.tree_shardings(state.opt_state))

    def put(self, tree: Any, shardings: Any = None) -> Any:
        """``tree`` placed by rule (or on ``shardings``). Host arrays go to each device as that
        device's slice; device arrays are resharded on the devices, or left as they are."""
        shardings = self.tree_shardings(tree) if shardings is None else shardings

        def one(x, s):
            if isinstance(x, jax.Array):
                if x.sharding.is_equivalent_to(s, x.ndim):
                    return x
                if x.is_fully_addressable == s.is_fully_addressable:
                    return jax.device_put(x, s)
            host = np.asarray(x)
            return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])

        return jax.tree_util.tree_map(one, tree, shardings)

    def init(self, fn: Callable[..., Any], *args: Any, shardings: Callable[[Any], Any]) -> tuple[Any, Any]:
        """Runs ``fn(*args)`` jitted with its outputs created directly on their shardings
        (``shardings(abstract_output)``); returns ``(output, output_shardings)``."""
        out_sh = shardings(jax.eval_shape(fn, *args))
        return jax.jit(fn, out_shardings=out_sh)(*args), out_sh

    # -- batches ---------------------------------------------------------------------------------
    def process_rows(self, batch_size: int) -> np.ndarray | None:
        """Positions in a global batch of ``batch_size`` rows that this process's devices hold, in
        the order :func:`jax.make_array_from_process_local_data` expects (``None``: all rows, one
        process). The processes' rows are disjoint and together cover the batch."""
        if jax.process_count() == 1:
            return None
        if batch_size not in self._rows:
            index = self.batch_sharding.addressable_devices_indices_map((batch_size,))
            spans = sorted({(s[0].start or 0, batch_size if s[0].stop is None else s[0].stop)
                            for s in index.values()})
            self._rows[batch_size] = np.concatenate([np.arange(a, b) for a, b in spans])
        return self._rows[batch_size]

    def global_batch(self, local: dict[str, np.ndarray], stacked: bool = False) -> dict[str, jax.Array]:
        """This process's rows (see :meth:`process_rows`) -> global arrays split over the batch axes
        (``stacked``: arrays ``[steps, rows, ...]``, split along the rows)."""
        sharding = self.stacked_batch_sharding if stacked else self.batch_sharding
        if jax.process_count() == 1:
            return jax.device_put(local, sharding)
        return jax.make_array_from_process_local_data(sharding, local)

    # -- jit ---------------------------------------------------------------------------------------
    def traced(self, fn: Callable, name: str, limit: int | None = None) -> Callable:
        """``fn`` counting its traces in :attr:`traces`; more than ``limit`` raises (recompile guard)."""

        count = 0

        @functools.wraps(fn)
        def counted(*args, **kwargs):
            nonlocal count
            count += 1
            self.traces[name] += 1
            if limit is not None and count > limit:
                raise RuntimeError(
                    f"{name} compiled {count} times, more than its {limit} input shapes: an input's "
                    f"shape, dtype or sharding changes between calls")
            return fn(*args, **kwargs)

        return counted

    def jit_train_step(self, step: Callable, state_sharding: Any, frozen_sharding: Any,
                       max_traces: int | None = None, compiler_options: dict | None = None) -> Callable:
        """``step(state, frozen, batch, lr) -> (state, metrics)`` jitted on the mesh: state donated
        and kept on its shardings, the batch split over the batch axes, lr and metrics replicated."""
        return jax.jit(self.traced(step, "train_step", max_traces),
                       in_shardings=(state_sharding, frozen_sharding, self.batch_sharding, self.replicated),
                       out_shardings=(state_sharding, self.replicated), donate_argnums=(0,),
                       compiler_options=compiler_options)

    def jit_train_loop(self, loop: Callable, state_sharding: Any, frozen_sharding: Any,
                       max_traces: int | None = None, compiler_options: dict | None = None) -> Callable:
        """``loop(state, frozen, batches, active, schedule) -> (state, metrics)`` (``steps.
        make_train_loop``) jitted on the mesh: state donated, the stacked batches split along their
        rows, the rest replicated."""
        return jax.jit(self.traced(loop, "train_loop", max_traces),
                       in_shardings=(state_sharding, frozen_sharding, self.stacked_batch_sharding,
                                     self.replicated, self.replicated),
                       out_shardings=(state_sharding, self.replicated), donate_argnums=(0,),
                       compiler_options=compiler_options)

    def jit_predict(self, predict: Callable, trainable_sharding: Any, frozen_sharding: Any,
                    max_traces: int | None = None, compiler_options: dict | None = None) -> Callable:
        """``predict(trainable, frozen, batch) -> logits`` jitted on the mesh; the logits come back
        replicated, so every process can read all of them."""
        return jax.jit(self.traced(predict, "predict", max_traces),
                       in_shardings=(trainable_sharding, frozen_sharding, self.batch_sharding),
                       out_shardings=self.replicated, compiler_options=compiler_options)


def create_plan(mesh: str | None = None, fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE,
                rules: Sequence[tuple[str, Any]] = DEFAULT_RULES,
                devices: Sequence[jax.Device] | None = None) -> MeshPlan:
    """The plan for ``--mesh`` over ``devices`` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    if fsdp_min_size < 0:
        raise UserError(f"--fsdp_min_size={fsdp_min_size} must be >= 0")
    return MeshPlan(make_mesh(parse_mesh(mesh, len(devices)), devices), rules, fsdp_min_size)
