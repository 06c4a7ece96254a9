"""Runs an analysis: streams unit values from the store into sufficient statistics and
hands them to the domain analysis. Memory stays at one chunk of units, whatever the
number of events.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from falaj_platform.services.experiments import analysis as an
from falaj_platform.services.experiments.model import AnalysisSettings, Experiment, MetricDefinition
from falaj_platform.services.experiments.statistics import Moments, MomentsAccumulator
from falaj_platform.services.experiments.store import ExperimentsStore, UnitValueQuery


def metric_moments(
    store: ExperimentsStore, experiment: Experiment, metric: MetricDefinition, settings: AnalysisSettings, as_of: dt.datetime
) -> dict[str, Moments]:
    """Moments of the metric's per-unit values in each variant (with the CUPED covariate when on)."""
    covariate = None
    if settings.cuped.enabled and experiment.start_time is not None:
        covariate = experiment.metric(settings.cuped.covariate_metric_id) if settings.cuped.covariate_metric_id else metric
    query = UnitValueQuery(
        metric_id=metric.metric_id,
        aggregation=metric.unit_aggregation,
        conversion_window=metric.conversion_window,
        covariate_metric_id=covariate.metric_id if covariate else None,
        covariate_aggregation=covariate.unit_aggregation if covariate else None,
        pre_period_start=experiment.start_time - settings.cuped.effective_pre_period if covariate and experiment.start_time else None,
        pre_period_end=experiment.start_time if covariate else None,
    )
    codes = {v.variant_id: code for code, v in enumerate(experiment.variants)}
    accumulator = MomentsAccumulator(len(codes), with_covariate=covariate is not None)
    for chunk in store.stream_unit_values(experiment.experiment_id, codes, as_of, query):
        accumulator.add(chunk[:, 0].astype(int), chunk[:, 1], chunk[:, 2] if covariate is not None else None)
    return {variant_id: accumulator.moments[code] for variant_id, code in codes.items()}


def run_analysis(
    store: ExperimentsStore,
    experiment: Experiment,
    settings: AnalysisSettings,
    as_of: dt.datetime,
    metrics: Sequence[MetricDefinition],
) -> an.AnalysisResult:
    """The analysis of `metrics` (guardrail metrics are always read, for the guardrail verdicts)."""
    guardrail_metrics = [m for g in experiment.guardrails if (m := experiment.metric(g.metric_id)) is not None]
    needed = {m.metric_id: m for m in (*metrics, *guardrail_metrics)}
    moments = {metric_id: metric_moments(store, experiment, metric, settings, as_of) for metric_id, metric in needed.items()}
    units = store.exposed_units_by_variant(experiment.experiment_id, as_of)
    events = store.count_events(experiment.experiment_id, as_of, needed)
    return an.analyse(experiment, settings, as_of, units, metrics, moments, events)
