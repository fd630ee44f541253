"""What our Pallas (Triton) kernels share: compiler params across jax versions, the interpreter for
tests, powers of two for block shapes, and running a kernel per device's rows under a sharded jit."""

from __future__ import annotations

import contextlib

import jax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.experimental.pallas import triton as plgpu
from jax.sharding import NamedSharding, PartitionSpec as P

# renamed between jax versions
CompilerParams = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")


def pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# a process-wide switch: sharded kernels are partitioned from XLA's compiler threads
_interpreter_allowed = 0


@contextlib.contextmanager
def interpreter():
    """Lets the kernels run in Pallas's interpreter off GPU inside this block (tests check them
    against plain ``jax.numpy`` that way). Outside it, a kernel off GPU is an error: the
    interpreter is far too slow for real work."""
    global _interpreter_allowed
    _interpreter_allowed += 1
    try:
        yield
    finally:
        _interpreter_allowed -= 1


def interpret() -> bool:
    """Whether to run a kernel in the interpreter: off GPU, and only inside :func:`interpreter`."""
    if jax.default_backend() == "gpu":
        return False
    if not _interpreter_allowed:
        raise RuntimeError(f"our Pallas kernels compile for NVIDIA GPUs only, and this is "
                           f"{jax.default_backend()}: use attention_impl='dense'/'cudnn' and "
                           f"norm_impl='xla' (jaxpeft.compute refuses them there)")
    return True


def batch_parallel(call, batched: tuple[bool, ...], args):
    """``call(*args)`` with every program independent along the batch: under a sharded ``jit`` each
    device runs the kernel on its own rows (``custom_partitioning``), instead of XLA gathering the
    whole batch around a kernel it cannot split. Args with ``batched[i]`` False (a prefix shared by
    the batch) and every other dimension are replicated; all outputs are batch-major. With one
    device there is nothing to split: the kernel is called as it is (which also keeps the
    compiled step cacheable across processes)."""
    if jax.device_count() == 1:
        return call(*args)
    fn = custom_partitioning(call)

    def batch_axes(arg_shapes):
        for shape, is_batched in zip(arg_shapes, batched):
            sh = shape.sharding
            if is_batched and isinstance(sh, NamedSharding) and len(sh.spec):
                return sh.spec[0]
        return None

    def shardings(mesh, axes, ranks, batch_flags):
        return tuple(NamedSharding(mesh, P(axes if bf else None, *([None] * (r - 1))))
                     for r, bf in zip(ranks, batch_flags))

    def infer(mesh, arg_shapes, result_shape):
        ranks = [len(r.shape) for r in result_shape]
        return shardings(mesh, batch_axes(arg_shapes), ranks, [True] * len(ranks))

    def partition(mesh, arg_shapes, result_shape):
        axes = batch_axes(arg_shapes)
        ranks = [len(r.shape) for r in result_shape]
        arg_sh = shardings(mesh, axes, [len(a.shape) for a in arg_shapes], batched)
        return mesh, call, shardings(mesh, axes, ranks, [True] * len(ranks)), arg_sh

    names = iter(f"f{i}" for i in range(1000))
    others: list[str] = []

    def dims(rank, is_batched):
        ds = ["b" if (i == 0 and is_batched) else next(names) for i in range(rank)]
        others.extend(d for d in ds if d != "b")
        return " ".join(ds)

    out_shapes = jax.eval_shape(call, *args)
    out_ranks = [len(o.shape) for o in out_shapes]
    rule = (", ".join(dims(a.ndim, bf) for a, bf in zip(args, batched)) + " -> "
            + ", ".join(dims(r, True) for r in out_ranks))
    fn.def_partition(partition, infer_sharding_from_operands=infer, sharding_rule=rule,
                     need_replication_factors=tuple(others))
    return fn(*args)
