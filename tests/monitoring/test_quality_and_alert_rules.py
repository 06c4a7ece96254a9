"""Model quality, serving figures, alert state transitions and notification mechanics."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import itertools

import numpy as np
import pytest

from falaj_platform.services.monitoring import alerting, quality
from falaj_platform.services.monitoring.alerting import AlertState, Comparator, OpenAlert, Step
from falaj_platform.services.monitoring.quality import LabeledPrediction, Metric, TaskType


def _pairwise_auc(scores: list[float], positives: list[bool]) -> float:
    pos = [s for s, p in zip(scores, positives, strict=True) if p]
    neg = [s for s, p in zip(scores, positives, strict=True) if not p]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_binary_classification_metrics_from_joined_labels() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = np.round(np.clip(labels * 0.3 + rng.normal(0.35, 0.25, 300), 0, 1), 2)  # rounded: ties happen
    predictions = (scores >= 0.5).astype(int)
    rows = [LabeledPrediction(float(p), int(y), float(s)) for p, y, s in zip(predictions, labels, scores, strict=True)]
    metrics = quality.quality_metrics(rows, TaskType.BINARY_CLASSIFICATION, "1")
    tp = int(np.sum((predictions == 1) & (labels == 1)))
    precision, recall = tp / np.sum(predictions == 1), tp / np.sum(labels == 1)
    assert metrics[Metric.ACCURACY] == pytest.approx(np.mean(predictions == labels))
    assert metrics[Metric.PRECISION] == pytest.approx(precision)
    assert metrics[Metric.RECALL] == pytest.approx(recall)
    assert metrics[Metric.F1] == pytest.approx(2 * precision * recall / (precision + recall))
    assert metrics[Metric.ROC_AUC] == pytest.approx(_pairwise_auc(list(scores), list(labels == 1)), abs=1e-12)
    clipped = np.clip(scores, 1e-15, 1 - 1e-15)
    assert metrics[Metric.LOG_LOSS] == pytest.approx(-np.mean(labels * np.log(clipped) + (1 - labels) * np.log(1 - clipped)))


def test_labels_and_predictions_compare_by_value_not_by_type() -> None:
    rows = [LabeledPrediction("1", 1), LabeledPrediction(1.0, True), LabeledPrediction("cat", "cat"), LabeledPrediction("0", 1)]
    assert quality.quality_metrics(rows, TaskType.MULTICLASS_CLASSIFICATION)[Metric.ACCURACY] == 0.5


def test_multiclass_f1_is_the_macro_average() -> None:
    rows = [LabeledPrediction(p, y) for p, y in [("a", "a"), ("a", "b"), ("b", "b"), ("c", "c"), ("c", "a")]]
    metrics = quality.quality_metrics(rows, TaskType.MULTICLASS_CLASSIFICATION)
    f1 = {"a": 2 * 0.5 * 0.5 / 1.0, "b": 2 * 1.0 * 0.5 / 1.5, "c": 2 * 0.5 * 1.0 / 1.5}
    assert metrics[Metric.F1] == pytest.approx(np.mean(list(f1.values())))


def test_regression_metrics() -> None:
    rows = [LabeledPrediction(p, y) for p, y in [(1.0, 1.5), (2.0, 2.0), (3.5, 3.0), (4.0, 5.0)]]
    metrics = quality.quality_metrics(rows, TaskType.REGRESSION)
    errors = np.array([-0.5, 0.0, 0.5, -1.0])
    actual = np.array([1.5, 2.0, 3.0, 5.0])
    assert metrics[Metric.RMSE] == pytest.approx(np.sqrt(np.mean(errors**2)))
    assert metrics[Metric.MAE] == pytest.approx(np.mean(np.abs(errors)))
    assert metrics[Metric.R2] == pytest.approx(1 - np.sum(errors**2) / np.sum((actual - actual.mean()) ** 2))


def test_quality_drop_is_positive_when_worse() -> None:
    assert quality.quality_drop(Metric.ACCURACY, 0.80, 0.90) == pytest.approx(0.10)
    assert quality.quality_drop(Metric.RMSE, 1.5, 1.0) == pytest.approx(0.5)


def test_operational_figures() -> None:
    latencies = [float(v) for v in range(1, 101)]
    figures = quality.operational_figures([*latencies, None], [0] * 95 + [14] * 6, span_seconds=10.0)
    assert figures.request_count == 101 and figures.error_count == 6
    assert figures.error_rate == pytest.approx(6 / 101)
    assert figures.throughput_per_second == pytest.approx(10.1)
    assert figures.latency_p50_ms == pytest.approx(np.percentile(latencies, 50))
    assert figures.latency_p99_ms == pytest.approx(np.percentile(latencies, 99))


NOW = dt.datetime(2025, 5, 1, 12, 0, tzinfo=dt.UTC)


def test_rule_fires_after_for_duration_and_resolves_when_the_condition_clears() -> None:
    wait = dt.timedelta(minutes=5)
    assert alerting.next_step(None, False, NOW, wait) is Step.NOTHING
    assert alerting.next_step(None, True, NOW, wait) is Step.START_PENDING
    assert alerting.next_step(None, True, NOW, dt.timedelta(0)) is Step.START_FIRING
    pending = OpenAlert(AlertState.PENDING, NOW)
    assert alerting.next_step(pending, True, NOW + dt.timedelta(minutes=4), wait) is Step.KEEP
    assert alerting.next_step(pending, True, NOW + wait, wait) is Step.FIRE
    assert alerting.next_step(pending, False, NOW + dt.timedelta(minutes=1), wait) is Step.DROP_PENDING
    firing = OpenAlert(AlertState.FIRING, NOW)
    assert alerting.next_step(firing, True, NOW + wait, wait) is Step.KEEP
    assert alerting.next_step(firing, False, NOW + wait, wait) is Step.RESOLVE


def test_comparators_and_missing_values() -> None:
    assert alerting.condition_holds(0.5, Comparator.GREATER_THAN, 0.3)
    assert not alerting.condition_holds(0.3, Comparator.GREATER_THAN, 0.3)
    assert alerting.condition_holds(0.3, Comparator.GREATER_OR_EQUAL, 0.3)
    assert alerting.condition_holds(0.1, Comparator.LESS_THAN, 0.3)
    assert alerting.condition_holds(0.3, Comparator.LESS_OR_EQUAL, 0.3)
    assert not alerting.condition_holds(None, Comparator.LESS_THAN, 0.3)


def test_retries_back_off_exponentially_up_to_the_cap_and_give_up() -> None:
    schedule = alerting.RetrySchedule(max_attempts=4, initial=dt.timedelta(seconds=1), maximum=dt.timedelta(seconds=3))
    assert [schedule.delay_after(n).total_seconds() for n in (1, 2, 3, 4)] == [1, 2, 3, 3]
    assert not schedule.gives_up_after(3) and schedule.gives_up_after(4)
    assert alerting.is_retryable(0) and alerting.is_retryable(503) and alerting.is_retryable(429)
    assert not alerting.is_retryable(400) and alerting.is_delivered(204)


def test_notifications_are_signed_with_hmac_sha256() -> None:
    body = alerting.notification_body({"b": 1, "a": "x"})
    assert body == b'{"a":"x","b":1}'
    assert alerting.signature("s3cret", body) == "sha256=" + hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
