"""Trainable-parameter masks: pure pytree functions over key paths.

A *mask* is a pytree with the structure of a params tree and a ``bool`` at every leaf:
``True`` means "this leaf trains", ``False`` means "frozen". Every PEFT method in jaxpeft is
such a mask (plus, for prompt methods, a few added parameters). The functions here depend only
on ``jax`` and ``optax``: they work on Flax linen params, on an ``nnx.State`` and on plain nested
dicts alike, because they look at nothing but the ``/``-joined key path of each leaf, e.g.
``bert/encoder/layer_3/attention/self/query/bias``.

>>> import jax.numpy as jnp
>>> from jaxpeft import masks
>>> params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)},
...           "head": {"kernel": jnp.ones((2, 1)), "bias": jnp.zeros(1)}}
>>> m = masks.union(masks.bitfit(params), masks.match(params, include=r"^head/"))
>>> masks.count(params, m)
(5, 11)
>>> masks.trainable_paths(m)
['dense/bias', 'head/bias', 'head/kernel']
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import numpy as np
import optax

__all__ = [
    "BERT_BIAS_TERMS",
    "MaskError",
    "bitfit",
    "count",
    "describe",
    "flatten",
    "intersect",
    "invert",
    "match",
    "merge",
    "multi_transform",
    "path_str",
    "paths",
    "split",
    "trainable_paths",
    "unflatten",
    "union",
]

PyTree = Any
Patterns = str | Sequence[str] | None

_LAYER = r"layer[_/.]?\d+"
#: BitFit term names (Ben Zaken et al. 2022, table 1) -> regex over a BERT param path.
#: b_q, b_k, b_v: self-attention query/key/value; b_m1: attention output dense; b_LN1: its
#: LayerNorm; b_m2: intermediate (N -> 4N) dense; b_m3: output (4N -> N) dense; b_LN2: its LayerNorm.
BERT_BIAS_TERMS: dict[str, str] = {
    "query": rf"{_LAYER}/attention/self/query/bias$",
    "key": rf"{_LAYER}/attention/self/key/bias$",
    "value": rf"{_LAYER}/attention/self/value/bias$",
    "attention_output": rf"{_LAYER}/attention/output/dense/bias$",
    "attention_layernorm": rf"{_LAYER}/attention/output/LayerNorm/bias$",
    "intermediate": rf"{_LAYER}/intermediate/dense/bias$",
    "output": rf"{_LAYER}/output/dense/bias$",
    "output_layernorm": rf"{_LAYER}/output/LayerNorm/bias$",
}
#: The paper's short names, accepted as aliases of the term names above.
BITFIT_ALIASES: dict[str, str] = {
    "b_q": "query", "b_k": "key", "b_v": "value", "b_m1": "attention_output",
    "b_ln1": "attention_layernorm", "b_m2": "intermediate", "b_m3": "output",
    "b_ln2": "output_layernorm",
}


class MaskError(ValueError):
    """A mask request that cannot be satisfied (selects nothing, unknown term, bad shapes)."""


# ----------------------------------------------------------------------------- paths


def _key_name(k: Any) -> str | None:
    if isinstance(k, jax.tree_util.DictKey):
        return str(k.key)
    if isinstance(k, jax.tree_util.GetAttrKey):
        return k.name
    if isinstance(k, jax.tree_util.SequenceKey):
        return str(k.idx)
    if isinstance(k, jax.tree_util.FlattenedIndexKey):
        return str(k.key)
    return str(k)


def path_str(keypath: Sequence[Any]) -> str:
    """Turns a JAX key path into ``a/b/c``.

    A trailing ``.value`` (how an ``nnx.Variable`` exposes its array) is dropped, so an
    ``nnx.State`` and a linen params dict give the same paths.

    >>> import jax
    >>> path_str((jax.tree_util.DictKey("layer_0"), jax.tree_util.DictKey("bias")))
    'layer_0/bias'
    """
    names = [_key_name(k) for k in keypath]
    if len(names) > 1 and isinstance(keypath[-1], jax.tree_util.GetAttrKey) and names[-1] == "value":
        names = names[:-1]
    return "/".join(names)


def _is_hole(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


def _map_with_path(fn: Callable[[str, Any], Any], tree: PyTree) -> PyTree:
    return jax.tree_util.tree_map_with_path(lambda kp, x: fn(path_str(kp), x), tree, is_leaf=_is_hole)


def paths(tree: PyTree) -> list[str]:
    """All leaf paths of ``tree``, in flattening order.

    >>> paths({"b": {"bias": 0.0}, "a": 1.0})
    ['a', 'b/bias']
    """
    return [path_str(kp) for kp, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_hole)[0]
            if not _is_hole(x)]


def _as_patterns(p: Patterns) -> list[str]:
    if p is None:
        return []
    if isinstance(p, str):
        return [p]
    return list(p)


def _compile(patterns: Iterable[str]) -> list[re.Pattern]:
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise MaskError(f"invalid regular expression {p!r}: {e}") from None
    return out


# ----------------------------------------------------------------------------- builders


def match(params: PyTree, include: Patterns = None, exclude: Patterns = None, *,
          allow_empty: bool = False) -> PyTree:
    """Marks the leaves whose path matches a regex in ``include`` and none in ``exclude``.

    Patterns are searched (``re.search``) in the ``/``-joined path. ``include=None`` means every
    leaf. Raises :class:`MaskError` when the result selects nothing, unless ``allow_empty``.

    >>> params = {"enc": {"kernel": 1.0, "bias": 2.0}, "head": {"kernel": 3.0}}
    >>> match(params, include=r"kernel$", exclude=r"^head/")
    {'enc': {'bias': False, 'kernel': True}, 'head': {'kernel': False}}
    """
    inc = _compile(_as_patterns(include))
    exc = _compile(_as_patterns(exclude))

    def fn(path: str, _: Any) -> bool:
        ok = (not inc) or any(r.search(path) for r in inc)
        return bool(ok and not any(r.search(path) for r in exc))

    mask = _map_with_path(fn, params)
    if not allow_empty and not any(jax.tree_util.tree_leaves(mask)):
        raise MaskError(f"mask selects no parameter (include={include!r}, exclude={exclude!r}); "
                        f"paths look like {paths(params)[:3]}")
    return mask


def _canonical_term(term: str, table: Mapping[str, str] | None = None) -> str:
    table = BERT_BIAS_TERMS if table is None else table
    t = term.strip()
    t = BITFIT_ALIASES.get(t.lower(), t)
    if t not in table:
        raise MaskError(f"unknown BitFit term {term!r}; known terms: {', '.join(table)} "
                        f"(or {', '.join(a for a, n in BITFIT_ALIASES.items() if n in table)})")
    return t


def bitfit(params: PyTree, terms: str | Sequence[str] | None = None,
           table: Mapping[str, str] | None = None) -> PyTree:
    """BitFit mask: bias terms train, everything else is frozen.

    ``terms=None`` selects every leaf named ``bias`` (works on any model). Otherwise ``terms`` is a
    list (or comma-separated string) of BERT bias terms from :data:`BERT_BIAS_TERMS` -- ``query,
    key, value, attention_output, attention_layernorm, intermediate, output, output_layernorm`` --
    or the paper's names (``b_q`` ... ``b_ln2``); ``table`` gives another architecture's terms
    (term -> regex). A term that matches no leaf raises :class:`MaskError`, as does a model with no
    bias at all.

    >>> import numpy as np
    >>> layer = {"attention": {"self": {"query": {"kernel": np.ones((2, 2)), "bias": np.zeros(2)},
    ...                                 "key": {"kernel": np.ones((2, 2)), "bias": np.zeros(2)}}},
    ...          "intermediate": {"dense": {"kernel": np.ones((2, 8)), "bias": np.zeros(8)}}}
    >>> params = {"encoder": {"layer_0": layer}}
    >>> trainable_paths(bitfit(params, "query,intermediate"))
    ['encoder/layer_0/attention/self/query/bias', 'encoder/layer_0/intermediate/dense/bias']
    >>> count(params, bitfit(params))
    (12, 36)
    """
    if terms is None:
        mask = _map_with_path(lambda p, _: p.rsplit("/", 1)[-1] == "bias", params)
        if not any(jax.tree_util.tree_leaves(mask)):
            raise MaskError("BitFit: the params tree has no leaf named 'bias'")
        return mask
    if isinstance(terms, str):
        terms = [t for t in terms.split(",") if t.strip()]
    if not terms:
        raise MaskError("BitFit: empty list of bias terms")
    table = BERT_BIAS_TERMS if table is None else table
    names = [_canonical_term(t, table) for t in terms]
    all_paths = paths(params)
    for name in names:
        rx = re.compile(table[name])
        if not any(rx.search(p) for p in all_paths):
            raise MaskError(f"BitFit term {name!r} matches no parameter of this model "
                            f"(pattern {table[name]!r}; paths look like {all_paths[:2]})")
    return match(params, include=[table[n] for n in names])


# ----------------------------------------------------------------------------- algebra


def union(*masks: PyTree) -> PyTree:
    """Leaf-wise OR of masks of the same structure."""
    if not masks:
        raise MaskError("union() of no masks")
    return jax.tree_util.tree_map(lambda *xs: bool(any(xs)), *masks)


def intersect(*masks: PyTree) -> PyTree:
    """Leaf-wise AND of masks of the same structure."""
    if not masks:
        raise MaskError("intersect() of no masks")
    return jax.tree_util.tree_map(lambda *xs: bool(all(xs)), *masks)


def invert(mask: PyTree) -> PyTree:
    """Leaf-wise NOT."""
    return jax.tree_util.tree_map(lambda x: not x, mask)


def _size(x: Any) -> int:
    return int(np.prod(np.shape(x), dtype=np.int64)) if hasattr(x, "shape") else 1


def count(params: PyTree, mask: PyTree) -> tuple[int, int]:
    """``(trainable, total)`` number of scalars. Works on arrays or ``jax.ShapeDtypeStruct``s."""
    sizes = jax.tree_util.tree_leaves(jax.tree_util.tree_map(_size, params))
    flags = jax.tree_util.tree_leaves(mask)
    if len(sizes) != len(flags):
        raise MaskError(f"mask has {len(flags)} leaves but params have {len(sizes)}")
    return sum(s for s, f in zip(sizes, flags) if f), sum(sizes)


def describe(params: PyTree, mask: PyTree) -> str:
    """One line in the format users know from ``peft``'s ``print_trainable_parameters()``.

    >>> describe({"w": np.ones((10, 10)), "b": np.ones(10)}, {"w": False, "b": True})
    'trainable params: 10 || all params: 110 || trainable%: 9.0909'
    """
    t, n = count(params, mask)
    return f"trainable params: {t:,} || all params: {n:,} || trainable%: {100.0 * t / max(n, 1):.4f}"


def trainable_paths(mask: PyTree) -> list[str]:
    """Paths of the leaves marked ``True``."""
    return [p for p, v in flatten(mask).items() if v]


# ----------------------------------------------------------------------------- split / merge


def split(params: PyTree, mask: PyTree) -> tuple[PyTree, PyTree]:
    """Splits ``params`` into ``(trainable, frozen)`` trees of the same structure.

    Leaves that belong to the other part are replaced by ``optax.MaskedNode()`` -- an empty pytree
    node, so ``jax.grad`` w.r.t. ``trainable`` computes gradients of the trainable leaves only and an
    optimizer initialised on it holds no state for frozen ones.

    >>> p = {"w": np.ones(2), "b": np.zeros(2)}
    >>> t, f = split(p, {"w": False, "b": True})
    >>> sorted(flatten(t)), sorted(flatten(f))
    (['b'], ['w'])
    >>> jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, merge(t, f), p))
    True
    """
    t = jax.tree_util.tree_map(lambda x, m: x if m else optax.MaskedNode(), params, mask)
    f = jax.tree_util.tree_map(lambda x, m: optax.MaskedNode() if m else x, params, mask)
    return t, f


def merge(trainable: PyTree, frozen: PyTree) -> PyTree:
    """Inverse of :func:`split`: fills the holes of one tree with the leaves of the other."""

    def pick(a: Any, b: Any) -> Any:
        if _is_hole(a):
            return b
        if not _is_hole(b):
            raise MaskError("merge(): a leaf is present in both the trainable and the frozen tree")
        return a

    return jax.tree_util.tree_map(pick, trainable, frozen, is_leaf=_is_hole)


def flatten(tree: PyTree) -> dict[str, Any]:
    """``{path: leaf}`` for every leaf, skipping the holes left by :func:`split`."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_hole)[0]
    return {path_str(kp): x for kp, x in leaves if not _is_hole(x)}


