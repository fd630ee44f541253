"""Tasks: the task plug-in point (:class:`~jaxpeft.tasks.base.Task`) and the tasks by name.

Known by name: GLUE's nine tasks (:mod:`jaxpeft.tasks.glue`), ``pos`` and ``ner``
(:mod:`jaxpeft.tasks.tagging`), ``squad`` (:mod:`jaxpeft.tasks.qa`). With ``--train_file`` (or
``--dataset``) the task is your own data, of the kind ``--task_type`` says or the files show
(:mod:`jaxpeft.tasks.classification`, tagging, QA). :func:`get` builds the task a run names;
:func:`from_record` the task an adapter records.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from jaxpeft.errors import UserError
from jaxpeft.tasks.base import SequenceTask, Task

NAMED = ("pos", "ner", "squad")
#: file endings of tagging data (CoNLL columns) for ``--task_type=auto``
TAGGING_ENDINGS = (".conll", ".conllu", ".txt", ".iob", ".bio")


def known() -> list[str]:
    from jaxpeft.tasks import glue

    return [*glue.TASKS, *NAMED]


def own_kind(data: Any) -> str:
    """The kind of your own data: ``--task_type``, else what the training file looks like."""
    t = getattr(data, "task_type", "auto")
    if t in ("classification", "regression"):
        return "sequence"
    if t == "tagging":
        return "token"
    if t == "qa":
        return "span"
    path = Path(data.train_file) if getattr(data, "train_file", None) else None
    if path is None:
        return "sequence"
    if path.suffix.lower() in TAGGING_ENDINGS:
        return "token"
    if path.suffix.lower() in (".json", ".jsonl"):
        head = path.read_text(encoding="utf-8-sig", errors="replace")[:4096]
        if '"paragraphs"' in head and '"qas"' in head:
            return "span"
        if '"tokens"' in head and '"tags"' in head:
            return "token"
    return "sequence"


def get(name: str, data: Any = None, seed: int = 0) -> Task:
    """The task ``name`` for a run whose data settings are ``data`` (``data_dir``, ``train_file``, ...)."""
    from jaxpeft.tasks import classification, glue, qa, tagging

    own = data is not None and (getattr(data, "train_file", None) or getattr(data, "dataset", None))
    if own:
        kind = own_kind(data)
        if kind == "token":
            return tagging.from_files(name, data)
        if kind == "span":
            return qa.from_files(name, data)
        return classification.from_files(name, data, seed)
    if getattr(data, "task_type", "auto") != "auto":
        raise UserError(f"--task_type={data.task_type} is for your own data: give --train_file or --dataset")
    if name == "pos":
        return tagging.pos(data)
    if name == "ner":
        return tagging.ner(data)
    if name == "squad":
        return qa.squad_task(data, seed)
    try:
        return glue.task(name, getattr(data, "data_dir", None))
    except UserError:
        raise UserError(f"unknown task {name!r}; known tasks: {', '.join(known())} (or your own data: "
                        "--train_file)") from None


def from_record(record: Mapping[str, Any]) -> Task | None:
    """The task an adapter records (its files are not needed to predict), or ``None``."""
    from jaxpeft.tasks import base, qa, tagging

    kind = record.get("task_kind") or "sequence"
    if kind == "token" and record.get("label_names"):
        return tagging.from_record(record)
    if kind == "span":
        return qa.from_record(record)
    task = base.from_record(record)
    if task is not None and record.get("text_columns"):
        from jaxpeft.tasks.classification import FileClassification

        task = FileClassification(task.name, task.label_names, task.main_metric, metrics=task.metrics,
                                  num_texts=task.num_texts, text_columns=tuple(record["text_columns"]),
                                  label_column=record.get("label_column") or "label")
    return task


__all__ = ["NAMED", "SequenceTask", "Task", "from_record", "get", "known", "own_kind"]
