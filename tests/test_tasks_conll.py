"""Tagging corpora: UD EWT and CoNLL-2003 against their READMEs' counts, your own files, errors,
and the POS / NER metrics against scikit-learn and seqeval."""

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from jaxpeft.errors import UserError
from jaxpeft.tasks import conll

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
UD = DATA / "ud_ewt" / "UD_English-EWT"
CONLL = DATA / "conll2003"
UPOS = ["ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "INTJ", "NOUN", "NUM", "PART", "PRON", "PROPN",
        "PUNCT", "SCONJ", "SYM", "VERB", "X"]


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is not here")
    return path


@pytest.fixture(scope="module")
def conll_train():
    return conll.read_conll2003(need(CONLL / "eng.train"))


# counts from the READMEs beside the data (recounted there from the files, equal to stats.xml)
@pytest.mark.parametrize("split,sentences,words,xpos", [("train", 12544, 204577, 49),
                                                        ("dev", 2001, 25147, 49),
                                                        ("test", 2077, 25094, 48)])
def test_ud_ewt_counts(split, sentences, words, xpos):
    path = need(UD / f"en_ewt-ud-{split}.conllu")
    ud = conll.read_conllu(path)
    assert (len(ud), ud.num_words) == (sentences, words)
    assert conll.tag_names(ud) == tuple(UPOS)
    assert len(conll.tag_names(conll.read_conllu(path, "xpos"))) == xpos


def test_ud_skips_multiword_tokens_and_empty_nodes():
    ud = conll.read_conllu(need(UD / "en_ewt-ud-train.conllu"))
    i = ud.lines.index(998)               # the sentence "Baghdadis don't venture ..." (2-3 don't)
    assert ud.tokens[i][:4] == ["Baghdadis", "do", "n't", "venture"]
    assert ud.tags[i][:4] == ["PROPN", "AUX", "PART", "VERB"]
    j = max(k for k, line in enumerate(ud.lines) if line < 1746)   # holds the empty node 8.1
    assert ud.tokens[j].count("reported") == 1 and ud.tokens[j][7:9] == ["500", "wounded"]
    assert ud.where(i).endswith("en_ewt-ud-train.conllu:998")


@pytest.mark.parametrize("split,sentences,tokens,entities", [
    ("train", 14041, 203621, {"LOC": 7140, "MISC": 3438, "ORG": 6321, "PER": 6600}),
    ("testa", 3250, 51362, {"LOC": 1837, "MISC": 922, "ORG": 1341, "PER": 1842}),
    ("testb", 3453, 46435, {"LOC": 1668, "MISC": 702, "ORG": 1661, "PER": 1617}),
])
def test_conll2003_counts(split, sentences, tokens, entities, conll_train):
    seqeval = pytest.importorskip("seqeval.metrics.sequence_labeling")
    data = conll_train if split == "train" else conll.read_conll2003(need(CONLL / f"eng.{split}"))
    assert (len(data), data.num_words) == (sentences, tokens)
    assert not any(w.startswith("-DOCSTART-") for s in data.tokens for w in s)
    # entities in conlleval semantics (seqeval reading IOB1), and as B- tags after IOB2 conversion
    assert Counter(t for t, _, _ in seqeval.get_entities(data.tags)) == entities
    iob2 = [conll.iob1_to_iob2(s) for s in data.tags]
    assert Counter(t[2:] for s in iob2 for t in s if t.startswith("B-")) == entities
    assert all(t == "O" or t[:2] in ("B-", "I-") for s in iob2 for t in s)


def test_conll2003_columns_and_iob1(conll_train):
    assert conll_train.tokens[0] == ["EU", "rejects", "German", "call", "to", "boycott", "British",
                                     "lamb", "."]
    assert conll_train.tags[0] == ["I-ORG", "O", "I-MISC", "O", "O", "O", "I-MISC", "O", "O"]
    pos = conll.read_conll2003(need(CONLL / "eng.train"), "pos")
    assert pos.tags[0] == ["NNP", "VBZ", "JJ", "NN", "TO", "VB", "JJ", "NN", "."]
    assert conll.tag_names(conll_train) == ("B-LOC", "B-MISC", "B-ORG", "I-LOC", "I-MISC", "I-ORG",
                                           "I-PER", "O")
    assert sum(t.startswith("B-") for s in conll_train.tags for t in s) == 72     # README: 72 in train


