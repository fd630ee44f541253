"""The pure step functions: loss, train step, many train steps per call, predict step, and
prediction over a dataset. The trainer, the adapters and the benchmarks all use these.

The train step differentiates only the trainable part of the params: ``masks.split`` turns the
params into a trainable tree and a frozen tree (holes are ``optax.MaskedNode``), ``jax.grad`` is
taken w.r.t. the trainable tree, and the optimizer is initialised on it -- so frozen weights get
neither weight gradients nor optimizer state. This is ``masks.multi_transform(tx, mask)`` on the
full tree, minus the zero updates of frozen leaves (``tests/test_train_step.py`` checks the two
agree).

A batch is a dict of arrays. Unpacked: ``input_ids``, ``attention_mask``, ``token_type_ids``
``[B, T]``, ``labels`` and ``weights`` ``[B]`` (weight 0: a row that only fills the batch).
Packed (``jaxpeft.data.pack``): ``input_ids``, ``token_type_ids``, ``position_ids``,
``segment_ids`` ``[R, L]``, ``read_positions``, ``labels``, ``weights`` ``[R, K]``. The model's
logits are then ``[B, C]`` or ``[R, K, C]``; the loss is the weighted mean over examples either way.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxpeft import masks
from jaxpeft.training.optim import grad_norm, lr_at

#: batch keys that are model inputs (the rest: labels, weights and host-side bookkeeping)
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "segment_ids",
                "read_positions")


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    trainable: Any
    opt_state: Any
    rng: jax.Array


def init_state(trainable: Any, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """A fresh state; ``trainable`` is copied, so donating the state leaves the caller's arrays alive."""
    trainable = jax.tree_util.tree_map(jnp.copy, trainable)
    return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, opt_state=tx.init(trainable),
                      rng=jax.random.key_data(jax.random.key(seed)))


def loss_from_logits(logits: jax.Array, labels: jax.Array, weights: jax.Array,
                     regression: bool) -> jax.Array:
    """Weighted mean loss over the examples: cross-entropy, or MSE for regression. ``logits``
    ``[..., C]``, ``labels`` and ``weights`` ``[...]``."""
    if regression:
        per = (logits[..., 0] - labels.astype(jnp.float32)) ** 2
    else:
        per = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.sum(per * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def apply_model(module: Any, params: Any, batch: dict, deterministic: bool, rng: jax.Array | None = None):
    """The classifier's logits for ``batch`` (whichever model inputs it holds)."""
    rngs = None if rng is None else {"dropout": rng}
    kw = {k: batch[k] for k in MODEL_INPUTS[3:] if k in batch}
    return module.apply({"params": params}, batch["input_ids"], batch.get("attention_mask"),
                        batch.get("token_type_ids"), deterministic=deterministic, rngs=rngs, **kw)


def make_loss(module: Any, regression: bool) -> Callable:
    """``loss(trainable, frozen, batch, rng) -> scalar`` with dropout (training)."""

    def loss_fn(trainable, frozen, batch, rng):
        logits = apply_model(module, masks.merge(trainable, frozen), batch, False, rng)
        return loss_from_logits(logits, batch["labels"], batch["weights"], regression)

    return loss_fn


def make_train_step(module: Any, tx: optax.GradientTransformation, regression: bool) -> Callable:
    """``step(state, frozen, batch, lr) -> (state, metrics)``; pure, to be jitted by the caller.

    ``lr`` is this update's learning rate (a scalar): ``tx`` has none (``optim.make_optimizer``).
    The dropout RNG of step ``s`` is ``fold_in(state.rng, s)``.
    """
    loss_fn = make_loss(module, regression)

    def step(state: TrainState, frozen: Any, batch: dict, lr: jax.Array) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(state.rng, state.step)
        loss, grads = jax.value_and_grad(loss_fn)(state.trainable, frozen, batch, rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        updates = jax.tree_util.tree_map(lambda u: (lr * u).astype(u.dtype), updates)
        trainable = optax.apply_updates(state.trainable, updates)
        new = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state)
        return new, {"loss": loss, "grad_norm": grad_norm(grads), "lr": jnp.asarray(lr, jnp.float32)}

    return step


def make_train_loop(module: Any, tx: optax.GradientTransformation, regression: bool) -> Callable:
    """``loop(state, frozen, batches, active, schedule) -> (state, metrics)``: up to N train steps
    in one call (a ``lax.scan``; pure, to be jitted by the caller).

    ``batches``: a batch whose arrays have a leading step axis ``[N, ...]``. ``active`` ``[N]``
    bool: steps whose flag is off leave the state as it is (so a call can stop at an evaluation or
    a checkpoint with one compiled N; such a step is computed and dropped). ``schedule``: ``optim.Schedule.as_array()``; each step's
    learning rate comes from the state's step counter on the device. ``metrics``: ``loss``,
    ``grad_norm``, ``lr`` ``[N]`` (zeros for inactive steps).
    """
    step = make_train_step(module, tx, regression)

    def loop(state: TrainState, frozen: Any, batches: dict, active: jax.Array,
             schedule: jax.Array) -> tuple[TrainState, dict]:
        def body(st, xs):
            batch, on = xs
            new, m = step(st, frozen, batch, lr_at(st.step, schedule))
            # an inactive step computes and is dropped: a select, which XLA fuses into the update
            # it already reads, instead of a conditional, whose predicate the host would wait for
            keep = jax.tree_util.tree_map(lambda a, b: jnp.where(on, a, b), new, st)
            return keep, jax.tree_util.tree_map(lambda x: jnp.where(on, x, jnp.zeros_like(x)), m)

        return jax.lax.scan(body, state, (batches, active))

    return loop


def make_predict_step(module: Any) -> Callable:
    """``predict(trainable, frozen, batch) -> logits`` (no dropout)."""

    def predict(trainable, frozen, batch):
        return apply_model(module, masks.merge(trainable, frozen), batch, True)

    return predict


def model_inputs(batch: dict) -> dict:
    """What the device needs of a host batch: model inputs, labels and weights (not ``index``)."""
    return {k: v for k, v in batch.items() if k != "index"}


def predict_logits(predict_fn: Callable, trainable: Any, frozen: Any,
                   batches: Iterable[dict], n: int,
                   to_device: Callable[[dict], dict] | None = None) -> np.ndarray:
    """Logits of ``n`` examples, in their original order, from host ``batches`` that each carry an
    ``index`` array (the example of every row or slot; ``-1``: filler) of the logits' leading shape.

    ``to_device(batch)`` puts a host batch on the devices (default: as it is); ``predict_fn`` must
    return the logits of the whole batch. Batches are dispatched ahead of reading the results back,
    so the host work of the next batch overlaps the device work of this one.
    """
    to_device = to_device or model_inputs
    out: np.ndarray | None = None
    pending: list[tuple[np.ndarray, Any]] = []

    def collect(index, logits):
        nonlocal out
        logits = np.asarray(logits)
        if out is None:
            out = np.zeros((n, logits.shape[-1]), np.float32)
        real = index >= 0
        out[index[real]] = logits[real]

    for batch in batches:
        pending.append((batch["index"], predict_fn(trainable, frozen, to_device(batch))))
        if len(pending) > 2:
            collect(*pending.pop(0))
    for p in pending:
        collect(*p)
    if out is None:
        raise ValueError("nothing to predict")
    return out


def logits_to_predictions(logits: np.ndarray, regression: bool) -> np.ndarray:
    return logits[:, 0] if regression else logits.argmax(-1)
