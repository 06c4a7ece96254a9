"""Historical retrieval: point-in-time correct (no value from after the row's time), TTL
respected, every entity row kept, streamed as Arrow batches with a manifest."""

from __future__ import annotations

import datetime as dt

import grpc
import pyarrow as pa
import pytest

from falaj.common.v1 import common_pb2
from falaj.features.v1 import message_pb2 as messages
from falaj.features.v1 import request_response_pb2 as requests
from tests.features.conftest import ALICE, NOW, Features, add_transactions, define_customer_view, status_code

H = dt.timedelta(hours=1)
T0 = NOW - 48 * H  # far enough back that nothing here depends on the wall clock

# Customer 1: 10 at T0-10h, 50 at T0-5h, 100 at T0-1h.  Customer 2: 7 at T0-8h.  TTL 6h.
EVENTS = [
    (1, 10.0, "a", False, T0 - 10 * H),
    (1, 50.0, "b", False, T0 - 5 * H),
    (1, 100.0, "c", True, T0 - H),
    (2, 7.0, "d", False, T0 - 8 * H),
]
# (customer, as-of time, expected amount): worked out by hand from EVENTS and the TTL.
EXPECTED = [
    (1, T0 - 6 * H, 10.0),  # latest before is 10 (4h old)
    (1, T0 - 4 * H, 50.0),  # 100 is in the future here: leakage would show 100
    (1, T0 - 5 * H, 50.0),  # an event exactly at the row's time counts
    (1, T0 - 2 * H, 50.0),  # still 50: 100 arrives an hour later
    (1, T0 - 30 * dt.timedelta(minutes=1), 100.0),
    (1, T0 - 11 * H, None),  # before any event
    (1, T0 + 2 * H, 100.0),
    (1, T0 + 6 * H, None),  # 100 is 7h old: outside the 6h TTL, even though it is the latest
    (2, T0 - H, None),  # 7 is 7h old: outside the TTL
    (2, T0 - 3 * H, 7.0),  # 5h old: inside
    (3, T0, None),  # never seen
    (1, T0 - 4 * H, 50.0),  # a duplicate row is answered again, not dropped
]


def entity_rows(rows: list[tuple[int, dt.datetime, float | None]]) -> common_pb2.ArrowBatch:
    table = pa.table(
        {
            "customer_id": pa.array([r[0] for r in rows], pa.int64()),
            "event_timestamp": pa.array([r[1] for r in rows], pa.timestamp("us", tz="UTC")),
            "label": pa.array([i % 2 for i in range(len(rows))], pa.int64()),
        }
    )
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return common_pb2.ArrowBatch(arrow_ipc=sink.getvalue().to_pybytes(), row_count=table.num_rows)


def retrieve(features: Features, request: requests.GetHistoricalFeaturesRequest) -> tuple[pa.Table, messages.RetrievalManifest, int]:
    batches, manifest = [], None
    for message in features.stub.GetHistoricalFeatures(request, metadata=ALICE, timeout=120):
        if message.HasField("batch"):
            with pa.ipc.open_stream(message.batch.arrow_ipc) as reader:
                batches.extend(reader)
        else:
            manifest = message.manifest
    assert manifest is not None
    return pa.Table.from_batches(batches), manifest, len(batches)


@pytest.fixture(scope="module")
def spend_view(features: Features) -> str:
    dataset = add_transactions(features.source, EVENTS)
    _, view_id = define_customer_view(features, dataset, ttl_seconds=6 * 3600)
    return view_id


def test_point_in_time_join_matches_the_hand_computed_answer(features: Features, spend_view: str) -> None:
    request = requests.GetHistoricalFeaturesRequest(
        features=messages.FeatureSelection(
            features=messages.FeatureReferences(references=[f"{spend_view}:amount", f"{spend_view}:category"])
        ),
        inline_entity_rows=entity_rows([(c, t, None) for c, t, _ in EXPECTED]),
        max_rows_per_batch=5,
    )
    table, manifest, batches = retrieve(features, request)
    assert table.num_rows == len(EXPECTED) and batches == 3  # every row kept, in request order, 5 rows a batch
    assert table.column_names == ["customer_id", "event_timestamp", "label", "amount", "category"]
    assert table.column("customer_id").to_pylist() == [c for c, _, _ in EXPECTED]
    assert table.column("event_timestamp").to_pylist() == [t for _, t, _ in EXPECTED]
    assert table.column("label").to_pylist() == [i % 2 for i in range(len(EXPECTED))]
    assert table.schema.field("amount").type == pa.float64()
    assert table.column("amount").to_pylist() == [amount for _, _, amount in EXPECTED]
    assert table.column("category").to_pylist()[:3] == ["a", "b", "b"]
    assert manifest.row_count == len(EXPECTED)
    assert manifest.missing_value_counts[f"{spend_view}:amount"] == sum(1 for *_, a in EXPECTED if a is None)
    assert list(manifest.feature_references) == [f"{spend_view}:amount", f"{spend_view}:category"]
    assert manifest.feature_views[0].feature_view == f"featureViews/{spend_view}"
    assert manifest.feature_views[0].dataset_version.endswith("/versions/1")
    assert manifest.feature_views[0].ttl.seconds == 6 * 3600
    assert len(manifest.content_hash) == 64


