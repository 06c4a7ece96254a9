"""Reading dataset versions: manifests, profiles, and rows as a stream of Arrow batches."""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa

from falaj.common.v1 import common_pb2 as common
from falaj.ingest.v1 import message_pb2 as m
from falaj.ingest.v1 import request_response_pb2 as rr
from falaj_platform.runtime.errors import FailedPrecondition, InvalidArgument
from falaj_platform.runtime.validate import optional_datetime
from falaj_platform.services.ingest import names, paging
from falaj_platform.services.ingest.residency import ResidencyGuard
from falaj_platform.services.ingest.schema import arrow_schema
from falaj_platform.services.ingest.storage import VersionStorage
from falaj_platform.services.ingest.store import IngestStore

DEFAULT_BATCH_ROWS = 65_536
MAX_BATCH_BYTES = 32 * 1024 * 1024


def ipc_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def _bounded(table: pa.Table) -> Iterator[pa.Table]:
    """Pieces of `table` small enough for one gRPC message."""
    if table.num_rows <= 1 or table.nbytes <= MAX_BATCH_BYTES:
        yield table
        return
    half = table.num_rows // 2
    yield from _bounded(table.slice(0, half))
    yield from _bounded(table.slice(half))


class Versions:
    def __init__(self, store: IngestStore, storage: VersionStorage, guard: ResidencyGuard):
        self.store = store
        self.storage = storage
        self.guard = guard

    def get(self, name: str) -> m.DatasetVersion:
        dataset_id, number = names.parse_version(name)
        version, _ = self.store.get_version(dataset_id, number)
        return version

    def list_versions(self, request: rr.ListDatasetVersionsRequest) -> rr.ListDatasetVersionsResponse:
        dataset_id = names.parse_dataset(request.parent, "parent")
        after = optional_datetime(request, "created_after")
        found = self.store.list_versions(dataset_id, after)
        filters = {"p": dataset_id, "a": request.created_after.ToJsonString() if after else ""}
        page, token = paging.paginate(found, paging.page_size(request.page_size, 50), request.page_token, filters)
        return rr.ListDatasetVersionsResponse(dataset_versions=page, next_page_token=token)

    def profile(self, request: rr.GetDatasetProfileRequest, caller: str) -> m.DatasetProfile:
        dataset_id, number = names.parse_version(request.dataset_version)
        self.guard(self.store.get_dataset(dataset_id), "read_profile", caller)
        _, record = self.store.get_version(dataset_id, number)
        profile, _ = self.store.get_profile(record.id)
        if request.columns:
            known = {c.column for c in profile.columns}
            unknown = [c for c in request.columns if c not in known]
            if unknown:
                raise InvalidArgument(f"unknown column(s) {', '.join(unknown)}", reason="UNKNOWN_COLUMN")
            wanted = set(request.columns)
            kept = [c for c in profile.columns if c.column in wanted]
            del profile.columns[:]
            profile.columns.extend(kept)
        return profile

    def read(self, request: rr.ReadDatasetVersionRequest, caller: str) -> Iterator[rr.ReadDatasetVersionResponse]:
        """Rows in partition order (event date, then commit order), filtered, from `start_row_offset`."""
        dataset_id, number = names.parse_version(request.name)
        dataset = self.store.get_dataset(dataset_id)
        self.guard(dataset, "read", caller)
        version, record = self.store.get_version(dataset_id, number)
        if request.expected_content_hash and request.expected_content_hash != version.content_hash:
            raise FailedPrecondition(
                f"{version.name} was rewritten (by an erasure) since you read it; its content hash is now {version.content_hash}",
                reason="CONTENT_HASH_CHANGED",
                metadata={"content_hash": version.content_hash},
            )
        with self.store.transaction() as session:
            schema = self.store.schema_of(session, dataset_id, record.schema_major, record.schema_minor)
        full = arrow_schema(schema)
        columns = list(request.columns) or full.names
        unknown = [c for c in columns if c not in full.names]
        if unknown:
            raise InvalidArgument(f"unknown column(s) {', '.join(unknown)} in {version.name}", reason="UNKNOWN_COLUMN")
        start = optional_datetime(request, "start_time")
        end = optional_datetime(request, "end_time")
        if (start or end) and not schema.event_time_column:
            raise InvalidArgument(f"{dataset.name} has no event-time column to filter on", reason="NO_EVENT_TIME_COLUMN")
        if request.max_rows_per_batch < 0 or request.start_row_offset < 0:
            raise InvalidArgument("max_rows_per_batch and start_row_offset must not be negative", reason="INVALID_READ_OPTIONS")
        batch_rows = request.max_rows_per_batch or DEFAULT_BATCH_ROWS
        skip = request.start_row_offset
        offset = 0
        for table in self.storage.scan(
            record.files, full, columns=columns, event_time_column=schema.event_time_column, start=start, end=end, batch_rows=batch_rows
        ):
            if skip >= table.num_rows:
                skip -= table.num_rows
                offset += table.num_rows
                continue
            if skip:
                table = table.slice(skip)
                offset += skip
                skip = 0
            for piece in _bounded(table):
                yield rr.ReadDatasetVersionResponse(
                    batch=common.ArrowBatch(arrow_ipc=ipc_bytes(piece), batch_id=f"{version.name}@{offset}", row_count=piece.num_rows),
                    row_offset=offset,
                )
                offset += piece.num_rows
