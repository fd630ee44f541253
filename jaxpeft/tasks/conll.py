"""Tagging corpora (POS tagging, NER): CoNLL-U, CoNLL-2003, your own CoNLL columns or JSON, and
their metrics.

Readers return :class:`TaggedSentences`: words and one tag per word. Reading a validation or test
file with ``label_names=`` the training tag set refuses a tag outside it (``path:line``).

Tag sets (:func:`tag_names`) are sorted, as NER label lists conventionally are (and as
``run_ner.py`` sorts the labels it collects), so a tag's id does not depend on which sentence
happens to come first.

Metrics: ``pos`` is token accuracy over words (:func:`pos_accuracy`); ``ner`` is entity-level
precision / recall / F1 over the entities ``seqeval`` extracts in its default (conlleval) mode,
scored as seqeval scores them (:func:`ner_scores`); that mode reads IOB1 and IOB2 alike, so
CoNLL-2003 is scored on its own IOB1 tags (a run imports seqeval while XLA compiles:
``Tagging.warm_modules``). :func:`iob1_to_iob2` converts tags for models that expect BIO; the entities do not change.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxpeft.errors import UserError
from jaxpeft.tasks.textio import json_array_items, parse_json, read_text, split_lines

CONLL2003_COLUMNS = ("word", "pos", "chunk", "ner")
#: extension -> format for :func:`read_tagged`
TAGGED_FORMATS = {".conllu": "conllu", ".conll": "conll", ".iob": "conll", ".bio": "conll",
                  ".json": "json", ".jsonl": "jsonl"}


@dataclasses.dataclass
class TaggedSentences:
    """Sentences of words with one tag per word.

    Attributes:
        tokens: the words of each sentence.
        tags: the tags of each sentence (same lengths as ``tokens``), or ``None`` for an untagged
            file.
        source: the file read.
        lines: the line where each sentence starts (``0`` where there is none: records of a JSON
            object file).
    """

    tokens: list[list[str]]
    tags: list[list[str]] | None
    source: str
    lines: list[int]

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_words(self) -> int:
        return sum(len(s) for s in self.tokens)

    @functools.cached_property
    def entities(self) -> dict[str, set[tuple[int, int]]]:
        """The entities of ``tags`` (:func:`entity_spans`), computed once: every NER evaluation
        scores against the same gold tags. ``tags`` is not changed after reading."""
        if self.tags is None:
            raise ValueError(f"{self.source}: no tags")
        return entity_spans(self.tags)

    def where(self, i: int) -> str:
        """``source:line`` of sentence ``i`` (``source: sentence i`` when its line is unknown)."""
        line = self.lines[i] if i < len(self.lines) else 0
        return f"{self.source}:{line}" if line > 0 else f"{self.source}: sentence {i}"


class _Builder:
    """Collects sentences while a reader walks a file, checking tags against a known set."""

    def __init__(self, path: str | Path, label_names: Sequence[str] | None):
        self.path = path
        self.known = None if label_names is None else set(label_names)
        self.shown = None if label_names is None else list(label_names)[:30]
        self.tokens: list[list[str]] = []
        self.tags: list[list[str | None]] = []
        self.lines: list[int] = []
        self.words: list[str] = []
        self.labels: list[str | None] = []
        self.start = 0

    def add(self, line: int, word: str, tag: str | None) -> None:
        if tag is not None and self.known is not None and tag not in self.known:
            raise UserError(f"{self.path}:{line}: tag {tag!r} is not one of the training tags {self.shown}")
        if not self.words:
            self.start = line
        self.words.append(word)
        self.labels.append(tag)

    def end(self) -> None:
        if self.words:
            self.tokens.append(self.words)
            self.tags.append(self.labels)
            self.lines.append(self.start)
            self.words, self.labels = [], []

    def result(self, untagged_ok: bool = True) -> TaggedSentences:
        self.end()
        if not self.tokens:
            raise UserError(f"{self.path}: no sentences")
        flat = [t is None for s in self.tags for t in s]
        if all(flat) and untagged_ok:
            return TaggedSentences(self.tokens, None, str(self.path), self.lines)
        return TaggedSentences(self.tokens, self.tags, str(self.path), self.lines)  # type: ignore[arg-type]


def read_conllu(path: str | Path, tag_column: str = "upos",
                label_names: Sequence[str] | None = None) -> TaggedSentences:
    """Reads a CoNLL-U file (Universal Dependencies): syntactic words and their UPOS or XPOS tags.

    Multiword-token lines (ID ``3-4``) and empty nodes (ID ``8.1``) are skipped, as are ``#``
    comment lines; a blank line ends a sentence.

    Args:
        path: the ``.conllu`` file.
        tag_column: ``upos`` (column 4) or ``xpos`` (column 5).
        label_names: the training tag set; a tag outside it is refused.

    Raises:
        UserError: a line without the 10 tab-separated columns, a tag outside ``label_names``, no
            sentences, and what :func:`jaxpeft.tasks.textio.read_text` refuses.
    """
    col = {"upos": 3, "xpos": 4}.get(tag_column.lower())
    if col is None:
        raise UserError(f"{path}: tag column {tag_column!r} of a CoNLL-U file: use upos or xpos")
    b = _Builder(path, label_names)
    for n, line in enumerate(split_lines(read_text(path)), 1):
        if not line.strip():
            b.end()
            continue
        if line.startswith("#"):
            continue
        cells = line.split("\t")
        if len(cells) != 10:
            raise UserError(f"{path}:{n}: expected 10 tab-separated CoNLL-U columns, got {len(cells)}")
        if "-" in cells[0] or "." in cells[0]:
            continue
        b.add(n, cells[1], cells[col])
    return b.result(untagged_ok=False)


def read_conll2003(path: str | Path, tag_column: str = "ner",
                   label_names: Sequence[str] | None = None) -> TaggedSentences:
    """Reads a CoNLL-2003 file (``word POS chunk NER``, space-separated, IOB1 tags as they are).

    A line starting with ``-DOCSTART-`` is a document boundary, not a sentence; a blank line ends
    a sentence.

    Args:
        path: ``eng.train``, ``eng.testa`` or ``eng.testb`` (or a file in the same layout).
        tag_column: ``ner``, ``chunk`` or ``pos``.
        label_names: the training tag set; a tag outside it is refused.

    Raises:
        UserError: a line without the 4 columns, a tag outside ``label_names``, no sentences.
    """
    if tag_column.lower() not in CONLL2003_COLUMNS[1:]:
        raise UserError(f"{path}: CoNLL-2003 tag column {tag_column!r}: use ner, chunk or pos")
    col = CONLL2003_COLUMNS.index(tag_column.lower())
    b = _Builder(path, label_names)
    for n, line in enumerate(split_lines(read_text(path)), 1):
        if line.startswith("-DOCSTART-") or not line.strip():
            b.end()
            continue
        cells = line.split()
        if len(cells) != 4:
            raise UserError(f"{path}:{n}: expected 4 space-separated columns (word POS chunk NER), "
                            f"got {len(cells)}")
        b.add(n, cells[0], cells[col])
    return b.result(untagged_ok=False)


def read_conll(path: str | Path, label_names: Sequence[str] | None = None) -> TaggedSentences:
    """Reads your own tagging data in CoNLL column format.

    One word per line, the word in the first column and its tag in the last, columns separated by
    tabs (when the line has a tab) or else by spaces; a blank line between sentences;
    ``-DOCSTART-`` lines are boundaries. A file whose lines all have a single column is untagged
    (``tags`` is ``None``).

    Raises:
        UserError: some lines tagged and others not, a tag outside ``label_names``, no sentences.
    """
    b = _Builder(path, label_names)
    tagged: bool | None = None
    for n, line in enumerate(split_lines(read_text(path)), 1):
        if line.startswith("-DOCSTART-") or not line.strip():
            b.end()
            continue
        cells = [c.strip() for c in line.split("\t")] if "\t" in line else line.split()
        has_tag = len(cells) > 1
        if tagged is None:
            tagged = has_tag
        elif has_tag != tagged:
            raise UserError(f"{path}:{n}: " + ("a word without a tag column (earlier lines have one)"
                                               if tagged else "a tag column that earlier lines lack"))
        if not cells[0]:
            raise UserError(f"{path}:{n}: empty word in the first column")
        if has_tag and not cells[-1]:
            raise UserError(f"{path}:{n}: empty tag in the last column")
        b.add(n, cells[0], cells[-1] if has_tag else None)
    return b.result()


def read_tagged_json(path: str | Path, tokens_field: str = "tokens", tags_field: str = "tags",
                     label_names: Sequence[str] | None = None,
                     file_format: str | None = None) -> TaggedSentences:
    """Reads records ``{"tokens": [...], "tags": [...]}`` from JSON Lines (``.jsonl``) or JSON (a
    list of records, or an object with a ``data`` list).

    A file whose records all lack ``tags_field`` is untagged.

    Raises:
        UserError: a record without ``tokens_field``, tokens or tags that are not lists of
            strings, a tag list whose length differs from its tokens, an empty sentence, some
            records tagged and others not, a tag outside ``label_names``.
    """
    fmt = file_format or Path(path).suffix.lower().lstrip(".")
    text = read_text(path)
    if fmt == "jsonl":
        records = []
        for n, line in enumerate(split_lines(text), 1):
            if line.strip():
                try:
                    records.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{n}: invalid JSON ({e.msg}, column {e.colno})") from None
    elif fmt == "json":
        if text.lstrip().startswith("{"):
            obj = parse_json(text, path)
            if not isinstance(obj.get("data"), list):
                raise UserError(f"{path}: a JSON object file needs a 'data' list of records")
            records = [(0, r) for r in obj["data"]]
        else:
            records = list(json_array_items(text, path))
    else:
        raise UserError(f"{path}: tagged records must be .json or .jsonl (got {fmt!r})")
    b = _Builder(path, label_names)
    tagged: bool | None = None
    for i, (n, rec) in enumerate(records):
        where = f"{path}:{n}" if n else f"{path}: record {i}"
        if not isinstance(rec, dict) or tokens_field not in rec:
            keys = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
            raise UserError(f"{where}: no field {tokens_field!r} (the record has {keys})")
        words = _strings(rec[tokens_field], where, tokens_field)
        tags = None if rec.get(tags_field) is None else _strings(rec[tags_field], where, tags_field)
        if tagged is None:
            tagged = tags is not None
        elif tagged != (tags is not None):
            raise UserError(f"{where}: " + (f"no {tags_field!r} (earlier records have them)" if tagged
                                           else f"{tags_field!r} that earlier records lack"))
        if not words:
            raise UserError(f"{where}: empty {tokens_field!r} list")
        if tags is not None and len(tags) != len(words):
            raise UserError(f"{where}: {len(tags)} tags for {len(words)} tokens")
        for k, w in enumerate(words):
            try:
                b.add(n, w, None if tags is None else tags[k])
            except UserError as e:
                raise UserError(str(e).replace(f"{path}:{n}:", f"{where}:", 1)) from None
        b.end()
    return b.result()


def _strings(v: Any, where: str, field: str) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise UserError(f"{where}: {field!r} must be a list of strings")
    return v


def read_tagged(path: str | Path, label_names: Sequence[str] | None = None,
                file_format: str | None = None, tokens_field: str = "tokens",
                tags_field: str = "tags", tag_column: str = "upos") -> TaggedSentences:
    """Reads a tagging file, the format from its extension (:data:`TAGGED_FORMATS`) or from
    ``file_format`` (``conllu``, ``conll``, ``conll2003``, ``json``, ``jsonl``).

    Raises:
        UserError: an unknown extension or format, and whatever the chosen reader refuses.
    """
    fmt = file_format.lower() if file_format else TAGGED_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise UserError(f"{path}: cannot tell the format from the extension {Path(path).suffix!r}; use "
                        f"{', '.join(TAGGED_FORMATS)} or name one with file_format")
    if fmt == "conllu":
        return read_conllu(path, tag_column, label_names)
    if fmt == "conll":
        return read_conll(path, label_names)
    if fmt == "conll2003":
        return read_conll2003(path, "ner" if tag_column == "upos" else tag_column, label_names)
    if fmt in ("json", "jsonl"):
        return read_tagged_json(path, tokens_field, tags_field, label_names, fmt)
    raise UserError(f"{path}: unknown tagging format {file_format!r}; use conllu, conll, conll2003, "
                    f"json or jsonl")


# ----------------------------------------------------------------------------- tags and metrics


def tag_names(*splits: TaggedSentences) -> tuple[str, ...]:
    """The sorted tag set of the given (tagged) splits; give only the training split to fix ids."""
    names = {t for s in splits if s.tags is not None for sent in s.tags for t in sent}
    return tuple(sorted(names))


def iob1_to_iob2(tags: Sequence[str]) -> list[str]:
    """One sentence's IOB1 tags in IOB2 (BIO): an ``I-X`` that starts an entity (after ``O``, a
    tag of another type, or at the start) becomes ``B-X``. The entities stay the same."""
    out: list[str] = []
    prev = "O"
    for t in tags:
        if t.startswith("I-") and (prev == "O" or prev[2:] != t[2:]):
            t = "B-" + t[2:]
        out.append(t)
        prev = t
    return out


def _check_shapes(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> None:
    if len(gold) != len(pred):
        raise ValueError(f"{len(pred)} predicted sentences for {len(gold)} gold ones")
    for i, (g, p) in enumerate(zip(gold, pred)):
        if len(g) != len(p):
            raise ValueError(f"sentence {i}: {len(p)} predicted tags for {len(g)} words")


def pos_accuracy(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> float:
    """Token accuracy over all words (scikit-learn's ``accuracy_score`` on the flattened tags).

    Raises:
        ValueError: the sentence counts or a sentence's length differ.
    """
    from sklearn.metrics import accuracy_score

    _check_shapes(gold, pred)
    return float(accuracy_score([t for s in gold for t in s], [t for s in pred for t in s]))


def _seqeval() -> Any:
    try:
        from seqeval.metrics import sequence_labeling
    except ImportError:
        raise UserError("NER scores need the `seqeval` package (pip install seqeval)") from None
    return sequence_labeling


def entity_spans(tags: Sequence[Sequence[str]]) -> dict[str, set[tuple[int, int]]]:
    """``{type: {(start, end)}}``: the entities ``seqeval``'s ``get_entities`` extracts from all
    sentences (positions over the sentences joined as seqeval joins them).

    Raises:
        UserError: ``seqeval`` is not installed.
    """
    spans: dict[str, set[tuple[int, int]]] = {}
    for kind, start, end in _seqeval().get_entities([list(s) for s in tags]):
        spans.setdefault(kind, set()).add((start, end))
    return spans


def ner_scores(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]],
               gold_entities: Mapping[str, set[tuple[int, int]]] | None = None) -> dict[str, Any]:
    """Entity-level micro precision, recall and F1 (and token accuracy) in ``seqeval``'s default
    conlleval-compatible mode, with per-type scores under ``"per_type"``.

    ``seqeval``'s ``get_entities`` extracts the entities of each side once, over all sentences;
    they are counted as seqeval's ``precision_recall_fscore_support`` counts them (per type: gold
    entities, predicted ones, and predicted ones whose type, start and end match a gold one), and
    the per-type and micro-averaged scores are computed from those counts in one pass (seqeval's
    ``classification_report`` extracts and counts again for each of its averages). A score whose
    denominator is 0 is 0 (seqeval's ``zero_division=0``): precision of a type never predicted,
    recall of a type absent from gold. Token accuracy is seqeval's ``accuracy_score``. The tests
    compare every number with seqeval's own ``classification_report`` and ``*_score`` functions.

    ``gold_entities``: ``entity_spans(gold)`` where the caller has it already
    (:attr:`TaggedSentences.entities`), so that repeated evaluations extract the gold entities once.

    Returns:
        ``{"precision", "recall", "f1", "accuracy": float, "per_type": {type: {"precision",
        "recall", "f1", "support"}}}`` (fractions in [0, 1]; ``per_type`` holds every type of gold
        or predictions, sorted; ``support`` is the type's gold entities).

    Raises:
        UserError: ``seqeval`` is not installed.
        ValueError: the sentence counts or a sentence's length differ.
    """
    seqeval = _seqeval()
    _check_shapes(gold, pred)
    true = entity_spans(gold) if gold_entities is None else gold_entities
    found = entity_spans(pred)
    names = sorted(true.keys() | found.keys())
    n_true = np.array([len(true.get(k, ())) for k in names], dtype=np.int64)
    n_pred = np.array([len(found.get(k, ())) for k in names], dtype=np.int64)
    n_hit = np.array([len(true.get(k, set()) & found.get(k, set())) for k in names], dtype=np.int64)
    p, r, f = _prf(n_hit, n_pred, n_true)
    per_type = {k: {"precision": float(a), "recall": float(b), "f1": float(c), "support": int(d)}
                for k, a, b, c, d in zip(names, p, r, f, n_true)}
    (mp,), (mr,), (mf,) = _prf(*(np.array([n.sum()]) for n in (n_hit, n_pred, n_true)))
    return {"precision": float(mp), "recall": float(mr), "f1": float(mf),
            "accuracy": float(seqeval.accuracy_score([list(s) for s in gold], [list(s) for s in pred])),
            "per_type": per_type}


def _prf(hit: np.ndarray, predicted: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and F1 from entity counts, as seqeval (scikit-learn's ``_prf_divide``)
    computes them with ``zero_division=0``: 0 where the denominator is 0."""
    precision = hit / np.maximum(predicted, 1)      # hit <= predicted: 0 / 1 where nothing was predicted
    recall = hit / np.maximum(true, 1)
    denom = precision + recall
    f1 = 2.0 * precision * recall / np.where(denom == 0, 1.0, denom)
    return precision, recall, f1
