"""Which exposure and outcome events an experiment accepts, and why it refuses the others.

A refused event does not fail its batch: it comes back as a rejection with a
machine-readable reason while the rest of the batch is counted.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass

from falaj_platform.runtime.errors import FailedPrecondition
from falaj_platform.services.experiments.assignment import Assigner
from falaj_platform.services.experiments.model import Experiment, ExperimentState, MetricType

MAX_EVENT_ID_LENGTH = 128
MAX_UNIT_ID_LENGTH = 256
CLOCK_SKEW = dt.timedelta(minutes=5)
"""How far in the future an event time may lie (clients' clocks drift)."""


@dataclass(frozen=True)
class Rejection:
    index: int
    event_id: str
    reason: str
    message: str


def require_running(experiment: Experiment) -> None:
    """Events are counted only while an experiment runs; a stopped one is evidence, frozen."""
    if experiment.state is not ExperimentState.RUNNING:
        raise FailedPrecondition(
            f"experiment {experiment.name!r} is {experiment.state}; events are accepted only while it is RUNNING",
            reason="EXPERIMENT_NOT_RUNNING",
            metadata={"experiment": experiment.name, "state": str(experiment.state)},
        )


def _identity(index: int, event_id: str, unit_id: str) -> Rejection | None:
    if not event_id or len(event_id) > MAX_EVENT_ID_LENGTH:
        return Rejection(index, event_id, "INVALID_EVENT_ID", f"event_id must be 1-{MAX_EVENT_ID_LENGTH} characters")
    if not unit_id or len(unit_id) > MAX_UNIT_ID_LENGTH:
        return Rejection(index, event_id, "INVALID_UNIT_ID", f"unit_id must be 1-{MAX_UNIT_ID_LENGTH} characters")
    return None


def _future(index: int, event_id: str, time: dt.datetime, now: dt.datetime) -> Rejection | None:
    if time > now + CLOCK_SKEW:
        return Rejection(index, event_id, "FUTURE_TIME", f"event time {time.isoformat()} is in the future")
    return None


def check_exposure(
    experiment: Experiment,
    assigner: Assigner,
    index: int,
    event_id: str,
    unit_id: str,
    variant_id: str,
    time: dt.datetime,
    now: dt.datetime,
) -> Rejection | None:
    """None when the exposure counts; otherwise why not."""
    rejection = _identity(index, event_id, unit_id) or _future(index, event_id, time, now)
    if rejection:
        return rejection
    if experiment.variant(variant_id) is None:
        return Rejection(index, event_id, "UNKNOWN_VARIANT", f"variant {variant_id!r} is not a variant of {experiment.name}")
    if experiment.start_time is not None and time < experiment.start_time - CLOCK_SKEW:
        return Rejection(index, event_id, "BEFORE_START", f"exposure time {time.isoformat()} is before the experiment started")
    assigned = assigner.variant_of_unit(unit_id)
    if assigned is None:
        return Rejection(index, event_id, "NOT_IN_EXPERIMENT", f"unit {unit_id!r} hashes outside the experiment's coverage")
    if assigned.variant_id != variant_id:
        return Rejection(index, event_id, "VARIANT_MISMATCH", f"unit {unit_id!r} is assigned {assigned.variant_id!r}, not {variant_id!r}")
    return None


def check_outcome(
    experiment: Experiment, index: int, event_id: str, unit_id: str, metric_id: str, value: float, time: dt.datetime, now: dt.datetime
) -> Rejection | None:
    """None when the outcome counts; otherwise why not."""
    rejection = _identity(index, event_id, unit_id) or _future(index, event_id, time, now)
    if rejection:
        return rejection
    metric = experiment.metric(metric_id)
    if metric is None:
        return Rejection(index, event_id, "UNKNOWN_METRIC", f"metric {metric_id!r} is not a metric of {experiment.name}")
    if not math.isfinite(value):
        return Rejection(index, event_id, "INVALID_VALUE", f"value {value} is not a finite number")
    if metric.type is MetricType.BINARY and value not in (0.0, 1.0):
        return Rejection(index, event_id, "INVALID_VALUE", f"binary metric {metric_id!r} takes 0 or 1, got {value}")
    if metric.type is MetricType.COUNT and value < 0:
        return Rejection(index, event_id, "INVALID_VALUE", f"count metric {metric_id!r} takes non-negative values, got {value}")
    return None
