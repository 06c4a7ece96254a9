"""Deterministic assignment: hash (salt, unit) to a bucket, buckets to variants.

A unit's bucket is `hash(salt + unit_id) mod 10000`; each variant owns half-open ranges
of buckets. The bucket never changes for a unit, so the unit keeps its variant as long
as the ranges do. When the allocation changes, `reallocate` keeps every bucket a
variant can keep and hands only the freed ones to the variants that grow: the number of
units that change variant is the minimum any layout can achieve (the sum of the
shrinkage of the shrinking variants).

The ranges of all variants together cover `coverage_bps` buckets; a unit whose bucket
lies outside every range is not in the experiment and gets the control. That is the
whole assignment rule, so a caller holding the ranges (GetAssignmentConfig) can
evaluate assignments itself.
"""

from __future__ import annotations

import enum
import hashlib
import re
from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

from falaj_platform.services.experiments.model import (
    TOTAL_BPS,
    AttributeCondition,
    AttributeScalar,
    BucketRange,
    ConditionOperator,
    Experiment,
    ExperimentState,
    HashAlgorithm,
    Targeting,
    Variant,
)

_FNV_OFFSET = 0x811C9DC5
_FNV_PRIME = 0x01000193


def fnv1a_32(text: str) -> int:
    """32-bit FNV-1a of the UTF-8 bytes (as GrowthBook's SDKs hash)."""
    value = _FNV_OFFSET
    for byte in text.encode():
        value = ((value ^ byte) * _FNV_PRIME) & 0xFFFFFFFF
    return value


def bucket_of(salt: str, unit_id: str, algorithm: HashAlgorithm = HashAlgorithm.SHA256) -> int:
    """The unit's hash bucket in [0, 10000); the same inputs always give the same bucket."""
    if algorithm is HashAlgorithm.FNV1A_32:
        # GrowthBook hash v2: fnv1a32(str(fnv1a32(seed + value))) % 10000.
        return fnv1a_32(str(fnv1a_32(salt + unit_id))) % TOTAL_BPS
    digest = hashlib.sha256((salt + unit_id).encode()).digest()
    return int.from_bytes(digest[:8], "big") % TOTAL_BPS


# -- bucket ranges ---------------------------------------------------------------------


def target_widths(variants: Sequence[Variant], coverage_bps: int) -> dict[str, int]:
    """Buckets each variant should own: coverage x weight, rounded so that they sum to coverage.

    Largest-remainder rounding; ties go to the earlier variant, so the result is deterministic.
    """
    exact = [(v.variant_id, coverage_bps * v.weight_bps / TOTAL_BPS) for v in variants]
    widths = {variant_id: int(share) for variant_id, share in exact}
    missing = coverage_bps - sum(widths.values())
    by_remainder = sorted(range(len(exact)), key=lambda i: (-(exact[i][1] - int(exact[i][1])), i))
    for index in by_remainder[:missing]:
        widths[exact[index][0]] += 1
    return widths


def initial_ranges(variants: Sequence[Variant], coverage_bps: int) -> tuple[BucketRange, ...]:
    """Contiguous ranges from bucket 0, in variant order."""
    widths = target_widths(variants, coverage_bps)
    ranges: list[BucketRange] = []
    start = 0
    for variant in variants:
        width = widths[variant.variant_id]
        if width:
            ranges.append(BucketRange(variant.variant_id, start, start + width))
        start += width
    return tuple(ranges)


def _merge(ranges: Iterable[BucketRange]) -> tuple[BucketRange, ...]:
    merged: list[BucketRange] = []
    for bucket_range in sorted(ranges, key=lambda r: r.start):
        if bucket_range.width <= 0:
            continue
        if merged and merged[-1].variant_id == bucket_range.variant_id and merged[-1].end == bucket_range.start:
            merged[-1] = BucketRange(bucket_range.variant_id, merged[-1].start, bucket_range.end)
        else:
            merged.append(bucket_range)
    return tuple(merged)


def reallocate(current: Sequence[BucketRange], variants: Sequence[Variant], coverage_bps: int) -> tuple[BucketRange, ...]:
    """New ranges for a new allocation that move as few units as possible.

    Each variant keeps min(old, new) of its buckets (shrinking variants give up their
    highest buckets); growing variants take free buckets, lowest first. Only buckets a
    shrinking variant had to give up change variant.
    """
    targets = target_widths(variants, coverage_bps)
    kept: list[BucketRange] = []
    for variant_id, target in targets.items():
        owned = sorted((r for r in current if r.variant_id == variant_id), key=lambda r: r.start)
        remaining = target
        for bucket_range in owned:
            if remaining <= 0:
                break
            take = min(bucket_range.width, remaining)
            kept.append(BucketRange(variant_id, bucket_range.start, bucket_range.start + take))
            remaining -= take
    taken = sorted(kept, key=lambda r: r.start)
    free: list[tuple[int, int]] = []
    cursor = 0
    for bucket_range in taken:
        if bucket_range.start > cursor:
            free.append((cursor, bucket_range.start))
        cursor = max(cursor, bucket_range.end)
    if cursor < TOTAL_BPS:
        free.append((cursor, TOTAL_BPS))
    result = list(kept)
    for variant in variants:
        need = targets[variant.variant_id] - sum(r.width for r in kept if r.variant_id == variant.variant_id)
        while need > 0:
            start, end = free.pop(0)
            take = min(end - start, need)
            result.append(BucketRange(variant.variant_id, start, start + take))
            if start + take < end:
                free.insert(0, (start + take, end))
            need -= take
    return _merge(result)


