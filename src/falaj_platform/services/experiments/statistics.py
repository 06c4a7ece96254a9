"""The statistics of an A-B analysis, from sufficient statistics so events can be streamed.

Per variant an analysis keeps only `Moments` (count, mean, sum of squared deviations,
and for CUPED the covariate's mean, squared deviations and co-moment), merged chunk by
chunk with the pairwise update of Chan, Golub and LeVeque (1979). Every test is then a
function of those numbers and calls the library that defines it:

- Welch's t-test: `scipy.stats.ttest_ind_from_stats(equal_var=False)`, which equals
  `scipy.stats.ttest_ind(equal_var=False)` on the unit values; its interval uses the
  Welch-Satterthwaite degrees of freedom and `scipy.stats.t`, as `TtestResult.confidence_interval`.
- Two-proportion z-test: `statsmodels.stats.proportion.proportions_ztest` (pooled
  variance) and the Wald interval of `confint_proportions_2indep`.
- Sample ratio mismatch: `scipy.stats.chisquare` against the allocation.
- Multiple comparisons: `statsmodels.stats.multitest.multipletests` (holm, fdr_bh).
- Power and minimum detectable effect: `statsmodels.stats.power` (TTestIndPower for
  means, NormalIndPower with Cohen's h from `proportion_effectsize` for proportions).
- Relative lift: the delta-method interval GrowthBook's engine uses.
- Sequential testing: the normal-mixture martingale. Its inversion is the asymptotic
  confidence sequence of Waudby-Smith, Arbour, Sinha, Kennedy and Ramdas, "Time-uniform
  central limit theory and asymptotic confidence sequences" (arXiv:2103.06476, Thm 2.2,
  the method GrowthBook ships), and its mixture likelihood ratio is the mSPRT of Johari,
  Koomen, Pekelis and Walsh, "Always valid inference: continuous monitoring of A/B
  tests" (Operations Research 70(3), 2022), whose always-valid p-value is
  min(1, 1/Lambda_n). By Ville's inequality the chance that it ever drops below alpha,
  however often one looks, is at most alpha.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import NormalIndPower, TTestIndPower
from statsmodels.stats.proportion import confint_proportions_2indep, proportion_effectsize, proportions_ztest

from falaj_platform.runtime.errors import InvalidArgument
from falaj_platform.services.experiments.model import Alternative, Correction, MetricType, SequentialMethod

NAN = float("nan")

_SCIPY_ALTERNATIVE = {Alternative.TWO_SIDED: "two-sided", Alternative.GREATER: "greater", Alternative.LESS: "less"}
_STATSMODELS_ALTERNATIVE = {Alternative.TWO_SIDED: "two-sided", Alternative.GREATER: "larger", Alternative.LESS: "smaller"}


# -- sufficient statistics -------------------------------------------------------------


@dataclass(frozen=True)
class Moments:
    """Sufficient statistics of per-unit values y (and a covariate x, for CUPED)."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0
    mean_x: float = 0.0
    m2_x: float = 0.0
    c_xy: float = 0.0

    @property
    def variance(self) -> float:
        """Sample variance of y (ddof 1)."""
        return self.m2 / (self.n - 1) if self.n > 1 else NAN

    @property
    def total(self) -> float:
        return self.mean * self.n

    @staticmethod
    def of(y: np.ndarray, x: np.ndarray | None = None) -> Moments:
        n = int(y.size)
        if n == 0:
            return Moments()
        mean = float(y.mean())
        dy = y - mean
        if x is None:
            return Moments(n, mean, float(dy @ dy))
        mean_x = float(x.mean())
        dx = x - mean_x
        return Moments(n, mean, float(dy @ dy), mean_x, float(dx @ dx), float(dx @ dy))

    def merge(self, other: Moments) -> Moments:
        """Moments of the union of two samples (Chan, Golub and LeVeque's pairwise update)."""
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        n = self.n + other.n
        delta = other.mean - self.mean
        delta_x = other.mean_x - self.mean_x
        weight = self.n * other.n / n
        return Moments(
            n=n,
            mean=self.mean + delta * other.n / n,
            m2=self.m2 + other.m2 + delta * delta * weight,
            mean_x=self.mean_x + delta_x * other.n / n,
            m2_x=self.m2_x + other.m2_x + delta_x * delta_x * weight,
            c_xy=self.c_xy + other.c_xy + delta * delta_x * weight,
        )


