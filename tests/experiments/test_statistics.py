"""The statistics equal scipy/statsmodels on the same numbers, computed from streamed sufficient
statistics; CUPED reduces variance; the sequential test survives peeking."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import NormalIndPower, TTestIndPower
from statsmodels.stats.proportion import confint_proportions_2indep, proportion_effectsize, proportions_ztest

from falaj_platform.runtime.errors import InvalidArgument
from falaj_platform.services.experiments import statistics as st
from falaj_platform.services.experiments.model import Alternative, Correction, MetricType, SequentialMethod
from falaj_platform.services.experiments.statistics import Moments, MomentsAccumulator

SCIPY_ALTERNATIVE = {Alternative.TWO_SIDED: "two-sided", Alternative.GREATER: "greater", Alternative.LESS: "less"}


def streamed(values: np.ndarray, covariate: np.ndarray | None = None, chunk: int = 997) -> Moments:
    """Moments built chunk by chunk, as an analysis streams units."""
    accumulator = MomentsAccumulator(1, with_covariate=covariate is not None)
    for start in range(0, values.size, chunk):
        part = values[start : start + chunk]
        accumulator.add(np.zeros(part.size, dtype=int), part, None if covariate is None else covariate[start : start + chunk])
    return accumulator.moments[0]


def test_streamed_moments_equal_the_moments_of_the_whole_sample() -> None:
    rng = np.random.default_rng(7)
    y = rng.lognormal(3, 1, 50_000)
    x = y * 0.5 + rng.normal(0, 5, y.size)
    moments = streamed(y, x)
    assert moments.n == y.size
    assert moments.mean == pytest.approx(y.mean(), rel=1e-12)
    assert moments.variance == pytest.approx(y.var(ddof=1), rel=1e-10)
    assert moments.c_xy / (moments.n - 1) == pytest.approx(np.cov(x, y)[0, 1], rel=1e-10)


@pytest.mark.parametrize("alternative", list(Alternative))
def test_welch_t_test_equals_scipy_ttest_ind(alternative: Alternative) -> None:
    rng = np.random.default_rng(42)
    treatment = rng.gamma(2.0, 11.0, 3_000)
    control = rng.gamma(2.0, 10.0, 2_500)
    t, c = streamed(treatment), streamed(control)
    ours = st.welch_t_test(t.mean, t.variance, t.n, c.mean, c.variance, c.n, 0.05, alternative)
    reference = stats.ttest_ind(treatment, control, equal_var=False, alternative=SCIPY_ALTERNATIVE[alternative])
    interval = reference.confidence_interval(0.95)
    assert ours.statistic == pytest.approx(reference.statistic, rel=1e-9)
    assert ours.p_value == pytest.approx(reference.pvalue, rel=1e-8)
    assert ours.degrees_of_freedom == pytest.approx(reference.df, rel=1e-9)
    assert ours.difference.value == pytest.approx(treatment.mean() - control.mean(), rel=1e-9)
    assert ours.difference.lower == pytest.approx(interval.low, rel=1e-8)
    assert ours.difference.upper == pytest.approx(interval.high, rel=1e-8)


@pytest.mark.parametrize("alternative", list(Alternative))
def test_two_proportion_z_test_equals_statsmodels(alternative: Alternative) -> None:
    rng = np.random.default_rng(3)
    treatment = (rng.random(8_000) < 0.115).astype(float)
    control = (rng.random(7_500) < 0.10).astype(float)
    t, c = streamed(treatment), streamed(control)
    ours = st.two_proportion_z_test(round(t.total), t.n, round(c.total), c.n, 0.05, alternative)
    names = {Alternative.TWO_SIDED: "two-sided", Alternative.GREATER: "larger", Alternative.LESS: "smaller"}
    statistic, p_value = proportions_ztest([treatment.sum(), control.sum()], [treatment.size, control.size], alternative=names[alternative])
    assert ours.statistic == pytest.approx(statistic, rel=1e-9)
    assert ours.p_value == pytest.approx(p_value, rel=1e-8)
    lower, upper = confint_proportions_2indep(treatment.sum(), treatment.size, control.sum(), control.size, method="wald", compare="diff")
    if alternative is Alternative.TWO_SIDED:
        assert (ours.difference.lower, ours.difference.upper) == pytest.approx((lower, upper), rel=1e-9)
    # One-sided bounds are the 90% two-sided Wald bound on their side.
    lower90, upper90 = confint_proportions_2indep(
        treatment.sum(), treatment.size, control.sum(), control.size, method="wald", compare="diff", alpha=0.1
    )
    if alternative is Alternative.GREATER:
        assert ours.difference.lower == pytest.approx(lower90, rel=1e-9) and ours.difference.upper == math.inf
    if alternative is Alternative.LESS:
        assert ours.difference.upper == pytest.approx(upper90, rel=1e-9) and ours.difference.lower == -math.inf


def test_relative_lift_interval_is_the_delta_method() -> None:
    value = st.relative_lift(11.0, 0.2, 10.0, 0.25, 0.05, Alternative.TWO_SIDED)
    se = math.sqrt(0.2**2 / 10.0**2 + 11.0**2 * 0.25**2 / 10.0**4)
    z = stats.norm.ppf(0.975)
    assert value.value == pytest.approx(0.1)
    assert (value.lower, value.upper) == pytest.approx((0.1 - z * se, 0.1 + z * se))


def test_sample_ratio_mismatch_equals_scipy_chisquare_and_flags_a_skewed_split() -> None:
    balanced = st.sample_ratio_mismatch([5_030, 4_970], [0.5, 0.5])
    reference = stats.chisquare([5_030, 4_970], f_exp=[5_000, 5_000])
    assert (balanced.chi_square, balanced.p_value) == pytest.approx((reference.statistic, reference.pvalue))
    assert balanced.p_value > 0.001
    skewed = st.sample_ratio_mismatch([5_300, 4_700], [0.5, 0.5])
    assert skewed.p_value < 0.001 and skewed.degrees_of_freedom == 1
    three = st.sample_ratio_mismatch([2_000, 3_100, 4_900], [0.2, 0.3, 0.5])
    assert three.p_value == pytest.approx(stats.chisquare([2_000, 3_100, 4_900], f_exp=[2_000, 3_000, 5_000]).pvalue)
    assert st.sample_ratio_mismatch([10, 3], [1.0, 0.0]).p_value == 0.0  # units where none were allocated


def test_cuped_equals_scipy_on_the_adjusted_values_and_reduces_the_variance() -> None:
    rng = np.random.default_rng(11)
    n_t, n_c = 4_000, 4_000
    pre = rng.gamma(3.0, 10.0, n_t + n_c)
    post = 0.8 * pre + rng.normal(0, 8, pre.size)
    post[:n_t] += 1.0  # the treatment effect
    y_t, y_c, x_t, x_c = post[:n_t], post[n_t:], pre[:n_t], pre[n_t:]
    t, c = streamed(y_t, x_t), streamed(y_c, x_c)
    adjustment = st.cuped_adjustment([t, c])
    assert adjustment is not None
    theta = np.cov(pre, post)[0, 1] / np.var(pre, ddof=1)
    assert adjustment.theta == pytest.approx(theta, rel=1e-9)
    adjusted_t = y_t - theta * (x_t - pre.mean())
    adjusted_c = y_c - theta * (x_c - pre.mean())
    mean_t, var_t = adjustment.adjusted(t)
    mean_c, var_c = adjustment.adjusted(c)
    assert (mean_t, var_t) == pytest.approx((adjusted_t.mean(), adjusted_t.var(ddof=1)), rel=1e-9)
    ours = st.welch_t_test(mean_t, var_t, n_t, mean_c, var_c, n_c, 0.05, Alternative.TWO_SIDED)
    reference = stats.ttest_ind(adjusted_t, adjusted_c, equal_var=False)
    assert (ours.statistic, ours.p_value) == pytest.approx((reference.statistic, reference.pvalue), rel=1e-8)
    raw_variance = y_t.var(ddof=1) / n_t + y_c.var(ddof=1) / n_c
    adjusted_variance = var_t / n_t + var_c / n_c
    assert adjusted_variance < 0.5 * raw_variance  # correlated covariate: most variance removed
    # Without a covariate there is nothing to adjust by.
    assert st.cuped_adjustment([streamed(y_t, np.zeros(n_t)), streamed(y_c, np.zeros(n_c))]) is None


@pytest.mark.parametrize(("correction", "method"), [(Correction.HOLM, "holm"), (Correction.BENJAMINI_HOCHBERG, "fdr_bh")])
def test_corrections_equal_statsmodels_multipletests(correction: Correction, method: str) -> None:
    p_values = [0.001, 0.04, 0.03, 0.2, 0.012]
    assert st.adjust_p_values(p_values, correction) == pytest.approx(list(multipletests(p_values, method=method)[1]))
    assert math.isnan(st.adjust_p_values([0.01, math.nan], correction)[1])  # NaN stays NaN and does not count
    assert st.adjust_p_values(p_values, Correction.NONE) == p_values


def test_power_and_minimum_detectable_effect_equal_statsmodels() -> None:
    binary = st.plan_sample_size(MetricType.BINARY, 0.10, 0.0, 0.05, Alternative.TWO_SIDED, 0.10, 0.8)
    expected = NormalIndPower().solve_power(effect_size=proportion_effectsize(0.11, 0.10), alpha=0.05, power=0.8, ratio=1.0)
    assert binary.units_per_variant == math.ceil(expected)
    continuous = st.plan_sample_size(MetricType.CONTINUOUS, 50.0, 20.0, 0.05, Alternative.TWO_SIDED, 0.02, 0.8)
    assert continuous.units_per_variant == math.ceil(TTestIndPower().solve_power(effect_size=1.0 / 20.0, alpha=0.05, power=0.8, ratio=1.0))
    power = st.plan_power(MetricType.CONTINUOUS, 50.0, 20.0, 0.05, Alternative.TWO_SIDED, 0.02, continuous.units_per_variant)
    assert 0.8 <= power.power < 0.801
    mde = st.plan_minimum_detectable_effect(MetricType.BINARY, 0.10, 0.0, 0.05, Alternative.TWO_SIDED, binary.units_per_variant, 0.8)
    assert mde.relative_effect == pytest.approx(0.10, rel=1e-3)
    mde_continuous = st.plan_minimum_detectable_effect(
        MetricType.CONTINUOUS, 50.0, 20.0, 0.05, Alternative.TWO_SIDED, continuous.units_per_variant, 0.8
    )
    assert mde_continuous.absolute_effect == pytest.approx(1.0, rel=1e-3)
    with pytest.raises(InvalidArgument):
        st.plan_sample_size(MetricType.BINARY, 1.5, 0.0, 0.05, Alternative.TWO_SIDED, 0.1, 0.8)
    with pytest.raises(InvalidArgument):
        st.plan_sample_size(MetricType.BINARY, 0.95, 0.0, 0.05, Alternative.TWO_SIDED, 0.1, 0.8)  # 104.5% conversion


def test_confidence_sequence_is_the_waudby_smith_asymptotic_sequence() -> None:
    # Theorem 2.2 of Waudby-Smith et al. (2021), with rho tuned to N* as GrowthBook does:
    # half-width = sigma * sqrt(2 (N rho^2 + 1) / (N^2 rho^2) * log(sqrt(N rho^2 + 1) / alpha)).
    alpha, n, tuning, sigma = 0.05, 4_000, 10_000, 3.0
    rho_squared = (-2 * math.log(alpha) + math.log(-2 * math.log(alpha) + 1)) / tuning
    expected = sigma * math.sqrt(2 * (n * rho_squared + 1) / (n * n * rho_squared) * math.log(math.sqrt(n * rho_squared + 1) / alpha))
    outcome = st.sequential_test(0.25, sigma**2 / n, n, alpha, SequentialMethod.ASYMPTOTIC_CONFIDENCE_SEQUENCE, tuning)
    assert outcome.interval.upper - 0.25 == pytest.approx(expected, rel=1e-12)
    # Its p-value is the smallest alpha whose sequence excludes 0 (same rho):
    # sqrt(N rho^2 + 1) * exp(-N^2 rho^2 est^2 / (2 sigma^2 (N rho^2 + 1))).
    p_value = math.sqrt(n * rho_squared + 1) * math.exp(-(n**2) * rho_squared * 0.25**2 / (2 * sigma**2 * (n * rho_squared + 1)))
    assert outcome.p_value == pytest.approx(min(1.0, p_value), rel=1e-12)


def _aa_simulation(
    method: SequentialMethod, tuning_units: int, simulations: int = 600, looks: int = 20, per_look: int = 100
) -> tuple[float, float]:
    """(sequential, fixed-horizon) share of A/A experiments ever called significant when peeking at every look."""
    rng = np.random.default_rng(2024)
    alpha = 0.05
    n = np.arange(1, looks + 1) * per_look
    sequential_hits = fixed_hits = 0
    for _ in range(simulations):
        # Skewed outcomes, like revenue: the asymptotics must hold beyond the normal case.
        a = rng.exponential(10.0, looks * per_look)
        b = rng.exponential(10.0, looks * per_look)
        sum_a, sum_b = np.cumsum(a)[n - 1], np.cumsum(b)[n - 1]
        sq_a, sq_b = np.cumsum(a * a)[n - 1], np.cumsum(b * b)[n - 1]
        mean_a, mean_b = sum_a / n, sum_b / n
        var_a, var_b = (sq_a - n * mean_a**2) / (n - 1), (sq_b - n * mean_b**2) / (n - 1)
        fixed = stats.ttest_ind_from_stats(mean_a, np.sqrt(var_a), n, mean_b, np.sqrt(var_b), n, equal_var=False).pvalue
        fixed_hits += bool((fixed < alpha).any())
        for look in range(looks):
            outcome = st.sequential_test(
                mean_a[look] - mean_b[look],
                var_a[look] / n[look] + var_b[look] / n[look],
                2 * int(n[look]),
                alpha,
                method,
                2 * tuning_units,
            )
            if outcome.p_value < alpha:
                sequential_hits += 1
                break
    return sequential_hits / simulations, fixed_hits / simulations


@pytest.mark.parametrize(
    ("method", "tuning_units"),
    [
        (SequentialMethod.ASYMPTOTIC_CONFIDENCE_SEQUENCE, 2_000),
        (SequentialMethod.MIXTURE_SPRT, 2_000),
        (SequentialMethod.ASYMPTOTIC_CONFIDENCE_SEQUENCE, 0),  # tuned to the current count at each look
    ],
)
def test_sequential_test_keeps_false_positives_at_most_alpha_under_repeated_peeking(method: SequentialMethod, tuning_units: int) -> None:
    sequential, fixed = _aa_simulation(method, tuning_units)
    # Peeking at a fixed-horizon test 20 times inflates its false positives far beyond 5% ...
    assert fixed > 0.12
    # ... while the always-valid p-value stays at or below alpha.
    assert sequential <= 0.05, sequential


def test_sequential_test_still_finds_a_real_effect() -> None:
    rng = np.random.default_rng(5)
    a = rng.normal(10.3, 5, 20_000)
    b = rng.normal(10.0, 5, 20_000)
    outcome = st.sequential_test(
        a.mean() - b.mean(), a.var(ddof=1) / a.size + b.var(ddof=1) / b.size, 40_000, 0.05, SequentialMethod.MIXTURE_SPRT, 40_000
    )
    assert outcome.p_value < 0.05
    assert outcome.interval.lower > 0
    fixed = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert outcome.interval.lower < fixed.low and outcome.interval.upper > fixed.high  # wider: the price of peeking