# -- targeting -------------------------------------------------------------------------


@lru_cache(maxsize=1024)
def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def _comparable(left: AttributeScalar, right: AttributeScalar) -> bool:
    numeric = (int, float)
    if isinstance(left, bool) or isinstance(right, bool):
        return isinstance(left, bool) and isinstance(right, bool)
    if isinstance(left, numeric) and isinstance(right, numeric):
        return True
    return isinstance(left, str) and isinstance(right, str)


def _equal(left: AttributeScalar, right: AttributeScalar) -> bool:
    return _comparable(left, right) and left == right


def condition_holds(condition: AttributeCondition, attributes: Mapping[str, AttributeScalar]) -> bool:
    """Whether one condition holds; a missing attribute or a type mismatch never satisfies a condition."""
    if condition.attribute not in attributes:
        return False
    value = attributes[condition.attribute]
    operator = condition.operator
    if operator is ConditionOperator.EXISTS:
        return True
    if operator is ConditionOperator.IN:
        return any(_equal(value, v) for v in condition.values)
    if operator is ConditionOperator.NOT_IN:
        return all(_comparable(value, v) and value != v for v in condition.values)
    operand = condition.values[0]
    if operator is ConditionOperator.EQUALS:
        return _equal(value, operand)
    if operator is ConditionOperator.NOT_EQUALS:
        return _comparable(value, operand) and value != operand
    if operator is ConditionOperator.MATCHES_REGEX:
        return isinstance(value, str) and isinstance(operand, str) and _regex(operand).fullmatch(value) is not None
    if not _comparable(value, operand) or isinstance(value, bool):
        return False
    left, right = value, operand
    if operator is ConditionOperator.GREATER_THAN:
        return left > right  # type: ignore[operator]
    if operator is ConditionOperator.GREATER_OR_EQUAL:
        return left >= right  # type: ignore[operator]
    if operator is ConditionOperator.LESS_THAN:
        return left < right  # type: ignore[operator]
    return left <= right  # type: ignore[operator]


def is_targeted(targeting: Targeting, attributes: Mapping[str, AttributeScalar]) -> bool:
    """Any clause whose conditions all hold; no clause targets every unit."""
    if not targeting.any_of:
        return True
    return any(all(condition_holds(c, attributes) for c in clause.all_of) for clause in targeting.any_of)


# -- assignment ------------------------------------------------------------------------


class AssignmentReason(enum.StrEnum):
    ASSIGNED = "ASSIGNED"
    NOT_TARGETED = "NOT_TARGETED"
    OUTSIDE_COVERAGE = "OUTSIDE_COVERAGE"
    NOT_RUNNING = "NOT_RUNNING"


@dataclass(frozen=True)
class Assignment:
    unit_id: str
    variant: Variant
    in_experiment: bool
    reason: AssignmentReason
    config_revision: int


class Assigner:
    """Evaluates assignments for one experiment configuration (prepared once, used many times)."""

    def __init__(self, experiment: Experiment):
        self.experiment = experiment
        self.control = experiment.control
        self._variants = {v.variant_id: v for v in experiment.variants}
        ranges = sorted(experiment.bucket_ranges, key=lambda r: r.start)
        self._starts = [r.start for r in ranges]
        self._ranges = ranges
        self._salt = experiment.hashing.salt
        self._algorithm = experiment.hashing.algorithm

    def variant_of_bucket(self, bucket: int) -> Variant | None:
        """The variant owning a bucket, or None when the bucket is outside the coverage."""
        index = bisect_right(self._starts, bucket) - 1
        if index >= 0 and bucket < self._ranges[index].end:
            return self._variants[self._ranges[index].variant_id]
        return None

    def variant_of_unit(self, unit_id: str) -> Variant | None:
        """The variant the unit hashes into, ignoring state and targeting (None: outside coverage)."""
        return self.variant_of_bucket(bucket_of(self._salt, unit_id, self._algorithm))

    def assign(self, unit_id: str, attributes: Mapping[str, AttributeScalar] | None = None) -> Assignment:
        revision = self.experiment.config_revision
        if self.experiment.state is not ExperimentState.RUNNING:
            return Assignment(unit_id, self.control, False, AssignmentReason.NOT_RUNNING, revision)
        if not is_targeted(self.experiment.targeting, attributes or {}):
            return Assignment(unit_id, self.control, False, AssignmentReason.NOT_TARGETED, revision)
        variant = self.variant_of_unit(unit_id)
        if variant is None:
            return Assignment(unit_id, self.control, False, AssignmentReason.OUTSIDE_COVERAGE, revision)
        return Assignment(unit_id, variant, True, AssignmentReason.ASSIGNED, revision)
