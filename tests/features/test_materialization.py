"""Materialization: full and incremental, rows written and freshness, runs on new ingest versions."""

from __future__ import annotations

import datetime as dt
import time

import grpc

from falaj.features.v1 import message_pb2 as messages
from falaj.features.v1 import request_response_pb2 as requests
from tests.features.conftest import (
    ALICE,
    NOW,
    Features,
    add_transactions,
    define_customer_view,
    int_keys,
    materialize,
    status_code,
    transactions,
)

H = dt.timedelta(hours=1)
FULL, INCREMENTAL = messages.MATERIALIZATION_MODE_FULL, messages.MATERIALIZATION_MODE_INCREMENTAL


def amounts(features: Features, view: str, *keys: int) -> list[float | None]:
    reply = features.stub.GetOnlineFeatures(
        requests.GetOnlineFeaturesRequest(
            features=messages.FeatureSelection(features=messages.FeatureReferences(references=[f"{view}:amount"])), entities=int_keys(*keys)
        ),
        metadata=ALICE,
        timeout=10,
    )
    column = reply.columns[0]
    return [v.double_value if s == messages.FIELD_STATUS_PRESENT else None for v, s in zip(column.values, column.statuses, strict=True)]


def test_full_then_incremental_materialization_report_rows_and_freshness(features: Features) -> None:
    dataset = add_transactions(
        features.source, [(1, 1.0, "a", False, NOW - 5 * H), (1, 2.0, "a", False, NOW - 3 * H), (2, 3.0, "b", False, NOW - 4 * H)]
    )
    _, view = define_customer_view(features, dataset)

    full = materialize(features, view, FULL)
    assert full.rows_written == 2  # the latest row of each of the two customers
    (result,) = full.results
    assert (result.rows_written, result.dataset_version) == (2, f"{dataset}/versions/1")
    assert result.freshness.newest_event_time.ToDatetime(dt.UTC) == NOW - 3 * H
    assert result.freshness.freshness.ToTimedelta() >= 3 * H
    assert amounts(features, view, 1, 2, 3) == [2.0, 3.0, None]

    nothing_new = materialize(features, view, INCREMENTAL)
    assert nothing_new.rows_written == 0

    # A new ingest version: customer 1 changes, customer 3 appears.
    features.source.commit(dataset, transactions([(1, 9.0, "c", True, NOW - 2 * H), (3, 4.0, "d", False, NOW - H)]))
    freshness = features.stub.GetFeatureFreshness(
        requests.GetFeatureFreshnessRequest(feature_views=[f"featureViews/{view}"]), metadata=ALICE, timeout=10
    )
    assert freshness.freshness[0].behind_source  # ingest has a version not yet materialized
    # The new version's rows are older than the last run's end (late data): the incremental
    # run reaches back one TTL (a day) and rewrites the latest value of every customer in it.
    incremental = features.stub.Materialize(
        requests.MaterializeRequest(feature_views=[f"featureViews/{view}"], mode=INCREMENTAL), metadata=ALICE, timeout=60
    ).materialization
    assert incremental.state == messages.MATERIALIZATION_STATE_SUCCEEDED, incremental.error_message
    assert incremental.rows_written == 3
    assert incremental.results[0].dataset_version == f"{dataset}/versions/2"
    assert amounts(features, view, 1, 2, 3) == [9.0, 3.0, 4.0]

    freshness = features.stub.GetFeatureFreshness(
        requests.GetFeatureFreshnessRequest(feature_views=[f"featureViews/{view}"]), metadata=ALICE, timeout=10
    )
    (answer,) = freshness.freshness
    assert answer.newest_event_time.ToDatetime(dt.UTC) == NOW - H
    assert not answer.behind_source
    assert answer.last_materialization == incremental.name
    got = features.stub.GetMaterialization(
        requests.GetMaterializationRequest(name=incremental.name), metadata=ALICE, timeout=10
    ).materialization
    assert got.rows_written == 3 and got.mode == INCREMENTAL
    listed = features.stub.ListMaterializations(
        requests.ListMaterializationsRequest(feature_view=f"featureViews/{view}"), metadata=ALICE, timeout=10
    )
    assert [m.name for m in listed.materializations] == [incremental.name, nothing_new.name, full.name]


def test_new_dataset_version_triggers_an_incremental_materialization(features: Features) -> None:
    dataset = add_transactions(features.source, [(1, 1.0, "a", False, NOW - 5 * H)])
    _, view = define_customer_view(features, dataset)
    changed = messages.FeatureView(name=f"featureViews/{view}", materialization=messages.MaterializationPolicy(on_new_dataset_version=True))
    from google.protobuf import field_mask_pb2

    features.stub.UpdateFeatureView(
        requests.UpdateFeatureViewRequest(feature_view=changed, update_mask=field_mask_pb2.FieldMask(paths=["materialization"])),
        metadata=ALICE,
        timeout=30,
    )
    materialize(features, view, FULL)
    features.source.commit(dataset, transactions([(2, 5.0, "b", False, NOW)]))
    started = features.service.scheduler.tick(dt.datetime.now(dt.UTC))
    assert [r.trigger for r in started if f"featureViews/{view}" in r.feature_views] == [
        messages.MATERIALIZATION_TRIGGER_NEW_DATASET_VERSION
    ]
    run = next(r for r in started if f"featureViews/{view}" in r.feature_views)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        run = features.stub.GetMaterialization(
            requests.GetMaterializationRequest(name=run.name), metadata=ALICE, timeout=10
        ).materialization
        if run.state not in (messages.MATERIALIZATION_STATE_QUEUED, messages.MATERIALIZATION_STATE_RUNNING):
            break
        time.sleep(0.05)
    assert run.state == messages.MATERIALIZATION_STATE_SUCCEEDED, run.error_message
    assert run.results[0].dataset_version == f"{dataset}/versions/2"
    assert amounts(features, view, 2) == [5.0]


def test_bad_materialization_requests_get_clear_statuses(features: Features) -> None:
    def call(request: requests.MaterializeRequest) -> tuple[grpc.StatusCode, str]:
        return status_code(lambda: features.stub.Materialize(request, metadata=ALICE, timeout=30))

    assert call(requests.MaterializeRequest(feature_views=["featureViews/x"]))[0] == grpc.StatusCode.INVALID_ARGUMENT  # no mode
    code, details = call(requests.MaterializeRequest(feature_views=["featureViews/ghost"], mode=FULL))
    assert code == grpc.StatusCode.NOT_FOUND and "ghost" in details
    empty = add_transactions(features.source, [])
    _, view = define_customer_view(features, empty)
    run = features.stub.Materialize(
        requests.MaterializeRequest(feature_views=[f"featureViews/{view}"], mode=FULL), metadata=ALICE, timeout=30
    ).materialization
    assert run.state == messages.MATERIALIZATION_STATE_FAILED and "no version" in run.error_message
