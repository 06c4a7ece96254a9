"""ImportFile: CSV and Parquet from local paths and fsspec URLs, one commit per import."""

from __future__ import annotations

import gzip
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import fsspec
import grpc
import pyarrow.parquet as pq
import pytest
from google.protobuf import field_mask_pb2

from falaj.ingest.v1 import message_pb2 as m
from falaj.ingest.v1 import request_response_pb2 as rr
from falaj_platform.services.ingest.config import IngestConfig
from tests.ingest.conftest import ALICE, IngestUnderTest, create_dataset, payments, quarantined, read_version, status_of, versions_of

CSV = """payment_id,customer_id,amount,channel,email,paid_at
1,c-1,10.5,pos,a@b.ae,2025-03-01T10:00:00Z
2,c-2,oops,online,b@b.ae,2025-03-01T11:00:00Z
3,c-3,12,atm
4, c-4 ,13.25,pos,,2025-03-02 09:15:00
"""


def import_file(ingest: IngestUnderTest, dataset: str, uri: str, **options: object) -> m.Ingestion:
    spec = m.FileImportSpec(uri=uri, **options)  # type: ignore[arg-type]
    return ingest.stub.ImportFile(rr.ImportFileRequest(dataset=dataset, file=spec), metadata=ALICE, timeout=60).ingestion


def test_csv_rows_are_parsed_into_declared_types_and_bad_lines_quarantined_with_their_line(ingest: IngestUnderTest, tmp_path: Path) -> None:
    dataset = create_dataset(ingest, "payments").name
    path = tmp_path / "payments.csv"
    path.write_text(CSV)

    ingestion = import_file(ingest, dataset, str(path))

    assert ingestion.source_kind == m.SOURCE_KIND_FILE and ingestion.source_description == f"file {path}"
    assert (ingestion.report.rows_in, ingestion.report.rows_accepted, ingestion.report.rows_quarantined) == (4, 2, 2)
    table = read_version(ingest, ingestion.dataset_version)
    assert table.to_pydict()["customer_id"] == ["c-1", "c-4"]  # trimmed
    assert table.to_pydict()["amount"] == [10.5, 13.25]
    assert table.to_pydict()["email"] == ["a@b.ae", None]  # an empty field is a missing value
    rows = {r.row_index: r for r in quarantined(ingest, dataset)}
    assert set(rows) == {1, 2}
    assert [(m.ValidationRule.Name(v.rule), v.column, v.reason) for v in rows[1].violations] == [
        ("VALIDATION_RULE_TYPE", "amount", "value 'oops' is not a valid FLOAT")
    ]
    assert [(m.ValidationRule.Name(v.rule), v.reason) for v in rows[2].violations] == [
        ("VALIDATION_RULE_PARSE", "line 4 has 4 field(s), expected 6")
    ]
    assert json.loads(rows[2].values_json) == {"_raw_line": "3,c-3,12,atm"}
    assert rows[2].batch_id == str(path)

    # The unparseable line, corrected, goes in on re-submission.
    fixed = {"payment_id": 3, "customer_id": "c-3", "amount": 12, "channel": "atm", "paid_at": "2025-03-01T12:00:00+04:00"}
    again = ingest.stub.ResubmitQuarantinedRows(
        rr.ResubmitQuarantinedRowsRequest(
            parent=dataset, corrections=[rr.RowCorrection(quarantined_row=rows[2].name, values_json=json.dumps(fixed))]
        ),
        metadata=ALICE,
    )
    assert again.ingestion.report.rows_accepted == 1 and not again.still_quarantined
    assert read_version(ingest, again.ingestion.dataset_version).column("payment_id").to_pylist() == [1, 3, 4]


