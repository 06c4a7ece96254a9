"""Model quality from predictions joined to late labels, and serving figures per window.

Classification compares category keys (see `profiles.category_key`), so a label `1` and
a prediction `1.0` or `"1"` agree. ROC AUC is the Mann-Whitney U statistic of the scores
of positives against negatives divided by n_pos * n_neg (ties count one half), which is
what `sklearn.metrics.roc_auc_score` computes.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from falaj_platform.services.monitoring.profiles import category_key, numeric_value


class TaskType(enum.Enum):
    BINARY_CLASSIFICATION = "BINARY_CLASSIFICATION"
    MULTICLASS_CLASSIFICATION = "MULTICLASS_CLASSIFICATION"
    REGRESSION = "REGRESSION"


class Metric(enum.Enum):
    ACCURACY = "ACCURACY"
    PRECISION = "PRECISION"
    RECALL = "RECALL"
    F1 = "F1"
    ROC_AUC = "ROC_AUC"
    LOG_LOSS = "LOG_LOSS"
    RMSE = "RMSE"
    MAE = "MAE"
    R2 = "R2"

    @property
    def lower_is_better(self) -> bool:
        return self in (Metric.LOG_LOSS, Metric.RMSE, Metric.MAE)


# Probabilities are clipped this far from 0 and 1 before the log in log loss.
LOG_LOSS_EPSILON = 1e-15


@dataclass(frozen=True)
class LabeledPrediction:
    """One logged prediction with its joined label (raw values as logged)."""

    prediction: object
    label: object
    score: object = None


def _accuracy(predicted: Sequence[str | None], actual: Sequence[str | None]) -> float:
    return sum(1 for p, a in zip(predicted, actual, strict=True) if p == a) / len(actual)


def _precision_recall_f1(predicted: Sequence[str | None], actual: Sequence[str | None], positive: str) -> tuple[float, float, float]:
    true_positive = sum(1 for p, a in zip(predicted, actual, strict=True) if p == positive and a == positive)
    predicted_positive = sum(1 for p in predicted if p == positive)
    actual_positive = sum(1 for a in actual if a == positive)
    precision = true_positive / predicted_positive if predicted_positive else 0.0
    recall = true_positive / actual_positive if actual_positive else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def roc_auc(scores: Sequence[float], positives: Sequence[bool]) -> float | None:
    """Area under the ROC curve; None unless both classes are present."""
    score_array = np.asarray(scores, dtype=np.float64)
    mask = np.asarray(positives, dtype=bool)
    positive_scores, negative_scores = score_array[mask], score_array[~mask]
    if len(positive_scores) == 0 or len(negative_scores) == 0:
        return None
    u_statistic = stats.mannwhitneyu(positive_scores, negative_scores, alternative="two-sided").statistic
    return float(u_statistic) / (len(positive_scores) * len(negative_scores))


def log_loss(scores: Sequence[float], positives: Sequence[bool]) -> float:
    probability = np.clip(np.asarray(scores, dtype=np.float64), LOG_LOSS_EPSILON, 1 - LOG_LOSS_EPSILON)
    actual = np.asarray(positives, dtype=np.float64)
    return float(-np.mean(actual * np.log(probability) + (1 - actual) * np.log(1 - probability)))


def classification_metrics(rows: Sequence[LabeledPrediction], task: TaskType, positive_class: str = "") -> dict[Metric, float]:
    """Accuracy and, for binary tasks, precision, recall, F1, ROC AUC and log loss of the positive class."""
    if not rows:
        return {}
    predicted = [category_key(row.prediction) for row in rows]
    actual = [category_key(row.label) for row in rows]
    metrics = {Metric.ACCURACY: _accuracy(predicted, actual)}
    if task is TaskType.MULTICLASS_CLASSIFICATION:
        classes = sorted({a for a in actual if a is not None} | {p for p in predicted if p is not None})
        f1s = [_precision_recall_f1(predicted, actual, c)[2] for c in classes]
        metrics[Metric.F1] = float(np.mean(f1s)) if f1s else 0.0
        return metrics
    positive = category_key(positive_class) or "1"
    precision, recall, f1 = _precision_recall_f1(predicted, actual, positive)
    metrics.update({Metric.PRECISION: precision, Metric.RECALL: recall, Metric.F1: f1})
    scores: list[float] = []
    positives: list[bool] = []
    for row, label in zip(rows, actual, strict=True):
        score = numeric_value_or_none(row.score)
        if score is not None:
            scores.append(score)
            positives.append(label == positive)
    if scores:
        auc = roc_auc(scores, positives)
        if auc is not None:
            metrics[Metric.ROC_AUC] = auc
        metrics[Metric.LOG_LOSS] = log_loss(scores, positives)
    return metrics


def numeric_value_or_none(value: object) -> float | None:
    try:
        return numeric_value(value)
    except ValueError:
        return None


def regression_metrics(rows: Sequence[LabeledPrediction]) -> dict[Metric, float]:
    """RMSE, MAE and R2 over rows whose prediction and label are numbers."""
    pairs = [(numeric_value_or_none(row.prediction), numeric_value_or_none(row.label)) for row in rows]
    clean = [(p, a) for p, a in pairs if p is not None and a is not None]
    if not clean:
        return {}
    predicted = np.asarray([p for p, _ in clean], dtype=np.float64)
    actual = np.asarray([a for _, a in clean], dtype=np.float64)
    errors = predicted - actual
    metrics = {Metric.RMSE: float(np.sqrt(np.mean(errors**2))), Metric.MAE: float(np.mean(np.abs(errors)))}
    total = float(np.sum((actual - actual.mean()) ** 2))
    if total > 0:
        metrics[Metric.R2] = 1.0 - float(np.sum(errors**2)) / total
    return metrics


def quality_metrics(rows: Sequence[LabeledPrediction], task: TaskType, positive_class: str = "") -> dict[Metric, float]:
    if task is TaskType.REGRESSION:
        return regression_metrics(rows)
    return classification_metrics(rows, task, positive_class)


def quality_drop(metric: Metric, value: float, training_value: float) -> float:
    """How much worse the window is than training; positive is worse."""
    return value - training_value if metric.lower_is_better else training_value - value


# -- operations -------------------------------------------------------------------------


@dataclass(frozen=True)
class OperationalFigures:
    """Serving figures over one window; latencies in milliseconds."""

    request_count: int
    error_count: int
    error_rate: float
    throughput_per_second: float
    latency_p50_ms: float
    latency_p90_ms: float
    latency_p95_ms: float
    latency_p99_ms: float


def operational_figures(latencies_ms: Sequence[float | None], status_codes: Sequence[int], span_seconds: float) -> OperationalFigures:
    """Latency percentiles (linear interpolation), error rate (status != OK) and throughput."""
    count = len(status_codes)
    errors = sum(1 for code in status_codes if code != 0)
    known = np.asarray([lat for lat in latencies_ms if lat is not None and math.isfinite(lat)], dtype=np.float64)
    if len(known):
        p50, p90, p95, p99 = (float(v) for v in np.percentile(known, [50, 90, 95, 99]))
    else:
        p50 = p90 = p95 = p99 = 0.0
    return OperationalFigures(
        request_count=count,
        error_count=errors,
        error_rate=errors / count if count else 0.0,
        throughput_per_second=count / span_seconds if span_seconds > 0 else 0.0,
        latency_p50_ms=p50,
        latency_p90_ms=p90,
        latency_p95_ms=p95,
        latency_p99_ms=p99,
    )