def test_iob1_to_iob2():
    assert conll.iob1_to_iob2(["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-LOC", "I-ORG", "I-PER"]) == \
        ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC", "B-ORG", "B-PER"]
    assert conll.iob1_to_iob2([]) == []


def perturb(sentences, names, rate, seed):
    rng = random.Random(seed)
    return [[rng.choice(names) if rng.random() < rate else t for t in s] for s in sentences]


def test_ner_scores_equal_seqeval_and_iob1_equals_iob2(conll_train):
    metrics = pytest.importorskip("seqeval.metrics")
    gold = conll_train.tags[:1000]
    names = list(conll.tag_names(conll_train))
    for rate, seed in [(0.05, 1), (0.3, 2)]:
        pred = perturb(gold, names, rate, seed)
        got = conll.ner_scores(gold, pred)
        assert got["f1"] == metrics.f1_score(gold, pred)
        assert got["precision"] == metrics.precision_score(gold, pred)
        assert got["recall"] == metrics.recall_score(gold, pred)
        assert got["accuracy"] == metrics.accuracy_score(gold, pred)
        report = metrics.classification_report(gold, pred, output_dict=True)
        assert got["per_type"] == {k: {"precision": report[k]["precision"], "recall": report[k]["recall"],
                                       "f1": report[k]["f1-score"], "support": report[k]["support"]}
                                   for k in ("LOC", "MISC", "ORG", "PER")}
        assert got["f1"] == report["micro avg"]["f1-score"]
        g2, p2 = [conll.iob1_to_iob2(s) for s in gold], [conll.iob1_to_iob2(s) for s in pred]
        assert metrics.f1_score(g2, p2) == pytest.approx(got["f1"], abs=1e-12)
        assert conll.ner_scores(g2, p2)["f1"] == pytest.approx(got["f1"], abs=1e-12)
    assert conll.ner_scores(gold, gold)["f1"] == 1.0
    nothing = [["O"] * len(s) for s in gold]
    got = conll.ner_scores(gold, nothing)
    assert (got["precision"], got["recall"], got["f1"]) == (0.0, 0.0, 0.0)
    assert got["accuracy"] == metrics.accuracy_score(gold, nothing)


def test_pos_accuracy_equals_sklearn():
    from sklearn.metrics import accuracy_score

    ud = conll.read_conllu(need(UD / "en_ewt-ud-dev.conllu"))
    pred = perturb(ud.tags, UPOS, 0.1, 0)
    flat = [t for s in ud.tags for t in s]
    assert conll.pos_accuracy(ud.tags, pred) == accuracy_score(flat, [t for s in pred for t in s])
    wrong = sum(g != p for gs, ps in zip(ud.tags, pred) for g, p in zip(gs, ps))
    assert conll.pos_accuracy(ud.tags, pred) == pytest.approx(1 - wrong / len(flat))
    with pytest.raises(ValueError, match="sentence 0: 1 predicted tags"):
        conll.pos_accuracy(ud.tags[:1], [pred[0][:1]])


def test_own_column_files(tmp_path):
    p = tmp_path / "train.conll"
    p.write_text("-DOCSTART- O\n\nJohn\tB-PER\nlives in\tO\n\nParis B-LOC\n.  O\n\n\n")
    data = conll.read_tagged(p)
    assert data.tokens == [["John", "lives in"], ["Paris", "."]]
    assert data.tags == [["B-PER", "O"], ["B-LOC", "O"]] and data.lines == [3, 6]
    names = conll.tag_names(data)
    q = tmp_path / "test.conll"
    q.write_text("Rome\n\nis\nnice\n")
    assert conll.read_tagged(q, names).tags is None
    r = tmp_path / "dev.conll"
    r.write_text("John B-PER\n\nParis B-LOC\nrocks B-MISC\n")
    with pytest.raises(UserError, match=r"dev\.conll:4: tag 'B-MISC' is not one of the training tags"):
        conll.read_tagged(r, names)
    r.write_text("John B-PER\nParis\n")
    with pytest.raises(UserError, match=r"dev\.conll:2: a word without a tag column"):
        conll.read_tagged(r)


