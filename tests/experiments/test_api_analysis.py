"""Analyses through the real service equal scipy/statsmodels on the same unit values; SRM is
flagged on a skewed split; CUPED removes variance; guardrails stop an experiment and say why."""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass, field

import grpc
import numpy as np
import pyarrow as pa
import pytest
from google.protobuf import duration_pb2
from scipy import stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.proportion import confint_proportions_2indep, proportions_ztest

from falaj.experiments.v1 import message_pb2 as pb
from falaj.experiments.v1 import request_response_pb2 as rr
from tests.experiments.conftest import ExperimentsClient, create_running, design, error_of
from tests.experiments.test_api_events import arrow_batch

NAME = "experiments/checkout"
SERVICE_ID = "spiffe://falaj.local/service/experiments"


@dataclass
class Seeded:
    """What the test sent, per unit, so it can compute the expected figures itself."""

    variant: dict[str, str] = field(default_factory=dict)
    revenue: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    converted: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    latency: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    pre_revenue: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    event_count: int = 0

    def values(self, metric: dict[str, float], variant: str) -> np.ndarray:
        return np.array([metric[u] for u, v in self.variant.items() if v == variant])


def import_events(client: ExperimentsClient, kind: int, columns: dict[str, list[object]], request_id: str) -> rr.ImportEventsResponse:
    size = len(columns["event_id"])
    arrays = {k: pa.array(v, pa.timestamp("us", tz="UTC")) if k == "time" else pa.array(v) for k, v in columns.items()}
    batches = [arrow_batch({k: a.slice(start, 1000) for k, a in arrays.items()}, f"{request_id}-{start}") for start in range(0, size, 1000)]
    stream = [rr.ImportEventsRequest(header=rr.ImportEventsHeader(experiment=NAME, kind=kind, request_id=request_id))]
    stream += [rr.ImportEventsRequest(batch=b) for b in batches]
    response: rr.ImportEventsResponse = client.ImportEvents(iter(stream))
    assert response.rejected_count == 0, response.sample_rejections
    return response


def seed(
    client: ExperimentsClient,
    *,
    units: int = 2_000,
    lift: float = 1.0,
    skip_treatment_share: float = 0.0,
    latency_penalty: float = 0.0,
    seed_value: int = 1,
) -> Seeded:
    """Expose units as assigned, then record revenue, conversions, latency and a pre-period covariate."""
    rng = np.random.default_rng(seed_value)
    started = client.GetExperiment(rr.GetExperimentRequest(name=NAME)).experiment.start_time.ToDatetime(tzinfo=dt.UTC)
    exposed_at = started + dt.timedelta(seconds=1)
    client.clock.advance(dt.timedelta(minutes=1))  # the events lie in the past when analysed
    seeded = Seeded()
    assigned = client.BatchAssignVariants(
        rr.BatchAssignVariantsRequest(experiment=NAME, units=[rr.AssignmentUnit(unit_id=f"user-{i}") for i in range(units)])
    ).assignments
    exposures: dict[str, list[object]] = {"event_id": [], "unit_id": [], "variant_id": [], "time": []}
    outcomes: dict[str, list[object]] = {"event_id": [], "unit_id": [], "metric_id": [], "value": [], "time": []}

    def outcome(unit: str, metric: str, value: float, when: dt.datetime) -> None:
        outcomes["event_id"].append(f"{metric}-{unit}-{len(outcomes['event_id'])}")
        outcomes["unit_id"].append(unit)
        outcomes["metric_id"].append(metric)
        outcomes["value"].append(value)
        outcomes["time"].append(when)

    for a in assigned:
        unit, variant = a.unit_id, a.variant_id
        if variant == "treatment" and rng.random() < skip_treatment_share:
            continue  # exposures lost on the treatment side: a broken split
        seeded.variant[unit] = variant
        for event in ("first", "again"):  # a unit exposed twice still counts once
            exposures["event_id"].append(f"{event}-{unit}")
            exposures["unit_id"].append(unit)
            exposures["variant_id"].append(variant)
            exposures["time"].append(exposed_at)
        habit = rng.gamma(2.0, 10.0)  # the unit's spending habit, seen before and during the experiment
        pre = habit + rng.normal(0, 3)
        outcome(unit, "revenue", pre, started - dt.timedelta(days=2))
        seeded.pre_revenue[unit] += pre
        for _ in range(rng.integers(0, 3)):  # 0, 1 or 2 purchases
            value = habit + rng.normal(0, 3) + (lift if variant == "treatment" else 0.0)
            outcome(unit, "revenue", value, exposed_at + dt.timedelta(seconds=1))
            seeded.revenue[unit] += value
        if rng.random() < (0.12 if variant == "treatment" else 0.10):
            outcome(unit, "converted", 1.0, exposed_at + dt.timedelta(seconds=2))
            seeded.converted[unit] = 1.0
        latency = rng.normal(100, 10) * (1 + (latency_penalty if variant == "treatment" else 0.0))
        outcome(unit, "latency_ms", latency, exposed_at + dt.timedelta(seconds=1))
        seeded.latency[unit] += latency
    import_events(client, pb.EVENT_KIND_EXPOSURE, exposures, "seed-exposures")
    import_events(client, pb.EVENT_KIND_OUTCOME, outcomes, "seed-outcomes")
    seeded.event_count = len(exposures["event_id"]) + len(outcomes["event_id"])
    return seeded


