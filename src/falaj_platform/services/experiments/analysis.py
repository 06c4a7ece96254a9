"""An experiment's analysis from per-variant sufficient statistics: pure domain logic.

The store streams unit values into `Moments` per variant and metric; this module turns
them into what a statistician reads: traffic and the SRM check, per-metric summaries,
lifts with intervals, fixed-horizon and sequential tests, the multiple-comparison
correction, and the guardrail verdicts.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from falaj_platform.services.experiments import statistics as st
from falaj_platform.services.experiments.model import (
    AnalysisSettings,
    Experiment,
    Guardrail,
    GuardrailAction,
    ImprovementDirection,
    MetricDefinition,
    MetricRole,
    MetricType,
    SequentialMethod,
)
from falaj_platform.services.experiments.statistics import NAN, Interval, Moments


@dataclass(frozen=True)
class VariantTraffic:
    variant_id: str
    units: int
    expected_fraction: float
    observed_fraction: float


@dataclass(frozen=True)
class SampleRatioCheck:
    chi_square: float
    degrees_of_freedom: int
    p_value: float
    threshold: float
    mismatch: bool


@dataclass(frozen=True)
class VariantSummary:
    variant_id: str
    units: int
    mean: float
    variance: float
    standard_error: float
    cuped_mean: float
    cuped_variance: float


@dataclass(frozen=True)
class Test:
    method: str  # WELCH_T_TEST or TWO_PROPORTION_Z_TEST
    statistic: float
    degrees_of_freedom: float
    p_value: float


@dataclass(frozen=True)
class Sequential:
    method: SequentialMethod
    p_value: float
    absolute_lift: Interval


@dataclass(frozen=True)
class Comparison:
    variant_id: str
    control_variant_id: str
    absolute_lift: Interval
    relative_lift: Interval
    test: Test
    adjusted_p_value: float
    sequential: Sequential | None
    significant: bool
    cuped_applied: bool
    cuped_variance_reduction: float
    cuped_theta: float


@dataclass(frozen=True)
class MetricAnalysis:
    metric: MetricDefinition
    variants: tuple[VariantSummary, ...]
    comparisons: tuple[Comparison, ...]


@dataclass(frozen=True)
class GuardrailVerdict:
    metric_id: str
    variant_id: str
    relative_lift: Interval
    triggered: bool
    message: str
    action: GuardrailAction
    confidence_level: float


@dataclass(frozen=True)
class AnalysisResult:
    settings: AnalysisSettings
    as_of_time: dt.datetime
    config_revision: int
    traffic: tuple[VariantTraffic, ...]
    sample_ratio: SampleRatioCheck
    metrics: tuple[MetricAnalysis, ...]
    guardrails: tuple[GuardrailVerdict, ...]
    events_analysed: int

    def fired_guardrail(self) -> GuardrailVerdict | None:
        """The first triggered guardrail whose action is to stop the experiment."""
        return next((g for g in self.guardrails if g.triggered and g.action is GuardrailAction.STOP), None)


def traffic_and_sample_ratio(
    experiment: Experiment, units_by_variant: Mapping[str, int], settings: AnalysisSettings
) -> tuple[tuple[VariantTraffic, ...], SampleRatioCheck]:
    """Exposed units per variant against the allocation, and the chi-square SRM check."""
    total = sum(units_by_variant.values())
    weights = experiment.weights
    weight_total = sum(weights.values()) or 1
    traffic = tuple(
        VariantTraffic(
            v.variant_id,
            units_by_variant.get(v.variant_id, 0),
            weights[v.variant_id] / weight_total,
            units_by_variant.get(v.variant_id, 0) / total if total else 0.0,
        )
        for v in experiment.variants
    )
    result = st.sample_ratio_mismatch([t.units for t in traffic], [t.expected_fraction for t in traffic])
    threshold = settings.effective_srm_threshold
    return traffic, SampleRatioCheck(result.chi_square, result.degrees_of_freedom, result.p_value, threshold, result.p_value < threshold)


@dataclass(frozen=True)
class _Arm:
    """One variant's values for a comparison: raw or CUPED-adjusted."""

    n: int
    mean: float
    variance: float

    @property
    def standard_error(self) -> float:
        return math.sqrt(self.variance / self.n) if self.n > 0 and math.isfinite(self.variance) else NAN


def _binary_standard_error(moments: Moments) -> float:
    return math.sqrt(moments.mean * (1 - moments.mean) / moments.n) if moments.n else NAN


def _summaries(
    metric: MetricDefinition, variant_ids: Sequence[str], moments: Mapping[str, Moments], cuped: st.CupedAdjustment | None
) -> tuple[VariantSummary, ...]:
    summaries = []
    for variant_id in variant_ids:
        m = moments.get(variant_id, Moments())
        if metric.type is MetricType.BINARY:
            standard_error = _binary_standard_error(m)
        else:
            standard_error = math.sqrt(m.variance / m.n) if m.n > 1 else NAN
        adjusted_mean, adjusted_variance = cuped.adjusted(m) if cuped and m.n else (m.mean, m.variance)
        mean = m.mean if m.n else NAN
        summaries.append(
            VariantSummary(variant_id, m.n, mean, m.variance, standard_error, adjusted_mean if m.n else NAN, adjusted_variance)
        )
    return tuple(summaries)


