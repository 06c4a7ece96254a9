"""The ingest contract as other services call it: through the gateway, with their own identity.

Features (feature views over dataset versions) and serving (batch prediction jobs) read
dataset versions as `ReadDatasetVersion`'s stream of Arrow IPC batches. A stream cut
mid-way resumes from the last row received (`start_row_offset`), pinned to the content
hash first seen, so an erasure rewriting the version in between is noticed, not mixed in.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Generator, Sequence

import grpc
import pyarrow as pa

from falaj.ingest.v1 import message_pb2 as ingest_messages
from falaj.ingest.v1 import request_response_pb2 as ingest_requests
from falaj.ingest.v1 import service_pb2_grpc as ingest_service
from falaj_platform.runtime.clients import RETRIABLE, GatewayChannel, request_id_metadata, upstream_error
from falaj_platform.runtime.errors import FalajError
from falaj_platform.runtime.settings import PkiPaths


class IngestClient:
    """Ingest through the gateway; errors come back as the caller's own FalajErrors."""

    def __init__(
        self,
        gateway_addr: str,
        pki: PkiPaths,
        *,
        timeout: float,
        stream_timeout: float | None = None,
        read_attempts: int = 3,
        denied_hint: str = "",
    ):
        self.channel = GatewayChannel(gateway_addr, pki)
        self.timeout = timeout
        self.stream_timeout = stream_timeout if stream_timeout is not None else timeout
        self.read_attempts = read_attempts
        self.denied_hint = denied_hint

    @property
    def stub(self) -> ingest_service.IngestServiceStub:
        return ingest_service.IngestServiceStub(self.channel.get())

    def error(self, error: grpc.RpcError, what: str) -> FalajError:
        return upstream_error(error, what, "ingest", denied_hint=self.denied_hint)

    def get_dataset(self, dataset: str) -> ingest_messages.Dataset:
        try:
            request = ingest_requests.GetDatasetRequest(name=dataset)
            return self.stub.GetDataset(request, timeout=self.timeout, metadata=request_id_metadata()).dataset
        except grpc.RpcError as error:
            raise self.error(error, f"reading dataset {dataset}") from None

    def get_version(self, version: str) -> ingest_messages.DatasetVersion:
        try:
            request = ingest_requests.GetDatasetVersionRequest(name=version)
            return self.stub.GetDatasetVersion(request, timeout=self.timeout, metadata=request_id_metadata()).dataset_version
        except grpc.RpcError as error:
            raise self.error(error, f"reading dataset version {version}") from None

    def read_version(
        self,
        version: str,
        columns: Sequence[str] = (),
        *,
        content_hash: str = "",
        start: dt.datetime | None = None,
        end: dt.datetime | None = None,
        max_rows_per_batch: int = 0,
    ) -> Generator[pa.RecordBatch, None, None]:
        """The version's rows in batches; a cut stream is resumed where it stopped (UNAVAILABLE, deadline)."""
        request = ingest_requests.ReadDatasetVersionRequest(
            name=version, columns=list(columns), expected_content_hash=content_hash, max_rows_per_batch=max_rows_per_batch
        )
        if start is not None:
            request.start_time.FromDatetime(start)
        if end is not None:
            request.end_time.FromDatetime(end)
        offset = 0
        attempt = 0
        while True:
            request.start_row_offset = offset
            call = self.stub.ReadDatasetVersion(request, timeout=self.stream_timeout, metadata=request_id_metadata())
            try:
                for message in call:
                    with pa.ipc.open_stream(message.batch.arrow_ipc) as reader:
                        for batch in reader:
                            yield batch
                            offset = message.row_offset + batch.num_rows
                return
            except grpc.RpcError as error:
                attempt += 1
                code = error.code() if isinstance(error, grpc.Call) else None
                if code not in RETRIABLE or attempt >= self.read_attempts:
                    raise self.error(error, f"reading dataset version {version}") from None
            finally:
                call.cancel()  # a reader that stops early ends the stream now

    def close(self) -> None:
        self.channel.close()
