"""Drift statistics of one column and of a dataset: the figures and the choice of test.

Every statistic is scipy's on the same data (`scipy.stats.ks_2samp`,
`scipy.stats.wasserstein_distance`, `scipy.spatial.distance.jensenshannon`,
`scipy.stats.chisquare`), prepared the way Evidently prepares it, so a Falaj report and
an Evidently data-drift preset agree on the same frames: missing and infinite values
are dropped, binned distributions use Sturges bins over both samples (or one bin per
value when the reference has at most 20 distinct values), Wasserstein is divided by the
reference's population standard deviation, and the test is chosen by type and size.

Numerical columns are float arrays with NaN for missing; categorical columns are object
arrays of category keys (strings) with None for missing.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import pandas as pd
from scipy import stats
from scipy.spatial import distance


class ColumnKind(enum.Enum):
    """Statistical type of a column, which picks its drift test."""

    NUMERICAL = "NUMERICAL"
    CATEGORICAL = "CATEGORICAL"


class Method(enum.Enum):
    """A drift statistic."""

    PSI = "PSI"
    KOLMOGOROV_SMIRNOV = "KOLMOGOROV_SMIRNOV"
    WASSERSTEIN_NORMALIZED = "WASSERSTEIN_NORMALIZED"
    JENSEN_SHANNON = "JENSEN_SHANNON"
    CHI_SQUARE = "CHI_SQUARE"
    Z_TEST = "Z_TEST"

    @property
    def is_p_value_test(self) -> bool:
        """p-value tests find drift below the threshold; distances at or above it."""
        return self in (Method.KOLMOGOROV_SMIRNOV, Method.CHI_SQUARE, Method.Z_TEST)


DEFAULT_THRESHOLDS: dict[Method, float] = {
    Method.KOLMOGOROV_SMIRNOV: 0.05,
    Method.CHI_SQUARE: 0.05,
    Method.Z_TEST: 0.05,
    Method.WASSERSTEIN_NORMALIZED: 0.1,
    Method.JENSEN_SHANNON: 0.1,
    Method.PSI: 0.1,
}

NUMERICAL_ONLY = frozenset({Method.KOLMOGOROV_SMIRNOV, Method.WASSERSTEIN_NORMALIZED})

# Evidently's boundaries: up to this many reference rows p-value tests are used, above
# it distances (p-values of large samples find drift in every harmless wobble).
SMALL_REFERENCE_ROWS = 1000
# Numbers with at most this many distinct values (both samples) are tested as categories.
FEW_VALUES = 5
# A binned statistic gives each value its own bin when the reference has at most this
# many distinct values, else Sturges bins over both samples.
VALUE_BINS_UP_TO = 20
# Wasserstein is divided by the reference std, but never by less than this.
MIN_WASSERSTEIN_NORM = 0.001
# Above this many rows in all, columns are tested on threads (numpy sorts release the GIL).
PARALLEL_ROWS = 200_000

Array = npt.NDArray[np.generic]
FloatArray = npt.NDArray[np.float64]


class DriftConfigError(ValueError):
    """A method or threshold that cannot apply to a column."""


@dataclass(frozen=True)
class TestResult:
    """A statistic, with its p-value for p-value tests."""

    statistic: float
    p_value: float | None = None


@dataclass(frozen=True)
class Histogram:
    """Counts per bin; one more edge than counts."""

    bin_edges: tuple[float, ...]
    counts: tuple[int, ...]


@dataclass(frozen=True)
class ColumnDrift:
    """The drift test of one column and what a plot of it needs."""

    column: str
    kind: ColumnKind
    method: Method
    statistic: float
    p_value: float | None
    threshold: float
    drifted: bool
    tested: bool
    reference_count: int
    current_count: int
    current_missing_count: int
    reference_histogram: Histogram | None = None
    current_histogram: Histogram | None = None
    reference_categories: tuple[tuple[str, int], ...] = ()
    current_categories: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class ColumnTest:
    """What to test on one column: its type, and a method and threshold when chosen."""

    column: str
    kind: ColumnKind
    method: Method | None = None
    threshold: float | None = None


@dataclass(frozen=True)
class DatasetDrift:
    """Per-column drift and the dataset-level verdict."""

    columns: tuple[ColumnDrift, ...]
    tested_count: int
    drifted_count: int
    drift_share: float
    drift_share_threshold: float
    dataset_drift: bool


@dataclass(frozen=True)
class DriftSettings:
    """Method and threshold choices, as a monitor's drift config states them."""

    numerical_method: Method | None = None
    categorical_method: Method | None = None
    method_thresholds: dict[Method, float] = field(default_factory=dict)
    column_methods: dict[str, Method] = field(default_factory=dict)
    column_thresholds: dict[str, float] = field(default_factory=dict)
    drift_share_threshold: float = 0.5

    def column_test(self, column: str, kind: ColumnKind) -> ColumnTest:
        method = self.column_methods.get(column) or (self.numerical_method if kind is ColumnKind.NUMERICAL else self.categorical_method)
        if method is not None:
            check_method_applies(method, kind, column)
        threshold = self.column_thresholds.get(column)
        return ColumnTest(column, kind, method, threshold)

    def threshold_for(self, method: Method, override: float | None) -> float:
        if override is not None and override > 0:
            return override
        return self.method_thresholds.get(method, DEFAULT_THRESHOLDS[method])


