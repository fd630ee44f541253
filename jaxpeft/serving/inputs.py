"""Request inputs in, answers out, for each task kind: what the serving engine does on the host.

One input of a request becomes one row, tokenized exactly as ``jaxpeft-predict`` tokenizes that
adapter's inputs (the task's own :meth:`~jaxpeft.tasks.base.Task.encode`), and one row's outputs
become its answer through the task's own :meth:`~jaxpeft.tasks.base.Task.predictions` -- so a
served answer is the one ``jaxpeft-predict`` (:func:`jaxpeft.adapters.predict.predict`) prints for
that input, in the server's JSON shape:

========== ================================== =================================================
kind       input                              answer
========== ================================== =================================================
sequence   ``"text"`` or ``["text", "text"]`` ``{"label", "scores": {label: probability}}``;
                                              regression: ``{"value"}``
token      ``{"tokens": [word, ...]}``        ``{"tags": [{"token", "label", "score"}, ...]}``,
                                              one per word; ``score``: the tag's probability on
                                              the word's first sub-word (``null`` for a word
                                              with no sub-word, tagged as ``jaxpeft-predict`` does)
span       ``{"question", "context"}``        ``{"answer", "start", "end", "score",
                                              "probability"}``: the best span, its character
                                              offsets in the context, the task's span score
                                              (start + end logit) and n-best probability
========== ================================== =================================================

Length: a row holds at most ``limit`` tokens (the adapter's ``max_seq_length``, at most the longest
bucket). Texts are truncated to it as in training (longest first); a tagging or QA input that does
not fit is refused (:class:`~jaxpeft.serving.engine.TooLarge`, HTTP 413) -- ``jaxpeft-predict`` would
cut it into windows, and one input is one row here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jaxpeft.data.encoding import Encoded, Examples, encode
from jaxpeft.errors import UserError
from jaxpeft.serving.engine import InputError, TooLarge
from jaxpeft.tasks import conll, squad
from jaxpeft.tasks.base import Task, softmax
from jaxpeft.tasks.qa import MAX_ANSWER_LENGTH, N_BEST

#: longer strings are refused before tokenizing (HTTP 413), whatever the truncation
MAX_CHARS = 100_000


@dataclasses.dataclass
class Prepared:
    """One tokenized input: ``enc`` (one row, ``limit`` wide) and what decoding its outputs needs."""

    enc: Encoded
    raw: Any

    @property
    def length(self) -> int:
        return int(self.enc.lengths[0])


def _text(where: str, x: Any) -> str:
    if not isinstance(x, str):
        raise InputError(f"{where}: expected a string, got {type(x).__name__}")
    if len(x) > MAX_CHARS:
        raise TooLarge(f"{where}: {len(x)} characters, more than {MAX_CHARS}")
    return x


def prepare(task: Task, tokenizer: Any, x: Any, limit: int, where: str, adapter: str) -> Prepared:
    """Checks and tokenizes one input of ``adapter`` (of ``task``); raises
    :class:`~jaxpeft.serving.engine.InputError` / :class:`~jaxpeft.serving.engine.TooLarge`."""
    if task.kind == "sequence":
        n = getattr(task, "num_texts", 1)
        parts = [x] if isinstance(x, str) else x if isinstance(x, list) and len(x) == 2 else None
        if parts is None or len(parts) != n:
            want = "a [text, text] pair" if n == 2 else "one text"
            raise InputError(f"{where}: {adapter} classifies {want}")
        texts = [_text(where, p) for p in parts]
        return Prepared(encode(tokenizer, Examples(tuple([t] for t in texts), None, "request"), limit), None)
    if task.kind == "token":
        toks = x.get("tokens") if isinstance(x, dict) and set(x) == {"tokens"} else None
        if not isinstance(toks, list) or not toks or not all(isinstance(t, str) and t.strip() for t in toks):
            raise InputError(f'{where}: {adapter} tags {{"tokens": [word, ...]}} (non-empty words)')
        _text(where, " ".join(toks))
        raw = conll.TaggedSentences([list(toks)], None, "request", [0])
        enc = task.encode(tokenizer, raw, limit)
        if len(enc) != 1:
            raise TooLarge(f"{where}: {len(toks)} words are more than the {limit} tokens {adapter} takes; "
                           "tagging inputs are not truncated")
        return Prepared(enc, raw)
    if not (isinstance(x, dict) and set(x) == {"question", "context"}):
        raise InputError(f'{where}: {adapter} answers {{"question": ..., "context": ...}}')
    question, context = _text(where, x["question"]), _text(where, x["context"])
    if not context.strip() or not question.strip():
        raise InputError(f"{where}: the question and the context must not be empty")
    raw = squad.SquadData([squad.QAExample("0", question, context, (), (), 0, "")], 1, "request")
    try:
        enc = task.encode(tokenizer, raw, limit)
    except UserError:
        enc = None
    if enc is None or len(enc) != 1:
        raise TooLarge(f"{where}: the question and context are more than the {limit} tokens {adapter} takes; "
                       "QA inputs are not truncated")
    return Prepared(enc, raw)


def decode(task: Task, out: np.ndarray, row: Prepared) -> dict[str, Any]:
    """The answer for one row from its outputs (``[C]`` or ``[L, C]``, the group's padded head)."""
    if task.kind == "sequence":
        p = task.predictions(out[None, :task.num_labels], row.enc, row.raw)[0]
        if task.is_regression:
            return {"value": p["prediction"]}
        return {"label": p["prediction"], "scores": p["scores"]}
    if task.kind == "token":
        logits = out[None, :, :task.num_labels]
        p = task.predictions(logits, row.enc, row.raw)[0]
        features = row.enc.host["features"]
        probs = softmax(logits[0].astype(np.float64))
        scores: list[float | None] = [None] * len(p["tokens"])
        for c in np.flatnonzero(features.word_index[0] >= 0).tolist():
            scores[int(features.word_index[0, c])] = float(probs[c].max())
        return {"tags": [{"token": t, "label": g, "score": s} for t, g, s in zip(p["tokens"], p["tags"], scores)]}
    p = task.predictions(out[None], row.enc, row.raw)[0]
    context = row.raw.examples[0].context
    span = best_offsets(out[:, 0], out[:, 1], row.enc.host["features"].offsets[0, :out.shape[0]])
    start, end = span if span is not None and context[span[0]:span[1]] == p["answer"] else (None, None)
    return {"answer": p["answer"], "start": start, "end": end, "score": p["score"], "probability": p["probability"]}


def best_offsets(start: np.ndarray, end: np.ndarray, offsets: np.ndarray) -> tuple[int, int] | None:
    """The character offsets of the best span of one window, chosen as
    :func:`jaxpeft.tasks.squad.postprocess_predictions` chooses it (which keeps only the text)."""
    context = offsets[:, 0] >= 0
    start, end = np.where(context, start, -np.inf), np.where(context, end, -np.inf)
    prelim = []
    for s in np.argsort(start)[-1:-N_BEST - 1:-1].tolist():
        for e in np.argsort(end)[-1:-N_BEST - 1:-1].tolist():
            if offsets[s, 0] < 0 or offsets[e, 0] < 0 or e < s or e - s + 1 > MAX_ANSWER_LENGTH:
                continue
            prelim.append((start[s] + end[e], int(offsets[s, 0]), int(offsets[e, 1])))
    if not prelim:
        return None
    _, a, b = sorted(prelim, key=lambda p: p[0], reverse=True)[0]
    return a, b
