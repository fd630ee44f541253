"""Bias-change analysis: known Δb in, known table out; heatmap written; bad adapters rejected."""

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments.bitfit_study import bias_change
from jaxpeft import masks, methods, tasks
from jaxpeft.adapters import folder as adapters
from jaxpeft.errors import UserError
from jaxpeft.models import hf_weights
from jaxpeft.models.bert import FAMILY as BERT
from jaxpeft.models.fingerprint import fingerprint
from jaxpeft.models.loading import load_classifier

REPO = Path(__file__).resolve().parent.parent
TERMS = list(bias_change.SYMBOLS)


def base_biases(model_dir, params):
    """``{bert/... path: array}`` of every per-layer bias of the model, read from its checkpoint
    (``params``: the model's, for the paths)."""
    expected = {p: a for p, a in masks.flatten(params).items() if bias_change.classify(p)}
    return hf_weights.convert_state_dict(hf_weights.load_state_dict(model_dir), expected, "bert")


def delta(layer, term, scale=1.0):
    """The known mean |Δb| of a cell: distinct for every layer and term."""
    return scale * (layer + 1) / 8 + TERMS.index(term) / 64


def make_adapter(folder, model_dir, terms=TERMS, scale=1.0, method="bitfit"):
    """An adapter written by the library's own exporter, with known bias changes."""
    loaded = load_classifier(str(model_dir), 2)
    flat = masks.flatten(loaded.params)
    for path, b in base_biases(model_dir, loaded.params).items():
        layer, term = bias_change.classify(path)
        if term in terms:
            signs = np.where(np.arange(b.size) % 2 == 0, 1.0, -1.0)  # |Δb| is what counts
            flat[path] = b + signs * delta(layer, term, scale)
    params = masks.unflatten(flat, loaded.params)
    options = {} if method != "bitfit" or list(terms) == TERMS else {"bitfit_terms": ",".join(terms)}
    return adapters.save_adapter(folder, params, methods.create(method, options), tasks.get("rte"), family=BERT,
                                 model_config=loaded.config, base_model=str(model_dir),
                                 fingerprint=fingerprint(loaded.params, str(model_dir), str(loaded.model_dir)))


def test_known_changes_give_the_known_table(tiny_bert_dir, tmp_path):
    t = bias_change.analyze([make_adapter(tmp_path / "a", tiny_bert_dir)])
    assert t.layers == [0, 1, 2] and t.terms == TERMS
    for i in range(3):
        for j, term in enumerate(TERMS):
            assert t.values[i, j] == pytest.approx(delta(i, term), rel=1e-6)
    files = bias_change.write(t, tmp_path / "out" / "bc", title="tiny")
    assert [f.name for f in files] == ["bc.md", "bc.csv", "bc.png"]
    md = (tmp_path / "out" / "bc.md").read_text().splitlines()
    assert md[0] == "| layer | b_q | b_k | b_v | b_m1 | b_LN1 | b_m2 | b_m3 | b_LN2 |"
    # layer 1: (1+1)/8 + j/64 for j = 0..7
    assert md[3] == "| 1 | 0.25 | 0.2656 | 0.2812 | 0.2969 | 0.3125 | 0.3281 | 0.3438 | 0.3594 |"
    # mean over layers of term j: 0.25 + j/64
    assert md[-1] == "| mean | 0.25 | 0.2656 | 0.2812 | 0.2969 | 0.3125 | 0.3281 | 0.3438 | 0.3594 |"
    rows = list(csv.DictReader((tmp_path / "out" / "bc.csv").open()))
    assert [r["layer"] for r in rows] == ["0", "1", "2"]
    assert float(rows[2]["b_k"]) == pytest.approx(3 / 8 + 1 / 64, rel=1e-6)
    assert float(rows[0]["b_LN2"]) == pytest.approx(1 / 8 + 7 / 64, rel=1e-6)
    png = (tmp_path / "out" / "bc.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert t.ranking() == TERMS[::-1]


def test_partial_adapter_and_aggregate(tiny_bert_dir, tmp_path):
    qi = ["query", "intermediate"]
    a = make_adapter(tmp_path / "a", tiny_bert_dir, terms=qi)
    b = make_adapter(tmp_path / "b", tiny_bert_dir, terms=qi, scale=3.0)
    t = bias_change.analyze([a, b])
    assert t.sources == [str(a), str(b)]
    for i in range(3):
        for j, term in enumerate(TERMS):
            if term in qi:  # mean of (l+1)/8 and 3(l+1)/8, plus j/64
                assert t.values[i, j] == pytest.approx(2 * (i + 1) / 8 + j / 64, rel=1e-6)
            else:
                assert math.isnan(t.values[i, j])
    md = bias_change.to_markdown(t).splitlines()
    assert md[2] == "| 0 | 0.25 | — | — | — | — | 0.3281 | — | — |"
    row = bias_change.to_csv(t).splitlines()[1].split(",")
    assert row[0] == "0" and row[2:6] == ["", "", "", ""] and row[7:] == ["", ""]
    assert float(row[1]) == pytest.approx(0.25, rel=1e-6) and float(row[6]) == pytest.approx(0.328125, rel=1e-6)
    assert t.ranking() == ["intermediate", "query"]
    bias_change.heatmap(t, tmp_path / "qi.png")
    assert (tmp_path / "qi.png").stat().st_size > 0
    full = make_adapter(tmp_path / "full", tiny_bert_dir)
    with pytest.raises(UserError, match="differ in layers or trained bias terms"):
        bias_change.analyze([a, full])


def test_bad_adapters(tiny_bert_dir, minilm_dir, tmp_path):
    with pytest.raises(UserError, match="not found"):
        bias_change.analyze([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not an adapter folder"):
        bias_change.analyze([tmp_path / "empty"])
    a = make_adapter(tmp_path / "a", tiny_bert_dir)
    with pytest.raises(UserError, match="another base model"):  # tiny adapter on MiniLM: other shapes
        bias_change.analyze([a], model=str(minilm_dir))
    head_only = make_adapter(tmp_path / "h", tiny_bert_dir, method="frozen")
    with pytest.raises(UserError, match="not a BitFit adapter"):
        bias_change.analyze([head_only])


def test_script_writes_outputs_and_rejects_bad_input(tiny_bert_dir, tmp_path):
    a = make_adapter(tmp_path / "a", tiny_bert_dir)
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    script = ["-m", "experiments.bitfit_study.analyze_bias_change"]
    p = subprocess.run([sys.executable, *script, str(a), f"--out={tmp_path}/img/bc"], capture_output=True,
                       text=True, env=env, timeout=300, cwd=REPO)
    assert p.returncode == 0, p.stderr
    assert "largest mean change first: b_LN2 0.3594, b_m3 0.3438" in p.stdout
    assert sorted(f.name for f in (tmp_path / "img").iterdir()) == ["bc.csv", "bc.md", "bc.png"]
    p = subprocess.run([sys.executable, *script, str(tmp_path / "missing")], capture_output=True, text=True,
                       env=env, timeout=300, cwd=REPO)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        f"error: adapter folder {tmp_path / 'missing'} not found"]