def _compare(
    metric: MetricDefinition,
    treatment: Moments,
    control: Moments,
    cuped: st.CupedAdjustment | None,
    settings: AnalysisSettings,
) -> tuple[Interval, Interval, Test, st.SequentialOutcome | None, bool, float, float]:
    alpha = settings.effective_alpha
    alternative = settings.alternative
    raw_t = _Arm(treatment.n, treatment.mean, treatment.variance)
    raw_c = _Arm(control.n, control.mean, control.variance)
    cuped_applied = cuped is not None and treatment.n > 1 and control.n > 1
    if cuped_applied and cuped is not None:
        arm_t = _Arm(treatment.n, *cuped.adjusted(treatment))
        arm_c = _Arm(control.n, *cuped.adjusted(control))
        raw_variance = raw_t.variance / raw_t.n + raw_c.variance / raw_c.n
        adjusted_variance = arm_t.variance / arm_t.n + arm_c.variance / arm_c.n
        reduction = 1 - adjusted_variance / raw_variance if raw_variance > 0 else 0.0
        theta = cuped.theta
    else:
        arm_t, arm_c, reduction, theta = raw_t, raw_c, 0.0, 0.0

    if metric.type is MetricType.BINARY and not cuped_applied:
        conversions_t, conversions_c = round(treatment.total), round(control.total)
        result = st.two_proportion_z_test(conversions_t, treatment.n, conversions_c, control.n, alpha, alternative)
        test = Test("TWO_PROPORTION_Z_TEST", result.statistic, result.degrees_of_freedom, result.p_value)
        se_t, se_c = _binary_standard_error(treatment), _binary_standard_error(control)
    else:
        # CUPED-adjusted values are no longer 0/1, so binary metrics under CUPED use Welch too.
        result = st.welch_t_test(arm_t.mean, arm_t.variance, arm_t.n, arm_c.mean, arm_c.variance, arm_c.n, alpha, alternative)
        test = Test("WELCH_T_TEST", result.statistic, result.degrees_of_freedom, result.p_value)
        se_t, se_c = arm_t.standard_error, arm_c.standard_error
    relative = st.relative_lift(arm_t.mean, se_t, arm_c.mean, se_c, alpha, alternative)
    sequential = None
    if settings.sequential.enabled:
        variance = se_t**2 + se_c**2
        sequential = st.sequential_test(
            arm_t.mean - arm_c.mean,
            variance,
            treatment.n + control.n,
            alpha,
            settings.sequential.method,
            2 * settings.sequential.tuning_units,
        )
    return result.difference, relative, test, sequential, cuped_applied, reduction, theta


def analyse_metric(
    metric: MetricDefinition,
    experiment: Experiment,
    moments: Mapping[str, Moments],
    settings: AnalysisSettings,
) -> tuple[tuple[VariantSummary, ...], list[tuple[str, Interval, Interval, Test, st.SequentialOutcome | None, bool, float, float]]]:
    """Per-variant summaries and the raw comparisons of every treatment against the control."""
    variant_ids = [v.variant_id for v in experiment.variants]
    control_id = experiment.control.variant_id
    cuped = st.cuped_adjustment(list(moments.values())) if settings.cuped.enabled else None
    summaries = _summaries(metric, variant_ids, moments, cuped)
    comparisons = []
    for variant_id in variant_ids:
        if variant_id == control_id:
            continue
        comparisons.append(
            (variant_id, *_compare(metric, moments.get(variant_id, Moments()), moments.get(control_id, Moments()), cuped, settings))
        )
    return summaries, comparisons


def analyse(
    experiment: Experiment,
    settings: AnalysisSettings,
    as_of_time: dt.datetime,
    units_by_variant: Mapping[str, int],
    metrics: Sequence[MetricDefinition],
    moments_by_metric: Mapping[str, Mapping[str, Moments]],
    events_analysed: int,
) -> AnalysisResult:
    """The full analysis: traffic and SRM, metric results with the correction, guardrails."""
    traffic, sample_ratio = traffic_and_sample_ratio(experiment, units_by_variant, settings)
    control_id = experiment.control.variant_id
    alpha = settings.effective_alpha
    raw = {m.metric_id: analyse_metric(m, experiment, moments_by_metric.get(m.metric_id, {}), settings) for m in metrics}

    # The correction's family: every comparison on a primary or secondary metric.
    family: list[tuple[str, int]] = []
    family_p: list[float] = []
    for metric in metrics:
        if metric.role is MetricRole.GUARDRAIL:
            continue
        for index, comparison in enumerate(raw[metric.metric_id][1]):
            test, sequential = comparison[3], comparison[4]
            family.append((metric.metric_id, index))
            family_p.append(sequential.p_value if sequential is not None else test.p_value)
    adjusted = dict(zip(family, st.adjust_p_values(family_p, settings.correction), strict=True))

    results = []
    for metric in metrics:
        summaries, comparisons = raw[metric.metric_id]
        built = []
        for index, (variant_id, absolute, relative, test, sequential, cuped_applied, reduction, theta) in enumerate(comparisons):
            decisive = sequential.p_value if sequential is not None else test.p_value
            adjusted_p = adjusted.get((metric.metric_id, index), decisive)
            built.append(
                Comparison(
                    variant_id=variant_id,
                    control_variant_id=control_id,
                    absolute_lift=absolute,
                    relative_lift=relative,
                    test=test,
                    adjusted_p_value=adjusted_p,
                    sequential=Sequential(settings.sequential.method, sequential.p_value, sequential.interval) if sequential else None,
                    significant=bool(math.isfinite(adjusted_p) and adjusted_p < alpha),
                    cuped_applied=cuped_applied,
                    cuped_variance_reduction=reduction,
                    cuped_theta=theta,
                )
            )
        results.append(MetricAnalysis(metric, summaries, tuple(built)))

    guardrails = tuple(
        verdict
        for guardrail in experiment.guardrails
        for verdict in evaluate_guardrail(guardrail, experiment, moments_by_metric.get(guardrail.metric_id, {}), settings)
    )
    return AnalysisResult(
        settings, as_of_time, experiment.config_revision, traffic, sample_ratio, tuple(results), guardrails, events_analysed
    )