def check_method_applies(method: Method, kind: ColumnKind, column: str = "") -> None:
    if kind is ColumnKind.CATEGORICAL and method in NUMERICAL_ONLY:
        where = f" on column {column!r}" if column else ""
        raise DriftConfigError(f"{method.value} needs a numerical column{where}; use CHI_SQUARE, Z_TEST, JENSEN_SHANNON or PSI")


# -- preparation ------------------------------------------------------------------------


def drop_missing(values: Array, kind: ColumnKind) -> Array:
    """Values without missing entries (and, for numbers, without infinities)."""
    if kind is ColumnKind.NUMERICAL:
        numbers = np.asarray(values, dtype=np.float64)
        return numbers[np.isfinite(numbers)]
    objects = np.asarray(values, dtype=object)
    return objects[pd.notna(objects)]


def distinct_count(values: Array) -> int:
    return int(len(pd.unique(values)))


def has_more_distinct_than(values: Array, limit: int) -> bool:
    """Whether `values` holds more than `limit` distinct values; a prefix usually settles it."""
    if len(pd.unique(values[: 8 * (limit + 1)])) > limit:
        return True
    return distinct_count(values) > limit


def _value_shares(reference: Array, current: Array) -> tuple[FloatArray, FloatArray]:
    """Share of each value of either sample, one entry per value."""
    reference_counts = pd.Series(reference).value_counts()
    current_counts = pd.Series(current).value_counts()
    keys = reference_counts.index.union(current_counts.index)
    reference_shares = reference_counts.reindex(keys, fill_value=0).to_numpy(dtype=np.float64) / len(reference)
    current_shares = current_counts.reindex(keys, fill_value=0).to_numpy(dtype=np.float64) / len(current)
    return reference_shares, current_shares


def binned_shares(reference: Array, current: Array, kind: ColumnKind) -> tuple[FloatArray, FloatArray]:
    """Reference and current shares on common bins (Evidently's `get_binned_data`)."""
    if kind is ColumnKind.NUMERICAL and has_more_distinct_than(reference, VALUE_BINS_UP_TO):
        edges = np.histogram_bin_edges(np.concatenate([reference, current]), bins="sturges")
        reference_shares = np.histogram(reference, edges)[0] / len(reference)
        current_shares = np.histogram(current, edges)[0] / len(current)
        return reference_shares.astype(np.float64), current_shares.astype(np.float64)
    return _value_shares(reference, current)


def _fill_empty_bins(shares: FloatArray) -> FloatArray:
    """Empty bins get a small share so that PSI's logarithm stays finite (as Evidently)."""
    filled = shares.copy()
    smallest = float(filled[filled != 0].min())
    filled[filled == 0] = smallest / 10**6 if smallest <= 0.0001 else 0.0001
    return filled


# -- statistics ---------------------------------------------------------------------------


def population_stability_index(reference: Array, current: Array, kind: ColumnKind) -> float:
    """PSI = sum((ref - cur) * ln(ref / cur)) over common bins."""
    reference_shares, current_shares = binned_shares(reference, current, kind)
    reference_shares, current_shares = _fill_empty_bins(reference_shares), _fill_empty_bins(current_shares)
    return float(np.sum((reference_shares - current_shares) * np.log(reference_shares / current_shares)))


