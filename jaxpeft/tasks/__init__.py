"""Tasks: the task plug-in point (:class:`~jaxpeft.tasks.base.Task`) and the tasks by name.

GLUE's nine tasks are known by name; :func:`get` builds the task a run names.
"""

from __future__ import annotations

from typing import Any

from jaxpeft.errors import UserError
from jaxpeft.tasks.base import SequenceTask, Task, from_record


def known() -> list[str]:
    from jaxpeft.tasks import glue

    return list(glue.TASKS)


def get(name: str, data: Any = None) -> Task:
    """The task ``name`` for a run whose data settings are ``data`` (``data_dir``, ...)."""
    from jaxpeft.tasks import glue

    data_dir = getattr(data, "data_dir", None)
    try:
        return glue.task(name, data_dir)
    except UserError:
        raise UserError(f"unknown task {name!r}; known tasks: {', '.join(known())}") from None


__all__ = ["SequenceTask", "Task", "from_record", "get", "known"]
