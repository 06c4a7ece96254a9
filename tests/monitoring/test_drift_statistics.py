"""Drift statistics equal scipy's on the same data, the test is chosen as Evidently chooses
it, injected drift is found and clean windows are not (false-positive rate over seeds)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from scipy.spatial import distance
from statsmodels.stats.proportion import proportions_ztest

from falaj_platform.services.monitoring import drift
from falaj_platform.services.monitoring.drift import ColumnKind, ColumnTest, Method

NUM, CAT = ColumnKind.NUMERICAL, ColumnKind.CATEGORICAL


def test_kolmogorov_smirnov_is_scipys_ks_2samp() -> None:
    rng = np.random.default_rng(1)
    reference, current = rng.normal(0, 1, 800), rng.normal(0.2, 1.1, 600)
    expected = stats.ks_2samp(reference, current)
    result = drift.kolmogorov_smirnov(reference, current)
    assert result.statistic == expected.statistic
    assert result.p_value == expected.pvalue


def test_wasserstein_is_scipys_distance_over_the_reference_population_std() -> None:
    rng = np.random.default_rng(2)
    reference, current = rng.gamma(2.0, 3.0, 5000), rng.gamma(2.2, 3.0, 4000)
    expected = stats.wasserstein_distance(reference, current) / np.std(reference)
    assert drift.wasserstein_normalized(reference, current) == pytest.approx(expected, rel=1e-15)
    # A constant reference is divided by 0.001, never by zero.
    assert drift.wasserstein_normalized(np.full(10, 3.0), np.full(10, 3.5)) == pytest.approx(500.0)


def test_jensen_shannon_is_scipys_distance_on_sturges_bins_over_both_samples() -> None:
    rng = np.random.default_rng(3)
    reference, current = rng.normal(0, 1, 3000), rng.normal(0.3, 1, 2000)
    edges = np.histogram_bin_edges(np.concatenate([reference, current]), bins="sturges")
    p = np.histogram(reference, edges)[0] / len(reference)
    q = np.histogram(current, edges)[0] / len(current)
    assert drift.jensen_shannon(reference, current, NUM) == pytest.approx(distance.jensenshannon(p, q, 2.0), abs=1e-15)


def test_jensen_shannon_of_categories_uses_each_category_as_a_bin() -> None:
    reference = np.array(["a"] * 50 + ["b"] * 30 + ["c"] * 20, dtype=object)
    current = np.array(["a"] * 20 + ["b"] * 30 + ["d"] * 50, dtype=object)
    p = np.array([0.5, 0.3, 0.2, 0.0])
    q = np.array([0.2, 0.3, 0.0, 0.5])
    assert drift.jensen_shannon(reference, current, CAT) == pytest.approx(distance.jensenshannon(p, q, 2.0), abs=1e-15)


def test_chi_square_is_scipys_chisquare_against_scaled_reference_counts() -> None:
    reference = np.array(["x"] * 400 + ["y"] * 350 + ["z"] * 250, dtype=object)
    current = np.array(["x"] * 150 + ["y"] * 200 + ["z"] * 150, dtype=object)
    expected = stats.chisquare([150, 200, 150], [200.0, 175.0, 125.0])
    result = drift.chi_square(reference, current)
    assert result.statistic == pytest.approx(expected.statistic, rel=1e-12)
    assert result.p_value == pytest.approx(expected.pvalue, rel=1e-12)


def test_psi_follows_its_definition_with_empty_bins_filled() -> None:
    reference = np.array(["a"] * 60 + ["b"] * 40, dtype=object)
    current = np.array(["a"] * 30 + ["b"] * 50 + ["c"] * 20, dtype=object)
    ref = np.array([0.6, 0.4, 0.0001])  # the empty reference bin gets 0.0001 (as Evidently)
    cur = np.array([0.3, 0.5, 0.2])
    assert drift.population_stability_index(reference, current, CAT) == pytest.approx(
        float(np.sum((ref - cur) * np.log(ref / cur))), rel=1e-12
    )


def test_z_test_equals_statsmodels_two_proportion_test() -> None:
    reference = np.array(["yes"] * 300 + ["no"] * 700, dtype=object)
    current = np.array(["yes"] * 180 + ["no"] * 320, dtype=object)
    result = drift.z_test(reference, current)
    z, p = proportions_ztest([700, 320], [1000, 500])  # share of values other than the first key ("no")
    assert abs(result.statistic) == pytest.approx(abs(z), rel=1e-12)
    assert result.p_value == pytest.approx(p, rel=1e-12)


@pytest.mark.parametrize(
    ("kind", "reference_rows", "distinct", "expected"),
    [
        (NUM, 1000, 50, Method.KOLMOGOROV_SMIRNOV),
        (NUM, 1000, 4, Method.CHI_SQUARE),
        (NUM, 1000, 2, Method.Z_TEST),
        (CAT, 500, 7, Method.CHI_SQUARE),
        (CAT, 500, 2, Method.Z_TEST),
        (NUM, 1001, 50, Method.WASSERSTEIN_NORMALIZED),
        (NUM, 5000, 5, Method.JENSEN_SHANNON),
        (CAT, 5000, 40, Method.JENSEN_SHANNON),
    ],
)
def test_default_method_is_chosen_by_type_and_size_as_evidently_does(
    kind: ColumnKind, reference_rows: int, distinct: int, expected: Method
) -> None:
    values = np.arange(distinct, dtype=np.float64) if kind is NUM else np.array([f"v{i}" for i in range(distinct)], dtype=object)
    assert drift.default_method(kind, reference_rows, values) is expected


def test_missing_and_infinite_values_are_left_out_and_counted() -> None:
    reference = np.array([1.0, 2.0, 3.0, np.nan, 4.0, 5.0, 6.0, 7.0])
    current = np.array([1.5, np.inf, np.nan, 2.5, 3.5, 4.5, 5.5, 6.5])
    result = drift.column_drift(ColumnTest("f", NUM), reference, current)
    assert (result.reference_count, result.current_count, result.current_missing_count) == (7, 6, 2)
    expected = stats.ks_2samp(reference[np.isfinite(reference)], current[np.isfinite(current)])
    assert result.method is Method.KOLMOGOROV_SMIRNOV and result.p_value == expected.pvalue


def test_configured_methods_and_thresholds_apply_and_wrong_ones_are_refused() -> None:
    settings = drift.DriftSettings(
        numerical_method=Method.PSI,
        method_thresholds={Method.PSI: 0.5},
        column_methods={"b": Method.JENSEN_SHANNON},
        column_thresholds={"b": 0.01},
    )
    assert settings.column_test("a", NUM) == ColumnTest("a", NUM, Method.PSI, None)
    assert settings.threshold_for(Method.PSI, None) == 0.5
    assert settings.column_test("b", NUM) == ColumnTest("b", NUM, Method.JENSEN_SHANNON, 0.01)
    with pytest.raises(drift.DriftConfigError, match="needs a numerical column"):
        drift.DriftSettings(categorical_method=Method.KOLMOGOROV_SMIRNOV).column_test("c", CAT)


def _frames(seed: int, rows_reference: int, rows_current: int, shift: float) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    reference = {f"f{i}": rng.normal(0, 1, rows_reference) for i in range(6)}
    reference["city"] = rng.choice(np.array(["dxb", "auh", "shj", "ajm"], dtype=object), rows_reference, p=[0.4, 0.3, 0.2, 0.1])
    current = {f"f{i}": rng.normal(shift if i < 4 else 0.0, 1, rows_current) for i in range(6)}
    probabilities = [0.1, 0.2, 0.3, 0.4] if shift else [0.4, 0.3, 0.2, 0.1]
    current["city"] = rng.choice(np.array(["dxb", "auh", "shj", "ajm"], dtype=object), rows_current, p=probabilities)
    return reference, current


TESTS = [ColumnTest(f"f{i}", NUM) for i in range(6)] + [ColumnTest("city", CAT)]


@pytest.mark.parametrize(("rows_reference", "rows_current"), [(800, 400), (5000, 2000)], ids=["p-value tests", "distances"])
def test_injected_drift_is_detected_and_clean_windows_are_not(rows_reference: int, rows_current: int) -> None:
    seeds = range(40)
    clean = [drift.dataset_drift(TESTS, *_frames(seed, rows_reference, rows_current, 0.0), with_plots=False) for seed in seeds]
    drifted = [drift.dataset_drift(TESTS, *_frames(seed, rows_reference, rows_current, 0.6), with_plots=False) for seed in seeds]
    # Dataset drift (half of the columns) never fires on clean data ...
    assert sum(r.dataset_drift for r in clean) == 0
    # ... a single column's false-positive rate stays near the p-value threshold (5%) or below ...
    column_false_positives = sum(c.drifted for r in clean for c in r.columns) / (len(clean) * len(TESTS))
    assert column_false_positives <= 0.09
    # ... and a shift of 0.6 std in 4 of 7 columns is found every time.
    assert all(r.dataset_drift and r.drifted_count >= 4 for r in drifted)


def test_dataset_drift_is_the_share_of_tested_columns_at_or_above_the_threshold() -> None:
    reference, current = _frames(7, 3000, 3000, 0.6)
    result = drift.dataset_drift(TESTS, reference, current, drift.DriftSettings(drift_share_threshold=0.5))
    assert result.tested_count == 7
    assert result.drift_share == result.drifted_count / 7
    assert result.dataset_drift == (result.drift_share >= 0.5)
    empty = drift.column_drift(ColumnTest("f0", NUM), reference["f0"], np.full(10, np.nan))
    assert not empty.tested and empty.current_missing_count == 10
    assert drift.summarize([empty], 0.5).tested_count == 0


def test_plots_share_bins_between_reference_and_current() -> None:
    reference, current = _frames(8, 2000, 1000, 0.0)
    numeric = drift.column_drift(ColumnTest("f0", NUM), reference["f0"], current["f0"])
    assert numeric.reference_histogram and numeric.current_histogram
    assert numeric.reference_histogram.bin_edges == numeric.current_histogram.bin_edges
    assert sum(numeric.reference_histogram.counts) == 2000 and sum(numeric.current_histogram.counts) == 1000
    categorical = drift.column_drift(ColumnTest("city", CAT), reference["city"], current["city"])
    assert dict(categorical.reference_categories) == pd.Series(reference["city"]).value_counts().to_dict()