METRICS = [
    pb.MetricDefinition(metric_id="revenue", type=pb.METRIC_TYPE_CONTINUOUS, role=pb.METRIC_ROLE_PRIMARY),
    pb.MetricDefinition(metric_id="converted", type=pb.METRIC_TYPE_BINARY, role=pb.METRIC_ROLE_SECONDARY),
    pb.MetricDefinition(
        metric_id="latency_ms",
        type=pb.METRIC_TYPE_CONTINUOUS,
        role=pb.METRIC_ROLE_GUARDRAIL,
        direction=pb.IMPROVEMENT_DIRECTION_DECREASE,
        aggregation=pb.UNIT_AGGREGATION_MEAN,
    ),
]


def result_of(analysis: pb.ExperimentAnalysis, metric_id: str) -> pb.MetricResult:
    return next(m for m in analysis.metric_results if m.metric_id == metric_id)


def test_analysis_equals_scipy_and_statsmodels_on_the_same_unit_values(experiments: ExperimentsClient) -> None:
    create_running(
        experiments, "checkout", design(metrics=METRICS, analysis=pb.AnalysisConfig(correction=pb.MULTIPLE_COMPARISON_CORRECTION_HOLM))
    )
    seeded = seed(experiments)
    analysis = experiments.AnalyzeExperiment(rr.AnalyzeExperimentRequest(experiment=NAME, request_id="analysis-1")).analysis

    # Traffic and SRM: units, not exposures (every unit was exposed twice).
    counts = {v: sum(1 for x in seeded.variant.values() if x == v) for v in ("control", "treatment")}
    assert {t.variant_id: t.units for t in analysis.traffic} == counts
    srm = stats.chisquare([counts["control"], counts["treatment"]])
    assert analysis.sample_ratio_mismatch.p_value == pytest.approx(srm.pvalue)
    assert not analysis.sample_ratio_mismatch.mismatch
    assert analysis.events_analysed == seeded.event_count

    revenue = result_of(analysis, "revenue")
    treatment, control = seeded.values(seeded.revenue, "treatment"), seeded.values(seeded.revenue, "control")
    reference = stats.ttest_ind(treatment, control, equal_var=False)
    comparison = revenue.comparisons[0]
    assert comparison.test.method == pb.TEST_METHOD_WELCH_T_TEST
    assert comparison.test.statistic == pytest.approx(reference.statistic, rel=1e-8)
    assert comparison.test.p_value == pytest.approx(reference.pvalue, rel=1e-7)
    assert comparison.test.degrees_of_freedom == pytest.approx(reference.df, rel=1e-8)
    interval = reference.confidence_interval(0.95)
    assert (comparison.absolute_lift.ci_lower, comparison.absolute_lift.ci_upper) == pytest.approx((interval.low, interval.high), rel=1e-7)
    assert comparison.absolute_lift.value == pytest.approx(treatment.mean() - control.mean(), rel=1e-9)
    assert comparison.relative_lift.value == pytest.approx(treatment.mean() / control.mean() - 1, rel=1e-9)
    by_variant = {v.variant_id: v for v in revenue.variants}
    assert by_variant["control"].mean == pytest.approx(control.mean(), rel=1e-12)
    assert by_variant["control"].variance == pytest.approx(control.var(ddof=1), rel=1e-9)
    assert by_variant["control"].standard_error == pytest.approx(stats.sem(control), rel=1e-9)

    converted = result_of(analysis, "converted")
    t_conv, c_conv = seeded.values(seeded.converted, "treatment"), seeded.values(seeded.converted, "control")
    z, p = proportions_ztest([t_conv.sum(), c_conv.sum()], [t_conv.size, c_conv.size])
    binary = converted.comparisons[0]
    assert binary.test.method == pb.TEST_METHOD_TWO_PROPORTION_Z_TEST
    assert (binary.test.statistic, binary.test.p_value) == pytest.approx((z, p), rel=1e-9)
    lower, upper = confint_proportions_2indep(t_conv.sum(), t_conv.size, c_conv.sum(), c_conv.size, method="wald", compare="diff")
    assert (binary.absolute_lift.ci_lower, binary.absolute_lift.ci_upper) == pytest.approx((lower, upper), rel=1e-9)

    # Holm across the primary and secondary metrics; the guardrail metric is outside the family.
    adjusted = multipletests([comparison.test.p_value, binary.test.p_value], method="holm")[1]
    assert [comparison.adjusted_p_value, binary.adjusted_p_value] == pytest.approx(list(adjusted))
    latency = result_of(analysis, "latency_ms")
    assert latency.comparisons[0].adjusted_p_value == latency.comparisons[0].test.p_value
    assert latency.role == pb.METRIC_ROLE_GUARDRAIL

    # Kept, readable again, listed newest first; a retry with the request id returns the same analysis.
    assert experiments.GetExperimentAnalysis(rr.GetExperimentAnalysisRequest(name=analysis.name)).analysis == analysis
    again = experiments.AnalyzeExperiment(rr.AnalyzeExperimentRequest(experiment=NAME, request_id="analysis-1")).analysis
    assert again == analysis
    later = experiments.AnalyzeExperiment(rr.AnalyzeExperimentRequest(experiment=NAME, metric_ids=["converted"])).analysis
    assert [m.metric_id for m in later.metric_results] == ["converted"]
    listed = experiments.ListExperimentAnalyses(rr.ListExperimentAnalysesRequest(parent=NAME, page_size=1))
    assert [a.name for a in listed.analyses] == [later.name] and listed.next_page_token
    rest = experiments.ListExperimentAnalyses(rr.ListExperimentAnalysesRequest(parent=NAME, page_token=listed.next_page_token))
    assert [a.name for a in rest.analyses] == [analysis.name]
    code, reason, _ = error_of(lambda: experiments.AnalyzeExperiment(rr.AnalyzeExperimentRequest(experiment=NAME, metric_ids=["nope"])))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_METRIC")
    code, reason, _ = error_of(lambda: experiments.GetExperimentAnalysis(rr.GetExperimentAnalysisRequest(name=NAME + "/analyses/nope")))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "ANALYSIS_NOT_FOUND")

    # Conclude on the analysis.
    experiments.StopExperiment(rr.StopExperimentRequest(name=NAME))
    concluded = experiments.ConcludeExperiment(
        rr.ConcludeExperimentRequest(
            name=NAME, conclusion=pb.Conclusion(winning_variant_id="treatment", summary="ship", analysis=analysis.name)
        )
    ).experiment
    assert concluded.conclusion.analysis == analysis.name


