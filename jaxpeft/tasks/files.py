"""Your own sentence (pair) classification or regression data: CSV, TSV, JSON, JSON Lines or a
``datasets`` dataset.

:func:`read_examples` reads one file. The format comes from the extension (``.csv``, ``.tsv``,
``.json``, ``.jsonl``) or from ``file_format``. Spreadsheet exports work: UTF-8 with or without a
byte-order mark, CRLF line ends, quoted fields holding commas, quotes and line breaks (the ``csv``
module's dialect, as ``pandas.read_csv`` reads it; ``quotes=False`` reads a file whose texts
hold stray quotes, such as GLUE's TSV files). Errors name the file and the physical line where
the row starts.

The task type and label names come from the training file (``task_type="auto"``): any label that
is not a number makes the task classification; numbers that are all integral too (``0``, ``1``,
``2``); numbers with a non-integral value make it regression. Class names are the sorted unique
labels (numerically when all are numbers), as ``run_glue.py`` sorts its ``label_list``, written as
strings (``1`` and ``1.0`` are the same class, named ``"1"``). Validation and test files are read
with ``reference=`` the training examples: their labels must be among the training names, and a
test file may lack the label column altogether.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxpeft.errors import UserError
from jaxpeft.tasks.textio import json_array_items, parse_json, read_text, split_lines

csv.field_size_limit(sys.maxsize)

FORMATS = ("csv", "tsv", "json", "jsonl")
TASK_TYPES = ("auto", "classification", "regression")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_INTEGER = re.compile(r"[+-]?\d+")


@dataclasses.dataclass
class TextExamples:
    """One split as raw text.

    Attributes:
        texts: one list of strings per text column (1 or 2 columns), one entry per example.
        labels: ``[N]`` int32 class ids (classification) or float32 values (regression);
            ``None`` for a file without labels.
        label_names: the class names, id ``i`` is ``label_names[i]``; ``None`` for regression.
        task_type: ``"classification"`` or ``"regression"``.
        source: where the examples come from (a path, or ``name/config/split``).
    """

    texts: tuple[list[str], ...]
    labels: np.ndarray | None
    label_names: tuple[str, ...] | None
    task_type: str
    source: str

    def __len__(self) -> int:
        return len(self.texts[0])

    @property
    def is_regression(self) -> bool:
        return self.task_type == "regression"

    @property
    def num_labels(self) -> int:
        """Width of the head: the number of classes, 1 for regression."""
        return 1 if self.label_names is None else len(self.label_names)

    def subset(self, indices: Sequence[int] | np.ndarray, source: str | None = None) -> TextExamples:
        """The examples at ``indices`` (in that order), with the same label set."""
        idx = np.asarray(indices, np.int64)
        texts = tuple([col[i] for i in idx] for col in self.texts)
        labels = None if self.labels is None else self.labels[idx]
        return TextExamples(texts, labels, self.label_names, self.task_type, source or self.source)


# ----------------------------------------------------------------------------- reading files


def file_format_of(path: str | Path, file_format: str | None = None) -> str:
    """The format to read ``path`` with: ``file_format`` if given, else from the extension.

    Raises:
        UserError: ``file_format`` is not one of :data:`FORMATS`, or it is ``None`` and the
            extension is not ``.csv``, ``.tsv``, ``.json`` or ``.jsonl``.
    """
    if file_format is not None:
        fmt = file_format.lower().lstrip(".")
        if fmt not in FORMATS:
            raise UserError(f"{path}: unknown file format {file_format!r}; known: {', '.join(FORMATS)}")
        return fmt
    ext = Path(path).suffix.lower().lstrip(".")
    if ext not in FORMATS:
        raise UserError(f"{path}: cannot tell the format from the extension {Path(path).suffix!r}; "
                        f"use .csv, .tsv, .json or .jsonl, or name one with file_format")
    return ext


def read_records(path: str | Path, file_format: str | None = None, quotes: bool = True
                 ) -> tuple[list[str] | None, list[tuple[int, dict[str, Any]]]]:
    """The rows of a table file as ``(line, record)`` pairs.

    Args:
        path: a ``.csv``/``.tsv`` file with a header row, a ``.json`` file (a list of objects, or
            an object whose ``data`` is one) or a ``.jsonl`` file (one object per line).
        file_format: overrides the extension (one of :data:`FORMATS`).
        quotes: CSV/TSV fields may be quoted (``"a, b"``, a quote doubled inside), as
            spreadsheets write them and ``pandas.read_csv`` reads them; ``False`` takes every
            character literally (GLUE's TSV files, whose texts hold stray quotes, need that).

    Returns:
        ``(header, rows)``: ``header`` is the column list of a CSV/TSV file (``None`` for JSON);
        each row is the physical line where it starts and a dict from column to value (strings
        for CSV/TSV; any JSON value otherwise). Blank lines are skipped.

    Raises:
        UserError: a bad extension or format, an unreadable or empty file, a byte that is not
            UTF-8, a CSV row whose field count differs from the header's, invalid JSON, a JSON
            item that is not an object.
    """
    fmt = file_format_of(path, file_format)
    text = read_text(path)
    if fmt in ("csv", "tsv"):
        return _read_delimited(text, path, "," if fmt == "csv" else "\t", quotes)
    if fmt == "jsonl":
        rows = []
        for n, line in enumerate(split_lines(text), 1):
            if line.strip():
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{n}: invalid JSON ({e.msg}, column {e.colno})") from None
                rows.append((n, _object(item, path, n)))
    elif text.lstrip().startswith("{"):
        obj = parse_json(text, path)
        if not isinstance(obj.get("data"), list):
            raise UserError(f"{path}: a JSON object file needs a 'data' list of records "
                            f"(it has keys {sorted(obj)[:10]})")
        rows = [(0, _object(r, path, 0, i)) for i, r in enumerate(obj["data"])]
    else:
        rows = [(n, _object(r, path, n)) for n, r in json_array_items(text, path)]
    if not rows:
        raise UserError(f"{path}: no records")
    return None, rows


def _object(item: Any, path: str | Path, line: int, index: int | None = None) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise UserError(f"{_where(path, line, index)}: expected a JSON object, got {type(item).__name__}")
    return item


def _where(path: str | Path, line: int, index: int | None = None) -> str:
    """``path:line``, or ``path: record i`` where the line is not known (``line == 0``)."""
    return f"{path}:{line}" if line > 0 else f"{path}: record {index}"


def _read_delimited(text: str, path: str | Path, delimiter: str, quotes: bool
                    ) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter,
                        quoting=csv.QUOTE_MINIMAL if quotes else csv.QUOTE_NONE)
    rows: list[tuple[int, dict[str, Any]]] = []
    header: list[str] | None = None
    last = 0
    try:
        for row in reader:
            start, last = last + 1, reader.line_num
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if header is None:
                header = [h.strip() for h in row]
                twice = sorted({h for h in header if header.count(h) > 1})
                if twice:
                    raise UserError(f"{path}:{start}: the header names {twice} more than once")
                continue
            if len(row) != len(header):
                hint = " (an unquoted comma?)" if delimiter == "," else (
                    " (quotes inside the text? read it with quotes=False)" if quotes else "")
                raise UserError(f"{path}:{start}: row has {len(row)} fields, the header has "
                                f"{len(header)}{hint}")
            rows.append((start, dict(zip(header, row))))
    except csv.Error as e:
        raise UserError(f"{path}:{reader.line_num}: malformed row ({e})") from None
    if not rows:
        raise UserError(f"{path}: no rows after the header")
    return header, rows


def read_examples(path: str | Path, text_columns: str | Sequence[str], label_column: str = "label",
                  *, file_format: str | None = None, quotes: bool = True, task_type: str = "auto",
                  reference: TextExamples | None = None) -> TextExamples:
    """Reads a classification or regression file.

    Args:
        path: the file (see :func:`read_records` for the formats).
        text_columns: the text column, or two for sentence pairs.
        label_column: the label column.
        file_format: ``csv``/``tsv``/``json``/``jsonl``, overriding the extension.
        quotes: whether CSV/TSV fields may be quoted (see :func:`read_records`).
        task_type: ``auto`` (see the module doc), ``classification`` or ``regression``; ignored
            when ``reference`` is given.
        reference: the training examples, when reading a validation or test file: their task
            type and label names are used, and the label column may be missing (labels ``None``).

    Returns:
        The examples, in file order.

    Raises:
        UserError: everything :func:`read_records` refuses; a missing text column (naming the
            columns there are); a missing label column in a file read without ``reference``; an
            empty label cell; a label that is not a number (regression) or not among the
            reference's classes; ``path:line`` where the row is known.
    """
    cols = _text_columns(text_columns)
    header, rows = read_records(path, file_format, quotes)
    fields = header if header is not None else list(rows[0][1])
    what = "the header has columns" if header is not None else "the first record has fields"
    for c in cols:
        if c not in fields:
            raise UserError(f"{path}: no column {c!r}; {what} {fields}")
    has_label = label_column in fields
    if not has_label and reference is None:
        raise UserError(f"{path}: no label column {label_column!r}; {what} {fields}")
    texts: tuple[list[str], ...] = tuple([] for _ in cols)
    raw: list[Any] = []
    for i, (line, rec) in enumerate(rows):
        for out, c in zip(texts, cols):
            v = rec.get(c, _MISSING)
            if v is _MISSING or v is None:
                raise UserError(f"{_where(path, line, i)}: no value in text column {c!r}")
            out.append(v if isinstance(v, str) else str(v))
        if has_label:
            v = rec.get(label_column, _MISSING)
            if v is _MISSING or v is None or (isinstance(v, str) and not v.strip()):
                raise UserError(f"{_where(path, line, i)}: empty label in column {label_column!r}")
            raw.append(v)
    return _finish(texts, raw if has_label else None, lambda i: _where(path, rows[i][0], i), str(path),
                   task_type, reference, label_column)


_MISSING = object()


def _text_columns(text_columns: str | Sequence[str]) -> tuple[str, ...]:
    cols = (text_columns,) if isinstance(text_columns, str) else tuple(text_columns)
    if len(cols) not in (1, 2):
        raise UserError(f"text_columns: give one column, or two for sentence pairs (got {list(cols)})")
    return cols


# ----------------------------------------------------------------------------- labels


def _number(v: Any) -> float | None:
    """The value as a finite number, or ``None`` when it is not one (booleans are not)."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float, np.integer, np.floating)):
        f = float(v)
        return f if math.isfinite(f) else None
    if isinstance(v, str) and _NUMBER.fullmatch(v.strip()):
        f = float(v)
        return f if math.isfinite(f) else None
    return None


def _class_name(v: Any) -> str:
    """The class a label value stands for: integral numbers as ``"3"``, other numbers as their
    shortest repr, booleans as ``true``/``false``, strings stripped."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str) and _INTEGER.fullmatch(v.strip()):
        return str(int(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    f = _number(v)
    if f is not None:
        return str(int(f)) if f.is_integer() else repr(f)
    return v.strip() if isinstance(v, str) else str(v)


def infer_task_type(values: Sequence[Any]) -> str:
    """``regression`` when every value is a number and one is not integral, else ``classification``."""
    nums = [_number(v) for v in values]
    if nums and all(f is not None for f in nums) and any(not f.is_integer() for f in nums):
        return "regression"
    return "classification"


def class_names(values: Sequence[Any]) -> tuple[str, ...]:
    """Sorted unique class names of ``values``: numerically when all are numbers, else as strings."""
    names = {_class_name(v) for v in values}
    if all(_number(n) is not None for n in names):
        return tuple(sorted(names, key=float))
    return tuple(sorted(names))


def _finish(texts: tuple[list[str], ...], raw: list[Any] | None, where: Callable[[int], str],
            source: str, task_type: str, reference: TextExamples | None,
            label_column: str) -> TextExamples:
    if task_type not in TASK_TYPES:
        raise UserError(f"task_type {task_type!r}: use one of {', '.join(TASK_TYPES)}")
    if reference is not None:
        kind, names = reference.task_type, reference.label_names
    else:
        kind = infer_task_type(raw) if task_type == "auto" else task_type
        names = class_names(raw) if kind == "classification" else None
    if not texts[0]:
        raise UserError(f"{source}: no examples")
    if raw is None:
        return TextExamples(texts, None, names, kind, source)
    if kind == "regression":
        values = np.empty(len(raw), np.float32)
        for i, v in enumerate(raw):
            f = _number(v)
            if f is None:
                raise UserError(f"{where(i)}: label {v!r} in column {label_column!r} is not a number "
                                f"(a regression task)")
            values[i] = f
        return TextExamples(texts, values, None, kind, source)
    index = {n: k for k, n in enumerate(names)}
    ids = np.empty(len(raw), np.int32)
    for i, v in enumerate(raw):
        k = index.get(_class_name(v))
        if k is None:
            shown = list(names) if len(names) <= 20 else list(names[:20]) + ["..."]
            raise UserError(f"{where(i)}: label {v!r} is not one of the training labels {shown}")
        ids[i] = k
    return TextExamples(texts, ids, names, kind, source)


# ----------------------------------------------------------------------------- splits and the hub


def holdout(examples: TextExamples, fraction: float = 0.1, seed: int = 0
            ) -> tuple[TextExamples, TextExamples]:
    """A seeded random split into ``(train, validation)``, for when no validation file is given.

    ``round(fraction * N)`` examples (at least 1) go to validation; both parts keep file order
    and the label set. The same ``(examples, fraction, seed)`` always gives the same split.

    Raises:
        UserError: ``fraction`` not strictly between 0 and 1, or fewer than 2 examples.
    """
    n = len(examples)
    if not 0.0 < fraction < 1.0:
        raise UserError(f"validation fraction {fraction} must be between 0 and 1")
    if n < 2:
        raise UserError(f"{examples.source}: {n} example(s) cannot be split into train and validation")
    k = min(n - 1, max(1, round(fraction * n)))
    perm = np.random.default_rng(seed).permutation(n)
    val, train = np.sort(perm[:k]), np.sort(perm[k:])
    return (examples.subset(train, f"{examples.source} (held-in {n - k})"),
            examples.subset(val, f"{examples.source} (held-out {k}, seed {seed})"))


def load_hub_dataset(name: str, config: str | None = None, split: str = "train",
                     text_columns: str | Sequence[str] = "sentence", label_column: str = "label",
                     *, task_type: str = "auto", reference: TextExamples | None = None
                     ) -> TextExamples:
    """One split of a ``datasets`` dataset: a hub name, or a local folder of CSV/JSON files.

    Goes through ``datasets.load_dataset(name, config, split=split)``. A ``ClassLabel`` label
    feature gives the class names (and an all ``-1`` column means unlabeled); any other label
    column follows the same rules as :func:`read_examples`.

    Raises:
        UserError: the dataset or split cannot be loaded, a column is missing, or a label is bad
            (``name/split row i``).
    """
    cols = _text_columns(text_columns)
    try:
        import datasets
    except ImportError:
        raise UserError("reading a hub dataset needs the `datasets` package") from None
    source = "/".join(p for p in (name, config, split) if p)
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # noqa: BLE001 -- any loading failure is the user's to fix
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{source}: the dataset could not be loaded ({msg[:200]})") from None
    for c in cols:
        if c not in ds.column_names:
            raise UserError(f"{source}: no column {c!r}; the dataset has columns {ds.column_names}")
    texts = tuple(["" if t is None else str(t) for t in ds[c]] for c in cols)
    if label_column not in ds.column_names:
        if reference is None:
            raise UserError(f"{source}: no label column {label_column!r}; the dataset has columns "
                            f"{ds.column_names}")
        return _finish(texts, None, lambda i: f"{source} row {i}", source, task_type, reference,
                       label_column)
    feature = ds.features[label_column]
    values = list(ds[label_column])
    if isinstance(feature, datasets.ClassLabel):
        ids = np.asarray(values, np.int32)
        names = tuple(feature.names)
        if reference is not None and reference.label_names != names:
            raise UserError(f"{source}: class names {list(names)} differ from the training "
                            f"labels {list(reference.label_names or ())}")
        labels = None if len(ids) and (ids < 0).all() else ids
        if labels is not None and (ids < 0).any():
            raise UserError(f"{source} row {int(np.argmax(ids < 0))}: empty label in column {label_column!r}")
        return TextExamples(texts, labels, names, "classification", source)
    for i, v in enumerate(values):
        if v is None or (isinstance(v, str) and not v.strip()):
            raise UserError(f"{source} row {i}: empty label in column {label_column!r}")
    return _finish(texts, values, lambda i: f"{source} row {i}", source, task_type, reference,
                   label_column)
