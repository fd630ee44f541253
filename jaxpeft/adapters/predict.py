"""Prediction with loaded adapters: inputs read for the adapter's task, outputs decoded by the task,
and one output format for one adapter or many.

Every prediction row carries ``index``, ``adapter`` and what the task predicts (a label with its
scores, one tag per word, an answer span). Sequence tasks print a TSV (``index``, ``adapter``,
``prediction``, ``probabilities`` as ``label:p`` pairs: the GLUE submission's two columns first);
tagging tasks print CoNLL columns (or a TSV); span tasks print JSON.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

import jax
import numpy as np

from jaxpeft import masks
from jaxpeft.data import batches as batching
from jaxpeft.data.encoding import Examples
from jaxpeft.errors import UserError
from jaxpeft.methods.base import Method
from jaxpeft.models.heads import head_modules
from jaxpeft.models.loading import LoadedModel, frozen_in_dtype
from jaxpeft.tasks.base import Task
from jaxpeft.training import steps

csv.field_size_limit(sys.maxsize)

#: GLUE's text columns, and the common ones of your own files, by the number of texts
DEFAULT_COLUMNS = {1: (("sentence",), ("text",), ("question",)),
                   2: (("sentence1", "sentence2"), ("#1 String", "#2 String"), ("question1", "question2"),
                       ("premise", "hypothesis"), ("question", "sentence"), ("text1", "text2"))}


def text_columns(task: Task, header: Sequence[str], recorded: Sequence[str] | None = None) -> list[int] | None:
    """Where ``task``'s texts are in ``header``: the columns it was trained on (``recorded``), else
    GLUE's and the usual names for its number of texts."""
    n = getattr(task, "num_texts", 1)
    candidates = ([tuple(recorded)] if recorded else []) + list(DEFAULT_COLUMNS.get(n, ()))
    for cand in candidates:
        if len(cand) == n and all(c in header for c in cand):
            return [header.index(c) for c in cand]
    return None