def test_entity_rows_from_an_ingest_dataset_version_with_carried_label(features: Features, spend_view: str) -> None:
    from falaj.ingest.v1 import message_pb2 as ingest

    labels = features.source.add_dataset(
        "labels_for_training",
        {"customer_id": ingest.COLUMN_TYPE_INT, "as_of": ingest.COLUMN_TYPE_TIMESTAMP, "churned": ingest.COLUMN_TYPE_BOOL},
        event_time_column="as_of",
        residency_region="ae-dxb",
    )
    version = features.source.commit(
        labels,
        pa.table(
            {
                "customer_id": pa.array([1, 2, 1], pa.int64()),
                "as_of": pa.array([T0 - 4 * H, T0 - 3 * H, T0 + 6 * H], pa.timestamp("us", tz="UTC")),
                "churned": [False, True, True],
            }
        ),
    )
    request = requests.GetHistoricalFeaturesRequest(
        features=messages.FeatureSelection(features=messages.FeatureReferences(references=[f"{spend_view}:amount"])),
        entity_dataset=messages.EntityDatasetSource(dataset_version=version, carry_columns=["churned"]),
        full_feature_names=True,
    )
    table, manifest, _ = retrieve(features, request)
    assert table.column_names == ["customer_id", "as_of", "churned", f"{spend_view}__amount"]
    assert table.column(f"{spend_view}__amount").to_pylist() == [50.0, 7.0, None]
    assert table.column("churned").to_pylist() == [False, True, True]
    assert manifest.entity_dataset_version == version


def test_rows_of_subjects_without_consent_are_left_out_and_counted(features: Features, spend_view: str) -> None:
    from falaj.ingest.v1 import message_pb2 as ingest

    labels = features.source.add_dataset(
        "labels_with_subjects",
        {"customer_id": ingest.COLUMN_TYPE_INT, "as_of": ingest.COLUMN_TYPE_TIMESTAMP, "person": ingest.COLUMN_TYPE_STRING},
        event_time_column="as_of",
        residency_region="ae-dxb",
        data_subject_column="person",
    )
    version = features.source.commit(
        labels,
        pa.table(
            {
                "customer_id": pa.array([1, 2, 1], pa.int64()),
                "as_of": pa.array([T0 - 4 * H, T0 - 3 * H, T0 - 2 * H], pa.timestamp("us", tz="UTC")),
                "person": ["p-1", "p-2", "p-1"],
            }
        ),
    )
    features.source.grant_consent("p-1", "training")
    request = requests.GetHistoricalFeaturesRequest(
        features=messages.FeatureSelection(features=messages.FeatureReferences(references=[f"{spend_view}:amount"])),
        entity_dataset=messages.EntityDatasetSource(dataset_version=version),
        consent_purpose="training",
        full_feature_names=True,
    )
    table, manifest, _ = retrieve(features, request)
    assert table.column("customer_id").to_pylist() == [1, 1]  # p-2 gave no consent to training
    assert "person" not in table.column_names  # read for the check, not handed out
    assert manifest.rows_excluded_without_consent == 1


def test_bad_historical_requests_are_refused(features: Features, spend_view: str) -> None:
    def call(request: requests.GetHistoricalFeaturesRequest) -> tuple[grpc.StatusCode, str]:
        return status_code(lambda: list(features.stub.GetHistoricalFeatures(request, metadata=ALICE, timeout=30)))

    selection = messages.FeatureSelection(features=messages.FeatureReferences(references=[f"{spend_view}:amount"]))
    table = pa.table({"user": pa.array([1], pa.int64()), "event_timestamp": pa.array([T0], pa.timestamp("us", tz="UTC"))})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    code, details = call(
        requests.GetHistoricalFeaturesRequest(
            features=selection, inline_entity_rows=common_pb2.ArrowBatch(arrow_ipc=sink.getvalue().to_pybytes())
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "customer_id" in details
    code, _ = call(
        requests.GetHistoricalFeaturesRequest(features=selection, inline_entity_rows=common_pb2.ArrowBatch(arrow_ipc=b"not arrow"))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    unknown = messages.FeatureSelection(features=messages.FeatureReferences(references=[f"{spend_view}:nope"]))
    code, details = call(requests.GetHistoricalFeaturesRequest(features=unknown, inline_entity_rows=entity_rows([(1, T0, None)])))
    assert code == grpc.StatusCode.NOT_FOUND and f"{spend_view}:nope" in details
