"""Extractive question answering on SQuAD v1.1: reading, windowed features, answer decoding.

Features follow transformers' ``examples/pytorch/question-answering/run_qa.py``: the question
(left-stripped) first and the context second, ``truncation="only_second"``, windows of
``max_length`` tokens overlapping by ``doc_stride`` tokens, padded to ``max_length``. Training
windows are labelled with the token positions of the first answer, or with the [CLS] index when
the answer is not wholly inside the window. :func:`postprocess_predictions` picks answers as
``utils_qa.postprocess_qa_predictions`` does (SQuAD v1, no null answer); EM / F1 are in
:mod:`jaxpeft.tasks.squad_metric`.

The offline copy holds only the dev set: :func:`split_by_article` turns it into a training and an
evaluation part with no article on both sides, unless ``train-v1.1.json(.gz)`` lies beside it
(:func:`train_and_eval`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from jaxpeft.errors import UserError
from jaxpeft.tasks.textio import parse_json, read_text
from jaxpeft.tasks.token_align import backend_tokenizer, pad_token_id

TRAIN_FILES = ("train-v1.1.json", "train-v1.1.json.gz")


@dataclasses.dataclass(frozen=True)
class QAExample:
    """One question with its context and reference answers (all kept; training uses the first)."""

    id: str
    question: str
    context: str
    answers: tuple[str, ...]
    answer_starts: tuple[int, ...]
    article: int   # index of the article in its file
    title: str


@dataclasses.dataclass
class SquadData:
    """The questions of a SQuAD file, in file order, and how many articles they come from."""

    examples: list[QAExample]
    num_articles: int
    source: str

    def __len__(self) -> int:
        return len(self.examples)

    def references(self) -> dict[str, list[str]]:
        """``{question id: reference answer texts}``."""
        return {e.id: list(e.answers) for e in self.examples}


def read_squad(path: str | Path, require_answers: bool = True) -> SquadData:
    """Reads a SQuAD v1.1 file (``.json`` or ``.json.gz``).

    Every answer is checked: its ``text`` must equal ``context[answer_start:answer_start +
    len(text)]`` (character offsets after JSON decoding). ``require_answers=False`` (questions to
    answer) takes questions without answers too.

    Raises:
        UserError: not SQuAD's layout, a question without answers, a duplicate id, or an answer
            that is not at its ``answer_start`` (naming the file and the question id).
    """
    text = read_text(path)
    obj = parse_json(text, path)
    if not isinstance(obj, dict) or not isinstance(obj.get("data"), list):
        raise UserError(f"{path}: not a SQuAD file (expected an object with a 'data' list of articles)")
    examples: list[QAExample] = []
    seen: set[str] = set()
    try:
        for a, article in enumerate(obj["data"]):
            title = str(article.get("title", ""))
            for paragraph in article["paragraphs"]:
                context = paragraph["context"]
                for qa in paragraph["qas"]:
                    qid = str(qa["id"])
                    if qid in seen:
                        raise UserError(f"{path}: question {qid}: duplicate id")
                    seen.add(qid)
                    answers = qa.get("answers") or []
                    if not answers and require_answers:
                        raise UserError(f"{path}: question {qid}: no answers (unanswerable questions "
                                        f"of SQuAD v2 are not supported)")
                    for ans in answers:
                        s, t = ans["answer_start"], ans["text"]
                        if not isinstance(s, int) or context[s:s + len(t)] != t:
                            found = context[s:s + len(t)] if isinstance(s, int) else None
                            raise UserError(f"{path}: question {qid}: answer {t!r} is not at "
                                            f"answer_start {s} of its context (found {found!r})")
                    examples.append(QAExample(qid, qa["question"], context,
                                              tuple(x["text"] for x in answers),
                                              tuple(x["answer_start"] for x in answers), a, title))
    except (KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{path}: not in SQuAD's layout ({type(e).__name__}: {e}) near question "
                        f"{len(examples)}") from None
    if not examples:
        raise UserError(f"{path}: no questions")
    return SquadData(examples, len(obj["data"]), str(path))


def split_by_article(data: SquadData, n_train_articles: int = 38) -> tuple[SquadData, SquadData]:
    """``(train, eval)``: the questions of the first ``n_train_articles`` articles, and the rest.

    No article is on both sides, so no context is seen in training and scored in evaluation. On
    the official ``dev-v1.1.json`` (48 articles, 10,570 questions) the default split gives 38
    articles / 8,582 questions for training and 10 articles / 1,988 questions for evaluation.

    Raises:
        UserError: ``n_train_articles`` leaves one side empty.
    """
    if not 0 < n_train_articles < data.num_articles:
        raise UserError(f"{data.source}: n_train_articles={n_train_articles} must be between 1 and "
                        f"{data.num_articles - 1} (the file has {data.num_articles} articles)")
    train = [e for e in data.examples if e.article < n_train_articles]
    evals = [e for e in data.examples if e.article >= n_train_articles]
    return (SquadData(train, n_train_articles, f"{data.source} (articles 0-{n_train_articles - 1})"),
            SquadData(evals, data.num_articles - n_train_articles,
                      f"{data.source} (articles {n_train_articles}-{data.num_articles - 1})"))


def find_train_file(dev_path: str | Path) -> Path | None:
    """``train-v1.1.json`` or ``train-v1.1.json.gz`` beside ``dev_path``, if there is one."""
    for name in TRAIN_FILES:
        p = Path(dev_path).parent / name
        if p.is_file():
            return p
    return None


def train_and_eval(dev_path: str | Path, n_train_articles: int = 38) -> tuple[SquadData, SquadData, str]:
    """The training and evaluation questions, and a line saying where they come from.

    With a train file beside ``dev_path`` (:func:`find_train_file`): that file and the whole dev
    set. Otherwise the dev set split by article (:func:`split_by_article`); the caller should
    report that, since the scores are then not comparable with published dev-set numbers.
    """
    dev = read_squad(dev_path)
    train_path = find_train_file(dev_path)
    if train_path is not None:
        return read_squad(train_path), dev, f"train {train_path}, evaluation {dev_path}"
    train, evals = split_by_article(dev, n_train_articles)
    return train, evals, (f"no train file beside {dev_path}: its first {n_train_articles} articles "
                          f"({len(train)} questions) train, the last {evals.num_articles} "
                          f"({len(evals)} questions) evaluate")


# ----------------------------------------------------------------------------- features


@dataclasses.dataclass
class QAFeatures:
    """Windows of (question, context) pairs.

    Attributes:
        input_ids, token_type_ids: ``[N, L]`` int32, right-padded.
        lengths: ``[N]`` int32 real token counts.
        example_index: ``[N]`` int32, the question (index in the :class:`SquadData`) of each window.
        offsets: ``[N, L, 2]`` int32 character span in the context of each context token, -1
            for question, special and padding tokens.
        start_positions, end_positions: ``[N]`` int32 token positions of the first answer, or
            the [CLS] index where it is not wholly inside the window.
    """

    input_ids: np.ndarray
    token_type_ids: np.ndarray
    lengths: np.ndarray
    example_index: np.ndarray
    offsets: np.ndarray
    start_positions: np.ndarray
    end_positions: np.ndarray

    def __len__(self) -> int:
        return len(self.lengths)


def prepare_features(tokenizer: Any, data: SquadData, max_length: int = 384,
                     doc_stride: int = 128) -> QAFeatures:
    """Tokenizes every question with its context into windows, labelled and with offsets.

    ``prepare_train_features`` and ``prepare_validation_features`` of ``run_qa.py`` in one: the
    same windows, ``start/end_positions`` from the first answer, and ``offsets`` of context
    tokens only. One deliberate difference: a start position is searched only among the window's
    context tokens (when the answer starts in the last context token, ``run_qa.py`` walks on
    through [SEP] and padding, whose offsets are (0, 0), and labels a start after the end, the
    window's last position; no window of the dev set at 384/128 or 256/64 meets that case).

    With the bundled MiniLM (BERT uncased) tokenizer, the 10,570 dev questions give 10,784
    windows at 384/128 (8,792 for the 38 training articles, 1,992 for the other 10).

    Args:
        tokenizer: a fast tokenizer (see :func:`jaxpeft.tasks.token_align.backend_tokenizer`).
        data: the questions.
        max_length: tokens per window (run_qa's ``max_seq_length``).
        doc_stride: tokens of context shared by consecutive windows.

    Raises:
        UserError: a question too long to leave more than ``doc_stride`` context tokens in a
            window of a context that needs several windows.
    """
    backend = backend_tokenizer(tokenizer)
    pad = pad_token_id(tokenizer, backend)
    cls_id = backend.token_to_id("[CLS]")
    if cls_id is None:
        cls_id = backend.token_to_id("<s>")
    special = backend.num_special_tokens_to_add(True)
    questions = [e.question.lstrip() for e in data.examples]
    q_lens = [len(e.ids) for e in backend.encode_batch(questions, add_special_tokens=False)]
    for i, n in enumerate(q_lens):
        if max_length - special - n <= doc_stride:
            ex = data.examples[i]
            whole = len(backend.encode(questions[i], ex.context).ids)
            if whole > max_length:
                raise UserError(f"{data.source}: question {ex.id}: the question is {n} tokens, leaving "
                                f"{max_length - special - n} context tokens per window, not more than "
                                f"doc_stride {doc_stride}; raise max_length or lower doc_stride")
    backend.enable_truncation(max_length, stride=doc_stride, strategy="only_second")
    encs = backend.encode_batch([(q, e.context) for q, e in zip(questions, data.examples)],
                                add_special_tokens=True)
    windows = [(i, w) for i, enc in enumerate(encs) for w in [enc] + list(enc.overflowing)]
    n = len(windows)
    ids = np.full((n, max_length), pad, np.int32)
    types = np.zeros((n, max_length), np.int32)
    lengths = np.zeros(n, np.int32)
    example = np.zeros(n, np.int32)
    offsets = np.full((n, max_length, 2), -1, np.int32)
    starts = np.zeros(n, np.int32)
    ends = np.zeros(n, np.int32)
    for r, (i, w) in enumerate(windows):
        row_ids, offs = w.ids, w.offsets   # each attribute access builds a new list
        m = len(row_ids)
        ids[r, :m], types[r, :m], lengths[r], example[r] = row_ids, w.type_ids, m, i
        ctx = [k for k, s in enumerate(w.sequence_ids) if s == 1]
        offsets[r, ctx] = [offs[k] for k in ctx]
        cls = row_ids.index(cls_id) if cls_id in row_ids else 0
        starts[r] = ends[r] = cls
        ex = data.examples[i]
        if not ex.answers or not ctx:
            continue
        start_char = ex.answer_starts[0]
        end_char = start_char + len(ex.answers[0])
        first, last = ctx[0], ctx[-1]
        if not (offs[first][0] <= start_char and offs[last][1] >= end_char):
            continue
        s = first
        while s <= last and offs[s][0] <= start_char:
            s += 1
        e = last
        while offs[e][1] >= end_char:
            e -= 1
        starts[r], ends[r] = s - 1, e + 1
    return QAFeatures(ids, types, lengths, example, offsets, starts, ends)


# ----------------------------------------------------------------------------- answers


def postprocess_predictions(data: SquadData, features: QAFeatures, start_logits: np.ndarray,
                            end_logits: np.ndarray, n_best_size: int = 20, max_answer_length: int = 30
                            ) -> tuple[dict[str, str], dict[str, list[dict[str, Any]]]]:
    """Answer texts from per-token start and end logits, as ``postprocess_qa_predictions``.

    For each question, over all its windows: the ``n_best_size`` best start and end positions
    among the window's context tokens (``postprocess_qa_predictions`` ranks every position, so
    padding and question tokens can crowd out the context, and the answer then depends on how
    far a window is padded -- here, on the other rows of its batch); spans ending before they
    start or longer than ``max_answer_length`` tokens are skipped; a span scores
    ``start_logit + end_logit`` and reads ``context[offsets[start][0]:offsets[end][1]]``. The n
    best spans get softmax probabilities. Like the original, a question with no valid span gets
    the text ``"empty"``.

    Args:
        data: the questions the features were made from.
        features: :func:`prepare_features` of ``data``.
        start_logits, end_logits: ``[N, W]`` per window, ``W <= L`` (positions past ``W`` are
            never chosen).

    Returns:
        ``({id: answer text}, {id: n-best list of {"text", "start_logit", "end_logit", "score",
        "probability"}, best first})``.
    """
    start_logits, end_logits = np.asarray(start_logits), np.asarray(end_logits)
    if start_logits.shape != end_logits.shape or start_logits.shape[0] != len(features):
        raise ValueError(f"logits of shapes {start_logits.shape} / {end_logits.shape} for "
                         f"{len(features)} windows")
    # every window at once: its n best context starts and ends ([N, n], best first), and the
    # [N, n, n] grid of their spans, in the order a loop over starts then ends would visit them
    width = start_logits.shape[1]
    off = features.offsets[:, :width]
    context = off[..., 0] >= 0
    sl, el = np.where(context, start_logits, -np.inf), np.where(context, end_logits, -np.inf)
    top_s = np.argsort(sl, axis=1)[:, ::-1][:, :n_best_size]
    top_e = np.argsort(el, axis=1)[:, ::-1][:, :n_best_size]
    s_ok = np.take_along_axis(context, top_s, 1)
    e_ok = np.take_along_axis(context, top_e, 1)
    length = top_e[:, None, :] - top_s[:, :, None] + 1
    valid = s_ok[:, :, None] & e_ok[:, None, :] & (length >= 1) & (length <= max_answer_length)
    s_logit = np.take_along_axis(sl, top_s, 1)
    e_logit = np.take_along_axis(el, top_e, 1)
    row, si, ei = np.nonzero(valid)                   # the valid spans, in visiting order
    start_logit, end_logit = s_logit[row, si], e_logit[row, ei]
    score = start_logit + end_logit
    start_tok, end_tok = top_s[row, si], top_e[row, ei]
    example = features.example_index[row]
    # per question (its windows in order), best score first; ties keep the visiting order
    order = np.lexsort((np.arange(len(score)), -score, example))
    example = example[order]
    first = np.searchsorted(example, np.arange(len(data.examples)))
    last = np.searchsorted(example, np.arange(len(data.examples)), side="right")
    answers: dict[str, str] = {}
    nbest: dict[str, list[dict[str, Any]]] = {}
    for i, ex in enumerate(data.examples):
        keep = order[first[i]:min(last[i], first[i] + n_best_size)]
        best = [{"text": ex.context[a:b], "start_logit": sv, "end_logit": ev, "score": cv}
                for a, b, sv, ev, cv in zip(off[row[keep], start_tok[keep], 0].tolist(),
                                            off[row[keep], end_tok[keep], 1].tolist(),
                                            start_logit[keep].tolist(), end_logit[keep].tolist(),
                                            score[keep].tolist())]
        if not best or (len(best) == 1 and best[0]["text"] == ""):
            best.insert(0, {"text": "empty", "start_logit": 0.0, "end_logit": 0.0, "score": 0.0})
        scores = np.array([p["score"] for p in best], np.float64)
        probs = np.exp(scores - scores.max())
        probs /= probs.sum()
        for p, q in zip(best, probs.tolist()):
            p["probability"] = q
        nbest[ex.id] = best
        answers[ex.id] = best[0]["text"]
    return answers, nbest
