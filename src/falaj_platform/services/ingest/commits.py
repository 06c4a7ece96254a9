"""The commit path every source shares: read, validate, quarantine, write, publish, catalog.

`Committer.run` turns one input (a stream, a file, a query result, broker messages,
re-submitted rows) into one ingestion: rows are validated and cleansed; failures go to
quarantine with their reasons; accepted rows become an immutable dataset version.

A version is visible only when both halves are done: the Parquet files are written to
a staging folder, fsynced and renamed into place, and only then is the catalog row
naming them committed, in the same transaction as the ingestion, its quarantined rows,
its batch ids and the request log entry. A failure (or a kill) in between leaves files
no row names; `recover` deletes them at the next boot.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np
import pyarrow as pa
from google.protobuf.message import Message

from falaj.common.v1 import common_pb2 as common
from falaj.ingest.v1 import message_pb2 as m
from falaj_platform.runtime.errors import AlreadyExists, FailedPrecondition, FalajError, InvalidArgument
from falaj_platform.runtime.logs import get_logger
from falaj_platform.services.ingest import names
from falaj_platform.services.ingest.profiles import profile_table
from falaj_platform.services.ingest.schema import arrow_schema
from falaj_platform.services.ingest.storage import StagedCommit, VersionStorage
from falaj_platform.services.ingest.store import IngestStore, NewQuarantinedRow, NewVersion, VersionRecord
from falaj_platform.services.ingest.validation import InputShape, KeyIndex, QuarantineEntry, rows_as_json, validate

if TYPE_CHECKING:  # the session is opaque here: the store opens it, hooks write through it
    from sqlalchemy.orm import Session

ResponseT = TypeVar("ResponseT", bound=Message)
log = get_logger()


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_id() -> str:
    """Ids that sort by creation time (ms), then randomly."""
    return f"{time.time_ns() // 1_000_000:013d}{secrets.token_hex(4)}"


# -- inputs ------------------------------------------------------------------------------------


@dataclass
class Batch:
    """One unit of input: an Arrow batch, a file, a page of query results, broker messages."""

    batch_id: str
    table: pa.Table
    # Position of each row in its batch or file, when not simply 0..n-1 (CSV lines skipped as unparseable).
    row_numbers: np.ndarray | None = None
    # Where each row came from, when rows of one table arrived separately (broker messages).
    row_batch_ids: Sequence[str] | None = None
    # SHA-256 of the batch as received (stream batches), to tell a retry from a reused id.
    digest: str = ""


@dataclass
class ParseFailure:
    """A record that failed before validation (a bad CSV line, a broker message that is not JSON, a failed migration cast)."""

    batch_id: str
    row_index: int
    values: dict[str, Any]
    reason: str
    rule: int = m.VALIDATION_RULE_PARSE
    column: str = ""


@dataclass
class IngestInput:
    batches: list[Batch]
    shape: InputShape = InputShape()
    parse_failures: list[ParseFailure] = field(default_factory=list)
    # Stream semantics: skip batch ids an earlier commit of the dataset holds.
    skip_committed_batches: bool = False
    batches_received: int = 0
    batches_skipped_duplicate: int = 0
    # Columns read only to drive the import (a watermark column the schema does not declare).
    drop_columns: Sequence[str] = ()
    watermark_end: str = ""
    # Request-log digest of a client stream, known only once the stream is read.
    stream_digest: str = ""
    # Quarantined rows (resource names) this input re-submits, one per input row, for the version's lineage.
    resubmitted_rows: Sequence[str] = ()
    # Versions the data was derived from (a schema migration rewriting the latest version).
    derived_from: Sequence[str] = ()


@dataclass(frozen=True)
class Origin:
    kind: int
    description: str
    source: str = ""  # stored Source resource name
    watermark_start: str = ""


@dataclass(frozen=True)
class Options:
    write_mode: int = m.WRITE_MODE_APPEND
    validate_only: bool = False
    expected_schema_version: str = ""


@dataclass(frozen=True)
class Idempotency:
    """Request-log entry of the call: method, request id and digest of the request body."""

    method: str
    request_id: str
    digest: str = ""  # empty for streams until read; taken from IngestInput.stream_digest


class Hooks(Protocol):
    """Extra writes a source makes in the commit transaction."""

    def quarantine(
        self, session: Session, ingestion_id: str, schema_version: str, rows: list[NewQuarantinedRow], input_rows: list[int]
    ) -> None: ...

    def after_commit(self, session: Session, ingestion: m.Ingestion, rejected_input_rows: set[int]) -> None: ...


class CommitGuard(Protocol):
    def __call__(self, dataset: m.Dataset, action: str, caller: str) -> None: ...


@dataclass
class Prepared:
    """Validation done; what the commit transaction needs."""

    dataset: m.Dataset
    ingestion: m.Ingestion
    quarantined: list[NewQuarantinedRow]
    quarantined_input_rows: list[int]
    batch_ids: list[tuple[str, str]]
    parent: VersionRecord | None
    accepted: pa.Table
    resubmitted_rows: Sequence[str] = ()
    derived_from: Sequence[str] = ()


# -- the committer ----------------------------------------------------------------------------


class Committer:
    """Runs ingestions: one input, one validation report, at most one new version."""

    def __init__(
        self,
        store: IngestStore,
        storage: VersionStorage,
        guard: CommitGuard,
        *,
        import_workers: int = 2,
        profile_threads: int | None = None,
    ):
        self.store = store
        self.storage = storage
        self.guard = guard
        self.profile_threads = profile_threads or max(2, os.cpu_count() or 2)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._queue: ThreadPoolExecutor | None = None
        self._queue_size = import_workers
        self._queued: set[Future[Any]] = set()

    def close(self) -> None:
        if self._queue is not None:
            self._queue.shutdown(wait=True, cancel_futures=False)
            self._queue = None

    def dataset_lock(self, dataset_id: str) -> threading.Lock:
        """Commits to one dataset are serialised in this process (version numbers, parents, unique keys)."""
        with self._locks_guard:
            return self._locks.setdefault(dataset_id, threading.Lock())

    # -- entry points ---------------------------------------------------------------------------
    def run(
        self,
        dataset_id: str,
        read: Callable[[], IngestInput],
        origin: Origin,
        options: Options,
        respond: Callable[[m.Ingestion], ResponseT],
        response_type: type[ResponseT],
        caller: str,
        *,
        idempotency: Idempotency | None = None,
        hooks: Hooks | None = None,
        queued_ingestion: str = "",
    ) -> ResponseT:
        """One ingestion, start to finish; failures are recorded as FAILED ingestions and re-raised."""
        dataset = self.store.get_dataset(dataset_id)
        self.guard(dataset, "write", caller)
        if idempotency is not None and idempotency.digest:
            with self.store.transaction() as session:
                replay = self.store.replayed_stream(session, idempotency.method, idempotency.request_id, idempotency.digest, response_type)
            if replay is not None:
                return replay
        ingestion_id = queued_ingestion or new_id()
        base = self._base_ingestion(dataset_id, ingestion_id, origin, options, caller, idempotency)
        try:
            if options.expected_schema_version and options.expected_schema_version != dataset.schema_version:
                raise FailedPrecondition(
                    f"the stream was built for {options.expected_schema_version} but the dataset is at {dataset.schema_version}",
                    reason="SCHEMA_VERSION_MISMATCH",
                    metadata={"current_schema_version": dataset.schema_version},
                )
            if queued_ingestion:
                with self.store.transaction() as session:
                    self.store.finish_ingestion(
                        session,
                        ingestion_id,
                        state=m.INGESTION_STATE_RUNNING,
                        report=m.IngestReport(),
                        version_number=None,
                        schema_version="",
                        now=now_utc(),
                    )
            source_input = read()
            if idempotency is not None and not idempotency.digest and source_input.stream_digest:
                idempotency = Idempotency(idempotency.method, idempotency.request_id, source_input.stream_digest)
                with self.store.transaction() as session:
                    replay = self.store.replayed_stream(
                        session, idempotency.method, idempotency.request_id, idempotency.digest, response_type
                    )
                if replay is not None:
                    return replay
            with self.dataset_lock(dataset_id):
                return self._validate_and_commit(
                    dataset_id, source_input, base, options, respond, response_type, idempotency, hooks, queued_ingestion
                )
        except FalajError as error:
            if error.reason != "REQUEST_ID_REUSED":
                self._record_failure(dataset_id, base, str(error.message), queued_ingestion)
            raise
        except Exception as error:
            self._record_failure(dataset_id, base, "internal error; see the service log", queued_ingestion)
            log.error("ingestion failed", ingestion=base.name, exc_info=error)
            raise

    def submit(
        self,
        dataset_id: str,
        read: Callable[[], IngestInput],
        origin: Origin,
        options: Options,
        respond: Callable[[m.Ingestion], ResponseT],
        response_type: type[ResponseT],
        caller: str,
        *,
        idempotency: Idempotency | None = None,
    ) -> ResponseT:
        """Queue an ingestion (return_immediately) and answer with it QUEUED; GetIngestion follows it."""
        dataset = self.store.get_dataset(dataset_id)
        self.guard(dataset, "write", caller)
        ingestion_id = new_id()
        base = self._base_ingestion(dataset_id, ingestion_id, origin, options, caller, idempotency)
        base.state = m.INGESTION_STATE_QUEUED

        def write(session: Session) -> ResponseT:
            self.store.insert_ingestion(session, ingestion_id, dataset_id, base, now_utc())
            return respond(self.store.get_ingestion(dataset_id, ingestion_id, session))

        if idempotency is not None:
            with self.store.transaction() as session:
                replay = self.store.replayed_stream(session, idempotency.method, idempotency.request_id, idempotency.digest, response_type)
                if replay is not None:
                    return replay
                response = write(session)
                self.store.remember_stream(session, idempotency.method, idempotency.request_id, idempotency.digest, response)
        else:
            with self.store.transaction() as session:
                response = write(session)
        if self._queue is None:
            self._queue = ThreadPoolExecutor(max_workers=self._queue_size, thread_name_prefix="ingest-import")

        def background() -> None:
            try:
                self.run(dataset_id, read, origin, options, respond, response_type, caller, queued_ingestion=ingestion_id)
            except FalajError:
                pass  # recorded on the ingestion
            except Exception as error:
                log.error("queued ingestion failed", ingestion=base.name, exc_info=error)

        future = self._queue.submit(background)
        self._queued.add(future)
        future.add_done_callback(self._queued.discard)
        return response

    # -- internals ---------------------------------------------------------------------------------
    def _base_ingestion(
        self, dataset_id: str, ingestion_id: str, origin: Origin, options: Options, caller: str, idempotency: Idempotency | None
    ) -> m.Ingestion:
        ingestion = m.Ingestion(
            name=names.ingestion_name(dataset_id, ingestion_id),
            request_id=idempotency.request_id if idempotency else "",
            source_kind=origin.kind,  # type: ignore[arg-type]
            source=origin.source,
            source_description=origin.description,
            state=m.INGESTION_STATE_RUNNING,
            write_mode=options.write_mode,  # type: ignore[arg-type]
            validate_only=options.validate_only,
            watermark_start=origin.watermark_start,
            create_stamp=common.AuditStamp(actor=caller),
        )
        ingestion.create_stamp.time.FromDatetime(now_utc())
        return ingestion

    def _record_failure(self, dataset_id: str, base: m.Ingestion, message: str, queued: bool | str) -> None:
        ingestion_id = base.name.rsplit("/", 1)[-1]
        try:
            with self.store.transaction() as session:
                if not queued:
                    failed = m.Ingestion()
                    failed.CopyFrom(base)
                    failed.state = m.INGESTION_STATE_FAILED
                    failed.error_message = message
                    self.store.insert_ingestion(session, ingestion_id, dataset_id, failed, now_utc())
                self.store.finish_ingestion(
                    session,
                    ingestion_id,
                    state=m.INGESTION_STATE_FAILED,
                    report=base.report,
                    version_number=None,
                    schema_version="",
                    error_message=message,
                    now=now_utc(),
                )
        except FalajError as error:  # the dataset may be gone; the caller still gets the first error
            log.warning("could not record failed ingestion", ingestion=base.name, error=str(error))

    def _existing_keys(self, parent: VersionRecord | None, schema: m.Schema) -> KeyIndex | None:
        keys = list(schema.unique_key_columns)
        if not keys or parent is None or not parent.files:
            return None
        table = self.storage.read_table(parent.files, arrow_schema(schema), columns=keys)
        return KeyIndex.of(table, names.version_name(parent.dataset, parent.number))

    def _prepare(
        self, dataset_id: str, source_input: IngestInput, base: m.Ingestion, options: Options
    ) -> tuple[Prepared | None, m.Ingestion | None]:
        """Validate under the dataset lock. Returns (prepared, earlier ingestion when the whole stream was a retry)."""
        batches = source_input.batches
        report_extra = m.IngestReport(
            batches_received=source_input.batches_received or len(batches), batches_skipped_duplicate=source_input.batches_skipped_duplicate
        )
        with self.store.transaction() as session:
            dataset = self.store.get_dataset(dataset_id, session)
            if source_input.skip_committed_batches and batches:
                committed = self.store.committed_batches(session, dataset_id, [b.batch_id for b in batches])
                reused = [b.batch_id for b in batches if b.batch_id in committed and committed[b.batch_id][1] != b.digest]
                if reused:
                    raise FailedPrecondition(
                        f"batch id(s) {', '.join(reused[:5])} were already committed to {dataset.name} with other content; "
                        "batch ids identify a batch for retries and must not be reused",
                        reason="BATCH_ID_REUSED",
                        metadata={"batch_id": reused[0]},
                    )
                if committed:
                    earlier = {ingestion for ingestion, _ in committed.values()}
                    if len(committed) == len(batches) and len(earlier) == 1 and not source_input.parse_failures:
                        return None, self.store.get_ingestion(dataset_id, earlier.pop(), session)
                    batches = [b for b in batches if b.batch_id not in committed]
                    report_extra.batches_skipped_duplicate += len(committed)
            parent = self.store.version_record(session, dataset_id, None)
        schema = dataset.schema
        write_mode = options.write_mode or m.WRITE_MODE_APPEND
        current_major = int(dataset.schema_version.rsplit("/", 1)[-1].split(".")[0])
        if write_mode == m.WRITE_MODE_APPEND and parent is not None and parent.schema_major != current_major:
            raise FailedPrecondition(
                f"{names.version_name(dataset_id, parent.number)} is under an earlier major schema; append cannot mix major versions. "
                "Write with WRITE_MODE_OVERWRITE, or evolve with a migration that rewrites the latest version",
                reason="SCHEMA_MAJOR_BOUNDARY",
            )
        table = _concat([b.table for b in batches]) if batches else arrow_schema(schema).empty_table()
        offsets = np.cumsum([0] + [b.table.num_rows for b in batches])
        declared = {c.name for c in schema.columns}
        if source_input.drop_columns:
            table = table.drop_columns([c for c in source_input.drop_columns if c in table.column_names and c not in declared])
        existing = self._existing_keys(parent, schema) if write_mode == m.WRITE_MODE_APPEND else None
        outcome = validate(table, schema, dataset.cleansing, shape=source_input.shape, existing_keys=existing)
        report = outcome.report
        report.MergeFrom(report_extra)
        quarantined = self._quarantine_rows(outcome.quarantined, outcome.raw, batches, offsets, schema)
        input_rows = [entry.row for entry in outcome.quarantined]
        if source_input.parse_failures:
            parse_rows = self._parse_failure_rows(source_input.parse_failures, schema)
            quarantined.extend(parse_rows)
            input_rows.extend([-1] * len(parse_rows))
            report.rows_in += len(parse_rows)
            report.rows_quarantined += len(parse_rows)
            for failure in source_input.parse_failures:
                _add_reason(report, failure.rule, failure.column, 1)
        ingestion = m.Ingestion()
        ingestion.CopyFrom(base)
        ingestion.report.CopyFrom(report)
        ingestion.schema_version = dataset.schema_version
        ingestion.write_mode = write_mode  # type: ignore[assignment]
        ingestion.watermark_end = source_input.watermark_end
        batch_ids = [(b.batch_id, b.digest) for b in batches] if source_input.skip_committed_batches else []
        failed_rows = set(input_rows)
        resubmitted = [name for i, name in enumerate(source_input.resubmitted_rows) if i not in failed_rows]
        return Prepared(
            dataset, ingestion, quarantined, input_rows, batch_ids, parent, outcome.accepted, resubmitted, source_input.derived_from
        ), None

    def _quarantine_rows(
        self, entries: list[QuarantineEntry], raw: pa.Table, batches: list[Batch], offsets: np.ndarray, schema: m.Schema
    ) -> list[NewQuarantinedRow]:
        if not entries:
            return []
        rows = [entry.row for entry in entries]
        values = rows_as_json(raw, rows)
        subjects: list[Any] = [None] * len(rows)
        if schema.data_subject_column and schema.data_subject_column in raw.column_names:
            subjects = raw.column(schema.data_subject_column).take(pa.array(rows)).to_pylist()
        base = new_id()
        found: list[NewQuarantinedRow] = []
        for i, (entry, value_json, subject) in enumerate(zip(entries, values, subjects, strict=True)):
            batch_index = int(np.searchsorted(offsets, entry.row, side="right") - 1)
            batch = batches[batch_index]
            position = entry.row - int(offsets[batch_index])
            row_index = int(batch.row_numbers[position]) if batch.row_numbers is not None else position
            batch_id = batch.batch_id
            if batch.row_batch_ids is not None:
                batch_id, row_index = batch.row_batch_ids[position], 0
            found.append(
                NewQuarantinedRow(
                    id=f"{base}{i:09d}",
                    batch_id=batch_id,
                    row_index=row_index,
                    values_json=value_json,
                    violations=entry.violations,
                    subject_id=None if subject is None else str(subject).strip(),
                )
            )
        return found

    def _parse_failure_rows(self, failures: list[ParseFailure], schema: m.Schema) -> list[NewQuarantinedRow]:

        base = new_id()
        rows = []
        for i, failure in enumerate(failures):
            subject = failure.values.get(schema.data_subject_column) if schema.data_subject_column else None
            rows.append(
                NewQuarantinedRow(
                    id=f"{base}p{i:08d}",
                    batch_id=failure.batch_id,
                    row_index=failure.row_index,
                    values_json=json.dumps(failure.values),
                    violations=[m.RowViolation(rule=failure.rule, column=failure.column, reason=failure.reason)],  # type: ignore[arg-type]
                    subject_id=None if subject is None else str(subject),
                )
            )
        return rows

    def _validate_and_commit(
        self,
        dataset_id: str,
        source_input: IngestInput,
        base: m.Ingestion,
        options: Options,
        respond: Callable[[m.Ingestion], ResponseT],
        response_type: type[ResponseT],
        idempotency: Idempotency | None,
        hooks: Hooks | None,
        queued_ingestion: str,
    ) -> ResponseT:
        prepared, earlier = self._prepare(dataset_id, source_input, base, options)
        if earlier is not None:
            return respond(earlier)
        assert prepared is not None
        ingestion_id = base.name.rsplit("/", 1)[-1]
        ingestion = prepared.ingestion
        if options.validate_only:
            ingestion.state = m.INGESTION_STATE_SUCCEEDED
            return self._commit_catalog(
                dataset_id,
                ingestion_id,
                prepared,
                None,
                None,
                respond,
                response_type,
                idempotency,
                hooks,
                queued_ingestion,
                record_quarantine=False,
            )
        write_mode = ingestion.write_mode
        accepted = prepared.accepted
        if accepted.num_rows == 0 and write_mode == m.WRITE_MODE_APPEND:
            ingestion.state = m.INGESTION_STATE_SUCCEEDED
            return self._commit_catalog(
                dataset_id, ingestion_id, prepared, None, None, respond, response_type, idempotency, hooks, queued_ingestion
            )
        staged, profile = self._stage(dataset_id, prepared)
        try:
            self.storage.publish(staged)
            ingestion.state = m.INGESTION_STATE_SUCCEEDED
            return self._commit_catalog(
                dataset_id, ingestion_id, prepared, staged, profile, respond, response_type, idempotency, hooks, queued_ingestion
            )
        except BaseException:
            self.storage.discard(staged)
            raise

    def _stage(self, dataset_id: str, prepared: Prepared) -> tuple[StagedCommit, m.DatasetProfile]:
        """Write the files and profile the new version at once (both release the GIL)."""
        schema = prepared.dataset.schema
        accepted = prepared.accepted
        parent = prepared.parent if prepared.ingestion.write_mode == m.WRITE_MODE_APPEND else None

        def profile() -> m.DatasetProfile:
            whole = accepted
            if parent is not None and parent.files:
                whole = pa.concat_tables([self.storage.read_table(parent.files, arrow_schema(schema)), accepted])
            return profile_table(whole, schema, threads=self.profile_threads)

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingest-profile") as pool:
            profiling = pool.submit(profile)
            staged = self.storage.stage(dataset_id, accepted, schema.event_time_column)
            try:
                return staged, profiling.result()
            except BaseException:
                self.storage.discard(staged)
                raise

    def _commit_catalog(
        self,
        dataset_id: str,
        ingestion_id: str,
        prepared: Prepared,
        staged: StagedCommit | None,
        profile: m.DatasetProfile | None,
        respond: Callable[[m.Ingestion], ResponseT],
        response_type: type[ResponseT],
        idempotency: Idempotency | None,
        hooks: Hooks | None,
        queued_ingestion: str,
        *,
        record_quarantine: bool = True,
    ) -> ResponseT:
        """The one transaction that makes the ingestion (and its version) visible."""
        ingestion = prepared.ingestion
        now = now_utc()
        schema_version = ingestion.schema_version.rsplit("/", 1)[-1]
        try:
            with self.store.transaction() as session:
                if idempotency is not None and idempotency.digest:
                    replay = self.store.replayed_stream(
                        session, idempotency.method, idempotency.request_id, idempotency.digest, response_type
                    )
                    if replay is not None:
                        raise _Replayed(replay)
                if queued_ingestion:
                    self.store.finish_ingestion(
                        session,
                        ingestion_id,
                        state=m.INGESTION_STATE_RUNNING,
                        report=ingestion.report,
                        version_number=None,
                        schema_version="",
                        now=now,
                    )
                else:
                    running = m.Ingestion()
                    running.CopyFrom(ingestion)
                    self.store.insert_ingestion(session, ingestion_id, dataset_id, running, now)
                version_number: int | None = None
                if staged is not None and profile is not None:
                    version_number = self._insert_version(session, dataset_id, ingestion_id, prepared, staged, profile, now)
                    ingestion.dataset_version = names.version_name(dataset_id, version_number)
                if record_quarantine and prepared.quarantined:
                    if hooks is not None:
                        hooks.quarantine(session, ingestion_id, schema_version, prepared.quarantined, prepared.quarantined_input_rows)
                    else:
                        self.store.insert_quarantined(session, dataset_id, ingestion_id, schema_version, prepared.quarantined, now)
                if staged is not None:
                    self.store.insert_batches(session, dataset_id, ingestion_id, prepared.batch_ids)
                self.store.finish_ingestion(
                    session,
                    ingestion_id,
                    state=ingestion.state,
                    report=ingestion.report,
                    version_number=version_number,
                    schema_version=schema_version,
                    watermark_end=ingestion.watermark_end,
                    now=now,
                )
                ingestion.end_time.FromDatetime(now)
                if hooks is not None and not ingestion.validate_only:
                    hooks.after_commit(session, ingestion, {r for r in prepared.quarantined_input_rows if r >= 0})
                stored = self.store.get_ingestion(dataset_id, ingestion_id, session)
                response = respond(stored)
                if idempotency is not None and idempotency.digest:
                    self.store.remember_stream(session, idempotency.method, idempotency.request_id, idempotency.digest, response)
                return response
        except _Replayed as replayed:
            if staged is not None:
                self.storage.discard(staged)
            return replayed.response  # type: ignore[return-value]
        except AlreadyExists:
            if idempotency is not None and idempotency.digest:
                # A concurrent retry of the same request committed first: answer with its result.
                with self.store.transaction() as session:
                    replay = self.store.replayed_stream(
                        session, idempotency.method, idempotency.request_id, idempotency.digest, response_type
                    )
                if replay is not None:
                    if staged is not None:
                        self.storage.discard(staged)
                    return replay
            raise

    def _insert_version(
        self,
        session: Session,
        dataset_id: str,
        ingestion_id: str,
        prepared: Prepared,
        staged: StagedCommit,
        profile: m.DatasetProfile,
        now: dt.datetime,
    ) -> int:
        ingestion = prepared.ingestion
        parent = prepared.parent
        write_mode = ingestion.write_mode
        files = list(parent.files) if parent is not None and write_mode == m.WRITE_MODE_APPEND else []
        files.extend(staged.files)
        number = (parent.number if parent is not None else 0) + 1
        lineage = m.DatasetVersionLineage(
            parent_version=names.version_name(dataset_id, parent.number) if parent is not None else "", source=ingestion.source
        )
        lineage.resubmitted_rows.extend(prepared.resubmitted_rows)
        lineage.derived_from_versions.extend(prepared.derived_from)
        profile.dataset_version = names.version_name(dataset_id, number)
        profile.compute_time.FromDatetime(now)
        schema_version = ingestion.schema_version.rsplit("/", 1)[-1]
        major, minor = (int(x) for x in schema_version.split("."))
        self.store.insert_version(
            session,
            NewVersion(
                dataset=dataset_id,
                number=number,
                schema_major=major,
                schema_minor=minor,
                files=files,
                added_rows=prepared.accepted.num_rows,
                commit_dir=staged.relative_dir,
                quarantined_count=len(prepared.quarantined),
                ingestion=ingestion_id,
                source_kind=ingestion.source_kind,
                source_description=ingestion.source_description,
                source=ingestion.source,
                write_mode=write_mode,
                lineage=lineage,
                profile=profile,
                actor=ingestion.create_stamp.actor,
                created_at=now,
            ),
        )
        return number

    # -- boot ------------------------------------------------------------------------------------------
    def recover(self) -> list[str]:
        """At boot: fail ingestions a dead process left running and delete files no version names."""
        failed = self.store.fail_unfinished_ingestions(
            "the service stopped before this ingestion finished; nothing was committed", now_utc()
        )
        removed = self.storage.remove_orphans(self.store.referenced_paths())
        if failed or removed:
            log.warning("recovered after an unclean stop", failed_ingestions=failed, removed_files=len(removed))
        return removed


class _Replayed(Exception):
    def __init__(self, response: Message):
        super().__init__("replayed")
        self.response = response


def _concat(tables: list[pa.Table]) -> pa.Table:
    if not tables:
        return pa.table({})
    if len(tables) == 1:
        return tables[0]
    first = tables[0].schema
    if all(t.schema.equals(first) for t in tables[1:]):
        return pa.concat_tables(tables)
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        raise InvalidArgument(f"schema mismatch: batches do not share compatible columns: {error}", reason="SCHEMA_MISMATCH") from None


def _add_reason(report: m.IngestReport, rule: int, column: str, count: int) -> None:
    for entry in report.quarantined_by_reason:
        if entry.rule == rule and entry.column == column:
            entry.row_count += count
            return
    report.quarantined_by_reason.add(rule=rule, column=column, row_count=count)


def stream_digest(header: Message) -> Any:
    """Running SHA-256 of a client stream: the header (less its request id) then each batch."""
    copy = type(header)()
    copy.CopyFrom(header)
    copy.ClearField("request_id")
    digest = hashlib.sha256(copy.SerializeToString(deterministic=True))
    return digest
