"""GLUE tasks: reading (local TSV folder or the Hugging Face hub), tokenizing, length-bucketed batches.

A local folder in the classic ``download_glue_data.py`` layout (``SST-2/train.tsv``, ...) is used when
given with ``data_dir`` or the ``GLUE_DIR`` environment variable; otherwise the ``nyu-mll/glue``
dataset is loaded through ``datasets``.

Batches have a fixed number of rows and a length taken from a small set of buckets, so only a few
shapes are ever compiled (:class:`BucketBatches`; packed rows of one shape are
:class:`jaxpeft.packing.PackedBatches`). Rows that only fill up a batch have ``weights == 0``.
Tokenized splits are cached on disk (:func:`encode_cached`), so a second run skips the tokenizer.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from jaxpeft.errors import UserError

csv.field_size_limit(sys.maxsize)


@dataclasses.dataclass(frozen=True)
class GlueTask:
    name: str
    folder: str                        # folder of the classic TSV layout
    hub_texts: tuple[str, ...]         # text columns in the hub dataset
    tsv_texts: tuple[str, ...]         # text columns in the TSV header (or indices when no header)
    tsv_label: str                     # label column in the TSV header (or index)
    label_names: tuple[str, ...] | None  # None: regression
    main_metric: str
    eval_splits: tuple[str, ...] = ("dev",)
    tsv_header: bool = True            # CoLA's train/dev files have none (their test file has one)
    headed_texts: tuple[str, ...] = ()  # text columns of a headed file when tsv_texts are indices

    @property
    def num_labels(self) -> int:
        return 1 if self.label_names is None else len(self.label_names)

    @property
    def is_regression(self) -> bool:
        return self.label_names is None


TASKS: dict[str, GlueTask] = {t.name: t for t in [
    GlueTask("sst2", "SST-2", ("sentence",), ("sentence",), "label", ("0", "1"), "accuracy"),
    GlueTask("cola", "CoLA", ("sentence",), ("3",), "1", ("0", "1"), "matthews_correlation",
             tsv_header=False, headed_texts=("sentence",)),
    GlueTask("mrpc", "MRPC", ("sentence1", "sentence2"), ("#1 String", "#2 String"), "Quality",
             ("0", "1"), "f1"),
    GlueTask("stsb", "STS-B", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "score", None,
             "pearson"),
    GlueTask("qqp", "QQP", ("question1", "question2"), ("question1", "question2"), "is_duplicate",
             ("0", "1"), "f1"),
    GlueTask("mnli", "MNLI", ("premise", "hypothesis"), ("sentence1", "sentence2"), "gold_label",
             ("entailment", "neutral", "contradiction"), "accuracy",
             eval_splits=("dev_matched", "dev_mismatched")),
    GlueTask("qnli", "QNLI", ("question", "sentence"), ("question", "sentence"), "label",
             ("entailment", "not_entailment"), "accuracy"),
    GlueTask("rte", "RTE", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label",
             ("entailment", "not_entailment"), "accuracy"),
    GlueTask("wnli", "WNLI", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label",
             ("0", "1"), "accuracy"),
]}
_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli"}
_HUB_SPLITS = {"train": "train", "dev": "validation", "dev_matched": "validation_matched",
               "dev_mismatched": "validation_mismatched", "test": "test",
               "test_matched": "test_matched", "test_mismatched": "test_mismatched"}


def get_task(name: str) -> GlueTask:
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in TASKS:
        raise UserError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[key]


@dataclasses.dataclass
class Examples:
    """One split as raw text: ``texts`` is a tuple of 1 or 2 lists; labels are float for STS-B,
    class ids otherwise, and ``None`` for unlabeled test splits."""

    texts: tuple[list[str], ...]
    labels: np.ndarray | None
    source: str

    def __len__(self) -> int:
        return len(self.texts[0])

    def take(self, n: int) -> "Examples":
        labels = None if self.labels is None else self.labels[:n]
        return Examples(tuple(t[:n] for t in self.texts), labels, self.source)


def resolve_data_dir(data_dir: str | None) -> Path | None:
    """The local GLUE folder to read, or ``None`` to use the hub."""
    d = data_dir or os.environ.get("GLUE_DIR")
    if not d:
        return None
    p = Path(d).expanduser()
    if not p.is_dir():
        origin = "--data_dir" if data_dir else "GLUE_DIR"
        raise UserError(f"GLUE data folder {d!r} (from {origin}) does not exist")
    return p


def load_split(task: GlueTask, split: str, data_dir: str | Path | None = None) -> Examples:
    """Reads one split (``train``, ``dev``, ``dev_matched``, ``test``...) of ``task``."""
    d = resolve_data_dir(str(data_dir) if data_dir is not None else None)
    if d is not None:
        return read_tsv(task, d / task.folder / f"{split}.tsv")
    return _load_hub(task, split)


def _label_id(task: GlueTask, raw: str, where: str) -> float | int:
    raw = raw.strip()
    if task.is_regression:
        try:
            return float(raw)
        except ValueError:
            raise UserError(f"{where}: label {raw!r} is not a number") from None
    if raw in task.label_names:
        return task.label_names.index(raw)
    raise UserError(f"{where}: label {raw!r} is not one of {list(task.label_names)}")


def read_tsv(task: GlueTask, path: Path) -> Examples:
    """Reads a GLUE TSV file; the label column is optional (test files have none)."""
    if not path.exists():
        raise UserError(f"{task.name}: data file {path} not found")
    with open(path, encoding="utf-8-sig", newline="") as f:   # utf-8-sig drops MRPC's BOM
        rows = list(csv.reader(f, delimiter="\t", quotechar=None))
    if not rows:
        raise UserError(f"{path}: file is empty")
    headed = task.tsv_header or rows[0][0].strip() == "index"
    if headed:
        header = [h.strip() for h in rows[0]]
        body, first = rows[1:], 2
        names = task.tsv_texts if task.tsv_header else task.headed_texts
        try:
            text_cols = [header.index(c) for c in names]
        except ValueError:
            raise UserError(f"{path}: header {header} lacks the columns {list(names)}") from None
        label_col = header.index(task.tsv_label) if task.tsv_label in header else None
        width = len(header)
    else:
        body, first = rows, 1
        text_cols = [int(c) for c in task.tsv_texts]
        label_col = int(task.tsv_label)
        width = max(text_cols + [label_col]) + 1
    texts: tuple[list[str], ...] = tuple([] for _ in text_cols)
    labels: list = []
    for i, row in enumerate(body):
        where = f"{path}:{first + i}"
        if len(row) < width:
            raise UserError(f"{where}: malformed row, expected {width} tab-separated fields, got {len(row)}")
        for out, c in zip(texts, text_cols):
            out.append(row[c])
        if label_col is not None:
            labels.append(_label_id(task, row[label_col], where))
    if not texts[0]:
        raise UserError(f"{path}: no examples")
    arr = None if label_col is None else np.asarray(labels, np.float32 if task.is_regression else np.int32)
    return Examples(texts, arr, str(path))


def _load_hub(task: GlueTask, split: str) -> Examples:
    try:
        import datasets
    except ImportError:
        raise UserError("no local GLUE folder given (--data_dir or GLUE_DIR) and the `datasets` "
                        "package is not installed") from None
    hub_split = _HUB_SPLITS.get(split)
    if hub_split is None:
        raise UserError(f"{task.name}: unknown split {split!r}")
    try:
        ds = datasets.load_dataset("nyu-mll/glue", task.name, split=hub_split)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{task.name}/{split}: no local GLUE folder given (--data_dir or GLUE_DIR) and "
                        f"the hub dataset nyu-mll/glue could not be loaded ({msg[:200]})") from None
    texts = tuple(list(ds[c]) for c in task.hub_texts)
    labels = np.asarray(ds["label"], np.float32 if task.is_regression else np.int32)
    if not task.is_regression and (labels < 0).all():
        labels = None  # unlabeled test split
    return Examples(texts, labels, f"nyu-mll/glue/{task.name}/{hub_split}")


# ----------------------------------------------------------------------------- tokenizing


@dataclasses.dataclass
class Encoded:
    """A tokenized split, right-padded to ``max_length``; ``lengths`` are the real token counts."""

    input_ids: np.ndarray       # [N, max_length] int32
    token_type_ids: np.ndarray  # [N, max_length] int32
    lengths: np.ndarray         # [N] int32
    labels: np.ndarray | None   # [N]

    def __len__(self) -> int:
        return len(self.lengths)


def encode(tokenizer, examples: Examples, max_length: int, chunk: int = 4096) -> Encoded:
    """Tokenizes with the fast tokenizer in chunks; pairs are truncated longest-first.
    ``tokenizer``: a :class:`jaxpeft.tokenizing.Tokenizer` or a transformers tokenizer."""
    if hasattr(tokenizer, "encode_arrays"):
        ids, types, lengths = tokenizer.encode_arrays(examples.texts, max_length)
        return Encoded(ids, types, lengths, examples.labels)
    n = len(examples)
    ids = np.zeros((n, max_length), np.int32)
    types = np.zeros((n, max_length), np.int32)
    lengths = np.zeros((n,), np.int32)
    pad = tokenizer.pad_token_id or 0
    for start in range(0, n, chunk):
        parts = [t[start:start + chunk] for t in examples.texts]
        enc = tokenizer(*parts, truncation=True, max_length=max_length, padding="max_length",
                        return_tensors="np", return_token_type_ids=True, return_attention_mask=True)
        sl = slice(start, start + len(parts[0]))
        ids[sl] = enc["input_ids"]
        types[sl] = enc["token_type_ids"]
        lengths[sl] = enc["attention_mask"].sum(axis=1)
    if pad != 0:
        ids[np.arange(max_length)[None, :] >= lengths[:, None]] = pad
    return Encoded(ids, types, lengths, examples.labels)


def _tokenizer_digest(tokenizer) -> str:
    """What identifies a tokenizer's output: its files, or its vocabulary and settings."""
    if hasattr(tokenizer, "digest"):
        return tokenizer.digest()
    h = hashlib.sha256()
    try:
        h.update(tokenizer.backend_tokenizer.to_str().encode())
    except Exception:  # noqa: BLE001 -- a slow tokenizer: its vocabulary and class
        h.update(repr(sorted(tokenizer.get_vocab().items())).encode())
        h.update(type(tokenizer).__name__.encode())
    return h.hexdigest()[:16]


