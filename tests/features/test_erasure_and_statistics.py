"""Erasure receipts remove the subject from offline and online stores; per-view statistics."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pytest

from falaj.common.v1 import common_pb2
from falaj.features.v1 import message_pb2 as messages
from falaj.features.v1 import request_response_pb2 as requests
from falaj_platform.runtime.audit import SecurityEvent
from falaj_platform.services.features.sources import ErasedKeys, ErasureInfo
from tests.features.conftest import ALICE, NOW, Features, add_transactions, define_customer_view, int_keys, materialize, unique

H = dt.timedelta(hours=1)


def test_erasure_receipt_removes_the_subject_offline_and_online(features: Features) -> None:
    dataset = add_transactions(
        features.source, [(1, 1.0, "a", False, NOW - 3 * H), (1, 2.0, "a", False, NOW - 2 * H), (2, 5.0, "b", False, NOW - H)]
    )
    _, view = define_customer_view(features, dataset)
    materialize(features, view)
    receipt = f"erasureReceipts/{unique('r')}"
    features.source.add_erasure_receipt(ErasureInfo(receipt, "d" * 64, True, (ErasedKeys(dataset, ("customer_id",), ((1,),)),)))

    applied = features.stub.ApplyErasureReceipt(requests.ApplyErasureReceiptRequest(erasure_receipt=receipt), metadata=ALICE, timeout=60)
    application = applied.erasure_application
    assert application.state == messages.ERASURE_APPLICATION_STATE_COMPLETED
    assert (application.offline_rows_removed, application.online_keys_removed) == (2, 1)
    assert list(application.feature_views) == [f"featureViews/{view}"]
    assert application.receipt_digest == "d" * 64
    again = features.stub.ApplyErasureReceipt(requests.ApplyErasureReceiptRequest(erasure_receipt=receipt), metadata=ALICE, timeout=60)
    assert again.erasure_application.name == application.name
    assert [e.event_type for e in features.audit.events if e.resource == application.name] == [SecurityEvent.DATA_ERASED]

    online = features.stub.GetOnlineFeatures(
        requests.GetOnlineFeaturesRequest(
            features=messages.FeatureSelection(features=messages.FeatureReferences(references=[f"{view}:amount"])), entities=int_keys(1, 2)
        ),
        metadata=ALICE,
        timeout=10,
    )
    assert list(online.columns[0].statuses) == [messages.FIELD_STATUS_NOT_FOUND, messages.FIELD_STATUS_PRESENT]

    rows = pa.table({"customer_id": pa.array([1, 2], pa.int64()), "event_timestamp": pa.array([NOW, NOW], pa.timestamp("us", tz="UTC"))})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, rows.schema) as writer:
        writer.write_table(rows)
    historical = features.stub.GetHistoricalFeatures(
        requests.GetHistoricalFeaturesRequest(
            features=messages.FeatureSelection(features=messages.FeatureReferences(references=[f"{view}:amount"])),
            inline_entity_rows=common_pb2.ArrowBatch(arrow_ipc=sink.getvalue().to_pybytes()),
        ),
        metadata=ALICE,
        timeout=60,
    )
    (batch,) = [m.batch for m in historical if m.HasField("batch")]
    with pa.ipc.open_stream(batch.arrow_ipc) as reader:
        assert reader.read_all().column("amount").to_pylist() == [None, 5.0]  # customer 1 is gone offline too

    listed = features.stub.ListErasureApplications(
        requests.ListErasureApplicationsRequest(erasure_receipt=receipt), metadata=ALICE, timeout=10
    )
    assert [a.name for a in listed.erasure_applications] == [application.name]


def test_view_statistics_summarize_each_feature(features: Features) -> None:
    dataset = add_transactions(
        features.source,
        [
            (1, 1.0, "food", False, NOW - 3 * H),
            (1, 3.0, "food", True, NOW - 2 * H),
            (2, None, "fuel", False, NOW - H),
            (3, 8.0, "food", True, NOW),
        ],
    )
    _, view = define_customer_view(features, dataset)
    reply = features.stub.GetFeatureViewStatistics(
        requests.GetFeatureViewStatisticsRequest(feature_view=f"featureViews/{view}"), metadata=ALICE, timeout=60
    )
    statistics = reply.statistics
    assert (statistics.row_count, statistics.entity_count, statistics.dataset_version) == (4, 3, f"{dataset}/versions/1")
    amount, category, flagged = statistics.features
    assert (amount.count, amount.null_count, amount.distinct_count) == (3, 1, 3)
    assert amount.numeric.min == 1.0 and amount.numeric.max == 8.0 and amount.numeric.mean == pytest.approx(4.0)
    assert sum(b.count for b in amount.numeric.histogram) == 3 and len(amount.numeric.quantiles) == 7
    assert [(c.value, c.count) for c in category.categorical.top_values] == [("food", 3), ("fuel", 1)]
    assert (flagged.boolean.true_count, flagged.boolean.false_count) == (2, 2)
