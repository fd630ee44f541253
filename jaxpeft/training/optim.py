"""The optimizer: AdamW after global-norm clipping, and its learning-rate schedule.

The schedule is computed inside the compiled step from the step counter and three numbers passed
as an argument (:class:`Schedule`), so runs that differ only in learning rate or length share one
compiled step (and the persistent compilation cache), and many steps run per device call without
the host.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxpeft import masks

_NO_DECAY = re.compile(r"(bias|scale|embeddings?|prefix_keys|prefix_values)$|(?i:norm)")


class Schedule(NamedTuple):
    """Linear warm-up to ``peak`` over ``warmup`` updates, then linear decay to 0 at ``total``."""

    peak: float
    warmup: int
    total: int

    @classmethod
    def create(cls, peak: float, total_steps: int, warmup_ratio: float) -> "Schedule":
        return cls(float(peak), int(round(warmup_ratio * total_steps)), int(total_steps))

    def __call__(self, step: int) -> float:
        """The learning rate of update number ``step`` (0-based), on the host.

        >>> s = Schedule.create(1.0, total_steps=10, warmup_ratio=0.2)
        >>> [round(s(i), 3) for i in (0, 1, 2, 6, 10)]
        [0.0, 0.5, 1.0, 0.5, 0.0]
        """
        if step < self.warmup:
            return self.peak * step / self.warmup
        return self.peak * max(0.0, (self.total - step) / max(self.total - self.warmup, 1))

    def as_array(self) -> np.ndarray:
        """``[peak, warmup, total]`` as float32: the step's argument."""
        return np.asarray([self.peak, self.warmup, self.total], np.float32)


def lr_at(step: jax.Array, schedule: jax.Array) -> jax.Array:
    """:class:`Schedule`'s rate on the device: ``schedule`` is :meth:`Schedule.as_array`."""
    peak, warmup, total = schedule[0], schedule[1], schedule[2]
    s = step.astype(jnp.float32)
    up = peak * s / jnp.maximum(warmup, 1.0)
    down = peak * jnp.maximum(0.0, (total - s) / jnp.maximum(total - warmup, 1.0))
    return jnp.where(s < warmup, up, down)


def decay_mask(tree: Any) -> Any:
    """Weight decay on kernels only (not biases, LayerNorm, embeddings), as BERT recipes do."""
    return jax.tree_util.tree_map_with_path(
        lambda kp, _: not _NO_DECAY.search(masks.path_str(kp)), tree)


# leaves of at most this many elements go into one concatenated reduction in ``grad_norm``
_NORM_GROUP_SIZE = 1 << 16


def grad_norm(tree: Any) -> jax.Array:
    """The global L2 norm of ``tree``, as ``optax.tree.norm`` (float32 sums), with all small leaves
    (biases, LayerNorm params, prompts, the head) squared and summed as one concatenated vector.

    One reduction per leaf is one kernel per leaf: over a hundred tiny kernels per step for BERT's
    biases and LayerNorms, each costing more in launch than in work. The sum's order differs from
    ``optax.tree.norm``'s, so the two agree to float32 rounding, not bitwise.
    """
    leaves = jax.tree_util.tree_leaves(tree)
    small = [x.reshape(-1).astype(jnp.float32) for x in leaves if x.size <= _NORM_GROUP_SIZE]
    sums = [jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves if x.size > _NORM_GROUP_SIZE]
    if small:
        sums.append(jnp.sum(jnp.square(jnp.concatenate(small))))
    return jnp.sqrt(sum(sums)) if sums else jnp.zeros((), jnp.float32)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """``optax.clip_by_global_norm`` (same state, same formula) with :func:`grad_norm`."""

    def update(updates, state, params=None):
        del params
        norm = grad_norm(updates)
        keep = norm < max_norm
        return jax.tree_util.tree_map(
            lambda t: jax.lax.select(keep, t, (t / norm.astype(t.dtype)) * max_norm), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(optim: Any, head_patterns: Sequence[str] = ()) -> optax.GradientTransformation:
    """AdamW after global-norm clipping, *without* the learning rate (``optim``: a
    :class:`jaxpeft.config.Optim`).

    The chain ends with ``scale(-1)``: the train step multiplies its updates by the step's
    learning rate, which makes this + :class:`Schedule` exactly ``optax.adamw(schedule, ...)``.
    Leaves matching ``head_patterns`` (the task head, ``modules_to_save``) get their updates scaled
    by ``head_learning_rate / learning_rate`` when ``head_learning_rate`` is set.
    """
    return optax.chain(
        clip_by_global_norm(optim.max_grad_norm) if optim.max_grad_norm > 0 else optax.identity(),
        optax.scale_by_adam(b1=optim.adam_b1, b2=optim.adam_b2, eps=optim.adam_eps),
        optax.add_decayed_weights(optim.weight_decay, mask=decay_mask) if optim.weight_decay
        else optax.identity(),
        optax.scale(-1.0),
        _head_rate_scale(optim, head_patterns))


def _head_rate_scale(optim: Any, head_patterns: Sequence[str]) -> optax.GradientTransformation:
    """Scales the head's updates by ``head_learning_rate / learning_rate`` (same schedule, other
    peak), so reparameterised prompt methods can train their encoder slowly and the head at a
    usual rate. Identity when ``head_learning_rate`` is unset."""
    head_lr = optim.head_learning_rate
    if head_lr is None or head_lr == optim.learning_rate or not head_patterns:
        return optax.identity()
    head = re.compile("|".join(f"(?:{p})" for p in head_patterns))
    return optax.masked(optax.scale(head_lr / optim.learning_rate),
                        lambda tree: jax.tree_util.tree_map_with_path(
                            lambda kp, _: bool(head.search(masks.path_str(kp))), tree))
