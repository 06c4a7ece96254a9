"""Fixtures of the ingest tests: the real service on a free port, reached as the gateway reaches it.

The service runs with its real store (SQLite under tmp_path, or PostgreSQL where a test
asks), real Parquet files, and a recording audit sink in place of the gateway's audit
log (the gateway side is tested on its own).
"""

from __future__ import annotations

import datetime as dt
import itertools
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import pyarrow as pa
import pytest

from falaj.common.v1 import common_pb2 as common
from falaj.gateway.v1 import message_pb2 as gateway_messages
from falaj.ingest.v1 import message_pb2 as m
from falaj.ingest.v1 import request_response_pb2 as rr
from falaj.ingest.v1 import service_pb2_grpc
from falaj_platform.pki import PKI
from falaj_platform.runtime.clients import secure_channel
from falaj_platform.runtime.db import Database
from falaj_platform.runtime.identity import GATEWAY_SPIFFE_ID
from falaj_platform.runtime.server import RunningServer, create_server
from falaj_platform.runtime.service import open_database
from falaj_platform.runtime.settings import Settings
from falaj_platform.services.ingest.api import IngestApi
from falaj_platform.services.ingest.config import IngestConfig
from falaj_platform.services.ingest.server import SPEC, build, serve
from tests.conftest import caller, identity

ALICE = caller("alice")


class RecordingAudit:
    """Stands in for the gateway's audit log: records every reported security event."""

    def __init__(self) -> None:
        self.records: list[gateway_messages.AuditRecord] = []
        self.unavailable = False

    def report(
        self,
        event_type: Any,
        *,
        resource: str,
        action: str,
        allowed: bool = True,
        detail: str = "",
        attributes: Mapping[str, str] | None = None,
        report_id: str = "",
        caller: str | None = None,
    ) -> gateway_messages.AuditRecord:
        from falaj_platform.runtime.errors import Unavailable

        if self.unavailable:
            raise Unavailable("the audit log is unavailable")
        record = gateway_messages.AuditRecord(
            sequence=len(self.records) + 1,
            kind=gateway_messages.AUDIT_RECORD_KIND_SECURITY_EVENT,
            caller=caller or "",
            resource=resource,
            action=action,
            decision=gateway_messages.DECISION_ALLOW if allowed else gateway_messages.DECISION_DENY,
            decision_detail=detail,
            event_type=event_type,
            attributes=dict(attributes or {}),
        )
        self.records.append(record)
        return record

    def of(self, event_type: int) -> list[gateway_messages.AuditRecord]:
        return [r for r in self.records if r.event_type == event_type]


@dataclass
class IngestUnderTest:
    running: RunningServer
    database: Database
    settings: Settings
    api: IngestApi
    audit: RecordingAudit
    channel: grpc.Channel
    stub: service_pb2_grpc.IngestServiceStub = field(init=False)

    def __post_init__(self) -> None:
        self.stub = service_pb2_grpc.IngestServiceStub(self.channel)

    @property
    def data_dir(self) -> Any:
        return self.settings.data_dir

    def stop(self) -> None:
        self.channel.close()
        self.running.stop(0)
        self.api.close()
        self.database.dispose()


@pytest.fixture
def start_ingest(settings_for: Callable[..., Settings], pki: PKI) -> Iterator[Callable[..., IngestUnderTest]]:
    """Start the ingest service (stoppable and restartable on the same data) with a recording audit sink."""
    started: list[IngestUnderTest] = []

    def start(config: IngestConfig | None = None, audit: RecordingAudit | None = None, **env: str) -> IngestUnderTest:
        settings = settings_for("ingest", **env)
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        database = open_database(SPEC, settings)
        recorder = audit or RecordingAudit()
        holder: dict[str, IngestApi] = {}

        def register(server: grpc.Server) -> list[str]:
            holder["api"] = build(database, settings, audit=recorder, config=config or IngestConfig(worker_poll_seconds=0.2))
            return serve(server, holder["api"])

        running = create_server(settings, register, listen_addr="127.0.0.1:0", allowed_peers=frozenset({GATEWAY_SPIFFE_ID}))
        channel = secure_channel(f"127.0.0.1:{running.port}", identity(pki, "service", "gateway"))
        service = IngestUnderTest(running, database, settings, holder["api"], recorder, channel)
        started.append(service)
        return service

    yield start
    for service in started:
        try:
            service.stop()
        except Exception:  # noqa: BLE001 - already stopped by the test
            pass


@pytest.fixture
def ingest(start_ingest: Callable[..., IngestUnderTest]) -> IngestUnderTest:
    return start_ingest()


# -- building requests ------------------------------------------------------------------------


def column(name: str, column_type: int, nullable: bool = False, **constraints: Any) -> m.Column:
    return m.Column(name=name, type=column_type, nullable=nullable, constraints=m.ColumnConstraints(**constraints))  # type: ignore[arg-type]