def test_analysis_as_of_an_earlier_time_sees_only_earlier_events(experiments: ExperimentsClient) -> None:
    create_running(experiments, "checkout", design(metrics=METRICS))
    seed(experiments, units=300)
    request = rr.AnalyzeExperimentRequest(experiment=NAME)
    started = experiments.GetExperiment(rr.GetExperimentRequest(name=NAME)).experiment.start_time.ToDatetime(tzinfo=dt.UTC)
    request.as_of_time.FromDatetime(started)  # before the first exposure
    empty = experiments.AnalyzeExperiment(request).analysis
    assert sum(t.units for t in empty.traffic) == 0
    assert result_of(empty, "revenue").variants[0].units == 0


def test_cuped_through_the_api_reduces_variance_and_equals_scipy_on_adjusted_values(experiments: ExperimentsClient) -> None:
    create_running(experiments, "checkout", design(metrics=METRICS, analysis=pb.AnalysisConfig(cuped=pb.CupedConfig(enabled=True))))
    seeded = seed(experiments, units=3_000)
    analysis = experiments.AnalyzeExperiment(rr.AnalyzeExperimentRequest(experiment=NAME)).analysis
    comparison = result_of(analysis, "revenue").comparisons[0]
    assert comparison.cuped_applied
    units = list(seeded.variant)
    y = np.array([seeded.revenue[u] for u in units])
    x = np.array([seeded.pre_revenue[u] for u in units])
    theta = np.cov(x, y)[0, 1] / np.var(x, ddof=1)
    assert comparison.cuped_theta == pytest.approx(theta, rel=1e-9)
    adjusted = y - theta * (x - x.mean())
    in_treatment = np.array([seeded.variant[u] == "treatment" for u in units])
    reference = stats.ttest_ind(adjusted[in_treatment], adjusted[~in_treatment], equal_var=False)
    assert (comparison.test.statistic, comparison.test.p_value) == pytest.approx((reference.statistic, reference.pvalue), rel=1e-7)
    raw = stats.ttest_ind(y[in_treatment], y[~in_treatment], equal_var=False)
    assert comparison.cuped_variance_reduction > 0.2
    assert (
        comparison.absolute_lift.ci_upper - comparison.absolute_lift.ci_lower
        < raw.confidence_interval().high - raw.confidence_interval().low
    )
    stats_by_variant = {v.variant_id: v for v in result_of(analysis, "revenue").variants}
    assert stats_by_variant["treatment"].cuped_adjusted_variance < stats_by_variant["treatment"].variance


