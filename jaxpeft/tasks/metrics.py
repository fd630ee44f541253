"""Sequence-task metrics: accuracy, binary and macro F1 and Matthews correlation from the confusion
counts (numpy), Pearson and Spearman correlations from scipy; GLUE's per task.

The classification metrics are the textbook formulas, checked against scikit-learn's in
``tests/test_metrics.py`` (equal on random predictions, degenerate cases included). A run does not
import scikit-learn: its import took 11.7 s on the H200 host (2026-12-02), more than the
whole training loop of the main command.

>>> import numpy as np
>>> compute("mrpc", np.array([1, 0, 1, 1]), np.array([1, 0, 0, 1]))
{'accuracy': 0.75, 'f1': 0.8}
"""

from __future__ import annotations

import warnings

import numpy as np

#: imported on first use (a run warms them up in the background: ``jaxpeft.runtime.prewarm``);
#: only regression tasks need scipy
HEAVY_IMPORTS: tuple[str, ...] = ()

#: Metrics reported per task; the first is the one used to pick the best checkpoint unless the
#: task says otherwise (see ``jaxpeft.tasks.glue.GlueTask.main_metric``).
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "sst2": ("accuracy",),
    "cola": ("matthews_correlation", "accuracy"),
    "mrpc": ("accuracy", "f1"),
    "qqp": ("accuracy", "f1"),
    "stsb": ("pearson", "spearman"),
    "mnli": ("accuracy",),
    "qnli": ("accuracy",),
    "rte": ("accuracy",),
    "wnli": ("accuracy",),
}


def compute(task: str, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """GLUE task ``task``'s metrics for ``predictions`` (class ids, or scores for STS-B) against ``labels``."""
    return compute_named(TASK_METRICS[task], predictions, labels)


#: every metric :func:`compute_named` knows
NAMES = ("accuracy", "f1", "macro_f1", "matthews_correlation", "pearson", "spearman")


def compute_named(names: tuple[str, ...] | list[str], predictions: np.ndarray, labels: np.ndarray,
                  num_labels: int | None = None) -> dict[str, float]:
    """The metrics ``names`` (of :data:`NAMES`) of ``predictions`` against ``labels``."""
    predictions = np.asarray(predictions)
    labels = np.asarray(labels)
    if predictions.shape != labels.shape:
        raise ValueError(f"{predictions.shape=} != {labels.shape=}")
    out: dict[str, float] = {}
    for name in names:
        if name == "accuracy":
            out[name] = float(np.mean(predictions == labels)) if labels.size else 0.0
        elif name == "f1":
            out[name] = f1(predictions, labels)
        elif name == "macro_f1":
            k = num_labels or int(max(predictions.max(initial=0), labels.max(initial=0)) + 1)
            out[name] = float(np.mean([f1(predictions, labels, c) for c in range(k)]))
        elif name == "matthews_correlation":
            out[name] = matthews(predictions, labels)
        elif name in ("pearson", "spearman"):
            from scipy import stats

            fn = stats.pearsonr if name == "pearson" else stats.spearmanr
            with warnings.catch_warnings():  # constant predictions: undefined, reported as 0
                warnings.simplefilter("ignore", stats.ConstantInputWarning)
                out[name] = _finite(fn(predictions, labels)[0])
    return out


def f1(predictions: np.ndarray, labels: np.ndarray, positive: int = 1) -> float:
    """Binary F1 of class ``positive``: ``2 tp / (2 tp + fp + fn)`` (0 when there is no positive
    in either, as scikit-learn's ``zero_division`` default)."""
    p, y = predictions == positive, labels == positive
    tp, fp, fn = int(np.sum(p & y)), int(np.sum(p & ~y)), int(np.sum(~p & y))
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def matthews(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation of two label arrays (any number of classes), from the confusion matrix
    as scikit-learn computes it; 0 when it is undefined (one class predicted or present)."""
    classes, inv = np.unique(np.concatenate([labels, predictions]), return_inverse=True)
    y, p = inv[:len(labels)], inv[len(labels):]
    k = len(classes)
    c = np.zeros((k, k), np.float64)
    np.add.at(c, (y, p), 1)
    t, pk = c.sum(1), c.sum(0)
    n, correct = c.sum(), np.trace(c)
    cov_yp = correct * n - t @ pk
    cov_pp, cov_yy = n * n - pk @ pk, n * n - t @ t
    if cov_pp * cov_yy == 0:
        return 0.0
    return float(cov_yp / np.sqrt(cov_yy * cov_pp))


def _finite(x: float) -> float:
    """Correlation of a constant prediction is undefined (NaN); report 0 so best-tracking works."""
    x = float(x)
    return x if np.isfinite(x) else 0.0


def majority_baseline(task: str, train_labels: np.ndarray, eval_labels: np.ndarray) -> dict[str, float]:
    """Metrics of always predicting the most frequent training label (mean score for STS-B)."""
    if task == "stsb":
        pred = np.full(eval_labels.shape, float(np.mean(train_labels)))
        return {"pearson": 0.0, "spearman": 0.0} | {"mse": float(np.mean((pred - eval_labels) ** 2))}
    values, counts = np.unique(train_labels, return_counts=True)
    return compute(task, np.full(eval_labels.shape, values[np.argmax(counts)]), eval_labels)
