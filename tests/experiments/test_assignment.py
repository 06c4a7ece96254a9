"""Deterministic assignment: stable, balanced, and moving few units when the allocation changes."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import replace

import pytest
from scipy import stats

from falaj_platform.services.experiments import lifecycle
from falaj_platform.services.experiments.assignment import (
    Assigner,
    AssignmentReason,
    bucket_of,
    fnv1a_32,
    initial_ranges,
    is_targeted,
    reallocate,
)
from falaj_platform.services.experiments.model import (
    AttributeCondition,
    ConditionOperator,
    Experiment,
    HashAlgorithm,
    Hashing,
    MetricDefinition,
    MetricRole,
    MetricType,
    Targeting,
    TargetingClause,
    Variant,
    start,
)

NOW = dt.datetime(2025, 3, 1, tzinfo=dt.UTC)
UNITS = [f"user-{i}" for i in range(100_000)]


def experiment(weights: dict[str, int], coverage_bps: int = 10_000, algorithm: HashAlgorithm = HashAlgorithm.SHA256) -> Experiment:
    variants = tuple(Variant(v, control=i == 0, weight_bps=w, deployment=f"deployments/{v}") for i, (v, w) in enumerate(weights.items()))
    draft = lifecycle.create(
        Experiment(
            experiment_id="checkout",
            variants=variants,
            coverage_bps=coverage_bps,
            hashing=Hashing("user_id", "checkout", algorithm),
            metrics=(MetricDefinition("revenue", MetricType.CONTINUOUS, MetricRole.PRIMARY),),
            residency_region="ae-dxb",
        ),
        "spiffe://falaj.local/client/alice",
        NOW,
    )
    return start(draft, "spiffe://falaj.local/client/alice", NOW, "go")


def test_fnv1a_matches_the_published_test_vectors() -> None:
    # Reference values of 32-bit FNV-1a (Fowler/Noll/Vo test suite).
    assert fnv1a_32("") == 0x811C9DC5
    assert fnv1a_32("a") == 0xE40C292C
    assert fnv1a_32("foobar") == 0xBF9CF968


@pytest.mark.parametrize("algorithm", list(HashAlgorithm))
def test_the_same_unit_always_lands_in_the_same_variant(algorithm: HashAlgorithm) -> None:
    first = Assigner(experiment({"control": 5000, "treatment": 5000}, algorithm=algorithm))
    again = Assigner(experiment({"control": 5000, "treatment": 5000}, algorithm=algorithm))
    picks = [first.assign(u).variant.variant_id for u in UNITS[:5000]]
    assert picks == [again.assign(u).variant.variant_id for u in UNITS[:5000]]
    assert picks == [first.assign(u).variant.variant_id for u in UNITS[:5000]]
    assert all(0 <= bucket_of("checkout", u, algorithm) < 10_000 for u in UNITS[:1000])
    # Another salt reshuffles units: experiments are independent of each other.
    other = [bucket_of("pricing", u, algorithm) for u in UNITS[:1000]]
    assert other != [bucket_of("checkout", u, algorithm) for u in UNITS[:1000]]


@pytest.mark.parametrize(
    ("weights", "algorithm"),
    [
        ({"control": 5000, "treatment": 5000}, HashAlgorithm.SHA256),
        ({"control": 2000, "a": 3000, "b": 5000}, HashAlgorithm.SHA256),
        ({"control": 5000, "treatment": 5000}, HashAlgorithm.FNV1A_32),
    ],
)
def test_assignment_is_balanced_over_100k_units(weights: dict[str, int], algorithm: HashAlgorithm) -> None:
    assigner = Assigner(experiment(weights, algorithm=algorithm))
    counts = Counter(assigner.assign(u).variant.variant_id for u in UNITS)
    observed = [counts[v] for v in weights]
    expected = [len(UNITS) * w / 10_000 for w in weights.values()]
    result = stats.chisquare(observed, f_exp=expected)
    assert result.pvalue > 0.001, (observed, expected)
    # The buckets themselves are uniform too (chi-square over 100 groups of 100 buckets).
    buckets = Counter(bucket_of("checkout", u, algorithm) // 100 for u in UNITS)
    assert stats.chisquare([buckets[i] for i in range(100)]).pvalue > 0.001


def test_changing_the_allocation_moves_only_the_units_it_must() -> None:
    before = experiment({"control": 5000, "treatment": 5000})
    variants = tuple(
        Variant(v.variant_id, control=v.control, weight_bps=w, deployment=v.deployment)
        for v, w in zip(before.variants, (6000, 4000), strict=True)
    )
    ranges = reallocate(before.bucket_ranges, variants, 10_000)
    assert sum(r.width for r in ranges if r.variant_id == "control") == 6000
    after = Assigner(replace(before, variants=variants, bucket_ranges=ranges))
    old = Assigner(before)
    moved = [(old.assign(u).variant.variant_id, after.assign(u).variant.variant_id) for u in UNITS]
    changed = [pair for pair in moved if pair[0] != pair[1]]
    # 10% of buckets must change hands (treatment -> control); nothing else moves.
    assert set(changed) == {("treatment", "control")}
    assert abs(len(changed) / len(UNITS) - 0.10) < 0.01
    # A fresh layout would have moved more: contiguous ranges from bucket 0 shift everything.
    fresh = Assigner(replace(before, variants=variants, bucket_ranges=initial_ranges(variants, 10_000)))
    assert sum(old.assign(u).variant != fresh.assign(u).variant for u in UNITS[:20_000]) >= sum(
        old.assign(u).variant != after.assign(u).variant for u in UNITS[:20_000]
    )


def test_growing_the_coverage_keeps_every_unit_already_in_the_experiment() -> None:
    small = experiment({"control": 5000, "treatment": 5000}, coverage_bps=2000)
    grown = reallocate(small.bucket_ranges, small.variants, 10_000)
    before, after = Assigner(small), Assigner(replace(small, bucket_ranges=grown, coverage_bps=10_000))
    inside = [u for u in UNITS[:20_000] if before.assign(u).in_experiment]
    assert 0.18 < len(inside) / 20_000 < 0.22
    assert all(after.assign(u).variant == before.assign(u).variant for u in inside)
    outside = before.assign(next(u for u in UNITS if not before.assign(u).in_experiment))
    assert (outside.variant.variant_id, outside.reason) == ("control", AssignmentReason.OUTSIDE_COVERAGE)


def test_targeting_selects_units_by_their_attributes() -> None:
    targeting = Targeting(
        (
            TargetingClause(
                (
                    AttributeCondition("country", ConditionOperator.IN, ("AE", "SA")),
                    AttributeCondition("age", ConditionOperator.GREATER_OR_EQUAL, (18,)),
                )
            ),
            TargetingClause((AttributeCondition("email", ConditionOperator.MATCHES_REGEX, (r".*@falaj\.ae",)),)),
        )
    )
    assert is_targeted(targeting, {"country": "AE", "age": 30})
    assert not is_targeted(targeting, {"country": "AE", "age": 17})
    assert not is_targeted(targeting, {"country": "AE"})  # a missing attribute fails its condition
    assert not is_targeted(targeting, {"country": "AE", "age": "30"})  # so does a type mismatch
    assert is_targeted(targeting, {"email": "ops@falaj.ae"})
    assert not is_targeted(targeting, {"email": "ops@falaj.ae.evil"})
    assert is_targeted(Targeting(), {})
    running = experiment({"control": 5000, "treatment": 5000})
    targeted = Assigner(replace(running, targeting=targeting))
    assignment = targeted.assign("user-1", {"country": "FR", "age": 40})
    assert (assignment.variant.variant_id, assignment.in_experiment, assignment.reason) == ("control", False, AssignmentReason.NOT_TARGETED)
