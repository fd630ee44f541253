"""The pure steps, built around a loss function: train step, many train steps per call, predict
step, and prediction over a dataset. Single-task and multi-task runs, every task kind and the
benchmarks use these; nothing here knows a model, method or task.

A *loss function* is ``loss_fn(trainable, frozen, batch, rng) -> (loss, aux)``: the params come as
the trainable part and the frozen part (``masks.split``: holes are ``optax.MaskedNode``), ``aux`` is
a dict of arrays logged beside the loss (per-task losses of a multi-task run). The train step takes
``jax.grad`` w.r.t. the trainable part only and the optimizer holds state for it only -- so frozen
weights get neither weight gradients nor optimizer state. This is ``masks.multi_transform(tx,
mask)`` on the full tree, minus the zero updates of frozen leaves (``tests/test_train_step.py``
checks the two agree).

A batch is a dict of arrays. Unpacked: ``input_ids``, ``attention_mask``, ``token_type_ids``
``[B, T]``, ``labels`` (``[B]`` or per token ``[B, T]``) and ``weights`` ``[B]`` (weight 0: a row
that only fills the batch). Packed (``jaxpeft.data.packing``): ``input_ids``, ``token_type_ids``,
``position_ids``, ``segment_ids`` ``[R, L]``, ``read_positions``, ``labels``, ``weights`` ``[R, K]``.
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
#: batch keys that stay on the host
HOST_KEYS = ("index", "slot_lengths")
#: batch keys only the loss reads (a predict step is not given them)
TARGET_KEYS = ("labels", "weights", "start_positions", "end_positions")

LossFn = Callable[[Any, Any, dict, Any], tuple[jax.Array, dict]]


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


def apply_model(module: Any, params: Any, batch: dict, deterministic: bool, rng: jax.Array | None = None):
    """The model's outputs for ``batch`` (whichever model inputs it holds)."""
    rngs = None if rng is None else {"dropout": rng}
    kw = {k: batch[k] for k in MODEL_INPUTS[3:] if k in batch}
    return module.apply({"params": params}, batch["input_ids"], batch.get("attention_mask"),
                        batch.get("token_type_ids"), deterministic=deterministic, rngs=rngs, **kw)


def model_loss(module: Any, task_loss: Callable[[jax.Array, dict], jax.Array]) -> LossFn:
    """The loss function of one model and one task: ``task_loss(outputs, batch)`` with dropout."""

    def loss_fn(trainable, frozen, batch, rng):
        outputs = apply_model(module, masks.merge(trainable, frozen), batch, False, rng)
        return task_loss(outputs, batch), {}

    return loss_fn


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation) -> Callable:
    """``step(state, frozen, batch, lr) -> (state, metrics)``; pure, to be jitted by the caller.

    ``lr`` is this update's learning rate (a scalar): ``tx`` has none (``optim.make_optimizer``).
    The dropout RNG of step ``s`` is ``fold_in(state.rng, s)``. ``metrics``: ``loss``,
    ``grad_norm``, ``lr`` and the loss function's ``aux``.
    """

    def step(state: TrainState, frozen: Any, batch: dict, lr: jax.Array) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(state.rng, state.step)
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable, frozen, batch, rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        updates = jax.tree_util.tree_map(lambda u: (lr * u).astype(u.dtype), updates)
        trainable = optax.apply_updates(state.trainable, updates)
        new = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state)
        return new, {"loss": loss, "grad_norm": grad_norm(grads), "lr": jnp.asarray(lr, jnp.float32), **aux}

    return step


def make_train_loop(loss_fn: LossFn, tx: optax.GradientTransformation) -> Callable:
    """``loop(state, frozen, batches, active, schedule) -> (state, metrics)``: up to N train steps
    in one call (a ``lax.scan``; pure, to be jitted by the caller).

    ``batches``: a batch whose arrays have a leading step axis ``[N, ...]``. ``active`` ``[N]``
    bool: steps whose flag is off leave the state as it is (so a call can stop at an evaluation or
    a checkpoint with one compiled N; such a step is computed and dropped). ``schedule``:
    ``optim.Schedule.as_array()``; each step's learning rate comes from the state's step counter on
    the device. ``metrics``: each of :func:`make_train_step`'s, ``[N, ...]`` (zeros for inactive steps).
    """
    step = make_train_step(loss_fn, tx)

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
    """``predict(trainable, frozen, batch) -> outputs`` (no dropout)."""

    def predict(trainable, frozen, batch):
        return apply_model(module, masks.merge(trainable, frozen), batch, True)

    return predict