def test_gzipped_csv_with_options_and_a_parquet_glob_through_fsspec_urls(
    start_ingest: Callable[..., IngestUnderTest], tmp_path: Path
) -> None:
    # Remote (non-local) URLs are read only under a prefix the operator allowed.
    ingest = start_ingest(config=IngestConfig(worker_poll_seconds=0.2, allowed_url_prefixes=("memory://falaj-tests/",)))
    dataset = create_dataset(ingest, "payments").name
    semicolons = "skip this banner\nid;cust;amount;channel;email;paid_at\n7;c-7;70;pos;x@y.ae;01/03/2025 08:00\n"
    (tmp_path / "export.csv.gz").write_bytes(gzip.compress(semicolons.encode()))
    ingestion = import_file(
        ingest,
        dataset,
        (tmp_path / "export.csv.gz").as_uri(),
        csv=m.CsvOptions(delimiter=";", skip_lines=1, timestamp_format="%d/%m/%Y %H:%M"),
        column_mapping={"id": "payment_id", "cust": "customer_id"},
    )
    assert ingestion.report.rows_accepted == 1, ingestion
    assert read_version(ingest, ingestion.dataset_version).column("paid_at").to_pylist()[0].isoformat() == "2025-03-01T08:00:00+00:00"

    folder = tmp_path / "landing"
    folder.mkdir()
    pq.write_table(payments(range(10, 13)), folder / "part-a.parquet")
    pq.write_table(payments(range(13, 15)), folder / "part-b.parquet")
    globbed = import_file(ingest, dataset, f"file://{folder}/*.parquet")
    assert (globbed.report.rows_accepted, globbed.report.batches_received) == (5, 2)

    memory_path = f"memory://falaj-tests/{uuid.uuid4().hex}/payments.parquet"
    with fsspec.open(memory_path, "wb") as handle:
        pq.write_table(payments(range(20, 22)), handle)
    from_memory = import_file(ingest, dataset, memory_path)
    assert from_memory.source_description == f"file {memory_path}"
    assert read_version(ingest, from_memory.dataset_version).num_rows == 8


def test_unreadable_or_missing_files_fail_clearly_and_commit_nothing(start_ingest: Callable[..., IngestUnderTest], tmp_path: Path) -> None:
    ingest = start_ingest(config=IngestConfig(worker_poll_seconds=0.2, allowed_url_prefixes=("nosuchscheme://bucket/",)))
    dataset = create_dataset(ingest, "payments").name
    not_csv = tmp_path / "photo.csv"
    not_csv.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40)
    wrong_columns = tmp_path / "people.csv"
    wrong_columns.write_text("name,age\nSara,31\n")
    parquet_in_disguise = tmp_path / "data.parquet"
    parquet_in_disguise.write_text("id,amount\n1,2\n")
    cases = [
        (str(not_csv), "FILE_NOT_CSV"),
        (str(wrong_columns), "SCHEMA_MISMATCH"),
        (str(parquet_in_disguise), "FILE_NOT_PARQUET"),
        (str(tmp_path / "missing.csv"), "FILE_NOT_FOUND"),
        (str(tmp_path / "data.xlsx"), "FILE_NOT_FOUND"),
        (str(tmp_path), "FILE_IS_A_FOLDER"),
        ("nosuchscheme://bucket/x.csv", "UNSUPPORTED_FILE_URL"),
    ]
    for uri, reason in cases:
        with pytest.raises(grpc.RpcError) as refused:
            import_file(ingest, dataset, uri)
        assert status_of(refused.value) == (grpc.StatusCode.INVALID_ARGUMENT, reason), uri
    assert versions_of(ingest, dataset) == []
    assert list(ingest.data_dir.rglob("*.parquet")) == []


def test_an_import_can_be_queued_and_followed_with_get_ingestion(ingest: IngestUnderTest, tmp_path: Path) -> None:
    dataset = create_dataset(ingest, "payments").name
    path = tmp_path / "payments.parquet"
    pq.write_table(payments(range(100)), path)
    request = rr.ImportFileRequest(dataset=dataset, file=m.FileImportSpec(uri=str(path)), return_immediately=True, request_id="queued-1")
    queued = ingest.stub.ImportFile(request, metadata=ALICE).ingestion
    assert queued.state in (m.INGESTION_STATE_QUEUED, m.INGESTION_STATE_RUNNING, m.INGESTION_STATE_SUCCEEDED)
    deadline = time.monotonic() + 20
    while True:
        current = ingest.stub.GetIngestion(rr.GetIngestionRequest(name=queued.name), metadata=ALICE).ingestion
        if current.state in (m.INGESTION_STATE_SUCCEEDED, m.INGESTION_STATE_FAILED) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert current.state == m.INGESTION_STATE_SUCCEEDED and current.report.rows_accepted == 100
    assert current.dataset_version == f"{dataset}/versions/1"
    assert ingest.stub.ImportFile(request, metadata=ALICE).ingestion.name == queued.name  # a retry does not queue twice