def read_table(path: str | Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """A TSV or CSV file's header and rows (with their line numbers)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"input file {path} not found" if not path.exists() else f"input {path} is not a file")
    delimiter = "," if path.suffix.lower() == ".csv" else "\t"
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter=delimiter, quotechar='"' if delimiter == "," else None)
            rows = [(reader.line_num, r) for r in reader]
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 (byte {e.start}: {e.reason})") from None
    if not rows:
        raise UserError(f"{path}: file is empty")
    return [h.strip() for h in rows[0][1]], rows[1:]


def read_sequence_input(path: str | Path, task: Task, recorded: Sequence[str] | None = None) -> Examples:
    """A TSV/CSV of ``task``'s texts (its columns by name in the header; labels optional)."""
    header, rows = read_table(path)
    cols = text_columns(task, header, recorded)
    if cols is None:
        want = list(recorded) if recorded else [list(c) for c in DEFAULT_COLUMNS.get(getattr(task, "num_texts", 1), ())]
        raise UserError(f"{path}: the header {header} lacks the text columns of task {task.name} ({want})")
    texts: tuple[list[str], ...] = tuple([] for _ in cols)
    for line, row in rows:
        if not any(c.strip() for c in row):
            continue
        if len(row) < len(header):
            raise UserError(f"{path}:{line}: malformed row, expected {len(header)} fields, got {len(row)}")
        for out, c in zip(texts, cols):
            out.append(row[c])
    if not texts[0]:
        raise UserError(f"{path}: no examples")
    return Examples(texts, None, str(path))


def examples_from_lines(lines: Iterable[str], task: Task) -> Examples:
    """One example per non-empty line; for sentence-pair tasks the two texts are tab-separated."""
    n = getattr(task, "num_texts", 1)
    texts: tuple[list[str], ...] = tuple([] for _ in range(n))
    for i, line in enumerate(lines, 1):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        parts = line.split("\t", n - 1) if n > 1 else [line]
        if len(parts) != n:
            raise UserError(f"line {i}: task {task.name} needs {n} texts separated by a tab")
        for out, t in zip(texts, parts):
            out.append(t)
    if not texts[0]:
        raise UserError("no text to predict")
    return Examples(texts, None, "<text>")


def outputs(loaded: LoadedModel, params: Any, method: Method, task: Task, raw: Any, *,
            max_seq_length: int = 128, batch_size: int = 64) -> tuple[np.ndarray, Any]:
    """The model's outputs for every row of ``raw`` (and the encoded rows)."""
    limit = getattr(loaded.config, "max_position_embeddings", None)
    if limit is not None and max_seq_length + method.extra_positions() > limit:
        raise UserError(f"max_seq_length={max_seq_length} plus {method.extra_positions()} virtual tokens "
                        f"exceeds the model's {limit} positions")
    enc = task.encode(loaded.tokenizer, raw, max_seq_length)
    heads = head_modules(loaded.family, loaded.module.head)
    trainable, frozen = masks.split(params, method.mask(params, loaded.family, heads))
    store = loaded.compute.frozen_dtype
    if store != "float32":   # the frozen base stored as --base_dtype says (default: the compute dtype)
        frozen = jax.jit(lambda f: frozen_in_dtype(f, store, loaded.family.prefix))(frozen)
    fn = jax.jit(steps.make_predict_step(loaded.module), compiler_options=loaded.compute.compiler_options())
    eval_batches = batching.BucketBatches(enc, batch_size, max_seq_length, 0).eval_batches(enc, batch_size)
    return steps.predict_outputs(fn, trainable, frozen, eval_batches, len(enc), length=enc.max_length), enc


def predict(loaded: LoadedModel, params: Any, method: Method, task: Task, raw: Any, *,
            max_seq_length: int = 128, batch_size: int = 64) -> list[dict[str, Any]]:
    """One prediction per example of ``raw`` (:meth:`Task.predictions`)."""
    out, enc = outputs(loaded, params, method, task, raw, max_seq_length=max_seq_length, batch_size=batch_size)
    return task.predictions(out, enc, raw)


# ----------------------------------------------------------------------------- output


def sequence_rows(preds: Sequence[dict[str, Any]], adapters: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """``index, adapter, prediction, probabilities`` rows (``label:p`` pairs, empty for regression)."""
    header = ["index", "adapter", "prediction", "probabilities"]
    rows = []
    for i, (p, a) in enumerate(zip(preds, adapters)):
        value = p["prediction"]
        shown = f"{value:.6g}" if isinstance(value, float) else str(value)
        scores = ",".join(f"{k}:{v:.6f}" for k, v in (p.get("scores") or {}).items())
        rows.append([str(i), a, shown, scores])
    return header, rows


def write_tsv(path: str | Path, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Writes a TSV next to ``path`` and renames it into place (an existing file is replaced only
    by a complete one)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"output {path} is a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\t".join(header) + "\n")
        for r in rows:
            f.write("\t".join(r) + "\n")
    os.replace(tmp, path)


def write_text(path: str | Path | None, text: str) -> None:
    if path is None:
        sys.stdout.write(text)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def render(preds: Sequence[dict[str, Any]], adapters: Sequence[str], kind: str, fmt: str | None = None) -> str:
    """The text of predictions of one task kind: TSV (sequence), CoNLL or TSV (token), JSON (span)."""
    if kind == "sequence":
        header, rows = sequence_rows(preds, adapters)
        return "\t".join(header) + "\n" + "".join("\t".join(r) + "\n" for r in rows)
    if kind == "token":
        if fmt == "tsv":
            lines = ["index\tadapter\ttokens\ttags"]
            lines += [f"{i}\t{a}\t{' '.join(p['tokens'])}\t{' '.join(p['tags'])}" for i, (p, a) in
                      enumerate(zip(preds, adapters))]
            return "\n".join(lines) + "\n"
        blocks = ["\n".join(f"{t}\t{g}" for t, g in zip(p["tokens"], p["tags"])) for p in preds]
        return "\n\n".join(blocks) + "\n"
    return json.dumps([{"index": i, "adapter": a, **p} for i, (p, a) in enumerate(zip(preds, adapters))],
                      indent=1) + "\n"