def model_inputs(batch: dict) -> dict:
    """What a train step needs of a host batch: model inputs, labels and weights (not ``index``)."""
    return {k: v for k, v in batch.items() if k not in HOST_KEYS}


def predict_inputs(batch: dict) -> dict:
    """What a predict step needs of a host batch: no labels, weights or ``index``."""
    return {k: v for k, v in batch.items() if k not in HOST_KEYS + TARGET_KEYS}


def unpack_tokens(outputs: np.ndarray, batch: dict) -> tuple[np.ndarray, np.ndarray]:
    """Packed rows' per-token outputs ``[R, T, ...]`` as one row per slot ``[R * K, T, ...]`` (each
    example's tokens from position 0, zeros after them) and the slots' example ids ``[R * K]``."""
    index, offsets, lengths = batch["index"], batch["read_positions"], batch["slot_lengths"]
    r, k = index.shape
    t = outputs.shape[1]
    pos = np.arange(t)
    src = offsets[..., None] + pos                                   # [R, K, T]
    inside = (pos < lengths[..., None]) & (index >= 0)[..., None]
    rows = np.broadcast_to(np.arange(r)[:, None, None], src.shape)
    got = outputs[rows, np.where(inside, src, 0)]                    # [R, K, T, ...]
    got = np.where(inside.reshape(inside.shape + (1,) * (outputs.ndim - 2)), got, 0)
    return got.reshape((r * k, t) + outputs.shape[2:]), index.reshape(-1)


def predict_outputs(predict_fn: Callable, trainable: Any, frozen: Any, batches: Iterable[dict], n: int,
                    to_device: Callable[[dict], dict] | None = None, length: int | None = None,
                    per_token: bool = False) -> np.ndarray:
    """Outputs of ``n`` examples, in their original order, from host ``batches`` that each carry an
    ``index`` array (the example of every row or slot; ``-1``: filler) of the outputs' leading shape.

    Per-token outputs (``[B, T, ...]``, ``T`` the batch's length bucket) are padded with zeros to
    ``length`` tokens; with ``per_token``, packed rows' outputs (``index`` ``[R, K]``) are cut back
    into their examples (:func:`unpack_tokens`). ``to_device(batch)`` puts a host batch on the
    devices (default: as it is). Batches are dispatched ahead of reading the results back, so the host work of the next batch
    overlaps the device work of this one.
    """
    to_device = to_device or predict_inputs
    out: np.ndarray | None = None
    pending: list[tuple[np.ndarray, Any]] = []

    def collect(batch, outputs):
        nonlocal out
        index = batch["index"]
        outputs = np.asarray(outputs)
        if per_token and index.ndim == 2:
            outputs, index = unpack_tokens(outputs, batch)
            if length is not None:   # a packed row may be longer than any one example
                outputs = outputs[:, :length]
        lead = index.ndim
        rest = outputs.shape[lead:]
        if length is not None and len(rest) >= 2:
            rest = (length,) + rest[1:]
        if out is None:
            out = np.zeros((n,) + rest, np.float32)
        real = index >= 0
        got = outputs[real]
        if got.ndim >= 3 and got.shape[1] != out.shape[1]:
            out[index[real], :got.shape[1]] = got
        else:
            out[index[real]] = got

    for batch in batches:
        host = {k: batch[k] for k in ("index", "read_positions", "slot_lengths") if k in batch}
        pending.append((host, predict_fn(trainable, frozen, to_device(batch))))
        if len(pending) > 2:
            collect(*pending.pop(0))
    for p in pending:
        collect(*p)
    if out is None:
        raise ValueError("nothing to predict")
    return out