def test_own_json_records(tmp_path):
    recs = [{"words": ["a", "b"], "labels": ["X", "Y"]}, {"words": ["c"], "labels": ["X"]}]
    p = tmp_path / "t.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in recs))
    q = tmp_path / "t.json"
    q.write_text(json.dumps(recs, indent=2))
    for path in (p, q):
        data = conll.read_tagged(path, tokens_field="words", tags_field="labels")
        assert data.tokens == [["a", "b"], ["c"]] and data.tags == [["X", "Y"], ["X"]]
    assert conll.read_tagged(q, tokens_field="words", tags_field="labels").lines == [2, 12]
    p.write_text('{"tokens": ["a"], "tags": ["X"]}\n{"tokens": ["a", "b"], "tags": ["X"]}\n')
    with pytest.raises(UserError, match=r"t\.jsonl:2: 1 tags for 2 tokens"):
        conll.read_tagged(p)
    p.write_text('{"tokens": ["a"], "tags": ["X"]}\n\n{"tokens": ["b"], "tags": ["Z"]}\n')
    with pytest.raises(UserError, match=r"t\.jsonl:3: tag 'Z' is not one of the training tags \['X'\]"):
        conll.read_tagged(p, ["X"])
    q.write_text(json.dumps({"data": [{"tokens": ["a"], "tags": ["X"]}, {"tokens": ["b"], "tags": ["Z"]}]}))
    with pytest.raises(UserError, match=r"t\.json: record 1: tag 'Z' is not one of"):
        conll.read_tagged(q, ["X"])
    p.write_text('{"text": "a b"}\n')
    with pytest.raises(UserError, match=r"t\.jsonl:1: no field 'tokens' \(the record has \['text'\]\)"):
        conll.read_tagged(p)
    p.write_text('{"tokens": "a b", "tags": "X"}\n')
    with pytest.raises(UserError, match=r"t\.jsonl:1: 'tokens' must be a list of strings"):
        conll.read_tagged(p)


def test_bad_tagging_files(tmp_path):
    cases = [
        ("e.conll", b"", r"e\.conll: file is empty"),
        ("e.conll", b"-DOCSTART- O\n\n", r"e\.conll: no sentences"),
        ("b.conll", b"ok O\ncaf\xe9 O\n", r"b\.conll:2: byte 0xe9 at column 4 is not UTF-8"),
        ("b.conllu", b"1\tok\tok\tNOUN\tNN\n",
         r"b\.conllu:1: expected 10 tab-separated CoNLL-U columns, got 5"),
        ("b.txt", b"ok O\n", r"b\.txt: cannot tell the format from the extension '\.txt'"),
    ]
    for name, content, message in cases:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(UserError, match=message) as e:
            conll.read_tagged(tmp_path / name)
        assert "\n" not in str(e.value)
    (tmp_path / "x.train").write_bytes(b"EU NNP I-NP\n")
    with pytest.raises(UserError, match=r"x\.train:1: expected 4 space-separated columns"):
        conll.read_conll2003(tmp_path / "x.train")
    with pytest.raises(UserError, match="unknown tagging format 'xml'"):
        conll.read_tagged(tmp_path / "x.train", file_format="xml")
    with pytest.raises(UserError, match="use upos or xpos"):
        conll.read_conllu(tmp_path / "b.conllu", "deprel")
    assert conll.read_tagged(need(CONLL / "eng.testa"),
                             file_format="conll2003").num_words == 51362