def test_a_scheduled_file_source_runs_on_its_own_until_paused(start_ingest: Callable[..., IngestUnderTest], tmp_path: Path) -> None:
    ingest = start_ingest(config=IngestConfig(worker_poll_seconds=0.1))
    dataset = create_dataset(ingest, "payments").name
    path = tmp_path / "drop.parquet"
    pq.write_table(payments(range(3)), path)
    every_second = m.Source(file=m.FileImportSpec(uri=str(path)), schedule="* * * * * *", write_mode=m.WRITE_MODE_OVERWRITE)
    with pytest.raises(grpc.RpcError) as bad_cron:
        ingest.stub.CreateSource(
            rr.CreateSourceRequest(parent=dataset, source_id="drop", source=m.Source(file=every_second.file, schedule="every day")),
            metadata=ALICE,
        )
    assert status_of(bad_cron.value) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_SCHEDULE")
    source = ingest.stub.CreateSource(rr.CreateSourceRequest(parent=dataset, source_id="drop", source=every_second), metadata=ALICE).source
    assert source.status.HasField("next_run_time")

    def runs() -> list[m.Ingestion]:
        listed = ingest.stub.ListIngestions(rr.ListIngestionsRequest(parent=dataset, source=source.name), metadata=ALICE).ingestions
        return [i for i in listed if i.state == m.INGESTION_STATE_SUCCEEDED]

    deadline = time.monotonic() + 20
    while len(runs()) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(runs()) >= 2 and all(i.source_kind == m.SOURCE_KIND_FILE for i in runs())
    assert read_version(ingest, f"{dataset}/versions/latest").num_rows == 3
    paused = ingest.stub.PauseSource(rr.PauseSourceRequest(name=source.name), metadata=ALICE).source
    assert paused.state == m.SOURCE_STATE_PAUSED and not paused.status.HasField("next_run_time")
    settled = len(runs())
    time.sleep(1.5)
    assert len(runs()) == settled
    assert ingest.stub.GetSource(rr.GetSourceRequest(name=source.name), metadata=ALICE).source.status.last_ingestion == runs()[0].name

    updated = ingest.stub.UpdateSource(
        rr.UpdateSourceRequest(
            source=m.Source(name=source.name, description="nightly drop", schedule="0 2 * * *", etag=paused.etag),
            update_mask=field_mask_pb2.FieldMask(paths=["description", "schedule"]),
        ),
        metadata=ALICE,
    ).source
    assert (updated.description, updated.schedule, updated.file.uri) == ("nightly drop", "0 2 * * *", str(path))
    assert updated.etag != paused.etag and updated.state == m.SOURCE_STATE_PAUSED
    with pytest.raises(grpc.RpcError) as kind_change:
        ingest.stub.UpdateSource(
            rr.UpdateSourceRequest(
                source=m.Source(name=source.name, nats=m.NatsSubscriptionSpec(stream="S", subject="s")),
                update_mask=field_mask_pb2.FieldMask(paths=["nats"]),
            ),
            metadata=ALICE,
        )
    assert status_of(kind_change.value) == (grpc.StatusCode.INVALID_ARGUMENT, "SOURCE_KIND_IMMUTABLE")
    listed = ingest.stub.ListSources(rr.ListSourcesRequest(parent="datasets/-"), metadata=ALICE).sources
    assert [(s.name, s.state) for s in listed] == [(source.name, m.SOURCE_STATE_PAUSED)]


def test_an_empty_overwrite_stream_commits_an_empty_version(ingest: IngestUnderTest) -> None:
    from tests.ingest.conftest import ingest_tables

    dataset = create_dataset(ingest, "payments").name
    ingest_tables(ingest, dataset, [payments(range(3))])
    emptied = ingest_tables(ingest, dataset, [], write_mode=m.WRITE_MODE_OVERWRITE)
    assert emptied.dataset_version == f"{dataset}/versions/2"
    assert read_version(ingest, emptied.dataset_version).num_rows == 0
    assert [v.row_count for v in versions_of(ingest, dataset)] == [0, 3]