def test_sample_ratio_mismatch_is_flagged_and_can_stop_the_experiment(experiments: ExperimentsClient) -> None:
    create_running(experiments, "checkout", design(metrics=METRICS, analysis=pb.AnalysisConfig(stop_on_srm=True)))
    seeded = seed(experiments, units=2_000, skip_treatment_share=0.2)
    analysis = experiments.AnalyzeExperiment(rr.AnalyzeExperimentRequest(experiment=NAME)).analysis
    counts = [sum(1 for v in seeded.variant.values() if v == name) for name in ("control", "treatment")]
    srm = analysis.sample_ratio_mismatch
    assert srm.mismatch and srm.p_value < 0.001 and srm.p_value_threshold == 0.001
    assert srm.chi_square == pytest.approx(stats.chisquare(counts).statistic)
    stopped = experiments.GetExperiment(rr.GetExperimentRequest(name=NAME)).experiment
    assert stopped.state == pb.EXPERIMENT_STATE_STOPPED
    assert stopped.stop_reason.cause == pb.STOP_CAUSE_SAMPLE_RATIO_MISMATCH
    assert "sample ratio mismatch" in stopped.stop_reason.message and analysis.name in stopped.stop_reason.message
    assert experiments.audit.events[-1]["action"] == "stop" and experiments.audit.events[-1]["caller"] == SERVICE_ID


