"""Tagging corpora: UD EWT and CoNLL-2003 against their READMEs' counts, your own files, errors,
and the POS / NER metrics against scikit-learn and seqeval."""

import json
import random
import subprocess
import sys
import threading
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


def as_seqeval(metrics, gold, pred):
    """What seqeval's public API reports for ``pred`` against ``gold``, in ``ner_scores``' layout."""
    report = metrics.classification_report(gold, pred, output_dict=True, zero_division=0)
    micro = report["micro avg"]
    assert metrics.f1_score(gold, pred, zero_division=0) == pytest.approx(micro["f1-score"], abs=1e-12)
    assert metrics.precision_score(gold, pred, zero_division=0) == pytest.approx(micro["precision"], abs=1e-12)
    assert metrics.recall_score(gold, pred, zero_division=0) == pytest.approx(micro["recall"], abs=1e-12)
    return {"precision": metrics.precision_score(gold, pred, zero_division=0),
            "recall": metrics.recall_score(gold, pred, zero_division=0),
            "f1": metrics.f1_score(gold, pred, zero_division=0),
            "accuracy": metrics.accuracy_score(gold, pred),
            "per_type": {k: {"precision": v["precision"], "recall": v["recall"], "f1": v["f1-score"],
                             "support": v["support"]} for k, v in report.items() if not k.endswith(" avg")}}


def assert_scores(got, want):
    assert set(got) == {"precision", "recall", "f1", "accuracy", "per_type"}
    for k in ("precision", "recall", "f1", "accuracy"):
        assert type(got[k]) is float and got[k] == pytest.approx(want[k], abs=1e-12), k
    assert list(got["per_type"]) == sorted(want["per_type"])
    for name, scores in got["per_type"].items():
        assert set(scores) == {"precision", "recall", "f1", "support"}
        assert type(scores["support"]) is int and scores["support"] == want["per_type"][name]["support"], name
        for k in ("precision", "recall", "f1"):
            assert type(scores[k]) is float
            assert scores[k] == pytest.approx(want["per_type"][name][k], abs=1e-12), (name, k)


def drop_and_invent(sentences, seed):
    """No MISC predicted at all, and a type gold never has (DATE) predicted in its place or on O words."""
    rng = random.Random(seed)
    out = []
    for s in sentences:
        p = []
        for t in s:
            if t.endswith("-MISC"):
                t = t[:2] + "DATE" if rng.random() < 0.5 else "O"
            elif t == "O" and rng.random() < 0.01:
                t = "B-DATE"
            elif t != "O" and rng.random() < 0.1:
                t = rng.choice(["O", "I-PER", "I-LOC", "B-ORG"])
            p.append(t)
        out.append(p)
    return out


@pytest.fixture(scope="module")
def conll_dev():
    return conll.read_conll2003(need(CONLL / "eng.testa"))


