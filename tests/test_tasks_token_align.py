"""Sub-word alignment for token classification, against transformers' fast tokenizer and the
labelling of ``run_ner.py``; windows of long sentences and their decoding."""

import itertools
import random
from pathlib import Path

import numpy as np
import pytest

from jaxpeft.errors import UserError
from jaxpeft.tasks import conll, token_align
from jaxpeft.tasks.conll import TaggedSentences

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


@pytest.fixture(scope="module")
def ner():
    path = DATA / "conll2003" / "eng.train"
    if not path.exists():
        pytest.skip(f"{path} is not here")
    full = conll.read_conll2003(path)
    n = 700
    return TaggedSentences(full.tokens[:n], full.tags[:n], full.source, full.lines[:n]), conll.tag_names(full)


@pytest.fixture(scope="module")
def pos():
    path = DATA / "ud_ewt" / "UD_English-EWT" / "en_ewt-ud-dev.conllu"
    if not path.exists():
        pytest.skip(f"{path} is not here")
    full = conll.read_conllu(path)
    n = 400
    return TaggedSentences(full.tokens[:n], full.tags[:n], full.source, full.lines[:n]), conll.tag_names(full)


@pytest.fixture(scope="module")
def hf_tokenizer(minilm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir), use_fast=True)


def run_ner_labels(tokenizer, words, tags, label_to_id, max_length):
    """``tokenize_and_align_labels`` of transformers' ``run_ner.py`` (label_all_tokens=False)."""
    enc = tokenizer(words, padding="max_length", truncation=True, max_length=max_length,
                    is_split_into_words=True)
    labels, previous = [], None
    for w in enc.word_ids(batch_index=0):
        if w is None:
            labels.append(-100)
        elif w != previous:
            labels.append(label_to_id[tags[w]])
        else:
            labels.append(-100)
        previous = w
    return enc, labels


@pytest.mark.parametrize("corpus", ["ner", "pos"])
def test_first_subword_labels_equal_run_ner(corpus, request, hf_tokenizer, minilm_dir):
    data, names = request.getfixturevalue(corpus)
    feats = token_align.encode_tagged(minilm_dir, data, names, max_length=128)
    assert len(feats) == len(data)                 # every sentence here fits one window
    label_to_id = {t: i for i, t in enumerate(names)}
    batch = hf_tokenizer(data.tokens, is_split_into_words=True, padding="max_length", max_length=128,
                         truncation=True)
    for i, (words, tags) in enumerate(zip(data.tokens, data.tags)):
        enc, labels = run_ner_labels(hf_tokenizer, words, tags, label_to_id, 128)
        assert feats.input_ids[i].tolist() == enc["input_ids"] == batch["input_ids"][i]
        assert feats.token_type_ids[i].tolist() == enc["token_type_ids"]
        assert feats.lengths[i] == sum(enc["attention_mask"])
        assert feats.labels[i].tolist() == labels
        wids = enc.word_ids()
        first = [w is not None and (p == 0 or wids[p - 1] != w) for p, w in enumerate(wids)]
        assert (feats.word_index[i] >= 0).tolist() == first
    assert (feats.example_index == np.arange(len(data))).all()


def test_other_tokenizer_inputs_give_the_same_features(ner, hf_tokenizer, minilm_dir):
    from jaxpeft.data.tokenizing import Tokenizer

    data, names = ner
    small = TaggedSentences(data.tokens[:50], data.tags[:50], data.source, data.lines[:50])
    ref = token_align.encode_tagged(minilm_dir, small, names, max_length=64)
    for tok in (hf_tokenizer, Tokenizer(minilm_dir), str(minilm_dir / "tokenizer.json")):
        got = token_align.encode_tagged(tok, small, names, max_length=64)
        for field in ("input_ids", "token_type_ids", "lengths", "labels", "word_index", "example_index"):
            np.testing.assert_array_equal(getattr(got, field), getattr(ref, field))


def test_decode_maps_first_subword_predictions_to_words(ner, minilm_dir):
    data, names = ner
    feats = token_align.encode_tagged(minilm_dir, data, names, max_length=128)
    rng = np.random.default_rng(0)
    pred = rng.integers(0, len(names), size=feats.input_ids.shape)
    got = token_align.decode(pred, feats)
    for i, words in enumerate(data.tokens):
        first = np.flatnonzero(feats.word_index[i] >= 0)          # first sub-words, in word order
        assert [names[k] for k in pred[i, first]] == got[i] and len(got[i]) == len(words)
    with pytest.raises(ValueError, match="predictions of shape"):
        token_align.decode(pred[:-1], feats)


