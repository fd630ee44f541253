"""SQuAD v1.1 exact match and F1, with the official evaluation's answer normalisation.

An answer is normalised by lower-casing, dropping ASCII punctuation (``string.punctuation``),
replacing the words *a*, *an*, *the* by spaces and collapsing whitespace. Exact match compares
normalised strings; F1 is the harmonic mean of precision and recall of the normalised tokens
(as multisets). Each question scores its best reference answer; a question without a prediction
scores 0. Scores are percentages, as the official ``evaluate-v1.1.py`` prints them.
"""

from __future__ import annotations

import functools
import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence

from jaxpeft.tasks.squad import SquadData

_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


@functools.lru_cache(maxsize=1 << 16)   # each reference is normalised once per run, not per evaluation
def normalize_answer(text: str) -> str:
    """The answer as SQuAD v1.1 compares it (see the module doc)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """F1 of the normalised tokens of ``prediction`` against one ``reference`` (0.0 if none shared)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    shared = sum((Counter(pred) & Counter(ref)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(pred), shared / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad_scores(references: SquadData | Mapping[str, Sequence[str]],
                 predictions: Mapping[str, str]) -> dict[str, float]:
    """``{"exact_match": %, "f1": %}`` over every question of ``references``.

    Args:
        references: the questions (:class:`SquadData`) or ``{id: reference answer texts}``.
        predictions: ``{id: predicted answer text}``; a question missing here scores 0, and ids
            not among the references are ignored.

    Raises:
        ValueError: no questions, or a question without reference answers.
    """
    refs = references.references() if isinstance(references, SquadData) else references
    if not refs:
        raise ValueError("no questions to score")
    em = f1 = 0.0
    for qid, answers in refs.items():
        if not answers:
            raise ValueError(f"question {qid} has no reference answers")
        if qid not in predictions:
            continue
        pred = predictions[qid]
        em += max(exact_match(pred, a) for a in answers)
        f1 += max(token_f1(pred, a) for a in answers)
    return {"exact_match": 100.0 * em / len(refs), "f1": 100.0 * f1 / len(refs)}