class MomentsAccumulator:
    """Streams chunks of (group code, y, x) into Moments per group; memory is one chunk."""

    def __init__(self, groups: int, with_covariate: bool):
        self.groups = groups
        self.with_covariate = with_covariate
        self.moments = [Moments() for _ in range(groups)]
        self.rows = 0

    def add(self, codes: np.ndarray, y: np.ndarray, x: np.ndarray | None = None) -> None:
        self.rows += int(codes.size)
        for group in range(self.groups):
            mask = codes == group
            if not mask.any():
                continue
            chunk = Moments.of(y[mask], x[mask] if (self.with_covariate and x is not None) else None)
            self.moments[group] = self.moments[group].merge(chunk)


def pooled(moments: Sequence[Moments]) -> Moments:
    result = Moments()
    for item in moments:
        result = result.merge(item)
    return result


# -- estimates and tests ---------------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    value: float
    lower: float
    upper: float


@dataclass(frozen=True)
class TestResult:
    statistic: float
    degrees_of_freedom: float
    p_value: float
    difference: Interval


def welch_degrees_of_freedom(var_t: float, n_t: int, var_c: float, n_c: int) -> float:
    """Welch-Satterthwaite degrees of freedom of the difference of two means."""
    a, b = var_t / n_t, var_c / n_c
    denominator = a * a / (n_t - 1) + b * b / (n_c - 1)
    return (a + b) ** 2 / denominator if denominator > 0 else NAN


def _bounds(value: float, half_width_two: float, half_width_one: float, alternative: Alternative) -> Interval:
    if alternative is Alternative.GREATER:
        return Interval(value, value - half_width_one, math.inf)
    if alternative is Alternative.LESS:
        return Interval(value, -math.inf, value + half_width_one)
    return Interval(value, value - half_width_two, value + half_width_two)


def welch_t_test(
    mean_t: float, var_t: float, n_t: int, mean_c: float, var_c: float, n_c: int, alpha: float, alternative: Alternative
) -> TestResult:
    """Welch's unequal-variances t-test of treatment - control, with its 1 - alpha interval."""
    difference = mean_t - mean_c
    if n_t < 2 or n_c < 2:
        return TestResult(NAN, NAN, NAN, Interval(difference, NAN, NAN))
    result = stats.ttest_ind_from_stats(
        mean_t, math.sqrt(var_t), n_t, mean_c, math.sqrt(var_c), n_c, equal_var=False, alternative=_SCIPY_ALTERNATIVE[alternative]
    )
    df = welch_degrees_of_freedom(var_t, n_t, var_c, n_c)
    standard_error = math.sqrt(var_t / n_t + var_c / n_c)
    if not math.isfinite(df) or standard_error == 0:
        return TestResult(float(result.statistic), df, float(result.pvalue), Interval(difference, difference, difference))
    interval = _bounds(
        difference,
        float(stats.t.ppf(1 - alpha / 2, df)) * standard_error,
        float(stats.t.ppf(1 - alpha, df)) * standard_error,
        alternative,
    )
    return TestResult(float(result.statistic), df, float(result.pvalue), interval)


def two_proportion_z_test(conversions_t: int, n_t: int, conversions_c: int, n_c: int, alpha: float, alternative: Alternative) -> TestResult:
    """Pooled two-proportion z-test (statsmodels proportions_ztest) with the Wald interval of the difference."""
    difference = conversions_t / n_t - conversions_c / n_c if n_t and n_c else NAN
    pooled_rate = (conversions_t + conversions_c) / (n_t + n_c) if n_t + n_c else NAN
    if not n_t or not n_c or pooled_rate in (0.0, 1.0) or math.isnan(pooled_rate):
        return TestResult(NAN, 0.0, NAN, Interval(difference, NAN, NAN))
    statistic, p_value = proportions_ztest([conversions_t, conversions_c], [n_t, n_c], alternative=_STATSMODELS_ALTERNATIVE[alternative])
    # The one-sided 1 - alpha bound is one side of the two-sided 1 - 2 alpha interval.
    two_sided_alpha = alpha if alternative is Alternative.TWO_SIDED else 2 * alpha
    lower, upper = confint_proportions_2indep(conversions_t, n_t, conversions_c, n_c, method="wald", compare="diff", alpha=two_sided_alpha)
    if alternative is Alternative.GREATER:
        upper = math.inf
    elif alternative is Alternative.LESS:
        lower = -math.inf
    return TestResult(float(statistic), 0.0, float(p_value), Interval(difference, float(lower), float(upper)))


