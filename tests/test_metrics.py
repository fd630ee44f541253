"""Metrics against independent computations (numpy formulas, scipy, sklearn)."""

import numpy as np
from scipy import stats

from jaxpeft.tasks import metrics


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


def test_classification_metrics_equal_scikit_learn():
    """The numpy formulas against scikit-learn on random and degenerate predictions."""
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    rng = np.random.default_rng(1)
    cases = [(rng.integers(0, 2, 500), rng.integers(0, 2, 500)) for _ in range(5)]
    cases += [(np.ones(10, int), rng.integers(0, 2, 10)), (np.zeros(10, int), np.zeros(10, int)),
              (np.zeros(10, int), np.ones(10, int)), (rng.integers(0, 3, 300), rng.integers(0, 3, 300))]
    for p, y in cases:
        assert metrics.compute("rte", p, y)["accuracy"] == accuracy_score(y, p)
        assert np.isclose(metrics.matthews(p, y), matthews_corrcoef(y, p), atol=1e-12)
        if y.max() <= 1 and p.max() <= 1:
            assert np.isclose(metrics.f1(p, y), f1_score(y, p, zero_division=0.0), atol=1e-12)
