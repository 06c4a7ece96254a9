"""Held-out metrics, computed with numpy: classification and regression.

Binary metrics treat the second class label as positive; multiclass precision, recall,
F1 and ROC AUC are macro averages (ROC AUC one-vs-rest over the classes present with
both outcomes). ROC AUC is the Mann-Whitney statistic with average ranks for ties, so
it equals the area under the ROC curve with ties counted half.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

EPSILON = 1e-15

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


def average_ranks(values: npt.ArrayLike) -> FloatArray:
    """1-based ranks, ties sharing the average of their positions."""
    data = np.asarray(values, dtype=np.float64)
    order = np.argsort(data, kind="mergesort")
    ordered = data[order]
    # Start of each run of equal values, and each run's average rank.
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], len(ordered)]
    run_ranks = (starts + ends + 1) / 2.0
    ranks = np.empty(len(data), dtype=np.float64)
    ranks[order] = np.repeat(run_ranks, ends - starts)
    return ranks


def roc_auc(positive: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """Area under the ROC curve of `scores` for the boolean `positive`; NaN with one class only."""
    is_positive = np.asarray(positive, dtype=bool)
    n_pos = int(is_positive.sum())
    n_neg = len(is_positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = average_ranks(scores)
    u_statistic = ranks[is_positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u_statistic / (n_pos * n_neg))


def confusion_matrix(actual: IntArray, predicted: IntArray, num_classes: int) -> IntArray:
    """Actual class by row, predicted by column."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (actual, predicted), 1)
    return matrix


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else 0.0


def classification_metrics(actual: npt.ArrayLike, probabilities: npt.ArrayLike, threshold: float = 0.5) -> dict[str, object]:
    """Metrics of class probabilities `[n, K]` (K >= 2) against class indices `actual`."""
    y = np.asarray(actual, dtype=np.int64)
    proba = np.asarray(probabilities, dtype=np.float64)
    num_classes = proba.shape[1]
    if num_classes == 2:
        predicted = (proba[:, 1] >= threshold).astype(np.int64)
    else:
        predicted = proba.argmax(axis=1).astype(np.int64)
    matrix = confusion_matrix(y, predicted, num_classes)
    true_positive = np.diag(matrix).astype(np.float64)
    predicted_count = matrix.sum(axis=0).astype(np.float64)
    actual_count = matrix.sum(axis=1).astype(np.float64)
    precisions = [_ratio(true_positive[k], predicted_count[k]) for k in range(num_classes)]
    recalls = [_ratio(true_positive[k], actual_count[k]) for k in range(num_classes)]
    f1s = [_ratio(2 * p * r, p + r) for p, r in zip(precisions, recalls, strict=True)]
    if num_classes == 2:
        precision, recall, f1 = precisions[1], recalls[1], f1s[1]
        auc = roc_auc(y == 1, proba[:, 1])
    else:
        precision, recall, f1 = float(np.mean(precisions)), float(np.mean(recalls)), float(np.mean(f1s))
        per_class = [roc_auc(y == k, proba[:, k]) for k in range(num_classes)]
        defined = [value for value in per_class if not math.isnan(value)]
        auc = float(np.mean(defined)) if defined else math.nan
    chosen = np.clip(proba[np.arange(len(y)), y], EPSILON, 1.0)
    return {
        "accuracy": _ratio(float(true_positive.sum()), float(len(y))),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "roc_auc": auc,
        "log_loss": float(-np.mean(np.log(chosen))) if len(y) else math.nan,
        "confusion_matrix": matrix,
    }


def binary_probabilities(positive_probability: npt.ArrayLike) -> FloatArray:
    """`[n, 2]` class probabilities from the positive-class probability."""
    p = np.asarray(positive_probability, dtype=np.float64).reshape(-1)
    return np.stack([1.0 - p, p], axis=1)


def regression_metrics(actual: npt.ArrayLike, predicted: npt.ArrayLike) -> dict[str, float]:
    y = np.asarray(actual, dtype=np.float64).reshape(-1)
    pred = np.asarray(predicted, dtype=np.float64).reshape(-1)
    error = pred - y
    total = float(np.sum((y - y.mean()) ** 2)) if len(y) else 0.0
    return {
        "rmse": float(np.sqrt(np.mean(error**2))),
        "mae": float(np.mean(np.abs(error))),
        "r2": 1.0 - float(np.sum(error**2)) / total if total > 0 else math.nan,
    }