def test_a_degrading_guardrail_stops_the_experiment_by_itself_and_says_why(experiments: ExperimentsClient) -> None:
    guardrail = pb.Guardrail(
        metric_id="latency_ms", max_relative_degradation=0.05, min_units_per_variant=100, check_interval=duration_pb2.Duration(seconds=0)
    )
    create_running(experiments, "checkout", design(metrics=METRICS, guardrails=[guardrail]))
    seed(experiments, units=1_000, latency_penalty=0.30)  # treatment is 30% slower
    # Nobody asked for an analysis: the events arriving triggered the guardrail check.
    stopped = experiments.GetExperiment(rr.GetExperimentRequest(name=NAME)).experiment
    assert stopped.state == pb.EXPERIMENT_STATE_STOPPED
    reason = stopped.stop_reason
    assert (reason.cause, reason.guardrail_metric_id, reason.guardrail_variant_id) == (pb.STOP_CAUSE_GUARDRAIL, "latency_ms", "treatment")
    assert "degraded" in reason.message and "+5.00%" in reason.message
    assert stopped.state_history[-1].changed.actor == SERVICE_ID
    kept = experiments.ListExperimentAnalyses(rr.ListExperimentAnalysesRequest(parent=NAME)).analyses[0]
    verdict = kept.guardrail_results[0]
    assert verdict.triggered and verdict.relative_lift.ci_lower > 0.05
    assert kept.created.actor == SERVICE_ID
    assert experiments.audit.actions(NAME)[-1] == "stop"
    # Events after the stop are refused.
    code, reason_code, _ = error_of(
        lambda: experiments.RecordOutcomes(
            rr.RecordOutcomesRequest(
                experiment=NAME, request_id="late", outcomes=[pb.Outcome(event_id="late", unit_id="user-1", metric_id="revenue", value=1)]
            )
        )
    )
    assert (code, reason_code) == (grpc.StatusCode.FAILED_PRECONDITION, "EXPERIMENT_NOT_RUNNING")


def test_a_healthy_guardrail_keeps_the_experiment_running(experiments: ExperimentsClient) -> None:
    guardrail = pb.Guardrail(metric_id="latency_ms", max_relative_degradation=0.05, min_units_per_variant=100)
    create_running(
        experiments,
        "checkout",
        design(metrics=METRICS, guardrails=[guardrail], analysis=pb.AnalysisConfig(sequential=pb.SequentialConfig(enabled=True))),
    )
    seed(experiments, units=1_000, latency_penalty=0.0)
    analysis = experiments.AnalyzeExperiment(rr.AnalyzeExperimentRequest(experiment=NAME)).analysis
    verdict = analysis.guardrail_results[0]
    assert not verdict.triggered and "holds" in verdict.message
    assert experiments.GetExperiment(rr.GetExperimentRequest(name=NAME)).experiment.state == pb.EXPERIMENT_STATE_RUNNING
    sequential = result_of(analysis, "revenue").comparisons[0].sequential
    fixed = result_of(analysis, "revenue").comparisons[0].absolute_lift
    assert sequential.method == pb.SEQUENTIAL_METHOD_ASYMPTOTIC_CONFIDENCE_SEQUENCE
    assert sequential.absolute_lift.ci_lower < fixed.ci_lower and sequential.absolute_lift.ci_upper > fixed.ci_upper
    assert result_of(analysis, "revenue").comparisons[0].adjusted_p_value == sequential.p_value


def test_calculate_power_through_the_api(experiments: ExperimentsClient) -> None:
    plan = experiments.CalculatePower(
        rr.CalculatePowerRequest(
            metric_type=pb.METRIC_TYPE_BINARY,
            baseline_mean=0.10,
            variant_count=3,
            units_per_day=1_000,
            sample_size=rr.SolveSampleSize(relative_effect=0.10),
        )
    )
    assert plan.units_per_variant == 14_745 and plan.total_units == 3 * 14_745
    assert plan.absolute_effect == pytest.approx(0.01)
    assert plan.estimated_duration.ToTimedelta() == dt.timedelta(days=3 * 14_745 / 1_000)
    mde = experiments.CalculatePower(
        rr.CalculatePowerRequest(
            metric_type=pb.METRIC_TYPE_CONTINUOUS,
            baseline_mean=50,
            baseline_std_dev=20,
            minimum_detectable_effect=rr.SolveMinimumDetectableEffect(units_per_variant=10_000),
        )
    )
    assert 0 < mde.relative_effect < 0.05 and mde.power == pytest.approx(0.8)
    code, reason, _ = error_of(
        lambda: experiments.CalculatePower(
            rr.CalculatePowerRequest(
                metric_type=pb.METRIC_TYPE_CONTINUOUS, baseline_mean=50, power=rr.SolvePower(units_per_variant=100, relative_effect=0.1)
            )
        )
    )
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_BASELINE")