def relative_lift(mean_t: float, se_t: float, mean_c: float, se_c: float, alpha: float, alternative: Alternative) -> Interval:
    """(treatment - control) / control with its delta-method normal interval."""
    if mean_c == 0 or not all(map(math.isfinite, (mean_t, se_t, mean_c, se_c))):
        return Interval(NAN, NAN, NAN)
    value = mean_t / mean_c - 1
    standard_error = relative_lift_standard_error(mean_t, se_t, mean_c, se_c)
    return _bounds(
        value, float(stats.norm.ppf(1 - alpha / 2)) * standard_error, float(stats.norm.ppf(1 - alpha)) * standard_error, alternative
    )


def relative_lift_standard_error(mean_t: float, se_t: float, mean_c: float, se_c: float) -> float:
    """Delta-method standard error of mean_t / mean_c - 1."""
    return math.sqrt(se_t**2 / mean_c**2 + mean_t**2 * se_c**2 / mean_c**4)


@dataclass(frozen=True)
class SampleRatioResult:
    chi_square: float
    degrees_of_freedom: int
    p_value: float


def sample_ratio_mismatch(observed: Sequence[int], expected_fractions: Sequence[float]) -> SampleRatioResult:
    """Chi-square goodness of fit of units per variant against the allocation (scipy.stats.chisquare)."""
    pairs = list(zip(observed, expected_fractions, strict=True))
    total = sum(observed)
    if any(units > 0 and fraction <= 0 for units, fraction in pairs):
        # Units in a variant that has no allocation at all: the split is certainly broken.
        return SampleRatioResult(math.inf, max(len(pairs) - 1, 1), 0.0)
    allocated = [(units, fraction) for units, fraction in pairs if fraction > 0]
    if total == 0 or len(allocated) < 2:
        return SampleRatioResult(0.0, max(len(allocated) - 1, 0), 1.0)
    fractions_total = sum(fraction for _, fraction in allocated)
    expected = [total * fraction / fractions_total for _, fraction in allocated]
    result = stats.chisquare([units for units, _ in allocated], f_exp=expected)
    return SampleRatioResult(float(result.statistic), len(allocated) - 1, float(result.pvalue))


# -- CUPED -----------------------------------------------------------------------------


@dataclass(frozen=True)
class CupedAdjustment:
    theta: float
    mean_x: float

    def adjusted(self, moments: Moments) -> tuple[float, float]:
        """Mean and sample variance of y - theta * (x - mean_x) in one group."""
        mean = moments.mean - self.theta * (moments.mean_x - self.mean_x)
        if moments.n < 2:
            return mean, NAN
        m2 = moments.m2 - 2 * self.theta * moments.c_xy + self.theta**2 * moments.m2_x
        return mean, max(m2, 0.0) / (moments.n - 1)


def cuped_adjustment(groups: Sequence[Moments]) -> CupedAdjustment | None:
    """theta = cov(x, y) / var(x) over all units of all variants (Deng et al. 2013); None without covariate variance."""
    everyone = pooled(groups)
    if everyone.n < 2 or everyone.m2_x <= 0:
        return None
    return CupedAdjustment(everyone.c_xy / everyone.m2_x, everyone.mean_x)


# -- sequential testing ----------------------------------------------------------------


@dataclass(frozen=True)
class SequentialOutcome:
    p_value: float
    interval: Interval