def payments_schema() -> m.Schema:
    """Card payments: a customer (the data subject), an amount in AED, a channel, an event time."""
    return m.Schema(
        columns=[
            column("payment_id", m.COLUMN_TYPE_INT),
            column("customer_id", m.COLUMN_TYPE_STRING),
            column("amount", m.COLUMN_TYPE_FLOAT, range=m.RangeConstraint(min=0, max=50_000)),
            column("channel", m.COLUMN_TYPE_CATEGORY, allowed_values=["pos", "online", "atm"]),
            column("email", m.COLUMN_TYPE_STRING, nullable=True, regex=r"[^@\s]+@[^@\s]+"),
            column("paid_at", m.COLUMN_TYPE_TIMESTAMP),
        ],
        entity_key_columns=["customer_id"],
        event_time_column="paid_at",
        data_subject_column="customer_id",
        unique_key_columns=["payment_id"],
    )


def create_dataset(
    ingest: IngestUnderTest,
    dataset_id: str,
    schema: m.Schema | None = None,
    *,
    region: str = "ae-dxb",
    cleansing: m.CleansingPolicy | None = None,
    request_id: str = "",
) -> m.Dataset:
    dataset = m.Dataset(
        display_name=dataset_id.replace("_", " "),
        schema=schema or payments_schema(),
        residency=common.Residency(region=region),
        cleansing=cleansing or m.CleansingPolicy(trim_strings=True),
    )
    response = ingest.stub.CreateDataset(
        rr.CreateDatasetRequest(dataset=dataset, dataset_id=dataset_id, request_id=request_id), metadata=ALICE, timeout=30
    )
    return response.dataset


UTC = dt.UTC
DAY1 = dt.datetime(2025, 3, 1, 9, 30, tzinfo=UTC)
DAY2 = dt.datetime(2025, 3, 2, 14, 0, tzinfo=UTC)


def payments(
    ids: Iterable[int], *, customer: str | Callable[[int], str] = "c-1", day: dt.datetime = DAY1, amount: float = 120.5
) -> pa.Table:
    ids = list(ids)
    customers = [customer(i) if callable(customer) else customer for i in ids]
    return pa.table(
        {
            "payment_id": pa.array(ids, pa.int64()),
            "customer_id": pa.array(customers, pa.string()),
            "amount": pa.array([amount + i for i in ids], pa.float64()),
            "channel": pa.array(["pos" if i % 2 else "online" for i in ids], pa.string()),
            "email": pa.array([f"{c}@example.ae" for c in customers], pa.string()),
            "paid_at": pa.array([day + dt.timedelta(minutes=i) for i in ids], pa.timestamp("us", tz="UTC")),
        }
    )


def ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def stream(
    dataset: str,
    tables: Sequence[pa.Table],
    *,
    request_id: str = "",
    batch_ids: Sequence[str] | None = None,
    write_mode: m.WriteMode.ValueType = m.WRITE_MODE_APPEND,
    validate_only: bool = False,
) -> Iterator[rr.IngestBatchesRequest]:
    prefix = uuid.uuid4().hex[:8]
    ids = batch_ids or [f"{prefix}-{i}" for i in range(len(tables))]
    yield rr.IngestBatchesRequest(
        header=rr.IngestStreamHeader(
            dataset=dataset, request_id=request_id, write_mode=write_mode, validate_only=validate_only, source_description="tests"
        )
    )
    for batch_id, table in zip(ids, tables, strict=True):
        yield rr.IngestBatchesRequest(batch=common.ArrowBatch(arrow_ipc=ipc(table), batch_id=batch_id, row_count=table.num_rows))


def ingest_tables(ingest: IngestUnderTest, dataset: str, tables: Sequence[pa.Table], **options: Any) -> m.Ingestion:
    return ingest.stub.IngestBatches(stream(dataset, tables, **options), metadata=ALICE, timeout=60).ingestion


def read_version(ingest: IngestUnderTest, name: str, **options: Any) -> pa.Table:
    responses = ingest.stub.ReadDatasetVersion(rr.ReadDatasetVersionRequest(name=name, **options), metadata=ALICE, timeout=60)
    tables = [pa.ipc.open_stream(r.batch.arrow_ipc).read_all() for r in responses]
    return pa.concat_tables(tables) if tables else pa.table({})


def versions_of(ingest: IngestUnderTest, dataset: str) -> list[m.DatasetVersion]:
    return list(ingest.stub.ListDatasetVersions(rr.ListDatasetVersionsRequest(parent=dataset), metadata=ALICE, timeout=30).dataset_versions)


def quarantined(ingest: IngestUnderTest, dataset: str, **filters: Any) -> list[m.QuarantinedRow]:
    rows: list[m.QuarantinedRow] = []
    token = ""
    for _ in itertools.count():
        page = ingest.stub.ListQuarantinedRows(
            rr.ListQuarantinedRowsRequest(parent=dataset, page_token=token, **filters), metadata=ALICE, timeout=30
        )
        rows.extend(page.quarantined_rows)
        token = page.next_page_token
        if not token:
            return rows
    raise AssertionError("unreachable")


def status_of(error: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(error)
    reason = ""
    if status is not None:
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                reason = info.reason
    return error.code(), reason


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"
