"""Ingest datasets for batch prediction jobs, over the ingest contract through the gateway.

Serving calls ingest as itself (`service/serving`): GetDataset and GetDatasetVersion to
plan a job, ReadDatasetVersion's stream of Arrow IPC batches for the input (resumed from
the last row received when the stream is cut, pinned to the content hash first seen),
and one IngestBatches stream for the output. The output stream commits only when it is
closed normally; a job that fails or is cancelled ends it with a message ingest refuses
(a repeated header), so ingest commits nothing.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc
import pyarrow as pa

from falaj.common.v1 import common_pb2
from falaj.ingest.v1 import message_pb2 as ingest_messages
from falaj.ingest.v1 import request_response_pb2 as ingest_requests
from falaj_platform.runtime.clients import request_id_metadata
from falaj_platform.runtime.errors import FailedPrecondition, Unavailable
from falaj_platform.runtime.settings import PkiPaths
from falaj_platform.services.ingest.client import IngestClient


@dataclass(frozen=True)
class DatasetColumn:
    """One declared column of an ingest dataset."""

    name: str
    column_type: int  # falaj.ingest.v1.ColumnType
    nullable: bool


@dataclass(frozen=True)
class DatasetInfo:
    """What a job needs to know of an ingest dataset: where it lives and its columns."""

    name: str
    residency_region: str
    columns: tuple[DatasetColumn, ...]

    def column(self, name: str) -> DatasetColumn | None:
        return next((column for column in self.columns if column.name == name), None)


@dataclass(frozen=True)
class VersionInfo:
    """One committed version of an ingest dataset."""

    name: str
    dataset: str
    row_count: int
    content_hash: str
    residency_region: str


@dataclass(frozen=True)
class WrittenVersion:
    """What ingest committed from an output stream."""

    dataset_version: str
    rows_accepted: int
    rows_quarantined: int


class DatasetWriter(Protocol):
    """An open output stream: `write` batches, then `commit`, or `abort` to commit nothing."""

    def write(self, table: pa.Table) -> None: ...

    def commit(self) -> WrittenVersion: ...

    def abort(self) -> None: ...


class IngestDatasets(Protocol):
    """The part of `falaj.ingest.v1.IngestService` batch prediction uses."""

    def get_dataset(self, dataset: str) -> DatasetInfo: ...

    def get_version(self, version: str) -> VersionInfo: ...

    def read_version(
        self, version: str, columns: Sequence[str], content_hash: str, max_rows_per_batch: int
    ) -> Generator[pa.RecordBatch, None, None]: ...

    def open_writer(self, dataset: str, request_id: str, source_description: str) -> DatasetWriter: ...


def _ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


class GatewayIngestDatasets:
    """Ingest through the gateway with serving's identity."""

    def __init__(self, gateway_addr: str, pki: PkiPaths, *, timeout: float, stream_timeout: float, read_attempts: int = 3):
        self.ingest = IngestClient(
            gateway_addr,
            pki,
            timeout=timeout,
            stream_timeout=stream_timeout,
            read_attempts=read_attempts,
            denied_hint="the gateway policy must let service-serving read ingest datasets and write IngestBatches",
        )

    def get_dataset(self, dataset: str) -> DatasetInfo:
        found = self.ingest.get_dataset(dataset)
        columns = tuple(DatasetColumn(c.name, int(c.type), c.nullable) for c in found.schema.columns)
        return DatasetInfo(name=found.name, residency_region=found.residency.region, columns=columns)

    def get_version(self, version: str) -> VersionInfo:
        found = self.ingest.get_version(version)
        return VersionInfo(
            name=found.name,
            dataset=found.name.split("/versions/")[0],
            row_count=found.row_count,
            content_hash=found.content_hash,
            residency_region=found.residency.region,
        )

    def read_version(
        self, version: str, columns: Sequence[str], content_hash: str, max_rows_per_batch: int
    ) -> Generator[pa.RecordBatch, None, None]:
        return self.ingest.read_version(version, columns, content_hash=content_hash, max_rows_per_batch=max_rows_per_batch)

    def open_writer(self, dataset: str, request_id: str, source_description: str) -> DatasetWriter:
        header = ingest_requests.IngestStreamHeader(
            dataset=dataset,
            request_id=request_id,
            # Each job's output is a version of its own, not the previous rows plus these.
            write_mode=ingest_messages.WRITE_MODE_OVERWRITE,
            source_description=source_description,
        )
        return _StreamWriter(self.ingest, header)

    def close(self) -> None:
        self.ingest.close()


