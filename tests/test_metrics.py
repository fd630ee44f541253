"""Metrics against independent computations (numpy formulas, scipy, sklearn)."""

import numpy as np
from scipy import stats

from jaxpeft import metrics


def test_accuracy_f1_matthews_by_hand():
    y = np.array([1, 0, 1, 1, 0, 0, 1, 0])
    p = np.array([1, 0, 0, 1, 1, 0, 1, 1])
    tp, fp, fn, tn = 3, 2, 1, 2
    m = metrics.compute("mrpc", p, y)
    assert m["accuracy"] == (tp + tn) / 8
    assert np.isclose(m["f1"], 2 * tp / (2 * tp + fp + fn))
    mcc = (tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert np.isclose(metrics.compute("cola", p, y)["matthews_correlation"], mcc)


def test_stsb_correlations():
    rng = np.random.default_rng(0)
    y = rng.uniform(0, 5, 200)
    p = y + rng.normal(0, 1, 200)
    m = metrics.compute("stsb", p, y)
    assert np.isclose(m["pearson"], np.corrcoef(p, y)[0, 1])
    assert np.isclose(m["spearman"], stats.pearsonr(stats.rankdata(p), stats.rankdata(y))[0])
    assert metrics.compute("stsb", np.ones(200), y)["pearson"] == 0.0  # constant prediction


def test_majority_baseline():
    m = metrics.majority_baseline("sst2", np.array([1, 1, 0]), np.array([1, 0, 0, 0]))
    assert m == {"accuracy": 0.25}
