"""Batches: a fixed number of rows and a length taken from a small set of buckets, so only a few
shapes are ever compiled (:class:`BucketBatches`; packed rows of one shape are
:class:`jaxpeft.data.packing.PackedBatches`). Rows that only fill up a batch have ``weights == 0``.
"""

from __future__ import annotations

import hashlib
import itertools
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from jaxpeft.data.encoding import IGNORE, Encoded

def length_buckets(max_length: int, smallest: int = 16) -> tuple[int, ...]:
    """Powers of two from ``smallest`` below ``max_length``, then ``max_length`` itself."""
    out, b = [], smallest
    while b < max_length:
        out.append(b)
        b *= 2
    out.append(max_length)
    return tuple(out)

def plan_buckets(train_rows: Mapping[int, int], eval_rows: Mapping[int, int], ladder: Sequence[int],
                 row_seconds: Callable[[int, bool], float], program_seconds: float) -> tuple[int, ...]:
    """The length buckets a run compiles: the subset of ``ladder`` (its largest always kept) with
    the fewest expected seconds, counting ``program_seconds`` for each program compiled (a train
    and a predict program per bucket that its batches use) and ``row_seconds(width, train)`` for
    each row computed at a padded width. Lengths no batch uses are left out.

    ``train_rows`` / ``eval_rows``: rows over the whole run by the ``ladder`` width of their batch
    (its smallest bucket that fits). A short run on a fast device pads to fewer lengths, a long one
    keeps them all. Ties go to more buckets (less padding). Exhaustive: the ladder of powers of two
    has at most a few entries (512 tokens: 6, 8192: 10).
    """
    ladder = tuple(sorted(ladder))
    top = ladder[-1]
    rest = tuple(w for w in ladder[:-1] if train_rows.get(w) or eval_rows.get(w))   # lengths in use

    def cost(chosen: tuple[int, ...]) -> float:
        total = 0.0
        for rows, train in ((train_rows, True), (eval_rows, False)):
            used = set()
            for w, n in rows.items():
                b = bucket_for(w, chosen)
                used.add(b)
                total += n * row_seconds(b, train)
            total += program_seconds * len(used)
        return total

    best = rest + (top,)
    best_cost = cost(best)
    for k in range(len(rest) - 1, -1, -1):    # fewer buckets after more: a tie keeps more
        for sub in itertools.combinations(rest, k):
            c = cost(sub + (top,))
            if c < best_cost - 1e-12:
                best, best_cost = sub + (top,), c
    return best

def longest(lengths: np.ndarray, idx: np.ndarray) -> int:
    """The longest example of the batch ``idx`` (``-1``: filler rows, left out)."""
    return int(lengths[idx[idx >= 0]].max(initial=1))