_CLOSE = object()


class _StreamWriter:
    """One IngestBatches call fed from a bounded queue, so the job thread never outruns ingest."""

    def __init__(self, ingest: IngestClient, header: ingest_requests.IngestStreamHeader):
        self.ingest = ingest
        self.header = header
        self._outbox: queue.Queue[object] = queue.Queue(maxsize=4)
        self._finished = threading.Event()
        self._batches = 0
        self._call = ingest.stub.IngestBatches.future(self._requests(), timeout=ingest.stream_timeout, metadata=request_id_metadata())

    def _requests(self) -> Iterator[ingest_requests.IngestBatchesRequest]:
        yield ingest_requests.IngestBatchesRequest(header=self.header)
        while True:
            try:
                item = self._outbox.get(timeout=0.2)
            except queue.Empty:
                # Ending this iterator closes the stream, which commits: only _CLOSE may do that.
                # Here the call is over (cancelled or refused) and the thread just leaves.
                if self._finished.is_set() and self._call.done():
                    return
                continue
            if item is _CLOSE:
                return
            assert isinstance(item, ingest_requests.IngestBatchesRequest)
            yield item

    def _put(self, item: object) -> None:
        while True:
            if self._call.done():
                # Ingest ended the call early (a refusal): its status says why.
                self._finished.set()
                self._call.result()
                raise Unavailable(f"ingest closed the output stream of {self.header.dataset} early", reason="INGEST_STREAM_CLOSED")
            try:
                self._outbox.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def write(self, table: pa.Table) -> None:
        batch = common_pb2.ArrowBatch(arrow_ipc=_ipc(table), batch_id=f"{self.header.request_id}-{self._batches}", row_count=table.num_rows)
        self._batches += 1
        try:
            self._put(ingest_requests.IngestBatchesRequest(batch=batch))
        except grpc.RpcError as error:
            raise self.ingest.error(error, f"writing dataset {self.header.dataset}") from None

    def commit(self) -> WrittenVersion:
        try:
            self._put(_CLOSE)
            ingestion = self._call.result().ingestion
        except grpc.RpcError as error:
            raise self.ingest.error(error, f"writing dataset {self.header.dataset}") from None
        finally:
            self._finished.set()
        if ingestion.state != ingest_messages.INGESTION_STATE_SUCCEEDED:
            raise FailedPrecondition(
                f"ingest did not commit the output to {self.header.dataset}: {ingestion.error_message or 'no reason given'}",
                reason="OUTPUT_NOT_COMMITTED",
            )
        report = ingestion.report
        return WrittenVersion(ingestion.dataset_version, report.rows_accepted, report.rows_quarantined)

    def abort(self, timeout: float = 10.0) -> None:
        """End the stream so that ingest commits none of it.

        A cancel alone is not enough: a proxy in between may pass a cancelled stream on as one
        that ended normally, and ingest would commit what it received. So the stream first gets
        a second header, which ingest refuses with the whole stream; the cancel only follows
        ingest's answer (or its absence).
        """
        try:
            if not self._call.done():
                self._put(ingest_requests.IngestBatchesRequest(header=self.header))
                self._put(_CLOSE)
                self._call.exception(timeout=timeout)
        except Exception:  # noqa: BLE001 - the call is over, refused or timed out: cancelled below either way
            pass
        finally:
            self._call.cancel()
            self._finished.set()
