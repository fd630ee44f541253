"""SQuAD v1.1: reading and the by-article split, windowed features against transformers' tokenizer
and run_qa.py's labelling, answer post-processing, and EM / F1 against the official script."""

import gzip
import importlib.util
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from jaxpeft.errors import UserError
from jaxpeft.tasks import squad, squad_metric
from jaxpeft.tasks.squad import SquadData

SQUAD = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "squad"
DEV = SQUAD / "dev-v1.1.json"


@pytest.fixture(scope="module")
def dev():
    if not DEV.exists():
        pytest.skip(f"{DEV} is not here")
    return squad.read_squad(DEV)


@pytest.fixture(scope="module")
def dev_json():
    return json.loads(DEV.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def official():
    """The official evaluate-v1.1.py, imported from beside the data (never copied here)."""
    path = SQUAD / "evaluate-v1.1.py"
    if not path.exists():
        pytest.skip(f"{path} is not here")
    spec = importlib.util.spec_from_file_location("squad_evaluate_v11", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def hf_tokenizer(minilm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir), use_fast=True)


@pytest.fixture(scope="module")
def sample(dev):
    """A few hundred questions: the first ones, and those with the longest contexts (many windows)."""
    longest = sorted(range(len(dev)), key=lambda i: -len(dev.examples[i].context))[:60]
    idx = sorted(set(range(250)) | set(longest))
    return SquadData([dev.examples[i] for i in idx], dev.num_articles, dev.source)


def test_dev_counts(dev):
    assert (len(dev), dev.num_articles) == (10570, 48)
    assert sum(len(e.answers) for e in dev.examples) == 34726
    assert len({e.id for e in dev.examples}) == 10570
    for e in dev.examples[:2000]:
        for text, start in zip(e.answers, e.answer_starts):
            assert e.context[start:start + len(text)] == text
    first = dev.examples[0]
    assert (first.id, first.answers[0], first.answer_starts[0]) == ("56be4db0acb8001400a502ec",
                                                                    "Denver Broncos", 177)


def test_split_by_article(dev):
    train, evals = squad.split_by_article(dev)
    assert (len(train), len(evals)) == (8582, 1988)
    assert (train.num_articles, evals.num_articles) == (38, 10)
    assert {e.article for e in train.examples} == set(range(38))
    assert {e.article for e in evals.examples} == set(range(38, 48))
    assert not {e.context for e in train.examples} & {e.context for e in evals.examples}
    assert [e.id for e in train.examples + evals.examples] == [e.id for e in dev.examples]
    with pytest.raises(UserError, match="n_train_articles=48 must be between 1 and 47"):
        squad.split_by_article(dev, 48)


def test_train_file_beside_the_dev_file(tmp_path, dev):
    d = tmp_path / "squad"
    d.mkdir()
    shutil.copy(DEV, d / "dev-v1.1.json")
    train, evals, how = squad.train_and_eval(d / "dev-v1.1.json")
    assert (len(train), len(evals)) == (8582, 1988) and "no train file" in how
    small = {"version": "1.1", "data": [{"title": "T", "paragraphs": [{"context": "Cats purr.", "qas": [
        {"id": "q1", "question": "Who purrs?", "answers": [{"text": "Cats", "answer_start": 0}]}]}]}]}
    (d / "train-v1.1.json.gz").write_bytes(gzip.compress(json.dumps(small).encode()))
    assert squad.find_train_file(d / "dev-v1.1.json") == d / "train-v1.1.json.gz"
    train, evals, how = squad.train_and_eval(d / "dev-v1.1.json")
    assert [e.id for e in train.examples] == ["q1"] and len(evals) == 10570 and "train-v1.1.json.gz" in how


def test_the_full_size_stand_in_is_the_train_file_of_the_job(tmp_path, dev):
    """``benchmarks/squad_standin.py`` writes a folder whose train file the task reads: the dev set's
    articles repeated to the asked size, unique ids, every answer where the dev set has it."""
    from benchmarks import squad_standin

    out = tmp_path / "full"
    assert squad_standin.main([f"--dev={DEV}", f"--out={out}", "--questions=25000"]) == 0
    train, evals, how = squad.train_and_eval(out / "dev-v1.1.json")
    assert f"train {out / 'train-v1.1.json'}" in how and len(evals) == 10570
    assert 25000 <= len(train) < 25000 + max(sum(len(p["qas"]) for p in a["paragraphs"])
                                             for a in json.loads(DEV.read_text())["data"])
    assert len({e.id for e in train.examples}) == len(train)
    copies = [train.examples[i * len(dev):(i + 1) * len(dev)] for i in range(3)]
    for c, part in enumerate(copies):       # two whole copies, then the third's first articles
        assert [(e.id, e.context, e.answers, e.answer_starts) for e in part] == \
            [(f"{e.id}-{c}", e.context, e.answers, e.answer_starts) for e in dev.examples[:len(part)]]


def test_bad_squad_files(tmp_path, dev_json):
    data = json.loads(json.dumps(dev_json["data"][:2]))
    qa = data[1]["paragraphs"][0]["qas"][3]
    qa["answers"][1]["answer_start"] += 1
    p = tmp_path / "bad.json"
    p.write_text(json.dumps({"version": "1.1", "data": data}))
    with pytest.raises(UserError, match=rf"bad\.json: question {qa['id']}: answer .* is not at answer_start"):
        squad.read_squad(p)
    qa["answers"] = []
    p.write_text(json.dumps({"version": "1.1", "data": data}))
    with pytest.raises(UserError, match=rf"question {qa['id']}: no answers"):
        squad.read_squad(p)
    for content, message in [(b"", r"e\.json: file is empty"),
                             (b'{"data": [\n{"title": "caf\xe9"}]}',
                              r"e\.json:2: byte 0xe9 at column 15 is not UTF-8"),
                             (b'{"data": [{"title": "x"}]}', r"e\.json: not in SQuAD's layout"),
                             (b'[1, 2]', r"e\.json: not a SQuAD file"),
                             (b'{"data": [\n\n{]}', r"e\.json:3: invalid JSON")]:
        (tmp_path / "e.json").write_bytes(content)
        with pytest.raises(UserError, match=message) as e:
            squad.read_squad(tmp_path / "e.json")
        assert "\n" not in str(e.value)


def run_qa_positions(tokenizer, enc, i, example):
    """``prepare_train_features`` of transformers' run_qa.py, for window ``i`` of a batch encoding."""
    input_ids, offsets = enc["input_ids"][i], enc["offset_mapping"][i]
    cls_index = input_ids.index(tokenizer.cls_token_id)
    sequence_ids = enc.sequence_ids(i)
    start_char = example.answer_starts[0]
    end_char = start_char + len(example.answers[0])
    token_start_index = 0
    while sequence_ids[token_start_index] != 1:
        token_start_index += 1
    token_end_index = len(input_ids) - 1
    while sequence_ids[token_end_index] != 1:
        token_end_index -= 1
    if not (offsets[token_start_index][0] <= start_char and offsets[token_end_index][1] >= end_char):
        return cls_index, cls_index
    while token_start_index < len(offsets) and offsets[token_start_index][0] <= start_char:
        token_start_index += 1
    start = token_start_index - 1
    while offsets[token_end_index][1] >= end_char:
        token_end_index -= 1
    return start, token_end_index + 1


@pytest.mark.parametrize("max_length,stride", [(384, 128), (128, 32)])
def test_features_equal_transformers(sample, hf_tokenizer, minilm_dir, max_length, stride):
    feats = squad.prepare_features(minilm_dir, sample, max_length, stride)
    enc = hf_tokenizer([e.question.lstrip() for e in sample.examples], [e.context for e in sample.examples],
                       truncation="only_second", max_length=max_length, stride=stride,
                       return_overflowing_tokens=True, return_offsets_mapping=True, padding="max_length")
    assert len(feats) == len(enc["input_ids"]) > len(sample)
    assert feats.example_index.tolist() == enc["overflow_to_sample_mapping"]
    np.testing.assert_array_equal(feats.input_ids, np.asarray(enc["input_ids"]))
    np.testing.assert_array_equal(feats.token_type_ids, np.asarray(enc["token_type_ids"]))
    np.testing.assert_array_equal(feats.lengths, np.asarray(enc["attention_mask"]).sum(1))
    quirks = 0
    for i in range(len(feats)):
        seq = enc.sequence_ids(i)
        want = [list(o) if s == 1 else [-1, -1] for o, s in zip(enc["offset_mapping"][i], seq)]
        assert feats.offsets[i].tolist() == want
        ref = run_qa_positions(hf_tokenizer, enc, i, sample.examples[feats.example_index[i]])
        got = (feats.start_positions[i], feats.end_positions[i])
        if got != ref:   # run_qa walks past the context when the answer starts in its last token
            last = max(k for k, s in enumerate(seq) if s == 1)
            assert ref[0] > last and got == (last, ref[1]) and ref[1] == last
            quirks += 1
    assert quirks <= 2


def test_gold_positions_decode_to_the_answer(sample, minilm_dir):
    feats = squad.prepare_features(minilm_dir, sample, 128, 32)
    labelled = 0
    for r in range(len(feats)):
        s, e = int(feats.start_positions[r]), int(feats.end_positions[r])
        ex = sample.examples[feats.example_index[r]]
        if s == 0:
            assert e == 0
            continue
        labelled += 1
        start, text = ex.answer_starts[0], ex.answers[0]
        got = ex.context[feats.offsets[r, s, 0]:feats.offsets[r, e, 1]]
        aligned = start in feats.offsets[r, :, 0] and start + len(text) in feats.offsets[r, :, 1]
        assert got == text if aligned else (text in got and len(got) > len(text))
    assert labelled >= len(sample)
    # every question has at least one window holding its first answer, except where none can
    per_question = np.bincount(feats.example_index[feats.start_positions > 0], minlength=len(sample))
    assert (per_question > 0).mean() > 0.97


def test_postprocess_picks_the_best_valid_span(sample, minilm_dir):
    few = SquadData(sample.examples[:40] + sample.examples[-10:], sample.num_articles, sample.source)
    feats = squad.prepare_features(minilm_dir, few, 128, 32)
    assert len(feats) > 60
    rng = np.random.default_rng(0)
    start = rng.normal(size=feats.input_ids.shape).astype(np.float32)
    end = rng.normal(size=feats.input_ids.shape).astype(np.float32)
    # n_best_size = the window length: every span is a candidate, so the answer is the best of all
    answers, nbest = squad.postprocess_predictions(few, feats, start, end, n_best_size=128,
                                                   max_answer_length=30)
    pos = np.arange(128)
    for i, ex in enumerate(few.examples):                      # brute force over every span
        best, text = -np.inf, None
        for r in np.flatnonzero(feats.example_index == i):
            ctx = feats.offsets[r, :, 0] >= 0
            length = pos[None, :] - pos[:, None]
            ok = ctx[:, None] & ctx[None, :] & (length >= 0) & (length < 30)
            score = np.where(ok, start[r][:, None] + end[r][None, :], -np.inf)
            s, e = np.unravel_index(np.argmax(score), score.shape)
            if score[s, e] > best:
                best = score[s, e]
                text = ex.context[feats.offsets[r, s, 0]:feats.offsets[r, e, 1]]
        assert answers[ex.id] == text
        assert nbest[ex.id][0]["score"] == pytest.approx(float(best))
        scores = [p["score"] for p in nbest[ex.id]]
        assert scores == sorted(scores, reverse=True) and len(scores) == 128
        assert sum(p["probability"] for p in nbest[ex.id]) == pytest.approx(1.0)
    # gold logits: the answer comes back (some answers here are longer than 30 tokens)
    start, end = np.zeros_like(start), np.zeros_like(end)
    rows = np.flatnonzero(feats.start_positions > 0)
    start[rows, feats.start_positions[rows]] = 10.0
    end[rows, feats.end_positions[rows]] = 10.0
    answers, _ = squad.postprocess_predictions(few, feats, start, end, max_answer_length=128)
    assert all(ex.answers[0] in answers[ex.id] for ex in few.examples if ex.id in labelled(few, feats))
    # no valid span at all: "empty", as utils_qa answers
    answers, nbest = squad.postprocess_predictions(few, feats, start, end, max_answer_length=0)
    assert set(answers.values()) == {"empty"} and nbest[few.examples[0].id][0]["probability"] == 1.0


def loop_postprocess(data, feats, start_logits, end_logits, n_best_size, max_answer_length):
    """transformers' ``utils_qa.postprocess_qa_predictions`` as its loops read (each window's n best
    starts and ends, every pair checked one by one), ranking the context's tokens only."""
    answers, nbest = {}, {}
    for i, ex in enumerate(data.examples):
        prelim = []
        for r in np.flatnonzero(feats.example_index == i):
            off = feats.offsets[r]
            sl = np.where(off[:, 0] >= 0, start_logits[r], -np.inf)
            el = np.where(off[:, 0] >= 0, end_logits[r], -np.inf)
            for s in np.argsort(sl)[-1:-n_best_size - 1:-1]:
                for e in np.argsort(el)[-1:-n_best_size - 1:-1]:
                    if off[s, 0] < 0 or off[e, 0] < 0 or e < s or e - s + 1 > max_answer_length:
                        continue
                    prelim.append({"text": ex.context[off[s, 0]:off[e, 1]], "score": float(sl[s] + el[e]),
                                   "start_logit": float(sl[s]), "end_logit": float(el[e])})
        best = sorted(prelim, key=lambda p: p["score"], reverse=True)[:n_best_size]
        if not best:
            best = [{"text": "empty", "score": 0.0, "start_logit": 0.0, "end_logit": 0.0}]
        probs = np.exp(np.array([p["score"] for p in best]) - max(p["score"] for p in best))
        for p, q in zip(best, probs / probs.sum()):
            p["probability"] = float(q)
        answers[ex.id], nbest[ex.id] = best[0]["text"], best
    return answers, nbest


@pytest.mark.parametrize("max_answer_length", [30, 4, 0])
def test_postprocess_equals_the_loops_it_vectorises(sample, minilm_dir, max_answer_length):
    """Every n-best list (texts, logits, scores, order, probabilities) as the reference loops give
    it, ties included (logits rounded to one decimal)."""
    feats = squad.prepare_features(minilm_dir, sample, 128, 32)
    rng = np.random.default_rng(1)
    start = np.round(rng.normal(size=feats.input_ids.shape), 1).astype(np.float32)
    end = np.round(rng.normal(size=feats.input_ids.shape), 1).astype(np.float32)
    answers, nbest = squad.postprocess_predictions(sample, feats, start, end, 20, max_answer_length)
    want_answers, want_nbest = loop_postprocess(sample, feats, start, end, 20, max_answer_length)
    assert answers == want_answers
    assert nbest.keys() == want_nbest.keys()
    for qid, want in want_nbest.items():
        assert [p["text"] for p in nbest[qid]] == [p["text"] for p in want]
        for key in ("score", "start_logit", "end_logit", "probability"):
            np.testing.assert_allclose([p[key] for p in nbest[qid]], [p[key] for p in want], rtol=1e-6)


def labelled(data, feats):
    """Ids of the questions with a window that holds their first answer."""
    return {data.examples[i].id for i in feats.example_index[feats.start_positions > 0]}


def perturbations(dev, seed):
    rng = random.Random(seed)
    out = []
    for e in dev.examples:
        a, s = e.answers[0], e.answer_starts[0]
        k = rng.randrange(6)
        if k == 0:
            out.append(a)
        elif k == 1:
            out.append(" ".join(a.split()[:-1]))                             # truncated
        elif k == 2:
            out.append(e.context[s:s + len(a) + rng.randint(1, 25)])          # extended
        elif k == 3:
            i = rng.randrange(len(e.context))
            out.append(e.context[i:i + rng.randint(1, 40)])                   # a random span
        elif k == 4:
            out.append("")
        else:
            out.append(rng.choice(e.answers[1:] or e.answers).upper() + " the.")
    return {e.id: p for e, p in zip(dev.examples, out)}


def test_em_f1_equal_the_official_script(dev, dev_json, official, capsys):
    gold = {e.id: e.answers[0] for e in dev.examples}
    assert squad_metric.squad_scores(dev, gold) == official.evaluate(dev_json["data"], gold) == \
        {"exact_match": 100.0, "f1": 100.0}
    part = SquadData([e for e in dev.examples if e.article < 10], 10, dev.source)   # 2,262 questions
    articles = dev_json["data"][:10]
    for seed in range(2):
        preds = perturbations(part, seed)
        ours, ref = squad_metric.squad_scores(part, preds), official.evaluate(articles, preds)
        assert abs(ours["exact_match"] - ref["exact_match"]) < 1e-9 and abs(ours["f1"] - ref["f1"]) < 1e-9
        assert 10 < ours["f1"] < 90
    empty = {e.id: "" for e in part.examples}
    assert squad_metric.squad_scores(part, empty) == official.evaluate(articles, empty)
    some = dict(list(gold.items())[:1000])                                  # unanswered score 0
    assert squad_metric.squad_scores(part, some) == pytest.approx(official.evaluate(articles, some))
    capsys.readouterr()
    refs = part.references()
    for text in perturbations(part, 9).values():
        assert squad_metric.normalize_answer(text) == official.normalize_answer(text)
    for qid, text in perturbations(part, 7).items():
        for r in refs[qid]:
            assert squad_metric.token_f1(text, r) == official.f1_score(text, r)
            assert squad_metric.exact_match(text, r) == float(official.exact_match_score(text, r))


def test_question_too_long_for_the_stride(minilm_dir):
    ex = squad.QAExample("q", "why " * 60, "word " * 400, ("word",), (0,), 0, "t")
    data = SquadData([ex], 1, "mem")
    with pytest.raises(UserError, match=r"mem: question q: the question is 60 tokens, leaving 65 context "
                                        r"tokens per window, not more than doc_stride 128"):
        squad.prepare_features(minilm_dir, data, 128, 128)
    assert len(squad.prepare_features(minilm_dir, data, 384, 128)) > 1


def test_answer_in_the_last_context_token(hf_tokenizer, minilm_dir):
    """The one documented difference from run_qa.py: it labels [SEP] (start after end) here."""
    context = " ".join(f"w{i}" for i in range(60))
    enc = hf_tokenizer(["which?"], [context], truncation="only_second", max_length=32, stride=8,
                       return_overflowing_tokens=True, return_offsets_mapping=True, padding="max_length")
    last = max(k for k, s in enumerate(enc.sequence_ids(0)) if s == 1)
    a, b = enc["offset_mapping"][0][last]
    ex = squad.QAExample("q", "which?", context, (context[a:b],), (a,), 0, "t")
    feats = squad.prepare_features(minilm_dir, SquadData([ex], 1, "mem"), 32, 8)
    assert (feats.start_positions[0], feats.end_positions[0]) == (last, last)
    assert run_qa_positions(hf_tokenizer, enc, 0, ex) == (last + 1, last)
    assert context[feats.offsets[0, last, 0]:feats.offsets[0, last, 1]] == ex.answers[0]
