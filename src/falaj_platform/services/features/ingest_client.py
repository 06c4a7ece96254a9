"""`DatasetSource` over the ingest contract (`ingest.client.IngestClient`), called through the
gateway with the features service's own identity (the gateway authorizes `service-features`
to read ingest)."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator, Sequence

import grpc
import pyarrow as pa
from google.protobuf import timestamp_pb2

from falaj.ingest.v1 import message_pb2 as ingest_messages
from falaj.ingest.v1 import request_response_pb2 as ingest_requests
from falaj_platform.runtime.clients import request_id_metadata
from falaj_platform.runtime.settings import PkiPaths
from falaj_platform.services.features.sources import DatasetInfo, ErasedKeys, ErasureInfo, VersionInfo
from falaj_platform.services.ingest.client import IngestClient


def _time(stamp: timestamp_pb2.Timestamp) -> dt.datetime | None:
    return stamp.ToDatetime(dt.UTC) if stamp.ByteSize() else None


class IngestDatasetSource:
    """Ingest datasets through the gateway."""

    def __init__(self, gateway_addr: str, pki: PkiPaths, *, timeout: float = 60.0, read_attempts: int = 3):
        self.ingest = IngestClient(gateway_addr, pki, timeout=timeout, read_attempts=read_attempts)
        self.timeout = timeout

    def get_dataset(self, dataset: str) -> DatasetInfo:
        found = self.ingest.get_dataset(dataset)
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
        found = self.ingest.get_version(version)
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
        return self.ingest.read_version(version, columns, content_hash=expected_content_hash, start=start, end=end)

    def consented_subjects(self, subject_ids: Sequence[str], purpose: str) -> set[str]:
        granted: set[str] = set()
        wanted = ingest_messages.ConsentPurpose.Value(f"CONSENT_PURPOSE_{purpose.upper()}")
        for start in range(0, len(subject_ids), 1000):
            request = ingest_requests.CheckConsentRequest(subject_ids=list(subject_ids[start : start + 1000]), purpose=wanted)
            try:
                reply = self.ingest.stub.CheckConsent(request, timeout=self.timeout, metadata=request_id_metadata())
            except grpc.RpcError as error:
                raise self.ingest.error(error, "checking consent") from None
            granted |= {c.subject_id for c in reply.consents if c.state == ingest_messages.CONSENT_STATE_GRANTED}
        return granted

    def get_erasure_receipt(self, receipt: str) -> ErasureInfo:
        try:
            reply = self.ingest.stub.GetErasureReceipt(
                ingest_requests.GetErasureReceiptRequest(name=receipt), timeout=self.timeout, metadata=request_id_metadata()
            )
        except grpc.RpcError as error:
            raise self.ingest.error(error, f"reading erasure receipt {receipt}") from None
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
        self.ingest.close()
