"""IngestBatches: Arrow batches streamed over gRPC become one immutable, readable version."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable, Iterator

import grpc
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from falaj.common.v1 import common_pb2 as common
from falaj.ingest.v1 import message_pb2 as m
from falaj.ingest.v1 import request_response_pb2 as rr
from tests.ingest.conftest import (
    ALICE,
    DAY1,
    DAY2,
    IngestUnderTest,
    create_dataset,
    ingest_tables,
    ipc,
    payments,
    read_version,
    status_of,
    stream,
    versions_of,
)


def test_streamed_batches_commit_one_version_partitioned_by_event_date_and_read_back(ingest: IngestUnderTest) -> None:
    dataset = create_dataset(ingest, "payments").name
    first, second = payments(range(0, 50), day=DAY1), payments(range(50, 80), day=DAY2)

    ingestion = ingest_tables(ingest, dataset, [first, second])

    assert ingestion.state == m.INGESTION_STATE_SUCCEEDED
    assert (ingestion.report.rows_in, ingestion.report.rows_accepted, ingestion.report.rows_quarantined) == (80, 80, 0)
    assert ingestion.report.batches_received == 2
    version = ingest.stub.GetDatasetVersion(rr.GetDatasetVersionRequest(name=ingestion.dataset_version), metadata=ALICE).dataset_version
    assert version.name == f"{dataset}/versions/1"
    assert (version.row_count, version.partition_count, version.schema_version) == (80, 2, f"{dataset}/schemaVersions/1.0")
    assert version.source_kind == m.SOURCE_KIND_GRPC_STREAM and version.source_description == "tests"
    assert version.residency.region == "ae-dxb" and len(version.content_hash) == 64
    assert version.lineage.original_content_hash == version.content_hash
    files = sorted(p.relative_to(ingest.data_dir).as_posix() for p in ingest.data_dir.rglob("*.parquet"))
    assert [f.split("/")[-2] for f in files] == ["event_date=2025-03-01", "event_date=2025-03-02"]
    assert sum(pq.read_metadata(ingest.data_dir / f).num_rows for f in files) == 80

    rows = read_version(ingest, f"{dataset}/versions/latest")
    assert rows.num_rows == 80
    assert rows.column("payment_id").to_pylist() == list(range(80))
    assert rows.schema.field("channel").type == pa.dictionary(pa.int32(), pa.string())

    # Filtered by event time [start, end) and projected to two columns, in the order asked.
    request_filter = rr.ReadDatasetVersionRequest(name=version.name, columns=["amount", "payment_id"], max_rows_per_batch=7)
    request_filter.start_time.FromDatetime(DAY2)
    request_filter.end_time.FromDatetime(DAY2 + dt.timedelta(minutes=70))
    responses = list(ingest.stub.ReadDatasetVersion(request_filter, metadata=ALICE))
    assert all(r.batch.row_count <= 7 for r in responses)
    assert [r.row_offset for r in responses] == list(range(0, 10 * 7, 7))[: len(responses)]
    filtered = pa.concat_tables(pa.ipc.open_stream(r.batch.arrow_ipc).read_all() for r in responses)
    assert filtered.column_names == ["amount", "payment_id"]
    assert filtered.column("payment_id").to_pylist() == list(range(50, 70))

    # A cut read resumes from the last offset received.
    resumed = read_version(ingest, version.name, start_row_offset=75)
    assert resumed.column("payment_id").to_pylist() == list(range(75, 80))


def test_append_builds_on_the_previous_version_and_overwrite_replaces_it(ingest: IngestUnderTest) -> None:
    dataset = create_dataset(ingest, "payments").name
    ingest_tables(ingest, dataset, [payments(range(10))])
    appended = ingest_tables(ingest, dataset, [payments(range(10, 15), day=DAY2)])
    assert appended.dataset_version == f"{dataset}/versions/2"
    v2 = versions_of(ingest, dataset)[0]
    assert (v2.row_count, v2.added_row_count, v2.lineage.parent_version) == (15, 5, f"{dataset}/versions/1")
    assert read_version(ingest, f"{dataset}/versions/1").num_rows == 10  # versions are immutable

    replaced = ingest_tables(ingest, dataset, [payments(range(100, 103))], write_mode=m.WRITE_MODE_OVERWRITE)
    v3 = ingest.stub.GetDatasetVersion(rr.GetDatasetVersionRequest(name=replaced.dataset_version), metadata=ALICE).dataset_version
    assert (v3.row_count, v3.write_mode, v3.lineage.parent_version) == (3, m.WRITE_MODE_OVERWRITE, f"{dataset}/versions/2")
    assert read_version(ingest, v3.name).column("payment_id").to_pylist() == [100, 101, 102]

    profile = ingest.stub.GetDatasetProfile(rr.GetDatasetProfileRequest(dataset_version=f"{dataset}/versions/2"), metadata=ALICE).profile
    by_column = {c.column: c for c in profile.columns}
    assert profile.row_count == 15 and by_column["amount"].numeric.min == 120.5 and by_column["amount"].numeric.max == 134.5
    assert [q.quantile for q in by_column["amount"].numeric.quantiles] == [0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99]
    assert sum(b.count for b in by_column["amount"].numeric.histogram) == 15
    assert {c.value: c.count for c in by_column["channel"].categorical.top_categories} == {"pos": 7, "online": 8}
    assert by_column["customer_id"].distinct_count == 1
    assert by_column["paid_at"].timestamp.max.ToDatetime(tzinfo=dt.UTC) == DAY2 + dt.timedelta(minutes=14)


def test_retried_stream_with_the_same_request_id_commits_once(ingest: IngestUnderTest) -> None:
    dataset = create_dataset(ingest, "payments").name
    tables = [payments(range(5)), payments(range(5, 9))]
    first = ingest_tables(ingest, dataset, tables, request_id="stream-1", batch_ids=["a", "b"])
    again = ingest_tables(ingest, dataset, tables, request_id="stream-1", batch_ids=["a", "b"])
    assert again == first
    assert len(versions_of(ingest, dataset)) == 1

    with pytest.raises(grpc.RpcError) as refused:
        ingest_tables(ingest, dataset, [payments(range(5)), payments(range(100, 104))], request_id="stream-1", batch_ids=["a", "b"])
    assert status_of(refused.value) == (grpc.StatusCode.FAILED_PRECONDITION, "REQUEST_ID_REUSED")
    assert len(versions_of(ingest, dataset)) == 1


def test_batches_already_committed_are_skipped_when_a_stream_is_retried_without_request_id(ingest: IngestUnderTest) -> None:
    dataset = create_dataset(ingest, "payments").name
    tables = [payments(range(5)), payments(range(5, 9))]
    first = ingest_tables(ingest, dataset, tables, batch_ids=["pos-17:1", "pos-17:2"])
    # The whole stream again: the client never saw the answer. Same ingestion, no new version.
    assert ingest_tables(ingest, dataset, tables, batch_ids=["pos-17:1", "pos-17:2"]) == first
    # One old batch and one new: only the new one is committed, the skip is reported.
    later = ingest_tables(ingest, dataset, [tables[1], payments(range(9, 12))], batch_ids=["pos-17:2", "pos-17:3"])
    assert (later.report.batches_received, later.report.batches_skipped_duplicate, later.report.rows_in) == (2, 1, 3)
    # Other bytes under a committed batch id are refused, not silently skipped.
    with pytest.raises(grpc.RpcError) as reused:
        ingest_tables(ingest, dataset, [payments(range(30, 33))], batch_ids=["pos-17:1"])
    assert status_of(reused.value) == (grpc.StatusCode.FAILED_PRECONDITION, "BATCH_ID_REUSED")
    # A batch id repeated inside one stream counts once.
    dup = ingest_tables(ingest, dataset, [payments(range(20, 22)), payments(range(20, 22))], batch_ids=["pos-17:4", "pos-17:4"])
    assert (dup.report.batches_skipped_duplicate, dup.report.rows_accepted) == (1, 2)
    assert [v.row_count for v in versions_of(ingest, dataset)] == [14, 12, 9]


def test_malformed_arrow_bytes_and_schema_mismatch_are_refused_without_a_version(ingest: IngestUnderTest) -> None:
    dataset = create_dataset(ingest, "payments").name

    def send(*batches: common.ArrowBatch) -> Iterator[rr.IngestBatchesRequest]:
        yield rr.IngestBatchesRequest(header=rr.IngestStreamHeader(dataset=dataset))
        for batch in batches:
            yield rr.IngestBatchesRequest(batch=batch)

    good = common.ArrowBatch(arrow_ipc=ipc(payments(range(3))), batch_id="ok", row_count=3)
    cases = {
        "MALFORMED_ARROW_BATCH": common.ArrowBatch(arrow_ipc=b"\xff\xff\xff\xff not arrow at all", batch_id="junk"),
        "BATCH_ROW_COUNT_MISMATCH": common.ArrowBatch(arrow_ipc=ipc(payments(range(3))), batch_id="short", row_count=4),
        "SCHEMA_MISMATCH": common.ArrowBatch(
            arrow_ipc=ipc(payments(range(3)).append_column("cvv", pa.array(["1", "2", "3"]))), batch_id="extra"
        ),
    }
    for reason, bad in cases.items():
        with pytest.raises(grpc.RpcError) as refused:
            ingest.stub.IngestBatches(send(good, bad), metadata=ALICE, timeout=30)
        assert status_of(refused.value) == (grpc.StatusCode.INVALID_ARGUMENT, reason), reason
    wrong_type = payments(range(3)).set_column(2, "amount", pa.array(["1", "2", "3"]))
    with pytest.raises(grpc.RpcError) as refused:
        ingest_tables(ingest, dataset, [wrong_type])
    assert status_of(refused.value) == (grpc.StatusCode.INVALID_ARGUMENT, "SCHEMA_MISMATCH")
    assert "amount" in refused.value.details()
    with pytest.raises(grpc.RpcError) as no_header:
        ingest.stub.IngestBatches(iter([rr.IngestBatchesRequest(batch=good)]), metadata=ALICE, timeout=30)
    assert status_of(no_header.value) == (grpc.StatusCode.INVALID_ARGUMENT, "HEADER_REQUIRED")

    assert versions_of(ingest, dataset) == []
    failed = ingest.stub.ListIngestions(rr.ListIngestionsRequest(parent=dataset, state=m.INGESTION_STATE_FAILED), metadata=ALICE).ingestions
    assert len(failed) == 4 and all(i.error_message for i in failed)
    assert list(ingest.data_dir.rglob("*.parquet")) == []


def test_a_stream_cut_mid_batch_commits_nothing(ingest: IngestUnderTest) -> None:
    dataset = create_dataset(ingest, "payments").name
    sent_two = threading.Event()

    def cut_stream() -> Iterator[rr.IngestBatchesRequest]:
        yield from stream(dataset, [payments(range(5)), payments(range(5, 10))])
        sent_two.set()
        threading.Event().wait(30)  # the client goes away before closing the stream

    call = ingest.stub.IngestBatches.future(cut_stream(), metadata=ALICE, timeout=60)
    assert sent_two.wait(10)

    def started() -> bool:
        return bool(ingest.stub.ListIngestions(rr.ListIngestionsRequest(parent=dataset), metadata=ALICE).ingestions)

    # Cut the stream once the service is reading it (a cancel before it read the header
    # leaves nothing to record, which proves less).
    deadline = dt.datetime.now() + dt.timedelta(seconds=10)
    while not started() and dt.datetime.now() < deadline:
        threading.Event().wait(0.02)
    call.cancel()
    with pytest.raises(grpc.FutureCancelledError):
        call.result()
    # A half-sent batch (bytes cut in the middle) is refused as malformed.
    half = ipc(payments(range(5)))
    truncated = iter(
        [
            rr.IngestBatchesRequest(header=rr.IngestStreamHeader(dataset=dataset)),
            rr.IngestBatchesRequest(batch=common.ArrowBatch(arrow_ipc=half[: len(half) // 2], batch_id="x")),
        ]
    )
    with pytest.raises(grpc.RpcError) as refused:
        ingest.stub.IngestBatches(truncated, metadata=ALICE, timeout=30)
    assert status_of(refused.value) == (grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_ARROW_BATCH")

    def settled() -> bool:
        found = ingest.stub.ListIngestions(rr.ListIngestionsRequest(parent=dataset), metadata=ALICE).ingestions
        return len(found) == 2 and all(i.state == m.INGESTION_STATE_FAILED for i in found)

    deadline = dt.datetime.now() + dt.timedelta(seconds=30)  # a loaded machine is slow to see the cut
    while not settled() and dt.datetime.now() < deadline:
        threading.Event().wait(0.05)
    assert settled()
    assert versions_of(ingest, dataset) == []
    assert list(ingest.data_dir.rglob("*.parquet")) == []


def test_validate_only_reports_without_committing(ingest: IngestUnderTest) -> None:
    dataset = create_dataset(ingest, "payments").name
    bad = payments(range(3), amount=-10.0)
    ingestion = ingest_tables(ingest, dataset, [payments(range(10, 13)), bad], validate_only=True)
    assert ingestion.validate_only and ingestion.state == m.INGESTION_STATE_SUCCEEDED and not ingestion.dataset_version
    assert (ingestion.report.rows_accepted, ingestion.report.rows_quarantined) == (3, 3)
    assert versions_of(ingest, dataset) == []
    assert ingest.stub.ListQuarantinedRows(rr.ListQuarantinedRowsRequest(parent=dataset), metadata=ALICE).quarantined_rows == []


def test_the_commit_path_works_the_same_on_the_postgresql_catalog(start_ingest: Callable[..., IngestUnderTest], database_url: str) -> None:
    ingest = start_ingest(FALAJ_INGEST_DATABASE_URL=database_url)
    dataset = create_dataset(ingest, "payments").name
    first = ingest_tables(ingest, dataset, [payments(range(5), customer="c-1"), payments(range(5, 7), amount=-500.0)], request_id="pg-1")
    assert (first.report.rows_accepted, first.report.rows_quarantined) == (5, 2)
    second = ingest_tables(ingest, dataset, [payments(range(7, 10), customer="c-2", day=DAY2)])
    assert second.dataset_version == f"{dataset}/versions/2"
    receipt = ingest.stub.EraseSubject(
        rr.EraseSubjectRequest(subject_id="c-1", legal_basis="test", request_id="pg-erase"), metadata=ALICE
    ).receipt
    assert receipt.rows_erased == 5 + 5 + 2  # from version 1, from version 2 (which lists the same file), from quarantine
    assert read_version(ingest, f"{dataset}/versions/latest").column("payment_id").to_pylist() == [7, 8, 9]
    assert [v.row_count for v in versions_of(ingest, dataset)] == [3, 0]