def kolmogorov_smirnov(reference: FloatArray, current: FloatArray) -> TestResult:
    """Two-sample KS: D and its p-value (`scipy.stats.ks_2samp`)."""
    result = stats.ks_2samp(reference, current)
    return TestResult(float(result.statistic), float(result.pvalue))


def wasserstein_normalized(reference: FloatArray, current: FloatArray) -> float:
    """Wasserstein-1 distance divided by the reference's population std (at least 0.001)."""
    norm = max(float(np.std(reference)), MIN_WASSERSTEIN_NORM)
    return float(stats.wasserstein_distance(reference, current)) / norm


def jensen_shannon(reference: Array, current: Array, kind: ColumnKind) -> float:
    """Jensen-Shannon distance, base 2, of the binned distributions."""
    reference_shares, current_shares = binned_shares(reference, current, kind)
    return float(distance.jensenshannon(reference_shares, current_shares, 2.0))


def chi_square(reference: Array, current: Array) -> TestResult:
    """Chi-square of current counts against reference frequencies scaled to the current size."""
    reference_counts = pd.Series(reference).value_counts()
    current_counts = pd.Series(current).value_counts()
    keys = reference_counts.index.union(current_counts.index)
    expected = reference_counts.reindex(keys, fill_value=0).to_numpy(dtype=np.float64) * (len(current) / len(reference))
    observed = current_counts.reindex(keys, fill_value=0).to_numpy(dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        result = stats.chisquare(observed, expected)
    return TestResult(float(result.statistic), float(result.pvalue))


def z_test(reference: Array, current: Array) -> TestResult:
    """Two-proportion z-test of a binary column (share of values other than the first key)."""
    reference_values, current_values = pd.unique(reference), pd.unique(current)
    if len(reference_values) == 1 and len(current_values) == 1 and reference_values[0] == current_values[0]:
        return TestResult(0.0, 1.0)
    first = sorted(set(reference_values) | set(current_values), key=str)[0]
    n1, n2 = len(reference), len(current)
    p1 = float(np.count_nonzero(reference != first)) / n1
    p2 = float(np.count_nonzero(current != first)) / n2
    pooled = (p1 * n1 + p2 * n2) / (n1 + n2)
    z = (p1 - p2) / math.sqrt(pooled * (1 - pooled) * (1.0 / n1 + 1.0 / n2))
    return TestResult(z, float(2 * stats.norm.sf(abs(z))))


def default_method(kind: ColumnKind, reference_count: int, both_samples: Array) -> Method:
    """Evidently's default test for a column of this type and size.

    The number of distinct values counts both samples together (`both_samples`).
    """
    many_values = has_more_distinct_than(both_samples, FEW_VALUES)
    if reference_count <= SMALL_REFERENCE_ROWS:
        if kind is ColumnKind.NUMERICAL and many_values:
            return Method.KOLMOGOROV_SMIRNOV
        return Method.CHI_SQUARE if has_more_distinct_than(both_samples, 2) else Method.Z_TEST
    if kind is ColumnKind.NUMERICAL and many_values:
        return Method.WASSERSTEIN_NORMALIZED
    return Method.JENSEN_SHANNON


def run_test(method: Method, reference: Array, current: Array, kind: ColumnKind) -> TestResult:
    """The statistic of `method` on two samples without missing values."""
    if method is Method.KOLMOGOROV_SMIRNOV:
        return kolmogorov_smirnov(np.asarray(reference, dtype=np.float64), np.asarray(current, dtype=np.float64))
    if method is Method.WASSERSTEIN_NORMALIZED:
        return TestResult(wasserstein_normalized(np.asarray(reference, dtype=np.float64), np.asarray(current, dtype=np.float64)))
    if method is Method.JENSEN_SHANNON:
        return TestResult(jensen_shannon(reference, current, kind))
    if method is Method.PSI:
        return TestResult(population_stability_index(reference, current, kind))
    if method is Method.CHI_SQUARE:
        return chi_square(reference, current)
    return z_test(reference, current)


# -- plots --------------------------------------------------------------------------------

MAX_PLOTTED_CATEGORIES = 30


def _histograms(reference: FloatArray, current: FloatArray) -> tuple[Histogram, Histogram]:
    edges = np.histogram_bin_edges(np.concatenate([reference, current]), bins="sturges")
    return (
        Histogram(tuple(float(e) for e in edges), tuple(int(c) for c in np.histogram(reference, edges)[0])),
        Histogram(tuple(float(e) for e in edges), tuple(int(c) for c in np.histogram(current, edges)[0])),
    )


def _category_counts(reference: Array, current: Array) -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, int], ...]]:
    reference_counts = pd.Series(reference, dtype=object).astype(str).value_counts()
    current_counts = pd.Series(current, dtype=object).astype(str).value_counts()
    both = reference_counts.add(current_counts, fill_value=0).sort_values(ascending=False, kind="stable")
    keys = list(both.index[:MAX_PLOTTED_CATEGORIES])
    return (
        tuple((str(k), int(reference_counts.get(k, 0))) for k in keys),
        tuple((str(k), int(current_counts.get(k, 0))) for k in keys),
    )


