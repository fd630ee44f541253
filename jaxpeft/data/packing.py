"""Packed rows: several short examples per row, one compiled shape, no padding computed.

Each row of ``max_seq_length`` tokens holds whole examples one after another. Every example keeps
its own positions (``0..n-1``), token types and ``[CLS]``; ``segment_ids`` (1, 2, ... per row, 0
for the unused tail) make its tokens attend only to each other (``jaxpeft.models.bert.KeyMask``),
and the head reads each example's ``[CLS]`` at ``read_positions``. So a packed example's logits
equal its logits alone (``tests/test_packing.py``).

An epoch's examples (shuffled by ``(seed, epoch)``) are packed best-fit-decreasing within pools,
the rows shuffled and dealt out ``rows_per_step`` at a time. ``rows_per_step`` is the fewest rows
that hold every planned epoch's packing in ``ceil(examples / batch_size)`` steps, so a step holds
about ``batch_size`` examples (not exactly: the loss is the mean over the examples it holds). An
epoch has as many steps as its rows fill -- no step without examples -- so epochs may differ by a
step or two (:meth:`PackedBatches.epoch_steps`), and the schedule follows.

A step is given by an ``[R, K]`` array of example ids (``-1``: an empty slot), its rows' examples
in order: the array alone says where every token goes (:func:`packed_batch`). Per-token labels go
with their tokens; per-example arrays (a QA window's answer start and end, positions in the
example) become ``[R, K]`` beside each slot's offset (``read_positions``) and token count
(``slot_lengths``), from which per-token outputs are read back per example
(``jaxpeft.training.steps.predict_outputs``).
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np

from jaxpeft.data.encoding import IGNORE, Encoded

#: examples packed together (best fit within a pool; larger pools fill rows a little better)
POOL = 4096


def pack_rows(lengths: np.ndarray, order: Sequence[int], capacity: int, pool: int = POOL,
              max_examples: int | None = None) -> list[list[int]]:
    """The examples of ``order`` as rows of at most ``capacity`` tokens (and ``max_examples``
    examples): within each pool of ``pool`` consecutive examples, longest first, each into the open
    row it fills best.

    >>> pack_rows(np.array([5, 3, 4, 2, 6]), [0, 1, 2, 3, 4], capacity=8)
    [[4, 3], [0, 1], [2]]
    """
    rows: list[list[int]] = []
    order = np.asarray(order)
    for s in range(0, len(order), pool):
        chunk = order[s:s + pool]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        # open rows by free space: free[c] lists the rows with c tokens left
        free: list[list[int]] = [[] for _ in range(capacity + 1)]
        for ex in chunk.tolist():
            n = int(lengths[ex])
            if n > capacity:
                raise ValueError(f"example {ex} has {n} tokens, more than a row's {capacity}")
            for c in range(n, capacity + 1):
                if free[c]:
                    r = free[c].pop()
                    break
            else:
                r, c = len(rows), capacity
                rows.append([])
            rows[r].append(ex)
            if max_examples is None or len(rows[r]) < max_examples:
                free[c - n].append(r)
    return rows


def rows_to_slots(rows: Sequence[Sequence[int]], slots: int) -> np.ndarray:
    """``[len(rows), slots]`` example ids, ``-1`` where a row has fewer examples."""
    out = np.full((len(rows), slots), -1, np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def packed_batch(data: Encoded, ids: np.ndarray, length: int) -> dict[str, np.ndarray]:
    """The model inputs of packed rows ``ids`` (``[R, K]`` example ids, ``-1``: empty)."""
    r, k = ids.shape
    real = ids >= 0
    safe = np.where(real, ids, 0)
    lens = np.where(real, data.lengths[safe], 0).astype(np.int64)
    offsets = np.cumsum(lens, axis=1) - lens
    if (offsets[:, -1] + lens[:, -1] > length).any():
        raise ValueError("a packed row is longer than the row length")
    ex, n = safe[real], lens[real]
    row_of = np.repeat(np.nonzero(real)[0], n)
    pos = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
    col = np.repeat(offsets[real], n) + pos
    src = np.repeat(ex, n)
    input_ids = np.zeros((r, length), np.int32)
    types = np.zeros((r, length), np.int32)
    positions = np.zeros((r, length), np.int32)
    segments = np.zeros((r, length), np.int32)
    input_ids[row_of, col] = data.input_ids[src, pos]
    types[row_of, col] = data.token_type_ids[src, pos]
    positions[row_of, col] = pos
    segments[row_of, col] = np.repeat(np.nonzero(real)[1] + 1, n)
    batch = {"input_ids": input_ids, "token_type_ids": types, "position_ids": positions,
             "segment_ids": segments, "read_positions": np.where(real, offsets, 0).astype(np.int32),
             "weights": real.astype(np.float32), "index": np.where(real, ids, -1).astype(np.int32),
             "slot_lengths": lens.astype(np.int32)}
    for key, v in data.extra.items():   # per example (a span's start and end: positions in the example)
        batch[key] = np.where(real, v[safe], 0).astype(v.dtype)
    if data.labels is not None and data.labels.ndim == 1:
        batch["labels"] = np.where(real, data.labels[safe], 0).astype(data.labels.dtype)
    elif data.labels is not None:   # per token: each example's labels at its own tokens
        labels = np.full((r, length), IGNORE, data.labels.dtype)
        labels[row_of, col] = data.labels[src, pos]
        batch["labels"] = labels
    return batch


class PackedBatches:
    """Training and evaluation batches of packed rows (the interface of ``jaxpeft.data.batches.BucketBatches``).

    ``epochs``: how many epochs training will visit (their packings decide ``rows_per_step``);
    ``row_multiple``: ``rows_per_step`` is a multiple of it (the data-parallel device count).
    """

    #: every step has one shape: a device call may hold any number of them
    run_length = 1 << 30

    def __init__(self, encoded: Encoded, batch_size: int, max_length: int, seed: int, epochs: int,
                 row_multiple: int = 1):
        self.data, self.batch_size, self.seed, self.length = encoded, batch_size, seed, max_length
        self.steps_per_epoch = max(1, -(-len(encoded) // batch_size))
        self._rows = {e: self._pack_epoch(e) for e in range(max(1, epochs))}
        rows = max(math.ceil(len(r) / self.steps_per_epoch) for r in self._rows.values())
        # a multiple of the data-parallel devices, which split a step's rows
        self.rows_per_step = -(-rows // row_multiple) * row_multiple
        self.slots = max(len(r) for rows in self._rows.values() for r in rows)
        self._cache: dict[int, list[np.ndarray]] = {}

    def _epoch_rows(self, epoch: int) -> list[list[int]]:
        rows = self._rows.get(epoch)
        if rows is None:     # beyond the epochs planned for (e.g. a longer resumed run): the slots planned
            rows = self._rows[epoch] = self._pack_epoch(epoch, self.slots)
        return rows

    def epoch_steps(self, epoch: int) -> int:
        """Steps of ``epoch``: as many as its packed rows fill, ``rows_per_step`` at a time."""
        return max(1, -(-len(self._epoch_rows(epoch)) // self.rows_per_step))

    def _pack_epoch(self, epoch: int, max_examples: int | None = None) -> list[list[int]]:
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.data))
        rows = pack_rows(self.data.lengths, perm, self.length, max_examples=max_examples)
        rng = np.random.default_rng([self.seed, epoch, 2])
        return [rows[i] for i in rng.permutation(len(rows))]

    def order(self, epoch: int) -> list[np.ndarray]:
        """The epoch's steps, each ``[rows_per_step, slots]`` example ids."""
        if epoch not in self._cache:
            rows = self._epoch_rows(epoch)
            r, n = self.rows_per_step, self.epoch_steps(epoch)
            slots = max(self.slots, max(map(len, rows)))
            table = rows_to_slots(rows, slots)[:, :self.slots] if slots == self.slots else None
            if table is None:
                raise ValueError(f"epoch {epoch} packs {slots} examples into a row, more than the "
                                 f"{self.slots} slots planned")
            pad = np.full((r * n - len(rows), self.slots), -1, np.int32)
            table = np.concatenate([table, pad]).reshape(n, r, self.slots)
            self._cache = {epoch: list(table)}
        return self._cache[epoch]

    def width(self, ids: np.ndarray) -> int:
        return self.length

    def batch(self, ids: np.ndarray, rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
        return packed_batch(self.data, ids if rows is None else ids[rows], self.length)

    def chunk(self, specs: Sequence[np.ndarray], rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The steps ``specs`` stacked on a leading step axis, built in one pass."""
        ids = np.stack(specs)
        if rows is not None:
            ids = ids[:, rows]
        n, r, k = ids.shape
        flat = packed_batch(self.data, ids.reshape(n * r, k), self.length)
        return {key: v.reshape((n, r) + v.shape[1:]) for key, v in flat.items()}

    def eval_rows_per_batch(self, batch_size: int) -> int:
        return self.rows_per_step * max(1, batch_size // self.batch_size)

    def eval_batches(self, encoded: Encoded, batch_size: int,
                     rows: np.ndarray | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Every example of ``encoded`` once, packed (longest first, best fit), in batches of
        :meth:`eval_rows_per_batch` rows: one shape per evaluation set."""
        yield from eval_batches(encoded, self.length, self.eval_rows_per_batch(batch_size), rows)


def eval_batches(encoded: Encoded, length: int, rows_per_batch: int,
                 rows: np.ndarray | None = None) -> Iterator[dict[str, np.ndarray]]:
    """``encoded`` packed longest first into rows of ``length``, ``rows_per_batch`` rows a batch."""
    if id(encoded) not in _EVAL_PACKINGS:
        packed = pack_rows(encoded.lengths, np.argsort(-encoded.lengths, kind="stable"), length,
                           max(len(encoded), 1))
        _EVAL_PACKINGS.clear()
        _EVAL_PACKINGS[id(encoded)] = (encoded, length, rows_to_slots(packed, max(map(len, packed))))
    _, packed_length, table = _EVAL_PACKINGS[id(encoded)]
    if packed_length != length:
        del _EVAL_PACKINGS[id(encoded)]
        yield from eval_batches(encoded, length, rows_per_batch, rows)
        return
    for s in range(0, len(table), rows_per_batch):
        ids = table[s:s + rows_per_batch]
        if len(ids) < rows_per_batch:
            ids = np.concatenate([ids, np.full((rows_per_batch - len(ids), table.shape[1]), -1, np.int32)])
        yield packed_batch(encoded, ids if rows is None else ids[rows], length)


# the last evaluation set's packing (evaluations repeat on the same dev set); holds the set itself
# so its id is not reused while cached
_EVAL_PACKINGS: dict[int, tuple[Encoded, int, np.ndarray]] = {}
