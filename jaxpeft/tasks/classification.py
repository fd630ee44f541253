"""Your own classification or regression data: CSV, TSV, JSON or JSON Lines files, or a ``datasets``
dataset (a hub name or a local folder), read by :mod:`jaxpeft.tasks.files`.

    jaxpeft-train --method=lora --task=tickets --train_file=tickets.csv --text_columns=body \\
        --label_column=team

The text column (or two, for pairs) and the label column are named by flags, as transformers'
``run_glue.py`` takes them. Classification (two or more classes, their names sorted) or regression
is inferred from the training labels, or set with ``--task_type``. Without a validation file a
seeded ``--validation_fraction`` of the training file is held out (the run says so). The label
names and the text columns go into the adapter, so ``jaxpeft-predict`` prints names and reads
the same columns.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from jaxpeft.errors import UserError
from jaxpeft.tasks import files
from jaxpeft.tasks.base import SequenceTask

DEFAULT_TEXT_COLUMNS = ("text", "sentence", "sentence1,sentence2")


@dataclasses.dataclass(frozen=True)
class FileClassification(SequenceTask):
    """A sequence task on your own files (see the module docstring). Build it with :func:`from_files`."""

    text_columns: tuple[str, ...] = ("text",)
    label_column: str = "label"
    splits: dict = dataclasses.field(default_factory=dict, hash=False, compare=False)
    note: str = ""

    def read(self, split: str) -> files.TextExamples:
        if split not in self.splits:
            raise UserError(f"task {self.name}: no {split} split (give --{'validation' if split == 'dev' else split}_file)")
        return self.splits[split]

    @staticmethod
    def take(raw: files.TextExamples, n: int) -> files.TextExamples:
        return raw.subset(np.arange(min(n, len(raw))))

    def read_input(self, path: str | Path, recorded: Any = None) -> files.TextExamples:
        return read_input_file(path, self)

    def record(self) -> dict[str, Any]:
        return {**super().record(), "text_columns": list(self.text_columns), "label_column": self.label_column}


def read_input_file(path: str | Path, task: SequenceTask) -> files.TextExamples:
    """A file to predict with a trained adapter: its text columns, labels if there are any."""
    ref = files.TextExamples(([],) * max(1, task.num_texts), None, task.label_names,
                             "regression" if task.is_regression else "classification", "<training labels>")
    cols = getattr(task, "text_columns", None) or ("text",)
    return files.read_examples(path, cols, getattr(task, "label_column", "label"), reference=ref)


def _columns(text_columns: str | None, header_hint: list[str] | None) -> tuple[str, ...]:
    if text_columns:
        cols = tuple(c.strip() for c in text_columns.split(",") if c.strip())
        if not 1 <= len(cols) <= 2:
            raise UserError(f"--text_columns={text_columns}: one column, or two for sentence pairs")
        return cols
    for cand in DEFAULT_TEXT_COLUMNS:
        cols = tuple(cand.split(","))
        if header_hint is None or all(c in header_hint for c in cols):
            return cols
    raise UserError(f"no --text_columns given and none of {', '.join(DEFAULT_TEXT_COLUMNS)} is a column "
                    f"(columns: {header_hint})")


def from_files(name: str, data: Any, seed: int = 0, echo=None) -> FileClassification:
    """The task of ``data``'s ``--train_file`` (``--validation_file``, ``--test_file``) or ``--dataset``."""
    kind = data.task_type if data.task_type in ("classification", "regression") else "auto"
    note = ""
    if data.dataset:
        ds, _, cfg = data.dataset.partition(":")
        cols = _columns(data.text_columns, None)
        train = files.load_hub_dataset(ds, cfg or None, "train", cols, data.label_column, task_type=kind)
        try:
            dev = files.load_hub_dataset(ds, cfg or None, "validation", cols, data.label_column, reference=train)
        except UserError:
            train, dev = files.holdout(train, data.validation_fraction, seed)
            note = f"no validation split in {data.dataset}: {len(dev)} training examples held out (seed {seed})"
    else:
        header, _ = files.read_records(data.train_file)
        cols = _columns(data.text_columns, header)
        train = files.read_examples(data.train_file, cols, data.label_column, task_type=kind)
        if data.validation_file:
            dev = files.read_examples(data.validation_file, cols, data.label_column, reference=train)
        else:
            train, dev = files.holdout(train, data.validation_fraction, seed)
            note = (f"no --validation_file: {len(dev)} of the {len(train) + len(dev)} training examples held out "
                    f"for validation (--validation_fraction={data.validation_fraction}, seed {seed})")
    splits = {"train": train, "dev": dev}
    if getattr(data, "test_file", None):
        splits["test"] = files.read_examples(data.test_file, cols, data.label_column, reference=train)
    regression = train.is_regression
    metrics = ("pearson", "spearman") if regression else ("accuracy", "macro_f1")
    return FileClassification(name, None if regression else train.label_names, metrics[0], ("dev",),
                              metrics=metrics, num_texts=len(cols), text_columns=cols,
                              label_column=data.label_column, splits=splits, note=note)
