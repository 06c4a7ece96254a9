"""Creating and changing experiments: validation, bucket ranges and revisions together.

The state machine itself (start, stop, conclude) lives in `model`; this module adds the
two changes that also touch assignment: creation (initial bucket ranges) and updates
(ranges kept stable across allocation changes, revision bumped when assignments can
change).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from falaj_platform.runtime.errors import Aborted
from falaj_platform.services.experiments.assignment import initial_ranges, reallocate
from falaj_platform.services.experiments.model import (
    ASSIGNMENT_FIELDS,
    Experiment,
    ExperimentState,
    check_running_metric_change,
    check_update_paths,
    created,
    validate_design,
    with_etag,
)


def create(experiment: Experiment, actor: str, now: dt.datetime) -> Experiment:
    """A validated DRAFT experiment with its initial bucket ranges."""
    validate_design(experiment)
    return created(replace(experiment, bucket_ranges=initial_ranges(experiment.variants, experiment.coverage_bps)), actor, now)


def check_etag(experiment: Experiment, etag: str) -> None:
    """ABORTED when the caller's etag is stale (someone changed the experiment meanwhile)."""
    if etag and etag != experiment.etag:
        raise Aborted(
            f"experiment {experiment.name!r} changed since it was read (etag {etag!r} is stale); read it again and retry",
            reason="ETAG_MISMATCH",
            metadata={"etag": experiment.etag},
        )


def update(current: Experiment, paths: Sequence[str], changes: Mapping[str, Any], actor: str, now: dt.datetime) -> Experiment:
    """Apply `changes` (domain field -> value) for the update mask `paths`, validated.

    A change of variants (DRAFT only) lays the ranges out afresh; an allocation change
    keeps every bucket a variant can keep (`reallocate`), so few units move.
    """
    check_update_paths(current, paths)
    updated = replace(current, **changes)
    if current.state is ExperimentState.RUNNING and "metrics" in paths:
        check_running_metric_change(current.metrics, updated.metrics)
    validate_design(updated)
    touches_assignment = bool(ASSIGNMENT_FIELDS & set(paths))
    if "variants" in paths:
        ranges = initial_ranges(updated.variants, updated.coverage_bps)
    elif "allocation" in paths:
        ranges = reallocate(current.bucket_ranges, updated.variants, updated.coverage_bps)
    else:
        ranges = current.bucket_ranges
    return with_etag(
        replace(
            updated,
            bucket_ranges=ranges,
            config_revision=current.config_revision + (1 if touches_assignment else 0),
            updated_by=actor,
            updated_at=now,
        )
    )