def evaluate_guardrail(
    guardrail: Guardrail, experiment: Experiment, moments: Mapping[str, Moments], settings: AnalysisSettings
) -> list[GuardrailVerdict]:
    """Whether the metric degraded beyond the tolerance in any treatment, judged sequentially.

    Guardrails are checked again and again while the experiment runs, so the interval
    is the confidence sequence of the relative lift (always valid, like the sequential
    test), at the guardrail's alpha.
    """
    metric = experiment.metric(guardrail.metric_id)
    if metric is None:
        return []
    alpha = guardrail.alpha or settings.effective_alpha
    control_id = experiment.control.variant_id
    control = moments.get(control_id, Moments())
    cuped = st.cuped_adjustment(list(moments.values())) if settings.cuped.enabled else None
    verdicts = []
    for variant in experiment.variants:
        if variant.control:
            continue
        treatment = moments.get(variant.variant_id, Moments())
        minimum = max(guardrail.min_units_per_variant, 2)
        if treatment.n < minimum or control.n < minimum:
            verdicts.append(
                GuardrailVerdict(
                    guardrail.metric_id,
                    variant.variant_id,
                    Interval(NAN, NAN, NAN),
                    False,
                    f"too few units to judge: {treatment.n} in {variant.variant_id}, {control.n} in {control_id}; "
                    f"{minimum} per variant needed",
                    guardrail.action,
                    1 - alpha,
                )
            )
            continue
        if cuped is not None:
            mean_t, var_t = cuped.adjusted(treatment)
            mean_c, var_c = cuped.adjusted(control)
        else:
            mean_t, var_t, mean_c, var_c = treatment.mean, treatment.variance, control.mean, control.variance
        se_t, se_c = math.sqrt(var_t / treatment.n), math.sqrt(var_c / control.n)
        if mean_c == 0:
            verdicts.append(
                GuardrailVerdict(
                    guardrail.metric_id,
                    variant.variant_id,
                    Interval(NAN, NAN, NAN),
                    False,
                    "control mean is 0, so a relative degradation has no size yet",
                    guardrail.action,
                    1 - alpha,
                )
            )
            continue
        lift = mean_t / mean_c - 1
        standard_error = st.relative_lift_standard_error(mean_t, se_t, mean_c, se_c)
        outcome = st.sequential_test(
            lift,
            standard_error**2,
            treatment.n + control.n,
            alpha,
            SequentialMethod.ASYMPTOTIC_CONFIDENCE_SEQUENCE,
            2 * settings.sequential.tuning_units,
        )
        interval = outcome.interval
        limit = guardrail.max_relative_degradation
        if metric.direction is ImprovementDirection.DECREASE:
            triggered = math.isfinite(interval.lower) and interval.lower > limit
            bound = f"lower bound {interval.lower:+.2%} is above the tolerated +{limit:.2%}"
            held = f"lower bound {interval.lower:+.2%} is not above the tolerated +{limit:.2%}"
        else:
            triggered = math.isfinite(interval.upper) and interval.upper < -limit
            bound = f"upper bound {interval.upper:+.2%} is below the tolerated -{limit:.2%}"
            held = f"upper bound {interval.upper:+.2%} is not below the tolerated -{limit:.2%}"
        described = (
            f"guardrail {guardrail.metric_id}: variant {variant.variant_id} vs {control_id} relative lift {lift:+.2%}, "
            f"{1 - alpha:.0%} confidence sequence [{interval.lower:+.2%}, {interval.upper:+.2%}] over "
            f"{treatment.n + control.n} units; "
        )
        verdicts.append(
            GuardrailVerdict(
                guardrail.metric_id,
                variant.variant_id,
                interval,
                triggered,
                described + ("degraded: " + bound if triggered else "holds: " + held),
                guardrail.action,
                1 - alpha,
            )
        )
    return verdicts
