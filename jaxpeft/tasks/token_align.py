"""Words to sub-words and back, for token classification.

:func:`encode_tagged` encodes pre-split words with a fast tokenizer into fixed-length arrays. The
first sub-word of each word carries the word's tag id; every other position (later sub-words,
special tokens, padding) is :data:`IGNORE` (-100), as ``run_ner.py`` labels with
``label_all_tokens=False``.

A sentence whose sub-words do not fit ``max_length`` (with the special tokens) is cut into windows
of whole words: a window never cuts a word, consecutive windows overlap by up to ``stride`` words,
and each word is scored in exactly one window (the overlap is split at its middle, so a scored
word has context on both sides). :func:`decode` maps per-position predictions back to one tag per
word of each original sentence.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxpeft.errors import UserError
from jaxpeft.tasks.conll import TaggedSentences

#: the label of positions that are not scored (as PyTorch's cross-entropy ``ignore_index``)
IGNORE = -100


@dataclasses.dataclass
class TokenFeatures:
    """Encoded windows of tagged sentences.

    Attributes:
        input_ids: ``[N, L]`` int32, right-padded with the pad id.
        token_type_ids: ``[N, L]`` int32.
        lengths: ``[N]`` int32 real token counts.
        labels: ``[N, L]`` int32 tag ids on scored positions, :data:`IGNORE` elsewhere; ``None``
            for untagged sentences.
        example_index: ``[N]`` int32, the sentence each window comes from.
        word_index: ``[N, L]`` int32, the word (index in its sentence) a scored position stands
            for, -1 elsewhere. Each word with at least one sub-word is scored exactly once.
        word_spans: ``[N, 2]`` int32, the words ``[start, end)`` each window holds.
        num_words: ``[S]`` int32, words per original sentence.
        label_names: tag names; id ``i`` is ``label_names[i]``.
    """

    input_ids: np.ndarray
    token_type_ids: np.ndarray
    lengths: np.ndarray
    labels: np.ndarray | None
    example_index: np.ndarray
    word_index: np.ndarray
    word_spans: np.ndarray
    num_words: np.ndarray
    label_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.lengths)


# ----------------------------------------------------------------------------- tokenizer


def backend_tokenizer(tokenizer: Any) -> Any:
    """A private copy of the ``tokenizers.Tokenizer`` under ``tokenizer``, truncation and padding off.

    Args:
        tokenizer: a ``tokenizers.Tokenizer``, a transformers fast tokenizer, a
            :class:`jaxpeft.tokenizing.Tokenizer`, or a path to a model folder / ``tokenizer.json``.

    Raises:
        UserError: no fast tokenizer can be had from ``tokenizer``.
    """
    from tokenizers import Tokenizer as RustTokenizer

    from jaxpeft.data.tokenizing import Tokenizer

    src = tokenizer
    if isinstance(tokenizer, Tokenizer) and not (tokenizer.model_dir / "tokenizer.json").is_file():
        src = tokenizer.hf.backend_tokenizer   # transformers converts a vocab.txt-only tokenizer
    elif isinstance(tokenizer, (str, Path, Tokenizer)):
        p = Path(tokenizer.model_dir if isinstance(tokenizer, Tokenizer) else tokenizer)
        p = p / "tokenizer.json" if p.is_dir() else p
        if not p.is_file():
            raise UserError(f"{p}: no tokenizer.json (a fast tokenizer is needed)")
        src = RustTokenizer.from_file(str(p))
    elif not isinstance(tokenizer, RustTokenizer):
        src = getattr(tokenizer, "backend_tokenizer", None)
        if src is None:
            raise UserError(f"{type(tokenizer).__name__}: a fast tokenizer is needed (one with a "
                            f"backend_tokenizer)")
    out = RustTokenizer.from_str(src.to_str())
    out.no_truncation()
    out.no_padding()
    return out


def pad_token_id(tokenizer: Any, backend: Any | None = None) -> int:
    """The pad id of ``tokenizer`` (its own attribute, else the ``[PAD]``/``<pad>`` token, else 0)."""
    from tokenizers import Tokenizer as RustTokenizer

    rust = isinstance(tokenizer, RustTokenizer)
    pad = None if rust or isinstance(tokenizer, (str, Path)) else getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        src = tokenizer if rust else backend
        if src is not None and src.padding:
            pad = src.padding.get("pad_id")
        for tok in ("[PAD]", "<pad>"):
            if pad is None and src is not None:
                pad = src.token_to_id(tok)
    return int(pad or 0)


# ----------------------------------------------------------------------------- windows


def plan_windows(counts: Sequence[int], budget: int, stride: int) -> list[tuple[int, int, int, int]]:
    """Cuts a sentence into windows of whole words.

    Args:
        counts: sub-words per word (each at most ``budget``).
        budget: sub-words a window may hold (``max_length`` less the special tokens).
        stride: words of the previous window repeated at the start of the next one as context;
            at most half of the previous window's words, and fewer where the next window would
            not hold a new word.

    Returns:
        ``(start, end, score_start, score_end)`` per window: it holds words ``[start, end)`` and
        scores ``[score_start, score_end)``; the scored ranges partition the sentence, in order.
        One window ``(0, n, 0, n)`` when everything fits.
    """
    n = len(counts)
    cum = np.concatenate([[0], np.cumsum(counts)])
    if cum[-1] <= budget:
        return [(0, n, 0, n)]
    spans: list[tuple[int, int]] = []
    s = 0
    while True:
        e = int(np.searchsorted(cum, cum[s] + budget, side="right")) - 1  # last e with sum <= budget
        e = min(max(e, s + 1), n)
        spans.append((s, e))
        if e == n:
            break
        ns = max(e - max(stride, 0), (s + e + 1) // 2)  # overlap at most half the window
        while cum[e + 1] - cum[ns] > budget:   # the next window must also hold word e
            ns += 1
        s = ns
    cuts = [0] + [(spans[k + 1][0] + spans[k][1]) // 2 for k in range(len(spans) - 1)] + [n]
    return [(s, e, cuts[k], cuts[k + 1]) for k, (s, e) in enumerate(spans)]


# ----------------------------------------------------------------------------- encoding


def encode_tagged(tokenizer: Any, sentences: TaggedSentences, label_names: Sequence[str],
                  max_length: int = 128, stride: int = 16, long_words: str = "error") -> TokenFeatures:
    """Encodes tagged (or untagged) sentences for token classification.

    Args:
        tokenizer: a fast tokenizer (see :func:`backend_tokenizer`).
        sentences: the words (and tags) to encode.
        label_names: the tag set (the training split's); a tag's id is its index.
        max_length: tokens per window, special tokens included.
        stride: words of overlap between consecutive windows of a long sentence.
        long_words: a single word with more sub-words than a window holds: ``"error"`` refuses
            it; ``"truncate"`` keeps its first sub-words (its label sits on the first one) in a
            window of its own.

    Returns:
        The windows; a sentence that fits gives exactly the ids of a plain
        ``tokenizer(words, is_split_into_words=True)`` call.

    Raises:
        UserError: a tag not in ``label_names``; a word longer than a window (``long_words``
            ``"error"``), naming the sentence, the word and its length in sub-words.
    """
    if long_words not in ("error", "truncate"):
        raise UserError(f"long_words {long_words!r}: use 'error' or 'truncate'")
    backend = backend_tokenizer(tokenizer)
    pad = pad_token_id(tokenizer, backend)
    special = backend.num_special_tokens_to_add(False)
    budget = max_length - special
    if budget < 1:
        raise UserError(f"max_length {max_length} leaves no room for words after {special} special tokens")
    tag_id = {t: i for i, t in enumerate(label_names)}
    full = backend.encode_batch(sentences.tokens, is_pretokenized=True, add_special_tokens=True)
    pieces: list[tuple[int, int, int, int, int, Any]] = []  # (sentence, start, end, score from, to, enc)
    pending: list[tuple[int, int, int, int, int]] = []
    for i, (words, enc) in enumerate(zip(sentences.tokens, full)):
        counts = np.bincount([w for w in enc.word_ids if w is not None], minlength=len(words))
        if counts.sum() <= budget:
            pieces.append((i, 0, len(words), 0, len(words), enc))
            continue
        too_long = np.flatnonzero(counts > budget)
        if len(too_long) and long_words == "error":
            k = int(too_long[0])
            shown = words[k] if len(words[k]) <= 40 else words[k][:37] + "..."
            raise UserError(f"{sentences.where(i)}: sentence {i}, word {k} ({shown!r}) is "
                            f"{counts[k]} sub-words, more than a window of {budget} holds "
                            f"(max_length {max_length}); raise max_length or use long_words='truncate'")
        for s, e, a, b in plan_windows(np.minimum(counts, budget), budget, stride):
            pending.append((i, s, e, a, b))
    if pending:
        backend.enable_truncation(max_length)   # cuts only a long word alone in its window
        encs = backend.encode_batch([sentences.tokens[i][s:e] for i, s, e, _, _ in pending],
                                    is_pretokenized=True, add_special_tokens=True)
        pieces += [(*p, enc) for p, enc in zip(pending, encs)]
        pieces.sort(key=lambda p: (p[0], p[3]))
    n = len(pieces)
    ids = np.full((n, max_length), pad, np.int32)
    types = np.zeros((n, max_length), np.int32)
    lengths = np.zeros(n, np.int32)
    word_index = np.full((n, max_length), -1, np.int32)
    labels = None if sentences.tags is None else np.full((n, max_length), IGNORE, np.int32)
    spans = np.zeros((n, 2), np.int32)
    example = np.zeros(n, np.int32)
    for r, (i, off, end, a, b, enc) in enumerate(pieces):
        m = len(enc.ids)
        ids[r, :m], types[r, :m], lengths[r], example[r], spans[r] = enc.ids, enc.type_ids, m, i, (off, end)
        prev = None
        for p, w in enumerate(enc.word_ids):
            if w is not None and w != prev and a <= w + off < b:
                word_index[r, p] = w + off
            prev = w
        if labels is not None:
            tags = sentences.tags[i]
            for p in np.flatnonzero(word_index[r] >= 0):
                tag = tags[word_index[r, p]]
                if tag not in tag_id:
                    raise UserError(f"{sentences.where(i)}: tag {tag!r} of word {word_index[r, p]} is "
                                    f"not one of the training tags {list(label_names)[:30]}")
                labels[r, p] = tag_id[tag]
    return TokenFeatures(ids, types, lengths, labels, example, word_index, spans,
                         np.asarray([len(s) for s in sentences.tokens], np.int32), tuple(label_names))


def decode(pred_ids: np.ndarray, features: TokenFeatures, fill: str | None = None) -> list[list[str]]:
    """Tag names per word of each original sentence, from per-position predicted tag ids.

    Args:
        pred_ids: ``[N, W]`` predicted tag ids of the windows (``W`` at least the longest window;
            only scored positions are read).
        features: what :func:`encode_tagged` returned for these windows.
        fill: the tag of a word with no sub-words at all (none is scored); default ``"O"`` when
            it is a tag, else the first tag.

    Returns:
        One list per sentence with exactly one tag per word.

    Raises:
        ValueError: ``pred_ids`` does not match the features' windows.
    """
    pred_ids = np.asarray(pred_ids)
    n = len(features)
    longest = int(features.lengths.max(initial=0))
    if pred_ids.ndim != 2 or pred_ids.shape[0] != n or pred_ids.shape[1] < longest:
        raise ValueError(f"predictions of shape {pred_ids.shape} for {n} windows of up to {longest} tokens")
    names = features.label_names
    fill = fill if fill is not None else ("O" if "O" in names else names[0])
    out: list[list[str | None]] = [[None] * int(k) for k in features.num_words]
    rows, cols = np.nonzero(features.word_index >= 0)
    for r, c in zip(rows.tolist(), cols.tolist()):
        out[features.example_index[r]][features.word_index[r, c]] = names[int(pred_ids[r, c])]
    return [[fill if t is None else t for t in sent] for sent in out]  # type: ignore[misc]