def bucket_for(length: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if length <= b:
            return b
    raise ValueError(f"length {length} exceeds the largest bucket {buckets[-1]}")

def epoch_order(lengths: np.ndarray, batch_size: int, seed: int, epoch: int,
                pool_batches: int = 50) -> list[np.ndarray]:
    """The training batches of one epoch as index arrays (``-1`` = filler), deterministic in
    ``(seed, epoch)``.

    Examples are shuffled, then sorted by length inside pools of ``pool_batches`` batches so a batch
    holds similar lengths (less padding), then the batches are shuffled again. The last batch is
    filled up with ``-1``. ``pool_batches=1``: each batch is a uniformly random sample (the shuffled
    examples taken ``batch_size`` at a time; sorting inside one batch changes no batch's members).
    """
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(lengths))
    pool = batch_size * pool_batches
    batches = []
    for s in range(0, len(perm), pool):
        chunk = perm[s:s + pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        for b in range(0, len(chunk), batch_size):
            batches.append(chunk[b:b + batch_size])
    rng.shuffle(batches)
    return [_fill(b, batch_size) for b in batches]

def eval_order(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Evaluation batches sorted by length (least padding); every example exactly once."""
    order = np.argsort(lengths, kind="stable")
    return [_fill(order[s:s + batch_size], batch_size) for s in range(0, len(order), batch_size)]

def _fill(idx: np.ndarray, size: int) -> np.ndarray:
    if len(idx) == size:
        return idx
    return np.concatenate([idx, np.full(size - len(idx), -1, idx.dtype)])

def make_batch(data: Encoded, idx: np.ndarray, buckets: Sequence[int],
               rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Gathers rows ``idx`` (``-1`` = filler row) into a padded batch of one bucket length.

    ``rows`` (positions in ``idx``) gathers only part of the batch, e.g. one process's share in a
    multi-host run; the bucket length is still that of the whole batch, so all parts agree.
    """
    real = idx >= 0
    safe = np.where(real, idx, 0)
    width = bucket_for(int(data.lengths[safe][real].max(initial=1)), buckets)
    if rows is not None:
        idx, real, safe = idx[rows], real[rows], safe[rows]
    ids = data.input_ids[safe, :width]
    batch = {
        "input_ids": np.where(real[:, None], ids, 0).astype(np.int32),
        "token_type_ids": np.where(real[:, None], data.token_type_ids[safe, :width], 0).astype(np.int32),
        "attention_mask": (np.arange(width)[None, :] < np.where(real, data.lengths[safe], 1)[:, None]
                           ).astype(np.int32),
        "weights": real.astype(np.float32),
        "index": idx.astype(np.int32),
    }
    if data.labels is not None:
        batch["labels"] = _rows(data.labels, safe, real, width, 0 if data.labels.ndim == 1 else IGNORE)
    for k, v in data.extra.items():
        batch[k] = _rows(v, safe, real, width, 0)
    return batch


def _rows(a: np.ndarray, safe: np.ndarray, real: np.ndarray, width: int, fill: int | float) -> np.ndarray:
    """Rows ``safe`` of a per-row (``[N]``) or per-token (``[N, L]``, cut to ``width``) array, with
    ``fill`` in filler rows."""
    if a.ndim == 1:
        return np.where(real, a[safe], fill).astype(a.dtype)
    return np.where(real[:, None], a[safe, :width], fill).astype(a.dtype)

def iterate(data: Encoded, order: list[np.ndarray], buckets: Sequence[int],
            start: int = 0) -> Iterator[dict[str, np.ndarray]]:
    for idx in order[start:]:
        yield make_batch(data, idx, buckets)

def in_runs(batches: list[np.ndarray], widths: Sequence[int], run: int, seed: int, epoch: int
            ) -> list[np.ndarray]:
    """``batches`` reordered into runs of up to ``run`` batches of one width, the runs shuffled:
    consecutive steps then share a shape, so many of them go to the device in one call. Each run
    keeps its batches' order; the result is deterministic in ``(seed, epoch)``."""
    by_width: dict[int, list[np.ndarray]] = {}
    for b, w in zip(batches, widths):
        by_width.setdefault(int(w), []).append(b)
    runs = [bs[i:i + run] for _, bs in sorted(by_width.items()) for i in range(0, len(bs), run)]
    rng = np.random.default_rng([seed, epoch, 1])
    return [b for i in rng.permutation(len(runs)) for b in runs[i]]

def order_digest(items: Sequence[Any]) -> str | None:
    """A short hash of a sequence of index arrays (the batches left in an epoch)."""
    if not len(items):
        return None
    h = hashlib.sha256()
    for a in items:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def groups_by_length(kinds: Sequence[str]) -> bool:
    """What an unset ``--group_by_length`` means for a run of tasks of ``kinds``: random batches where
    a task tags, batches of similar lengths otherwise. A tagging step's loss is the mean over its
    batch's labelled words, so in length-grouped batches a word of a short sentence weighs several
    times more than one of a long sentence; random batches weigh them alike, and trained NER and POS
    to higher scores with every method measured (docs/results.md, "Token and span tasks against the
    peer"). A sequence or span loss is a mean over examples or windows, which grouping leaves alike,
    at less padding."""
    return "token" not in kinds


class BucketBatches:
    """Training and evaluation batches of ``batch_size`` examples, padded to a length bucket.

    An epoch's batches (:func:`epoch_order`) come in runs of up to :attr:`RUN` batches of one
    length (:func:`in_runs`), so that a run can go to the device as one call.

    ``group_by_length``: a training batch holds examples of similar lengths (sorted inside pools of
    :attr:`POOL` batches: less padding); off, each batch is a uniformly random sample of the examples
    (as transformers' ``Trainer`` by default). Either way only whole batches are then reordered.
    """

    RUN = 32
    #: the most consecutive steps of one shape (one device call)
    run_length = RUN
    #: batches per pool sorted by length (``group_by_length``)
    POOL = 50

    def __init__(self, encoded: Encoded, batch_size: int, max_length: int, seed: int, *,
                 group_by_length: bool = True):
        self.data, self.batch_size, self.seed = encoded, batch_size, seed
        self.group_by_length = group_by_length
        #: every power of two up to ``max_length``: what orders an epoch's batches
        self.ladder = length_buckets(max_length)
        #: the lengths batches are padded to (:meth:`use_buckets`; default: the whole ladder)
        self.buckets = self.ladder
        self.steps_per_epoch = max(1, -(-len(encoded) // batch_size))
        self._cache: dict[int, list[np.ndarray]] = {}

    def epoch_steps(self, epoch: int) -> int:
        """Steps of ``epoch`` (the same in every epoch)."""
        return self.steps_per_epoch

    def order(self, epoch: int) -> list[np.ndarray]:
        """The epoch's steps, each an index array of the examples of its batch (``-1``: filler)."""
        if epoch not in self._cache:
            batches = epoch_order(self.data.lengths, self.batch_size, self.seed, epoch,
                                  pool_batches=self.POOL if self.group_by_length else 1)
            # runs by the ladder, not the chosen buckets: the order is the same whichever are chosen
            self._cache = {epoch: in_runs(batches, [self.ladder_width(b) for b in batches], self.RUN,
                                          self.seed, epoch)}
        return self._cache[epoch]

    def width(self, idx: np.ndarray) -> int:
        """The padded length of the batch ``idx``."""
        return bucket_for(longest(self.data.lengths, idx), self.buckets)

    def ladder_width(self, idx: np.ndarray) -> int:
        return bucket_for(longest(self.data.lengths, idx), self.ladder)

    def use_buckets(self, buckets: Sequence[int]) -> None:
        """Pads batches to ``buckets`` (lengths up to the ladder's largest, which they include) from now on;
        the order of the examples does not change."""
        buckets = tuple(sorted(set(int(b) for b in buckets)))
        if not buckets or buckets[-1] != self.ladder[-1]:
            raise ValueError(f"buckets {buckets} must end with the longest length {self.ladder[-1]}")
        self.buckets = buckets

    def ladder_rows(self, epoch: int = 0) -> dict[int, int]:
        """Rows of one epoch's batches by their ladder width (filler rows included: they are computed)."""
        out: dict[int, int] = {}
        for b in self.order(epoch):
            w = self.ladder_width(b)
            out[w] = out.get(w, 0) + len(b)
        return out

    def eval_ladder_rows(self, encoded: Encoded, batch_size: int) -> dict[int, int]:
        """Rows of one pass of :meth:`eval_batches` by their ladder width."""
        out: dict[int, int] = {}
        for idx in eval_order(encoded.lengths, batch_size):
            w = bucket_for(longest(encoded.lengths, idx), self.ladder)
            out[w] = out.get(w, 0) + len(idx)
        return out

    def batch(self, idx: np.ndarray, rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
        return make_batch(self.data, idx, self.buckets, rows)

    def chunk(self, specs: Sequence[np.ndarray], rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The batches of ``specs`` (all of one width) stacked on a leading step axis, built in
        one pass: ``[len(specs), batch, ...]``."""
        idx = np.stack(specs)
        if rows is not None:
            idx = idx[:, rows]
        n, b = idx.shape
        flat = make_batch(self.data, idx.reshape(-1), self.buckets)
        return {k: v.reshape((n, b) + v.shape[1:]) for k, v in flat.items()}

    def eval_batches(self, encoded: Encoded, batch_size: int,
                     rows: np.ndarray | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Every example of ``encoded`` once, sorted by length (least padding)."""
        for idx in eval_order(encoded.lengths, batch_size):
            yield make_batch(encoded, idx, self.buckets, rows)
