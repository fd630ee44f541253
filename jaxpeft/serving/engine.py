"""The engine interface: what the HTTP server (:mod:`jaxpeft.serving.app`) needs from a model.

The server knows nothing of JAX, tokenizers or adapter files. It talks to an *engine*, an object
holding one frozen base model and the adapters loaded on it, through the :class:`Engine`
protocol below. The real engine, :class:`jaxpeft.serving.jax_engine.JaxEngine`, runs the
mixed-adapter forward of :mod:`jaxpeft.adapters.mixed`; :class:`jaxpeft.serving.fake.FakeEngine`
implements the same protocol without a model, for the tests.

The split of work:

* :meth:`Engine.prepare` checks and tokenizes one request's inputs into :class:`Row` s (one row
  per input, in order). It raises :class:`InputError` for anything the client got wrong, and the
  server answers that with a 4xx status and the message;
* :meth:`Engine.run` predicts one *mixed batch*: rows of any adapters (of the families loaded),
  all of one bucket length (``row.length``), at most :attr:`Engine.max_batch` of them. It returns
  one JSON-able result per row, in order. An exception fails that batch only;
* :meth:`Engine.add` / :meth:`Engine.remove` load and unload an adapter while serving. Capacity
  is declared up front (:attr:`Engine.max_adapters_per_family`, :attr:`Engine.buckets`,
  :attr:`Engine.max_batch`) so that the device programs are compiled for fixed shapes and adding
  an adapter never recompiles.

Threads: the server calls ``run``, ``add`` and ``remove`` from one *device thread*, one call at
a time, so the engine never sees two of them at once and needs no lock around its device state.
``prepare`` and ``adapters`` are called from one other thread (the *prepare thread*: tokenizers
are not safe to share between threads), possibly while the device thread is in ``run``, ``add``
or ``remove``; the engine keeps its table of adapters consistent for that reader (a lock, or a
dict replaced rather than mutated). The server never sends ``run`` a row of an adapter that is
being removed: ``remove`` is called only once every accepted row of that adapter is answered.

Results (the server passes them through unchanged as ``outputs``):

* ``sequence`` adapters (classification): ``{"label": NAME, "scores": {NAME: probability, ...}}``;
  regression: ``{"value": NUMBER}``;
* ``token`` adapters (tagging): ``{"tags": [{"token": WORD, "label": NAME, "score": p}, ...]}``,
  one entry per input word;
* ``span`` adapters (extractive QA): ``{"answer": TEXT, "start": CHAR, "end": CHAR, "score": s}``
  with character offsets into the context (the JAX engine's ``score`` is the span's start + end
  logit, as ``jaxpeft-predict`` prints it, and it adds the span's n-best ``probability``).

An engine may add fields to an adapter's :meth:`Engine.adapters` entry and to its results.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, Sequence, runtime_checkable

from jaxpeft.errors import UserError

#: the task kinds an adapter may have (its ``task`` in :meth:`Engine.adapters`)
TASK_KINDS = ("sequence", "token", "span")


class InputError(UserError):
    """A request the engine refuses because of its input: answered with HTTP ``status`` (4xx) and
    the message as ``{"error": message}``. The message is one line."""

    status = 400

    def __init__(self, message: str, status: int | None = None):
        super().__init__(" ".join(str(message).split()))
        if status is not None:
            self.status = status


class UnknownAdapter(InputError):
    """A request names no loaded adapter (HTTP 404)."""

    status = 404


class TooLarge(InputError):
    """Too many inputs in one request, or an input longer than the engine serves (HTTP 413)."""

    status = 413


@dataclasses.dataclass
class Row:
    """One input of one request, ready for the device.

    ``length`` is its bucket: one of :attr:`Engine.buckets`, the padded length the row is
    computed at (the rows of one :meth:`Engine.run` call share it). ``data`` is whatever the
    engine needs (token ids, offsets for spans, ...); the server never reads it.
    """

    adapter: str
    length: int
    data: Any = None


@runtime_checkable
class Engine(Protocol):
    """A frozen base model with adapters loaded on it, predicting mixed batches.

    See the module docstring for the threads each method is called from.
    """

    #: the most rows one :meth:`run` call takes (the compiled batch size)
    max_batch: int
    #: the padded sequence lengths rows are computed at, ascending
    buckets: Sequence[int]
    #: how many adapters of one family the device state has room for
    max_adapters_per_family: int

    def adapters(self) -> list[dict[str, Any]]:
        """The loaded adapters: ``{"name", "method", "task"`` (one of :data:`TASK_KINDS`),
        ``"labels"`` (label names), ``"family"}`` each, and anything else worth showing."""
        ...

    def add(self, name: str, directory: str) -> dict[str, Any]:
        """Loads the adapter in ``directory`` under ``name``; returns its :meth:`adapters` entry.

        Raises :class:`~jaxpeft.errors.UserError` (one line) for a folder that is missing or
        broken, an adapter of another base model or of a family this engine does not serve, or
        a family already at :attr:`max_adapters_per_family`; the loaded adapters are unchanged
        and keep serving."""
        ...

    def remove(self, name: str) -> None:
        """Unloads adapter ``name`` (:class:`UnknownAdapter` if there is none); its slot is free
        for a later :meth:`add`."""
        ...

    def prepare(self, adapter: str, inputs: list[Any]) -> list[Row]:
        """Checks and tokenizes one request's ``inputs`` for ``adapter``: one :class:`Row` per
        input, in order. An input is a text or a ``[text, text]`` pair (``sequence`` adapters),
        ``{"tokens": [word, ...]}`` (``token``), ``{"question": ..., "context": ...}`` (``span``).

        Raises :class:`UnknownAdapter`, :class:`TooLarge` (too many inputs, or an input longer
        than the truncation policy allows) or :class:`InputError` (a wrong shape)."""
        ...

    def run(self, rows: list[Row]) -> list[dict[str, Any]]:
        """Predicts ``rows`` (at most :attr:`max_batch`, of any loaded adapters, all of one
        ``length``) in one device call; one JSON-able result per row, in order. Blocking."""
        ...


def check_engine(engine: Any) -> None:
    """Raises ``TypeError`` / ``ValueError`` unless ``engine`` has the :class:`Engine` members
    with sane values (a positive ``max_batch``, ascending positive ``buckets``)."""
    if not isinstance(engine, Engine):
        missing = [m for m in ("max_batch", "buckets", "max_adapters_per_family", "adapters", "add",
                               "remove", "prepare", "run") if not hasattr(engine, m)]
        raise TypeError(f"{type(engine).__name__} is not an engine: it lacks {', '.join(missing)}")
    if not isinstance(engine.max_batch, int) or engine.max_batch < 1:
        raise ValueError(f"engine.max_batch={engine.max_batch!r}: must be a positive int")
    buckets = list(engine.buckets)
    if not buckets or any(not isinstance(b, int) or b < 1 for b in buckets) or buckets != sorted(set(buckets)):
        raise ValueError(f"engine.buckets={engine.buckets!r}: must be ascending positive ints")
    if not isinstance(engine.max_adapters_per_family, int) or engine.max_adapters_per_family < 1:
        raise ValueError(f"engine.max_adapters_per_family={engine.max_adapters_per_family!r}: must be a positive int")