def unflatten(flat: Mapping[str, Any], like: PyTree) -> PyTree:
    """Builds a tree shaped like ``like`` from a ``{path: leaf}`` dict; missing paths become holes.

    >>> unflatten({"a/b": 1}, {"a": {"b": 0, "c": 0}})
    {'a': {'b': 1, 'c': MaskedNode()}}
    """
    used = set()

    def fn(path: str, _: Any) -> Any:
        if path in flat:
            used.add(path)
            return flat[path]
        return optax.MaskedNode()

    out = _map_with_path(fn, like)
    extra = sorted(set(flat) - used)
    if extra:
        raise MaskError(f"unflatten(): {len(extra)} path(s) not in the target tree, e.g. {extra[:3]}")
    return out


# ----------------------------------------------------------------------------- optax


def multi_transform(inner: optax.GradientTransformation, mask: PyTree) -> optax.GradientTransformation:
    """``optax.multi_transform`` that applies ``inner`` to trainable leaves, zeroes the rest.

    Frozen leaves get ``optax.set_to_zero()`` and carry no optimizer state: ``inner`` only ever sees
    the trainable leaves.

    >>> import jax.numpy as jnp, optax
    >>> p = {"w": jnp.ones(3), "b": jnp.zeros(3)}
    >>> tx = multi_transform(optax.sgd(0.1), {"w": False, "b": True})
    >>> g = {"w": jnp.ones(3), "b": jnp.ones(3)}
    >>> u, _ = tx.update(g, tx.init(p), p)
    >>> [float(x) for x in u["w"]], [round(float(x), 3) for x in u["b"]]
    ([0.0, 0.0, 0.0], [-0.1, -0.1, -0.1])
    """
    if not any(jax.tree_util.tree_leaves(mask)):
        raise MaskError("multi_transform(): the mask selects no parameter")
    labels = jax.tree_util.tree_map(lambda m: "trainable" if m else "frozen", mask)
    return optax.multi_transform({"trainable": inner, "frozen": optax.set_to_zero()}, labels)
