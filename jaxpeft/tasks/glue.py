"""GLUE: the nine tasks, read from a local folder in the classic layout or from the Hugging Face hub.

A local folder in the classic ``download_glue_data.py`` layout (``SST-2/train.tsv``, ...) is used when
given with ``data_dir`` or the ``GLUE_DIR`` environment variable; otherwise the ``nyu-mll/glue``
dataset is loaded through ``datasets``.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import sys
from pathlib import Path

import numpy as np

from jaxpeft.data.encoding import Examples
from jaxpeft.errors import UserError
from jaxpeft.tasks.base import SequenceTask
from jaxpeft.tasks.metrics import TASK_METRICS

csv.field_size_limit(sys.maxsize)

@dataclasses.dataclass(frozen=True)
class GlueTask:
    """Where one GLUE task's examples are: its folder and columns, in the TSV files and on the hub."""

    name: str
    folder: str                        # folder of the classic TSV layout
    hub_texts: tuple[str, ...]         # text columns in the hub dataset
    tsv_texts: tuple[str, ...]         # text columns in the TSV header (or indices when no header)
    tsv_label: str                     # label column in the TSV header (or index)
    file_labels: tuple[str, ...] | None  # the label values in the files, in label-id order; None: regression
    main_metric: str
    eval_splits: tuple[str, ...] = ("dev",)
    tsv_header: bool = True            # CoLA's train/dev files have none (their test file has one)
    headed_texts: tuple[str, ...] = ()  # text columns of a headed file when tsv_texts are indices
    names: tuple[str, ...] | None = None  # the classes' names (the hub's); default: file_labels

    @property
    def label_names(self) -> tuple[str, ...] | None:
        return self.names or self.file_labels

    @property
    def num_labels(self) -> int:
        return 1 if self.file_labels is None else len(self.file_labels)

    @property
    def is_regression(self) -> bool:
        return self.file_labels is None

TASKS: dict[str, GlueTask] = {t.name: t for t in [
    GlueTask("sst2", "SST-2", ("sentence",), ("sentence",), "label", ("0", "1"), "accuracy",
             names=("negative", "positive")),
    GlueTask("cola", "CoLA", ("sentence",), ("3",), "1", ("0", "1"), "matthews_correlation",
             tsv_header=False, headed_texts=("sentence",), names=("unacceptable", "acceptable")),
    GlueTask("mrpc", "MRPC", ("sentence1", "sentence2"), ("#1 String", "#2 String"), "Quality",
             ("0", "1"), "f1", names=("not_equivalent", "equivalent")),
    GlueTask("stsb", "STS-B", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "score", None,
             "pearson"),
    GlueTask("qqp", "QQP", ("question1", "question2"), ("question1", "question2"), "is_duplicate",
             ("0", "1"), "f1", names=("not_duplicate", "duplicate")),
    GlueTask("mnli", "MNLI", ("premise", "hypothesis"), ("sentence1", "sentence2"), "gold_label",
             ("entailment", "neutral", "contradiction"), "accuracy",
             eval_splits=("dev_matched", "dev_mismatched")),
    GlueTask("qnli", "QNLI", ("question", "sentence"), ("question", "sentence"), "label",
             ("entailment", "not_entailment"), "accuracy"),
    GlueTask("rte", "RTE", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label",
             ("entailment", "not_entailment"), "accuracy"),
    GlueTask("wnli", "WNLI", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label",
             ("0", "1"), "accuracy", names=("not_entailment", "entailment")),
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
    if raw in task.file_labels:
        return task.file_labels.index(raw)
    raise UserError(f"{where}: label {raw!r} is not one of {list(task.file_labels)}")

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


@dataclasses.dataclass(frozen=True)
class Glue(SequenceTask):
    """A GLUE task as a run reads it: from ``data_dir`` (or ``$GLUE_DIR``), else the hub."""

    spec: GlueTask | None = None
    data_dir: str | None = None

    def read(self, split: str) -> Examples:
        return load_split(self.spec, split, self.data_dir)

    def read_input(self, path: str | Path, recorded: object = None) -> Examples:
        """A file to predict: the task's TSV layout (labels optional)."""
        return read_tsv(self.spec, Path(path))


def task(name: str, data_dir: str | None = None) -> Glue:
    """The GLUE task ``name`` (one line naming the known ones otherwise)."""
    spec = get_task(name)
    return Glue(spec.name, spec.label_names, spec.main_metric, spec.eval_splits, metrics=TASK_METRICS[spec.name],
                num_texts=len(spec.hub_texts), spec=spec, data_dir=data_dir)
