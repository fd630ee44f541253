"""GLUE metrics, computed with scikit-learn and scipy.

>>> import numpy as np
>>> compute("mrpc", np.array([1, 0, 1, 1]), np.array([1, 0, 0, 1]))
{'accuracy': 0.75, 'f1': 0.8}
"""

from __future__ import annotations

import warnings

import numpy as np

#: imported on first use (scikit-learn and scipy take seconds to import; a run warms them up in
#: the background: ``jaxpeft.runtime.prewarm``)
HEAVY_IMPORTS = ("sklearn.metrics", "scipy.stats")

#: Metrics reported per task; the first is the one used to pick the best checkpoint unless the
#: task says otherwise (see ``jaxpeft.data.GlueTask.main_metric``).
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
    """Task metrics for ``predictions`` (class ids, or scores for STS-B) against ``labels``."""
    from scipy import stats
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    predictions = np.asarray(predictions)
    labels = np.asarray(labels)
    if predictions.shape != labels.shape:
        raise ValueError(f"{predictions.shape=} != {labels.shape=}")
    out: dict[str, float] = {}
    for name in TASK_METRICS[task]:
        if name == "accuracy":
            out[name] = float(accuracy_score(labels, predictions))
        elif name == "f1":
            out[name] = float(f1_score(labels, predictions))
        elif name == "matthews_correlation":
            out[name] = float(matthews_corrcoef(labels, predictions))
        elif name in ("pearson", "spearman"):
            fn = stats.pearsonr if name == "pearson" else stats.spearmanr
            with warnings.catch_warnings():  # constant predictions: undefined, reported as 0
                warnings.simplefilter("ignore", stats.ConstantInputWarning)
                out[name] = _finite(fn(predictions, labels)[0])
    return out


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