def cache_dir() -> Path | None:
    """Where tokenized splits are cached: ``$JAXPEFT_DATA_CACHE`` (``off``: nowhere), else
    ``~/.cache/jaxpeft/data`` (``$XDG_CACHE_HOME`` honoured)."""
    v = os.environ.get("JAXPEFT_DATA_CACHE")
    if v is not None:
        return None if v.strip().lower() in ("", "off", "0", "none") else Path(v).expanduser()
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "jaxpeft" / "data"


def encode_cached(tokenizer, examples: Examples, max_length: int) -> Encoded:
    """:func:`encode` through an on-disk cache keyed by the texts, labels, tokenizer and length.

    The key hashes the examples themselves (not a file name), so an edited file never reads a stale
    entry. A cache that cannot be written is skipped silently.
    """
    root = cache_dir()
    if root is None:
        return encode(tokenizer, examples, max_length)
    h = hashlib.sha256(f"{max_length}|{_tokenizer_digest(tokenizer)}|{len(examples)}".encode())
    for col in examples.texts:
        h.update("\x1f".join(col).encode("utf-8", "surrogatepass"))
        h.update(b"\x1e")
    path = root / f"{h.hexdigest()[:24]}.npz"
    if path.is_file():
        try:
            with np.load(path) as z:
                return Encoded(z["input_ids"], z["token_type_ids"], z["lengths"], examples.labels)
        except Exception:  # noqa: BLE001 -- a damaged entry: tokenize again
            pass
    enc = encode(tokenizer, examples, max_length)
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.npz")
        np.savez(tmp, input_ids=enc.input_ids, token_type_ids=enc.token_type_ids, lengths=enc.lengths)
        os.replace(tmp, path)
    except OSError:
        pass
    return enc