@pytest.mark.parametrize("case", ["5%", "30%", "15%", "drop+invent", "all O", "perfect"])
def test_ner_scores_equal_seqeval_and_iob1_equals_iob2(case, conll_dev):
    metrics = pytest.importorskip("seqeval.metrics")
    gold = conll_dev.tags
    names = list(conll.tag_names(conll_dev))
    pred = {"5%": lambda: perturb(gold, names, 0.05, 1), "30%": lambda: perturb(gold, names, 0.3, 2),
            "15%": lambda: perturb(gold, names + ["B-DATE", "I-DATE"], 0.15, 3),
            "drop+invent": lambda: drop_and_invent(gold, 4),
            "all O": lambda: [["O"] * len(s) for s in gold], "perfect": lambda: [list(s) for s in gold]}[case]()
    got = conll.ner_scores(gold, pred)
    assert_scores(got, as_seqeval(metrics, gold, pred))
    # the gold entities extracted once (what every evaluation of a run reuses) score the same
    assert conll.ner_scores(gold, pred, gold_entities=conll_dev.entities) == got
    assert conll_dev.entities is conll_dev.entities
    if case == "drop+invent":     # a gold type never predicted, a predicted type never in gold
        assert got["per_type"]["MISC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 922}
        assert got["per_type"]["DATE"]["support"] == 0 and got["per_type"]["DATE"]["recall"] == 0.0
        assert 0 < got["f1"] < 1
    if case == "all O":
        assert (got["precision"], got["recall"], got["f1"]) == (0.0, 0.0, 0.0)
        assert [v["support"] for v in got["per_type"].values()] == [1837, 922, 1341, 1842]
    if case == "perfect":
        assert (got["precision"], got["recall"], got["f1"], got["accuracy"]) == (1.0, 1.0, 1.0, 1.0)
    if case in ("5%", "30%"):     # IOB1 and its IOB2 conversion hold the same entities
        g2, p2 = [conll.iob1_to_iob2(s) for s in gold], [conll.iob1_to_iob2(s) for s in pred]
        assert conll.ner_scores(g2, p2)["f1"] == pytest.approx(got["f1"], abs=1e-12)
        assert metrics.f1_score(g2, p2) == pytest.approx(got["f1"], abs=1e-12)


def test_ner_scores_small_cases():
    metrics = pytest.importorskip("seqeval.metrics")
    gold = [["B-PER", "I-PER", "O", "I-LOC"], ["O", "O"]]
    for pred in ([["B-PER", "I-PER", "O", "I-ORG"], ["O", "I-ORG"]], [["O"] * 4, ["O", "O"]], gold):
        assert_scores(conll.ner_scores(gold, pred), as_seqeval(metrics, gold, pred))
    got = conll.ner_scores([["O", "O"]], [["O", "O"]])      # no entities on either side
    assert got == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "accuracy": 1.0, "per_type": {}}
    with pytest.raises(ValueError, match="sentence 0: 1 predicted tags for 2 words"):
        conll.ner_scores([["O", "O"]], [["O"]])


def test_a_missing_seqeval_is_one_error_and_warming_it_is_quiet(monkeypatch):
    from jaxpeft import runtime

    for name in [m for m in sys.modules if m.split(".")[0] == "seqeval"] + ["seqeval"]:
        monkeypatch.setitem(sys.modules, name, None)      # None there: importing it raises ImportError
    errors = []
    monkeypatch.setattr(threading, "excepthook", errors.append)
    thread = runtime.prewarm(("seqeval.metrics",))
    thread.join(60)
    assert not thread.is_alive() and errors == []
    with pytest.raises(UserError, match="NER scores need the `seqeval` package"):
        conll.ner_scores([["B-PER"]], [["B-PER"]])


def test_tagging_tasks_warm_their_scoring_modules(tmp_path):
    """A run imports what its evaluation will (seqeval, and scikit-learn behind it, for entity F1;
    scikit-learn's accuracy for token accuracy) in the background while XLA compiles, and only then:
    reading the data does not import them."""
    pytest.importorskip("seqeval.metrics")
    (tmp_path / "ner.conll").write_text("John B-PER\nlives O\n\nParis B-LOC\n")
    (tmp_path / "pos.conll").write_text("John PROPN\nlives VERB\n")
    code = ("import sys; from jaxpeft import runtime; from jaxpeft.tasks import tagging\n"
            "D = lambda f: type('D', (), {'train_file': f, 'validation_file': f, 'test_file': None})()\n"
            f"ner = tagging.from_files('mine', D({str(tmp_path / 'ner.conll')!r}))\n"
            f"pos = tagging.from_files('tags', D({str(tmp_path / 'pos.conll')!r}))\n"
            "assert 'seqeval' not in sys.modules and 'sklearn' not in sys.modules\n"
            "assert ner.warm_modules() == ('seqeval.metrics',) and pos.warm_modules() == ('sklearn.metrics',)\n"
            "runtime.prewarm(ner.warm_modules()).join(120); assert 'seqeval.metrics' in sys.modules\n"
            "from jaxpeft.tasks import conll; print(conll.ner_scores([['B-PER', 'O']], [['B-PER', 'O']])['f1'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1.0"


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
