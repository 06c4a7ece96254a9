"""Held-out metrics against reference computations (scipy where it has the function)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from falaj_platform.services.training import metrics as mx


def test_average_ranks_match_scipy() -> None:
    values = np.array([3.0, 1.0, 2.0, 2.0, 5.0, 1.0, 2.0])
    assert np.allclose(mx.average_ranks(values), stats.rankdata(values))


def test_roc_auc_is_the_mann_whitney_statistic_with_ties() -> None:
    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=500), 1)  # rounded: many ties
    positive = rng.random(500) < 1 / (1 + np.exp(-2 * scores))
    u = stats.mannwhitneyu(scores[positive], scores[~positive]).statistic
    assert mx.roc_auc(positive, scores) == pytest.approx(u / (positive.sum() * (~positive).sum()))
    assert mx.roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert mx.roc_auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
    assert mx.roc_auc([1, 0], [0.5, 0.5]) == 0.5
    assert math.isnan(mx.roc_auc([1, 1], [0.2, 0.3]))


def test_binary_metrics_match_a_hand_count() -> None:
    actual = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    p = np.array([0.9, 0.6, 0.4, 0.7, 0.2, 0.1, 0.3, 0.8])
    found = mx.classification_metrics(actual, mx.binary_probabilities(p), threshold=0.5)
    # predicted: 1 1 0 1 0 0 0 1 -> tp=3 fp=1 fn=1 tn=3
    assert found["accuracy"] == pytest.approx(6 / 8)
    assert found["precision"] == pytest.approx(3 / 4)
    assert found["recall"] == pytest.approx(3 / 4)
    assert found["f1"] == pytest.approx(3 / 4)
    assert np.asarray(found["confusion_matrix"]).tolist() == [[3, 1], [1, 3]]
    expected_log_loss = -np.mean(actual * np.log(p) + (1 - actual) * np.log(1 - p))
    assert found["log_loss"] == pytest.approx(expected_log_loss)
    u = stats.mannwhitneyu(p[actual == 1], p[actual == 0]).statistic
    assert found["roc_auc"] == pytest.approx(u / 16)
    stricter = mx.classification_metrics(actual, mx.binary_probabilities(p), threshold=0.85)
    assert stricter["precision"] == 1.0 and stricter["recall"] == pytest.approx(1 / 4)


def test_multiclass_metrics_are_macro_averages() -> None:
    actual = np.array([0, 0, 1, 1, 2, 2])
    proba = np.array([[0.8, 0.1, 0.1], [0.3, 0.6, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.1, 0.2, 0.7], [0.5, 0.1, 0.4]])
    found = mx.classification_metrics(actual, proba)
    # predicted: 0 1 1 1 2 0
    assert np.asarray(found["confusion_matrix"]).tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    precision = np.mean([1 / 2, 2 / 3, 1 / 1])
    recall = np.mean([1 / 2, 2 / 2, 1 / 2])
    f1 = np.mean([0.5, 0.8, 2 / 3])
    assert (found["precision"], found["recall"], found["f1"]) == pytest.approx((precision, recall, f1))
    ovr = [stats.mannwhitneyu(proba[actual == k, k], proba[actual != k, k]).statistic / 8 for k in range(3)]
    assert found["roc_auc"] == pytest.approx(np.mean(ovr))
    assert found["log_loss"] == pytest.approx(-np.mean(np.log([0.8, 0.3, 0.7, 0.8, 0.7, 0.4])))


def test_regression_metrics_match_their_definitions_and_scipy() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=200)
    y = 2 * x + rng.normal(scale=0.5, size=200)
    fit = stats.linregress(x, y)
    prediction = fit.intercept + fit.slope * x
    found = mx.regression_metrics(y, prediction)
    assert found["r2"] == pytest.approx(fit.rvalue**2)  # R^2 of a least-squares line is r^2
    assert found["rmse"] == pytest.approx(np.sqrt(np.mean((y - prediction) ** 2)))
    assert found["mae"] == pytest.approx(np.mean(np.abs(y - prediction)))
    assert mx.regression_metrics([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == {"rmse": 0.0, "mae": 0.0, "r2": 1.0}