# ----------------------------------------------------------------------------- batching


def length_buckets(max_length: int, smallest: int = 16) -> tuple[int, ...]:
    """Powers of two from ``smallest`` below ``max_length``, then ``max_length`` itself."""
    out, b = [], smallest
    while b < max_length:
        out.append(b)
        b *= 2
    out.append(max_length)
    return tuple(out)


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
    filled up with ``-1``.
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
        batch["labels"] = np.where(real, data.labels[safe], 0).astype(data.labels.dtype)
    return batch


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


class BucketBatches:
    """Training and evaluation batches of ``batch_size`` examples, padded to a length bucket.

    An epoch's batches (:func:`epoch_order`) come in runs of up to :attr:`RUN` batches of one
    length (:func:`in_runs`), so that a run can go to the device as one call.
    """

    RUN = 32

    def __init__(self, encoded: Encoded, batch_size: int, max_length: int, seed: int):
        self.data, self.batch_size, self.seed = encoded, batch_size, seed
        self.buckets = length_buckets(max_length)
        self.steps_per_epoch = max(1, -(-len(encoded) // batch_size))
        self._cache: dict[int, list[np.ndarray]] = {}

    def order(self, epoch: int) -> list[np.ndarray]:
        """The epoch's steps, each an index array of the examples of its batch (``-1``: filler)."""
        if epoch not in self._cache:
            batches = epoch_order(self.data.lengths, self.batch_size, self.seed, epoch)
            self._cache = {epoch: in_runs(batches, [self.width(b) for b in batches], self.RUN,
                                          self.seed, epoch)}
        return self._cache[epoch]

    def width(self, idx: np.ndarray) -> int:
        real = idx[idx >= 0]
        return bucket_for(int(self.data.lengths[real].max(initial=1)), self.buckets)

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