# -- columns and datasets -----------------------------------------------------------------


def column_drift(
    test: ColumnTest, reference: Array, current: Array, settings: DriftSettings | None = None, *, with_plots: bool = True
) -> ColumnDrift:
    """Test one column; `reference` and `current` may hold missing values."""
    settings = settings or DriftSettings()
    reference_values = drop_missing(reference, test.kind)
    current_values = drop_missing(current, test.kind)
    missing = len(current) - len(current_values)
    if len(reference_values) == 0 or len(current_values) == 0:
        # Nothing to compare: reported with its missing count, left out of the share.
        method = test.method or default_method(test.kind, len(reference_values), np.concatenate([reference_values, current_values]))
        return ColumnDrift(
            test.column,
            test.kind,
            method,
            math.nan,
            None,
            settings.threshold_for(method, test.threshold),
            False,
            False,
            len(reference_values),
            len(current_values),
            missing,
        )
    method = test.method or default_method(test.kind, len(reference_values), np.concatenate([reference_values, current_values]))
    threshold = settings.threshold_for(method, test.threshold)
    result = run_test(method, reference_values, current_values, test.kind)
    drifted = result.p_value < threshold if result.p_value is not None and method.is_p_value_test else result.statistic >= threshold
    reference_histogram = current_histogram = None
    reference_categories: tuple[tuple[str, int], ...] = ()
    current_categories: tuple[tuple[str, int], ...] = ()
    if with_plots:
        if test.kind is ColumnKind.NUMERICAL:
            reference_histogram, current_histogram = _histograms(
                np.asarray(reference_values, dtype=np.float64), np.asarray(current_values, dtype=np.float64)
            )
        else:
            reference_categories, current_categories = _category_counts(reference_values, current_values)
    return ColumnDrift(
        column=test.column,
        kind=test.kind,
        method=method,
        statistic=result.statistic,
        p_value=result.p_value,
        threshold=threshold,
        drifted=bool(drifted),
        tested=True,
        reference_count=len(reference_values),
        current_count=len(current_values),
        current_missing_count=missing,
        reference_histogram=reference_histogram,
        current_histogram=current_histogram,
        reference_categories=reference_categories,
        current_categories=current_categories,
    )


def dataset_drift(
    tests: Sequence[ColumnTest],
    reference: dict[str, Array],
    current: dict[str, Array],
    settings: DriftSettings | None = None,
    *,
    with_plots: bool = True,
) -> DatasetDrift:
    """Test every column and decide dataset drift: drifted share at or above the threshold."""
    settings = settings or DriftSettings()

    def one(test: ColumnTest) -> ColumnDrift:
        return column_drift(test, reference[test.column], current[test.column], settings, with_plots=with_plots)

    total_rows = sum(len(reference[t.column]) + len(current[t.column]) for t in tests)
    if total_rows >= PARALLEL_ROWS and len(tests) > 1:
        with ThreadPoolExecutor(max_workers=4, thread_name_prefix="drift") as pool:
            results = tuple(pool.map(one, tests))
    else:
        results = tuple(one(test) for test in tests)
    return summarize(results, settings.drift_share_threshold)


def summarize(columns: Sequence[ColumnDrift], drift_share_threshold: float) -> DatasetDrift:
    tested = [c for c in columns if c.tested]
    drifted = sum(1 for c in tested if c.drifted)
    share = drifted / len(tested) if tested else 0.0
    return DatasetDrift(
        columns=tuple(columns),
        tested_count=len(tested),
        drifted_count=drifted,
        drift_share=share,
        drift_share_threshold=drift_share_threshold,
        dataset_drift=bool(tested) and share >= drift_share_threshold,
    )