def mixture_variance(method: SequentialMethod, unit_variance: float, tuning_units: float, alpha: float) -> float:
    """Variance tau^2 of the normal mixture over the effect, tuned to `tuning_units` units.

    Confidence sequence: tau^2 = rho^2 sigma^2 with Waudby-Smith et al.'s rho that makes
    the sequence tightest at tuning_units (their eq. for rho*, as in GrowthBook). mSPRT:
    tau^2 is the squared effect a fixed-horizon test at tuning_units detects with 80%
    power, following Johari et al.'s advice to match the mixture to the effects sought.
    """
    if method is SequentialMethod.MIXTURE_SPRT:
        z = float(stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(0.8))
        return z * z * unit_variance / tuning_units
    log_alpha = -2 * math.log(alpha)
    rho_squared = (log_alpha + math.log(log_alpha + 1)) / tuning_units
    return rho_squared * unit_variance


def sequential_test(
    estimate: float, estimate_variance: float, units: int, alpha: float, method: SequentialMethod, tuning_units: int
) -> SequentialOutcome:
    """Always-valid p-value and two-sided confidence sequence for an asymptotically normal estimate.

    `estimate_variance` is the variance of the estimate (se^2) from `units` units in all;
    sigma^2 = se^2 * units is the per-unit variance it implies. The mixture likelihood ratio
    of H0: effect = 0 is Lambda = sqrt(V / (V + tau^2)) exp(tau^2 est^2 / (2 V (V + tau^2)));
    the p-value is min(1, 1 / Lambda) and the interval the effects Lambda does not reject.
    """
    if units < 2 or not math.isfinite(estimate_variance) or estimate_variance <= 0 or not math.isfinite(estimate):
        return SequentialOutcome(NAN, Interval(estimate, NAN, NAN))
    unit_variance = estimate_variance * units
    tau_squared = mixture_variance(method, unit_variance, tuning_units or units, alpha)
    v = estimate_variance
    log_inverse_lambda = 0.5 * math.log((v + tau_squared) / v) - tau_squared * estimate * estimate / (2 * v * (v + tau_squared))
    p_value = math.exp(min(0.0, log_inverse_lambda))
    half_width = math.sqrt(2 * v * (v + tau_squared) / tau_squared * (math.log(1 / alpha) + 0.5 * math.log((v + tau_squared) / v)))
    return SequentialOutcome(p_value, Interval(estimate, estimate - half_width, estimate + half_width))


# -- multiple comparisons --------------------------------------------------------------


def adjust_p_values(p_values: Sequence[float], correction: Correction) -> list[float]:
    """p-values adjusted across a family (statsmodels multipletests); NaNs stay NaN and do not count."""
    if correction is Correction.NONE or not p_values:
        return list(p_values)
    finite = [i for i, p in enumerate(p_values) if math.isfinite(p)]
    adjusted = list(p_values)
    if not finite:
        return adjusted
    method = "holm" if correction is Correction.HOLM else "fdr_bh"
    _, corrected, _, _ = multipletests([p_values[i] for i in finite], method=method)
    for index, value in zip(finite, corrected, strict=True):
        adjusted[index] = float(value)
    return adjusted


# -- power -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PowerPlan:
    units_per_variant: int
    relative_effect: float
    absolute_effect: float
    power: float


def _check_plan(metric_type: MetricType, baseline_mean: float, baseline_std_dev: float, alpha: float) -> None:
    if not 0 < alpha < 1:
        raise InvalidArgument(f"alpha must be in (0, 1), got {alpha}", reason="INVALID_ALPHA")
    if metric_type is MetricType.BINARY:
        if not 0 < baseline_mean < 1:
            raise InvalidArgument(
                f"baseline_mean of a binary metric is a conversion rate in (0, 1), got {baseline_mean}", reason="INVALID_BASELINE"
            )
        return
    if not math.isfinite(baseline_mean) or baseline_mean == 0:
        raise InvalidArgument("baseline_mean must be a non-zero number so that a relative effect has a size", reason="INVALID_BASELINE")
    if not math.isfinite(baseline_std_dev) or baseline_std_dev <= 0:
        raise InvalidArgument(f"baseline_std_dev must be positive, got {baseline_std_dev}", reason="INVALID_BASELINE")


