"""A model-free :class:`~jaxpeft.serving.engine.Engine` for testing the server.

:class:`FakeEngine` behaves like the real engine at the interface: it validates inputs,
"tokenizes" them (whitespace words plus the special tokens a BERT row has), assigns each row the
smallest bucket that holds it, and answers deterministically -- a row's scores are a hash of its
adapter and its words, so the same row always gets the same answer, in any batch, in any process.
It records every :meth:`~FakeEngine.run` call (``calls``: the rows' adapters and lengths;
``batches``: the rows) so that tests can check how the server batched, and it can be made slow
(``delay``) or made to fail (``fail_adapter``, :meth:`~FakeEngine.fail_next`).

Adapter folders of the fake hold ``fake_adapter.json``::

    {"method": "bitfit", "task": "sequence", "labels": ["negative", "positive"], "base": "fake-base"}

(:func:`write_adapter` writes one). An adapter whose ``base`` is not the engine's is refused, as
the real engine refuses an adapter of another base model.

``jaxpeft-serve --engine=jaxpeft.serving.fake:factory`` serves it (:func:`factory`).
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from jaxpeft.errors import UserError
from jaxpeft.serving.engine import TASK_KINDS, InputError, Row, TooLarge, UnknownAdapter

FILE = "fake_adapter.json"
#: method -> family, as in jaxpeft.multi_adapter.FAMILIES (kept here to stay free of JAX)
FAMILY_OF = {"bitfit": "bitfit", "prompt": "prompt", "ptuning": "prompt", "prefix": "prefix",
             "ptuning_v2": "prefix", "lora": "lora"}


def write_adapter(directory: str | Path, *, method: str = "bitfit", task: str = "sequence",
                  labels: Sequence[str] = ("negative", "positive"), base: str = "fake-base") -> Path:
    """Writes a fake adapter folder; returns it."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / FILE).write_text(json.dumps({"method": method, "task": task, "labels": list(labels), "base": base}))
    return d


def _unit(*parts: str) -> float:
    """A deterministic number in [0, 1) from strings."""
    h = hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0 ** 64


def _softmax(names: Sequence[str], key: Sequence[str]) -> dict[str, float]:
    logits = [4.0 * _unit(*key, n) for n in names]
    top = max(logits)
    exp = [math.exp(x - top) for x in logits]
    total = sum(exp)
    return {n: e / total for n, e in zip(names, exp)}


