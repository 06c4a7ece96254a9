"""The store's reductions on SQLite and PostgreSQL: per-unit aggregation, conversion windows,
the CUPED pre-period, units seen in two variants, and the one-claim-per-interval guardrail check."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import numpy as np
import pytest

from falaj_platform.runtime.db import Database
from falaj_platform.services.experiments import lifecycle
from falaj_platform.services.experiments import model as m
from falaj_platform.services.experiments.server import MIGRATIONS
from falaj_platform.services.experiments.store import ExperimentsStore, ExposureRow, OutcomeRow, UnitValueQuery

START = dt.datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=dt.UTC)
CODES = {"control": 0, "treatment": 1}


@pytest.fixture
def store(database_url: str) -> Iterator[ExperimentsStore]:
    database = Database(database_url, MIGRATIONS, "falaj_experiments_schema_version")
    database.upgrade()
    store = ExperimentsStore(database)
    draft = lifecycle.create(
        m.Experiment(
            experiment_id="checkout",
            variants=(
                m.Variant("control", control=True, weight_bps=5000, deployment="deployments/a"),
                m.Variant("treatment", weight_bps=5000, deployment="deployments/b"),
            ),
            coverage_bps=10_000,
            hashing=m.Hashing("user_id", "checkout"),
            metrics=(m.MetricDefinition("revenue", m.MetricType.CONTINUOUS, m.MetricRole.PRIMARY),),
            residency_region="ae-dxb",
        ),
        "spiffe://falaj.local/client/alice",
        START,
    )
    with store.transaction() as tx:
        tx.insert_experiment(m.start(draft, "spiffe://falaj.local/client/alice", START, "go"))
        tx.insert_exposures(
            "checkout",
            [
                ExposureRow("e1", "u1", "control", START + dt.timedelta(minutes=1)),
                ExposureRow("e2", "u1", "control", START + dt.timedelta(minutes=5)),
                ExposureRow("e3", "u2", "treatment", START + dt.timedelta(minutes=1)),
                ExposureRow("e4", "u3", "treatment", START + dt.timedelta(minutes=1)),
                ExposureRow("e5", "u4", "control", START + dt.timedelta(minutes=1)),
                ExposureRow("e6", "u4", "treatment", START + dt.timedelta(minutes=2)),  # seen in both variants
            ],
            START,
        )
        later = START + dt.timedelta(minutes=1)
        tx.insert_outcomes(
            "checkout",
            [
                OutcomeRow("o1", "u1", "revenue", 10.0, later + dt.timedelta(hours=1)),
                OutcomeRow("o2", "u1", "revenue", 30.0, later + dt.timedelta(hours=23, minutes=59, seconds=59)),
                OutcomeRow("o3", "u1", "revenue", 99.0, later + dt.timedelta(days=1, microseconds=1)),  # outside a 1-day window
                OutcomeRow("o4", "u2", "revenue", 5.0, later + dt.timedelta(hours=2)),
                OutcomeRow("o5", "u2", "revenue", 7.0, START - dt.timedelta(days=3)),  # pre-period
                OutcomeRow("o6", "u3", "revenue", 1.0, START - dt.timedelta(days=30)),  # before the pre-period
                OutcomeRow("o7", "u1", "revenue", 1.0, START),  # before u1's first exposure
                OutcomeRow("o8", "u4", "revenue", 50.0, later + dt.timedelta(hours=1)),
            ],
            START,
        )
    yield store
    database.dispose()


def values(store: ExperimentsStore, query: UnitValueQuery, as_of: dt.datetime = START + dt.timedelta(days=10)) -> list[tuple[int, ...]]:
    rows = np.concatenate(list(store.stream_unit_values("checkout", CODES, as_of, query, chunk_rows=2)))
    return sorted(tuple(row) for row in rows.tolist())


@pytest.mark.parametrize(
    ("aggregation", "expected"),
    [
        (m.UnitAggregation.SUM, [(0, 139.0), (1, 0.0), (1, 5.0)]),
        (m.UnitAggregation.MEAN, [(0, 139.0 / 3), (1, 0.0), (1, 5.0)]),
        (m.UnitAggregation.MAX, [(0, 99.0), (1, 0.0), (1, 5.0)]),
        (m.UnitAggregation.COUNT, [(0, 3.0), (1, 0.0), (1, 1.0)]),
        (m.UnitAggregation.ANY, [(0, 1.0), (1, 0.0), (1, 1.0)]),
    ],
)
def test_units_are_reduced_from_their_first_exposure_and_a_unit_in_two_variants_is_left_out(
    store: ExperimentsStore, aggregation: m.UnitAggregation, expected: list[tuple[float, ...]]
) -> None:
    rows = values(store, UnitValueQuery("revenue", aggregation))
    assert [r[0] for r in rows] == [e[0] for e in expected]
    assert [r[1] for r in rows] == pytest.approx([e[1] for e in expected])
    assert store.exposed_units_by_variant("checkout", START + dt.timedelta(days=10)) == {"control": 1, "treatment": 2}
    assert store.count_exposed_units("checkout") == {"control": 2, "treatment": 3}  # raw counts, for the SRM input


def test_the_conversion_window_and_the_pre_period_bound_the_outcomes(store: ExperimentsStore) -> None:
    windowed = values(store, UnitValueQuery("revenue", m.UnitAggregation.SUM, conversion_window=dt.timedelta(days=1)))
    assert [r[1] for r in windowed] == pytest.approx([40.0, 0.0, 5.0])  # u1's 99 came a microsecond too late
    with_covariate = values(
        store,
        UnitValueQuery(
            "revenue",
            m.UnitAggregation.SUM,
            covariate_metric_id="revenue",
            covariate_aggregation=m.UnitAggregation.SUM,
            pre_period_start=START - dt.timedelta(days=14),
            pre_period_end=START,
        ),
    )
    assert with_covariate == [(0, 139.0, 0.0), (1, 0.0, 0.0), (1, 5.0, 7.0)]
    early = values(store, UnitValueQuery("revenue", m.UnitAggregation.SUM), as_of=START + dt.timedelta(hours=3))
    assert [r[1] for r in early] == pytest.approx([10.0, 0.0, 5.0])


def test_one_guardrail_check_per_interval(store: ExperimentsStore) -> None:
    interval = dt.timedelta(minutes=5)
    assert store.claim_guardrail_check("checkout", START, interval)
    assert not store.claim_guardrail_check("checkout", START + dt.timedelta(minutes=4), interval)
    assert store.claim_guardrail_check("checkout", START + dt.timedelta(minutes=5), interval)
    assert not store.claim_guardrail_check("checkout", START + dt.timedelta(minutes=6), interval)


def test_duplicate_event_ids_are_not_inserted_twice(store: ExperimentsStore) -> None:
    with store.transaction() as tx:
        inserted = tx.insert_exposures(
            "checkout", [ExposureRow("e1", "u1", "control", START), ExposureRow("e9", "u9", "control", START)], START
        )
    assert inserted == {"e9"}