def _effect_size(metric_type: MetricType, baseline_mean: float, baseline_std_dev: float, relative_effect: float) -> float:
    if not math.isfinite(relative_effect) or relative_effect == 0:
        raise InvalidArgument("relative_effect must be a non-zero number (0.05 = 5%)", reason="INVALID_EFFECT")
    if metric_type is MetricType.BINARY:
        treated = baseline_mean * (1 + relative_effect)
        if not 0 < treated < 1:
            raise InvalidArgument(
                f"a relative effect of {relative_effect:g} takes the conversion rate to {treated:g}, outside (0, 1)",
                reason="INVALID_EFFECT",
            )
        return abs(float(proportion_effectsize(treated, baseline_mean)))
    return abs(relative_effect * baseline_mean / baseline_std_dev)


def _power_model(metric_type: MetricType) -> NormalIndPower | TTestIndPower:
    return NormalIndPower() if metric_type is MetricType.BINARY else TTestIndPower()


def _power_alternative(alternative: Alternative) -> str:
    # Effect sizes are taken as magnitudes, so a one-sided plan is "larger" either way.
    return "two-sided" if alternative is Alternative.TWO_SIDED else "larger"


def plan_sample_size(
    metric_type: MetricType,
    baseline_mean: float,
    baseline_std_dev: float,
    alpha: float,
    alternative: Alternative,
    relative_effect: float,
    power: float,
) -> PowerPlan:
    _check_plan(metric_type, baseline_mean, baseline_std_dev, alpha)
    if not 0 < power < 1:
        raise InvalidArgument(f"power must be in (0, 1), got {power}", reason="INVALID_POWER")
    effect = _effect_size(metric_type, baseline_mean, baseline_std_dev, relative_effect)
    units = _power_model(metric_type).solve_power(
        effect_size=effect, nobs1=None, alpha=alpha, power=power, ratio=1.0, alternative=_power_alternative(alternative)
    )
    return PowerPlan(math.ceil(float(np.asarray(units).item()) - 1e-9), relative_effect, relative_effect * baseline_mean, power)


def plan_power(
    metric_type: MetricType,
    baseline_mean: float,
    baseline_std_dev: float,
    alpha: float,
    alternative: Alternative,
    relative_effect: float,
    units: int,
) -> PowerPlan:
    _check_plan(metric_type, baseline_mean, baseline_std_dev, alpha)
    if units < 2:
        raise InvalidArgument(f"units_per_variant must be at least 2, got {units}", reason="INVALID_SAMPLE_SIZE")
    effect = _effect_size(metric_type, baseline_mean, baseline_std_dev, relative_effect)
    power = _power_model(metric_type).power(
        effect_size=effect, nobs1=units, alpha=alpha, ratio=1.0, alternative=_power_alternative(alternative)
    )
    return PowerPlan(units, relative_effect, relative_effect * baseline_mean, float(np.asarray(power).item()))


def plan_minimum_detectable_effect(
    metric_type: MetricType, baseline_mean: float, baseline_std_dev: float, alpha: float, alternative: Alternative, units: int, power: float
) -> PowerPlan:
    _check_plan(metric_type, baseline_mean, baseline_std_dev, alpha)
    if units < 2:
        raise InvalidArgument(f"units_per_variant must be at least 2, got {units}", reason="INVALID_SAMPLE_SIZE")
    if not 0 < power < 1:
        raise InvalidArgument(f"power must be in (0, 1), got {power}", reason="INVALID_POWER")
    effect = float(
        np.asarray(
            _power_model(metric_type).solve_power(
                effect_size=None, nobs1=units, alpha=alpha, power=power, ratio=1.0, alternative=_power_alternative(alternative)
            )
        ).item()
    )
    sign = -1.0 if alternative is Alternative.LESS else 1.0
    if metric_type is MetricType.BINARY:
        # Invert Cohen's h = 2 asin(sqrt(p1)) - 2 asin(sqrt(p0)) for the treated rate p1.
        angle = 2 * math.asin(math.sqrt(baseline_mean)) + sign * effect
        treated = math.sin(min(max(angle, 0.0), math.pi) / 2) ** 2
        absolute = treated - baseline_mean
    else:
        absolute = sign * effect * baseline_std_dev
    return PowerPlan(units, absolute / baseline_mean, absolute, power)