class FakeEngine:
    """The :class:`~jaxpeft.serving.engine.Engine` protocol without a model (see the module)."""

    def __init__(self, *, max_batch: int = 8, buckets: Sequence[int] = (16, 32, 64, 128),
                 max_adapters_per_family: int = 16, base: str = "fake-base", delay: float = 0.0,
                 max_chars: int = 10_000, fail_adapter: str | None = None):
        self.max_batch = max_batch
        self.buckets = tuple(buckets)
        self.max_adapters_per_family = max_adapters_per_family
        self.base = base
        self.delay = delay                  #: seconds each run call sleeps (a slow device)
        self.max_chars = max_chars          #: longer texts are refused, whatever the truncation
        self.fail_adapter = fail_adapter    #: a run holding a row of this adapter raises
        self.calls: list[list[tuple[str, int]]] = []   #: every run call's rows: (adapter, length)
        self.batches: list[list[Row]] = []               #: every run call's rows themselves
        self._adapters: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._failures = 0

    # ------------------------------------------------------------------ adapters

    def adapters(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(a) for a in self._adapters.values()]

    def add(self, name: str, directory: str) -> dict[str, Any]:
        path = Path(directory) / FILE
        try:
            cfg = json.loads(path.read_text())
            method, task, labels, base = cfg["method"], cfg["task"], list(cfg["labels"]), cfg["base"]
        except FileNotFoundError:
            raise UserError(f"adapter {name}: {directory} holds no {FILE}") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"adapter {name}: {path} is broken ({type(e).__name__}: {e})") from None
        if base != self.base:
            raise UserError(f"adapter {name} was trained on base model {base}; this server holds {self.base}")
        family = FAMILY_OF.get(method)
        if family is None:
            raise UserError(f"adapter {name} is a {method} adapter; served families: "
                            f"{', '.join(sorted(set(FAMILY_OF.values())))}")
        if task not in TASK_KINDS or not labels or not all(isinstance(x, str) for x in labels):
            raise UserError(f"adapter {name}: task {task!r} with labels {labels!r} is not servable")
        info = {"name": name, "method": method, "task": task, "labels": labels, "family": family,
                "path": str(directory)}
        with self._lock:
            if name in self._adapters:
                raise InputError(f"adapter {name} is already loaded", status=409)
            if sum(a["family"] == family for a in self._adapters.values()) >= self.max_adapters_per_family:
                raise InputError(f"the {family} family is full ({self.max_adapters_per_family} adapters); "
                                 "remove one first", status=409)
            self._adapters[name] = info
        return dict(info)

    def remove(self, name: str) -> None:
        with self._lock:
            if self._adapters.pop(name, None) is None:
                raise UnknownAdapter(f"no adapter named {name}")

    # ------------------------------------------------------------------ rows

    def _bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def _text(self, where: str, x: Any) -> list[str]:
        if not isinstance(x, str):
            raise InputError(f"{where}: expected a string, got {type(x).__name__}")
        if len(x) > self.max_chars:
            raise TooLarge(f"{where}: {len(x)} characters, more than {self.max_chars}")
        return x.lower().split()

    def prepare(self, adapter: str, inputs: list[Any]) -> list[Row]:
        with self._lock:
            info = self._adapters.get(adapter)
        if info is None:
            raise UnknownAdapter(f"no adapter named {adapter}")
        longest, task, rows = self.buckets[-1], info["task"], []
        for i, x in enumerate(inputs):
            where = f"inputs[{i}]"
            if task == "sequence":
                parts = [x] if isinstance(x, str) else x if isinstance(x, list) and len(x) == 2 else None
                if parts is None:
                    raise InputError(f"{where}: {adapter} classifies a text or a [text, text] pair")
                words = [self._text(where, p) for p in parts]
                # truncation policy: longest first, to the longest bucket (as the tokenizer does)
                while sum(map(len, words)) + len(words) + 1 > longest:
                    max(words, key=len).pop()
                data = ("sequence", tuple(" ".join(w) for w in words))
                n = sum(map(len, words)) + len(words) + 1
            elif task == "token":
                toks = x.get("tokens") if isinstance(x, dict) and set(x) == {"tokens"} else None
                if not isinstance(toks, list) or not toks or not all(isinstance(t, str) for t in toks):
                    raise InputError(f'{where}: {adapter} tags {{"tokens": [word, ...]}}')
                self._text(where, " ".join(toks))
                data, n = ("token", tuple(toks)), len(toks) + 2
            else:
                if not (isinstance(x, dict) and set(x) == {"question", "context"}):
                    raise InputError(f'{where}: {adapter} answers {{"question": ..., "context": ...}}')
                q, c = self._text(where, x["question"]), self._text(where, x["context"])
                if not c:
                    raise InputError(f"{where}: the context is empty")
                data, n = ("span", (" ".join(q), x["context"])), len(q) + len(c) + 3
            if n > longest:   # tags and answers need every word: no truncation
                raise TooLarge(f"{where}: {n} tokens, more than the longest served ({longest}); "
                               f"{task} inputs are not truncated")
            rows.append(Row(adapter, self._bucket(n), data))
        return rows

    def fail_next(self, n: int = 1) -> None:
        """Makes the next ``n`` run calls raise."""
        with self._lock:
            self._failures += n

    def run(self, rows: list[Row]) -> list[dict[str, Any]]:
        with self._lock:
            self.calls.append([(r.adapter, r.length) for r in rows])
            self.batches.append(list(rows))
            infos = {r.adapter: self._adapters.get(r.adapter) for r in rows}
            fail, self._failures = self._failures > 0, max(0, self._failures - 1)
        if self.delay:
            time.sleep(self.delay)
        if not rows or len(rows) > self.max_batch or len({r.length for r in rows}) != 1:
            raise AssertionError(f"a batch of {len(rows)} rows of lengths {sorted({r.length for r in rows})}")
        if fail or self.fail_adapter in infos:
            raise RuntimeError("the fake device failed on this batch")
        missing = [a for a, i in infos.items() if i is None]
        if missing:
            raise AssertionError(f"rows of adapters no longer loaded: {missing}")
        return [self.result(infos[r.adapter], r) for r in rows]

    @staticmethod
    def result(info: dict[str, Any], row: Row) -> dict[str, Any]:
        """The answer for one row: a function of its adapter and its words only."""
        kind, payload = row.data
        name, labels = info["name"], info["labels"]
        if kind == "sequence":
            scores = _softmax(labels, (name, *payload))
            return {"label": max(scores, key=scores.get), "scores": scores}
        if kind == "token":
            tags = []
            for i, tok in enumerate(payload):
                scores = _softmax(labels, (name, str(i), tok))
                best = max(scores, key=scores.get)
                tags.append({"token": tok, "label": best, "score": scores[best]})
            return {"tags": tags}
        question, context = payload
        spans = [(m, m + len(w)) for m, w in _word_spans(context)]
        i = int(_unit(name, question, context, "start") * len(spans))
        j = min(len(spans) - 1, i + int(_unit(name, question, context, "len") * 3))
        start, end = spans[i][0], spans[j][1]
        return {"answer": context[start:end], "start": start, "end": end,
                "score": 0.5 + 0.5 * _unit(name, question, context, "score")}


def _word_spans(text: str) -> list[tuple[int, str]]:
    out, pos = [], 0
    for w in text.split():
        pos = text.index(w, pos)
        out.append((pos, w))
        pos += len(w)
    return out


def factory(*, model: str | None = None, compute: str | None = None, max_batch: int | None = None,
            **options: Any) -> FakeEngine:
    """The engine factory for ``jaxpeft-serve --engine=jaxpeft.serving.fake:factory``: ``--model``
    names the fake base (default ``fake-base``); ``--compute`` is ignored."""
    return FakeEngine(base=model or "fake-base", **({"max_batch": max_batch} if max_batch else {}), **options)