@pytest.mark.parametrize("max_length,stride", [(16, 0), (16, 4), (24, 2), (40, 100)])
def test_windows_round_trip_gold_tags(ner, pos, minilm_dir, hf_tokenizer, max_length, stride):
    for data, names in (ner, pos):
        feats = token_align.encode_tagged(minilm_dir, data, names, max_length=max_length, stride=stride,
                                          long_words="truncate")
        assert len(feats) > len(data)                               # windows were needed
        gold = np.where(feats.labels >= 0, feats.labels, 0)
        assert token_align.decode(gold, feats) == data.tags          # every word exactly once
        assert (feats.word_index >= 0).sum() == data.num_words
        assert (feats.lengths <= max_length).all()
        counts = [np.bincount([w for w in hf_tokenizer(s, is_split_into_words=True,
                                                       add_special_tokens=False).word_ids()],
                              minlength=len(s)) for s in data.tokens]
        for r in range(len(feats)):
            i, (s, e) = feats.example_index[r], feats.word_spans[r]
            # a window never cuts a word: it holds all sub-words of each of its words (the only
            # exception is a single word longer than a window, truncated in a window of its own)
            held = np.bincount(feats.word_index[r][feats.word_index[r] >= 0] - s, minlength=e - s)
            assert held.max(initial=0) <= 1
            inside = feats.lengths[r] - 2
            if e - s > 1 or counts[i][s] <= max_length - 2:
                assert inside == counts[i][s:e].sum()
            # the window's ids are the tokenizer's own ids of its words
            ref = hf_tokenizer(data.tokens[i][s:e], is_split_into_words=True, truncation=True,
                               max_length=max_length)["input_ids"]
            assert feats.input_ids[r, :feats.lengths[r]].tolist() == ref
        if stride:
            starts = feats.word_spans[1:, 0]
            ends = feats.word_spans[:-1, 1]
            same = feats.example_index[1:] == feats.example_index[:-1]
            assert (starts[same] < ends[same]).any()                 # consecutive windows overlap


def test_plan_windows_partitions_and_fits():
    rng = random.Random(0)
    for _ in range(2000):
        budget = rng.randint(1, 20)
        counts = [rng.randint(0, budget) for _ in range(rng.randint(1, 40))]
        stride = rng.randint(0, 10)
        plan = token_align.plan_windows(counts, budget, stride)
        scored = [w for _, _, a, b in plan for w in range(a, b)]
        assert scored == list(range(len(counts)))
        for s, e, a, b in plan:
            assert s <= a < b <= e and sum(counts[s:e]) <= budget
        for (s0, e0, _, _), (s1, e1, _, _) in itertools.pairwise(plan):
            assert s0 < s1 and e0 < e1 and s1 <= e0                 # progress, contiguous cover
    assert token_align.plan_windows([1, 2, 3], 6, 2) == [(0, 3, 0, 3)]
    assert token_align.plan_windows([2, 2, 2, 2], 4, 0) == [(0, 2, 0, 2), (2, 4, 2, 4)]
    assert token_align.plan_windows([1, 1, 1, 1, 1, 1], 4, 2) == [(0, 4, 0, 3), (2, 6, 3, 6)]


def test_word_longer_than_a_window_is_refused(tmp_path, minilm_dir):
    p = tmp_path / "long.conll"
    p.write_text("ok O\n\nfine O\nsupercalifragilisticexpialidocious-antidisestablishmentarianism O\nend O\n")
    data = conll.read_tagged(p)
    with pytest.raises(UserError, match=r"long\.conll:3: sentence 1, word 1 \('supercali.*'\) is (\d+) "
                                        r"sub-words, more than a window of 8 holds \(max_length 10\)") as e:
        token_align.encode_tagged(minilm_dir, data, ["O"], max_length=10)
    assert "\n" not in str(e.value)
    feats = token_align.encode_tagged(minilm_dir, data, ["O"], max_length=10, long_words="truncate")
    assert token_align.decode(np.zeros((len(feats), 10), int), feats) == data.tags
    with pytest.raises(UserError, match=r"long\.conll:1: tag 'O' of word 0 is not one of the training tags"):
        token_align.encode_tagged(minilm_dir, data, ["B-X"], max_length=64)


def test_untagged_sentences_and_words_without_subwords(minilm_dir):
    data = TaggedSentences([["a", "\u200b", "b"], ["c"]], None, "mem", [0, 0])
    feats = token_align.encode_tagged(minilm_dir, data, ["O", "X"], max_length=8)
    assert feats.labels is None and (feats.word_index >= 0).sum() == 3
    pred = np.ones((len(feats), 8), int)
    assert token_align.decode(pred, feats) == [["X", "O", "X"], ["X"]]
    assert token_align.decode(pred, feats, fill="X") == [["X", "X", "X"], ["X"]]
