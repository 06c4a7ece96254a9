"""`DatasetSource` over the ingest contract, called through the gateway with the features
service's own identity (mTLS; the gateway authorizes `service-features` to read ingest).

Version data arrives as `ReadDatasetVersion`'s stream of Arrow IPC batches; a stream cut
mid-way resumes from the last row received (`start_row_offset`), pinned to the content
hash first seen so an erasure rewriting the version in between is noticed, not mixed in.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator, Sequence

import grpc
import pyarrow as pa
from google.protobuf import timestamp_pb2

from falaj.ingest.v1 import message_pb2 as ingest_messages
from falaj.ingest.v1 import request_response_pb2 as ingest_requests
from falaj.ingest.v1 import service_pb2_grpc as ingest_service
from falaj.sdk.errors import from_rpc_error
from falaj_platform.runtime.clients import secure_channel
from falaj_platform.runtime.errors import FailedPrecondition, FalajError, NotFound, Unavailable
from falaj_platform.runtime.interceptors import REQUEST_ID_KEY, current_request_id
from falaj_platform.runtime.settings import PkiPaths
from falaj_platform.services.features.sources import DatasetInfo, ErasedKeys, ErasureInfo, VersionInfo

_RETRIABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def _translate(error: grpc.RpcError, what: str) -> FalajError:
    typed = from_rpc_error(error)
    if isinstance(typed, NotFound | FailedPrecondition):
        typed.message = f"{what}: {typed.message}"
        return typed
    if typed.code in _RETRIABLE:
        return Unavailable(f"{what}: the ingest service is unavailable ({typed.message})", reason="INGEST_UNAVAILABLE")
    # Anything else (a refusal of our own identity, a contract mismatch) is ours to fix, not the caller's.
    return FailedPrecondition(f"{what}: ingest answered {typed.code.name}: {typed.message}", reason=f"INGEST_{typed.code.name}")


def _time(stamp: timestamp_pb2.Timestamp) -> dt.datetime | None:
    return stamp.ToDatetime(dt.UTC) if stamp.ByteSize() else None


class IngestDatasetSource:
    """Ingest datasets through the gateway."""

    def __init__(self, gateway_addr: str, pki: PkiPaths, *, timeout: float = 60.0, read_attempts: int = 3):
        self.gateway_addr = gateway_addr
        self.pki = pki
        self.timeout = timeout
        self.read_attempts = read_attempts
        self._channel: grpc.Channel | None = None

    def _stub(self) -> ingest_service.IngestServiceStub:
        if self._channel is None:
            self._channel = secure_channel(self.gateway_addr, self.pki)
        return ingest_service.IngestServiceStub(self._channel)

    @staticmethod
    def _metadata() -> tuple[tuple[str, str], ...]:
        request_id = current_request_id()
        return ((REQUEST_ID_KEY, request_id),) if request_id else ()

    def get_dataset(self, dataset: str) -> DatasetInfo:
        try:
            reply = self._stub().GetDataset(
                ingest_requests.GetDatasetRequest(name=dataset), timeout=self.timeout, metadata=self._metadata()
            )
        except grpc.RpcError as error:
            raise _translate(error, f"reading dataset {dataset}") from None
        found = reply.dataset
        schema = found.schema
        return DatasetInfo(
            name=found.name,
            residency_region=found.residency.region,
            columns={column.name: column.type for column in schema.columns},
            event_time_column=schema.event_time_column,
            entity_key_columns=tuple(schema.entity_key_columns),
            data_subject_column=schema.data_subject_column,
            latest_version=found.latest_version,
        )

    def get_version(self, version: str) -> VersionInfo:
        try:
            reply = self._stub().GetDatasetVersion(
                ingest_requests.GetDatasetVersionRequest(name=version), timeout=self.timeout, metadata=self._metadata()
            )
        except grpc.RpcError as error:
            raise _translate(error, f"reading dataset version {version}") from None
        found = reply.dataset_version
        return VersionInfo(
            name=found.name,
            dataset=found.name.split("/versions/")[0],
            version_number=found.version_number,
            content_hash=found.content_hash,
            row_count=found.row_count,
            residency_region=found.residency.region,
            min_event_time=_time(found.min_event_time),
            max_event_time=_time(found.max_event_time),
        )

    def read_version(
        self,
        version: str,
        columns: Sequence[str] = (),
        start: dt.datetime | None = None,
        end: dt.datetime | None = None,
        *,
        expected_content_hash: str = "",
    ) -> Iterator[pa.RecordBatch]:
        request = ingest_requests.ReadDatasetVersionRequest(
            name=version, columns=list(columns), expected_content_hash=expected_content_hash
        )
        if start is not None:
            request.start_time.FromDatetime(start)
        if end is not None:
            request.end_time.FromDatetime(end)
        offset = 0
        attempt = 0
        while True:
            request.start_row_offset = offset
            try:
                for message in self._stub().ReadDatasetVersion(request, timeout=self.timeout, metadata=self._metadata()):
                    with pa.ipc.open_stream(message.batch.arrow_ipc) as reader:
                        for batch in reader:
                            yield batch
                            offset = message.row_offset + batch.num_rows
                return
            except grpc.RpcError as error:
                attempt += 1
                code = error.code() if isinstance(error, grpc.Call) else None
                if code not in _RETRIABLE or attempt >= self.read_attempts:
                    raise _translate(error, f"reading dataset version {version}") from None

    def consented_subjects(self, subject_ids: Sequence[str], purpose: str) -> set[str]:
        granted: set[str] = set()
        wanted = ingest_messages.ConsentPurpose.Value(f"CONSENT_PURPOSE_{purpose.upper()}")
        for start in range(0, len(subject_ids), 1000):
            request = ingest_requests.CheckConsentRequest(subject_ids=list(subject_ids[start : start + 1000]), purpose=wanted)
            try:
                reply = self._stub().CheckConsent(request, timeout=self.timeout, metadata=self._metadata())
            except grpc.RpcError as error:
                raise _translate(error, "checking consent") from None
            granted |= {c.subject_id for c in reply.consents if c.state == ingest_messages.CONSENT_STATE_GRANTED}
        return granted

    def get_erasure_receipt(self, receipt: str) -> ErasureInfo:
        try:
            reply = self._stub().GetErasureReceipt(
                ingest_requests.GetErasureReceiptRequest(name=receipt), timeout=self.timeout, metadata=self._metadata()
            )
        except grpc.RpcError as error:
            raise _translate(error, f"reading erasure receipt {receipt}") from None
        found = reply.receipt
        datasets = tuple(
            ErasedKeys(
                dataset=erased.dataset,
                entity_key_columns=tuple(erased.entity_key_columns),
                keys=tuple(tuple(json.loads(key)) for key in erased.erased_entity_keys_json),
            )
            for erased in found.datasets
        )
        return ErasureInfo(found.name, found.receipt_digest, found.state == ingest_messages.ERASURE_STATE_COMPLETED, datasets)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
