"""Imports and stored sources: ad-hoc file and SQL imports, and Sources that run on their own.

A stored Source is a file location or SQL query run on demand (RunSource) or on a cron
schedule, or a NATS JetStream subscription consumed continuously. Scheduled runs and
subscriptions live in `SourceWorker`, one background thread with an asyncio loop that
starts only when some source needs it and stops with the service.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import threading
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import sqlalchemy as sa
from google.protobuf import field_mask_pb2
from sqlalchemy.orm import Session

from falaj.ingest.v1 import message_pb2 as m
from falaj.ingest.v1 import request_response_pb2 as rr
from falaj_platform.runtime.errors import Aborted, FailedPrecondition, FalajError, InvalidArgument, Unavailable
from falaj_platform.runtime.idempotency import request_digest
from falaj_platform.runtime.logs import get_logger
from falaj_platform.services.ingest import access, names, nats_source, readers
from falaj_platform.services.ingest.commits import Committer, Idempotency, IngestInput, Options, Origin, now_utc
from falaj_platform.services.ingest.config import IngestConfig
from falaj_platform.services.ingest.residency import ResidencyGuard
from falaj_platform.services.ingest.store import IngestStore, NewQuarantinedRow

log = get_logger()

SERVICE = "/falaj.ingest.v1.IngestService/"
MAX_CONSECUTIVE_FAILURES = 5

T = TypeVar("T")


def _croniter() -> Any:
    """croniter, needed only by scheduled sources."""
    try:
        from croniter import croniter
    except ImportError:
        raise FailedPrecondition(
            "scheduled sources need the croniter package, which this service lacks", reason="SCHEDULING_UNAVAILABLE"
        ) from None
    return croniter


def next_run(schedule: str, after: dt.datetime) -> dt.datetime | None:
    """Next time a cron schedule (UTC; a sixth field is seconds) fires after `after`; None for no schedule."""
    if not schedule:
        return None
    nxt: dt.datetime = _croniter()(schedule, after.astimezone(dt.UTC)).get_next(dt.datetime)
    return nxt if nxt.tzinfo else nxt.replace(tzinfo=dt.UTC)


def check_schedule(schedule: str) -> None:
    if not schedule:
        return
    if not _croniter().is_valid(schedule):
        raise InvalidArgument(f"schedule {schedule!r} is not a valid cron expression", reason="INVALID_SCHEDULE")


class _SourceHooks:
    """Writes a stored source's progress in the transaction of its commit."""

    def __init__(
        self,
        store: IngestStore,
        dataset_id: str,
        source_id: str,
        update: Callable[[m.SourceStatus, m.Ingestion], None],
        seen: list[str] | None = None,
    ):
        self.store = store
        self.dataset_id = dataset_id
        self.source_id = source_id
        self.update = update
        self.seen = seen

    def quarantine(
        self, session: Session, ingestion_id: str, schema_version: str, rows: list[NewQuarantinedRow], input_rows: list[int]
    ) -> None:
        self.store.insert_quarantined(session, self.dataset_id, ingestion_id, schema_version, rows, now_utc())

    def after_commit(self, session: Session, ingestion: m.Ingestion, rejected_input_rows: set[int]) -> None:
        if self.seen:
            self.store.insert_seen_keys(session, self.dataset_id, self.source_id, self.seen)
        self.store.update_source_status(session, self.dataset_id, self.source_id, lambda status: self.update(status, ingestion))


class SourceManager:
    """Ad-hoc imports and the lifecycle of stored sources."""

    def __init__(self, store: IngestStore, committer: Committer, guard: ResidencyGuard, config: IngestConfig):
        self.store = store
        self.committer = committer
        self.guard = guard
        self.config = config
        self.worker = SourceWorker(self, config.worker_poll_seconds)

    def start(self) -> None:
        """Start the background worker when the catalog holds sources that need it."""
        if self.store.has_background_sources():
            self.worker.ensure_running()

    def close(self) -> None:
        self.worker.close()

    # -- ad-hoc imports ----------------------------------------------------------------------------
    def _storage_options(self, profile: str) -> Mapping[str, Any]:
        if not profile:
            return {}
        if profile not in self.config.storage_profiles:
            raise InvalidArgument(f"storage profile {profile!r} is not configured on the service", reason="UNKNOWN_STORAGE_PROFILE")
        return self.config.storage_profiles[profile]

    def _schema(self, dataset_id: str) -> m.Schema:
        return self.store.get_dataset(dataset_id).schema

    def _audited(self, work: Callable[[], T], resource: str, action: str, caller: str) -> T:
        """`work()`; a source refused as the platform's own or not allowed is a denial in the audit log."""
        return access.audited(self.guard.audit, work, resource=resource, action=action, caller=caller)

    def _read_files(self, spec: m.FileImportSpec, dataset_id: str, storage_options: Mapping[str, Any]) -> IngestInput:
        return readers.read_files(
            spec, self._schema(dataset_id), storage_options, self.config.protected_roots, self.config.allowed_url_prefixes
        )

    def import_file(self, request: rr.ImportFileRequest, caller: str) -> rr.ImportFileResponse:
        dataset_id = names.parse_dataset(request.dataset, "dataset")
        spec = request.file
        options = self._storage_options(spec.storage_profile)
        if not spec.uri:
            raise InvalidArgument("file.uri is required", reason="FILE_URI_REQUIRED")
        resource = names.dataset_name(dataset_id)
        self._audited(lambda: access.check_file_uri(spec.uri, self.config.allowed_url_prefixes), resource, "import_file", caller)
        run = self.committer.submit if request.return_immediately else self.committer.run
        return run(
            dataset_id,
            lambda: self._audited(lambda: self._read_files(spec, dataset_id, options), resource, "import_file", caller),
            Origin(m.SOURCE_KIND_FILE, readers.describe_file(spec)),
            Options(request.write_mode or m.WRITE_MODE_APPEND, request.validate_only),
            lambda ingestion: rr.ImportFileResponse(ingestion=ingestion),
            rr.ImportFileResponse,
            caller,
            idempotency=Idempotency(SERVICE + "ImportFile", request.request_id, request_digest(request)) if request.request_id else None,
        )

    def import_sql(self, request: rr.ImportSqlRequest, caller: str) -> rr.ImportSqlResponse:
        dataset_id = names.parse_dataset(request.dataset, "dataset")
        spec = request.sql
        readers.check_sql_spec(spec)
        url = self._audited(lambda: self._sql_url(spec, stored=False), names.dataset_name(dataset_id), "import_sql", caller)
        start = spec.start_watermark if spec.mode == m.SQL_IMPORT_MODE_INCREMENTAL else ""
        run = self.committer.submit if request.return_immediately else self.committer.run
        return run(
            dataset_id,
            lambda: readers.read_sql(url, spec, start),
            Origin(m.SOURCE_KIND_SQL, readers.describe_sql(url, spec), watermark_start=start),
            Options(request.write_mode or m.WRITE_MODE_APPEND, request.validate_only),
            lambda ingestion: rr.ImportSqlResponse(ingestion=ingestion),
            rr.ImportSqlResponse,
            caller,
            idempotency=Idempotency(SERVICE + "ImportSql", request.request_id, request_digest(request)) if request.request_id else None,
        )

    def _sql_url(self, spec: m.SqlImportSpec, *, stored: bool) -> sa.engine.URL:
        """The source's URL, refused where it is the platform's own database or a host not allowed."""
        url = self._configured_sql_url(spec, stored=stored)
        access.check_sql_url(
            url,
            protected_roots=self.config.protected_roots,
            platform_databases=self.config.platform_databases,
            allowed_hosts=self.config.sql_allowed_hosts,
        )
        return url

    def _configured_sql_url(self, spec: m.SqlImportSpec, *, stored: bool) -> sa.engine.URL:
        connection = spec.WhichOneof("connection")
        if connection == "sqlalchemy_url":
            if stored:
                raise InvalidArgument(
                    "stored sources must name a connection_profile; a URL with credentials is never stored",
                    reason="CONNECTION_PROFILE_REQUIRED",
                )
            return readers.sqlalchemy_url(spec.sqlalchemy_url)
        if connection == "connection_profile":
            url = self.config.connection_profiles.get(spec.connection_profile)
            if url is None:
                raise InvalidArgument(
                    f"connection profile {spec.connection_profile!r} is not configured on the service", reason="UNKNOWN_CONNECTION_PROFILE"
                )
            return readers.sqlalchemy_url(url)
        raise InvalidArgument("sql needs sqlalchemy_url or connection_profile", reason="SQL_CONNECTION_REQUIRED")

    # -- stored sources --------------------------------------------------------------------------------
    def _check_source(self, source: m.Source) -> str:
        kind = source.WhichOneof("spec")
        if kind is None:
            raise InvalidArgument("source needs a file, sql or nats spec", reason="SOURCE_SPEC_REQUIRED")
        if kind == "file":
            if not source.file.uri:
                raise InvalidArgument("file.uri is required", reason="FILE_URI_REQUIRED")
            self._storage_options(source.file.storage_profile)
            access.check_file_uri(source.file.uri, self.config.allowed_url_prefixes)
        elif kind == "sql":
            readers.check_sql_spec(source.sql)
            self._sql_url(source.sql, stored=True)
        else:
            nats_source.check_spec(source.nats)
        if kind != "nats":
            check_schedule(source.schedule)
        return kind

    def _nats_url(self, spec: m.NatsSubscriptionSpec) -> tuple[str, Mapping[str, Any]]:
        credentials: Mapping[str, Any] = {}
        if spec.credentials_profile:
            if spec.credentials_profile not in self.config.nats_credentials_profiles:
                raise InvalidArgument(
                    f"NATS credentials profile {spec.credentials_profile!r} is not configured", reason="UNKNOWN_CREDENTIALS_PROFILE"
                )
            credentials = self.config.nats_credentials_profiles[spec.credentials_profile]
        return spec.server_url or self.config.nats_url, credentials

    def _probe(self, kind: str, source: m.Source) -> None:
        """validate_only: the connection is reachable and the stream or file exists."""
        if kind == "file":
            readers.open_filesystem(
                source.file.uri,
                self._storage_options(source.file.storage_profile),
                self.config.protected_roots,
                self.config.allowed_url_prefixes,
            )
        elif kind == "sql":
            url = self._sql_url(source.sql, stored=True)
            engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
            try:
                with engine.connect() as connection:
                    connection.execute(sa.text("SELECT 1"))
            except sa.exc.OperationalError as error:
                reason = str(error.orig).strip().splitlines()[0] if error.orig else "connection failed"
                raise Unavailable(f"cannot reach {readers.masked(url)}: {reason}", reason="SQL_SOURCE_UNREACHABLE") from None
            finally:
                engine.dispose()
        else:
            nats_url, credentials = self._nats_url(source.nats)
            asyncio.run(nats_source.check_stream(nats_url, credentials, source.nats.stream))

    def create(self, request: rr.CreateSourceRequest, caller: str) -> rr.CreateSourceResponse:
        dataset_id = names.parse_dataset(request.parent, "parent")
        source_id = names.check_id(request.source_id, "source_id")
        dataset = self.store.get_dataset(dataset_id)
        self.guard(dataset, "create_source", caller)
        source = m.Source()
        source.CopyFrom(request.source)
        kind = self._audited(lambda: self._check_source(source), dataset.name, "create_source", caller)
        source.state = m.SOURCE_STATE_ACTIVE
        source.ClearField("status")
        if request.validate_only:
            self._audited(lambda: self._probe(kind, source), dataset.name, "create_source", caller)
            source.name = names.source_name(dataset_id, source_id)
            return rr.CreateSourceResponse(source=source)

        def write(session: Session) -> rr.CreateSourceResponse:
            created = self.store.insert_source(session, dataset_id, source_id, source, caller, now_utc())
            if kind != "nats" and source.schedule:
                self.store.update_source_status(
                    session, dataset_id, source_id, lambda status: None, next_run_at=next_run(source.schedule, now_utc())
                )
                created = self.store.get_source(dataset_id, source_id, session)
            return rr.CreateSourceResponse(source=created)

        response = self.store.idempotent(SERVICE + "CreateSource", request, rr.CreateSourceResponse, write)
        if kind == "nats" or source.schedule:
            self.worker.ensure_running()
            self.worker.wake()
        return response

    def get(self, name: str) -> m.Source:
        dataset_id, source_id = names.parse_child(name, "sources")
        return self.store.get_source(dataset_id, source_id)

    def list_sources(self, parent: str, state: int) -> list[m.Source]:
        dataset_id = None if parent == "datasets/-" else names.parse_dataset(parent, "parent")
        return self.store.list_sources(dataset_id, state)

    def update(self, request: rr.UpdateSourceRequest, caller: str) -> rr.UpdateSourceResponse:
        dataset_id, source_id = names.parse_child(request.source.name, "sources")
        current = self.store.get_source(dataset_id, source_id)
        if request.source.etag and request.source.etag != current.etag:
            raise Aborted(f"source {current.name} changed since it was read (etag mismatch)", reason="ETAG_MISMATCH")
        kind = current.WhichOneof("spec") or ""
        incoming_kind = request.source.WhichOneof("spec")
        paths = list(request.update_mask.paths) or ["description", "schedule", "write_mode", kind]
        allowed_roots = {"description", "schedule", "write_mode", kind}
        for path in paths:
            root = path.split(".", 1)[0]
            if root in ("file", "sql", "nats") and root != kind:
                raise InvalidArgument(f"the kind of {current.name} is {kind}; it cannot become {root}", reason="SOURCE_KIND_IMMUTABLE")
            if root not in allowed_roots:
                raise InvalidArgument(
                    f"field {path!r} cannot be updated (mutable: description, schedule, write_mode, {kind}.*)", reason="FIELD_NOT_MUTABLE"
                )
        if incoming_kind not in (None, kind):
            raise InvalidArgument(f"the kind of {current.name} is {kind}; it cannot become {incoming_kind}", reason="SOURCE_KIND_IMMUTABLE")
        updated = m.Source()
        updated.CopyFrom(current)
        mask = field_mask_pb2.FieldMask(paths=paths)
        mask.MergeMessage(request.source, updated, replace_message_field=True, replace_repeated_field=True)
        self._audited(lambda: self._check_source(updated), names.dataset_name(dataset_id), "update_source", caller)

        def write(session: Session) -> rr.UpdateSourceResponse:
            source = self.store.update_source(session, dataset_id, source_id, updated, caller, now_utc())
            if kind != "nats":
                upcoming = next_run(updated.schedule, now_utc()) if updated.state == m.SOURCE_STATE_ACTIVE else None
                self.store.update_source_status(session, dataset_id, source_id, lambda status: None, next_run_at=upcoming)
                source = self.store.get_source(dataset_id, source_id, session)
            return rr.UpdateSourceResponse(source=source)

        response = self.store.idempotent(SERVICE + "UpdateSource", request, rr.UpdateSourceResponse, write)
        if kind == "nats":
            self.worker.stop_consumer((dataset_id, source_id))  # restarted with the new settings
        if kind == "nats" or updated.schedule:
            self.worker.ensure_running()
            self.worker.wake()
        return response

    def delete(self, request: rr.DeleteSourceRequest, caller: str) -> rr.DeleteSourceResponse:
        dataset_id, source_id = names.parse_child(request.name, "sources")
        source = self.store.get_source(dataset_id, source_id)
        if request.etag and request.etag != source.etag:
            raise Aborted(f"source {source.name} changed since it was read (etag mismatch)", reason="ETAG_MISMATCH")
        if source.WhichOneof("spec") == "nats":
            self.worker.stop_consumer((dataset_id, source_id))
            url, credentials = self._nats_url(source.nats)
            try:
                asyncio.run(
                    nats_source.delete_consumer(
                        url, credentials, source.nats.stream, nats_source.durable_name(source.nats, dataset_id, source_id)
                    )
                )
            except Unavailable as error:
                log.warning("could not remove the NATS consumer of a deleted source", source=source.name, error=error.message)

        def write(session: Session) -> rr.DeleteSourceResponse:
            self.store.delete_source(session, dataset_id, source_id, request.etag)
            return rr.DeleteSourceResponse(name=source.name)

        return self.store.idempotent(SERVICE + "DeleteSource", request, rr.DeleteSourceResponse, write)

    def pause(self, request: rr.PauseSourceRequest, caller: str) -> rr.PauseSourceResponse:
        dataset_id, source_id = names.parse_child(request.name, "sources")
        method = SERVICE + "PauseSource"
        replay = self.store.replay(method, request, rr.PauseSourceResponse)
        if replay is not None:
            return replay
        self.store.get_source(dataset_id, source_id)
        with self.store.transaction() as session:
            self.store.set_source_state(session, dataset_id, source_id, m.SOURCE_STATE_PAUSED, caller, now_utc())
            self.store.update_source_status(session, dataset_id, source_id, lambda status: None, next_run_at=None)
        # PAUSED is stored first so the worker does not restart it; stopping commits what it holds.
        self.worker.stop_consumer((dataset_id, source_id))
        response = rr.PauseSourceResponse(source=self.store.get_source(dataset_id, source_id))
        self.store.remember_response(method, request, response)
        return response

    def resume(self, request: rr.ResumeSourceRequest, caller: str) -> rr.ResumeSourceResponse:
        dataset_id, source_id = names.parse_child(request.name, "sources")
        source = self.store.get_source(dataset_id, source_id)
        self.guard(self.store.get_dataset(dataset_id), "resume_source", caller)

        def clear(status: m.SourceStatus) -> None:
            status.last_error = ""

        def write(session: Session) -> rr.ResumeSourceResponse:
            self.store.set_source_state(session, dataset_id, source_id, m.SOURCE_STATE_ACTIVE, caller, now_utc())
            upcoming = next_run(source.schedule, now_utc()) if source.WhichOneof("spec") != "nats" else None
            self.store.update_source_status(session, dataset_id, source_id, clear, next_run_at=upcoming)
            return rr.ResumeSourceResponse(source=self.store.get_source(dataset_id, source_id, session))

        response = self.store.idempotent(SERVICE + "ResumeSource", request, rr.ResumeSourceResponse, write)
        if source.WhichOneof("spec") == "nats" or source.schedule:
            self.worker.ensure_running()
            self.worker.wake()
        return response

    def run(self, request: rr.RunSourceRequest, caller: str) -> rr.RunSourceResponse:
        dataset_id, source_id = names.parse_child(request.name, "sources")
        source = self.store.get_source(dataset_id, source_id)
        if source.WhichOneof("spec") == "nats":
            raise FailedPrecondition(
                f"{source.name} is a NATS subscription; it runs continuously (pause or resume it instead)",
                reason="SOURCE_RUNS_CONTINUOUSLY",
            )
        idempotency = Idempotency(SERVICE + "RunSource", request.request_id, request_digest(request)) if request.request_id else None
        return self.run_stored(
            dataset_id, source_id, caller, full_refresh=request.full_refresh, idempotency=idempotency, queue=request.return_immediately
        )

    def run_stored(
        self,
        dataset_id: str,
        source_id: str,
        caller: str,
        *,
        full_refresh: bool = False,
        idempotency: Idempotency | None = None,
        queue: bool = False,
    ) -> rr.RunSourceResponse:
        """One run of a file or SQL source; its progress (watermark, last error) is saved with the commit."""
        source = self.store.get_source(dataset_id, source_id)
        kind = source.WhichOneof("spec")
        options = Options(source.write_mode or m.WRITE_MODE_APPEND)
        read: Callable[[], IngestInput]
        if kind == "file":
            spec_file = source.file
            storage_options = self._storage_options(spec_file.storage_profile)
            read = lambda: self._audited(  # noqa: E731
                lambda: self._read_files(spec_file, dataset_id, storage_options), source.name, "run_source", caller
            )
            origin = Origin(m.SOURCE_KIND_FILE, readers.describe_file(spec_file), source=source.name)
        else:
            spec_sql = source.sql
            url = self._audited(lambda: self._sql_url(spec_sql, stored=True), source.name, "run_source", caller)
            incremental = spec_sql.mode == m.SQL_IMPORT_MODE_INCREMENTAL
            start = "" if full_refresh or not incremental else (source.status.watermark or spec_sql.start_watermark)
            read = lambda: readers.read_sql(url, spec_sql, start)  # noqa: E731
            origin = Origin(m.SOURCE_KIND_SQL, readers.describe_sql(None, spec_sql), source=source.name, watermark_start=start)

        def progress(status: m.SourceStatus, ingestion: m.Ingestion) -> None:
            status.last_ingestion = ingestion.name
            status.last_run_time.FromDatetime(now_utc())
            status.last_error = ""
            if kind == "sql" and ingestion.watermark_end:
                status.watermark = ingestion.watermark_end

        hooks = _SourceHooks(self.store, dataset_id, source_id, progress)
        try:
            if queue:
                return self.committer.submit(
                    dataset_id,
                    read,
                    origin,
                    options,
                    lambda i: rr.RunSourceResponse(ingestion=i),
                    rr.RunSourceResponse,
                    caller,
                    idempotency=idempotency,
                )
            return self.committer.run(
                dataset_id,
                read,
                origin,
                options,
                lambda i: rr.RunSourceResponse(ingestion=i),
                rr.RunSourceResponse,
                caller,
                idempotency=idempotency,
                hooks=hooks,
            )
        except FalajError as error:
            self.record_error((dataset_id, source_id), error.message)
            raise

    def run_scheduled(self, key: tuple[str, str]) -> None:
        dataset_id, source_id = key
        try:
            source = self.store.get_source(dataset_id, source_id)
            with self.store.transaction() as session:
                self.store.update_source_status(
                    session, dataset_id, source_id, lambda status: None, next_run_at=next_run(source.schedule, now_utc())
                )
            self.run_stored(dataset_id, source_id, source.create_stamp.actor or "spiffe://falaj.local/service/ingest")
        except FalajError as error:
            log.warning("scheduled source run failed", source=names.source_name(dataset_id, source_id), error=error.message)

    def record_error(self, key: tuple[str, str], message: str, attempt: int = 0) -> bool:
        """Save a source's last error; after repeated failures the source is FAILED. Returns whether to keep trying."""
        dataset_id, source_id = key

        def note(status: m.SourceStatus) -> None:
            status.last_error = message[:2000]

        give_up = attempt >= MAX_CONSECUTIVE_FAILURES
        try:
            with self.store.transaction() as session:
                self.store.update_source_status(session, dataset_id, source_id, note, state=m.SOURCE_STATE_FAILED if give_up else None)
        except FalajError:
            return False  # the source is gone
        return not give_up

    # -- NATS ------------------------------------------------------------------------------------------
    def consumer_settings(self, key: tuple[str, str]) -> nats_source.ConsumerSettings:
        dataset_id, source_id = key
        source = self.store.get_source(dataset_id, source_id)
        spec = source.nats
        url, credentials = self._nats_url(spec)
        durable = nats_source.durable_name(spec, dataset_id, source_id)
        interval = (
            spec.commit_max_interval.ToTimedelta().total_seconds()
            if spec.HasField("commit_max_interval")
            else self.config.nats_commit_max_interval_seconds
        )
        return nats_source.ConsumerSettings(
            url=url,
            credentials=credentials,
            stream=spec.stream,
            subject=spec.subject,
            durable=durable,
            config=nats_source.consumer_config(spec, durable),
            max_rows=int(spec.commit_max_rows or self.config.nats_commit_max_rows),
            max_interval=max(0.05, interval),
        )

    def commit_nats(self, key: tuple[str, str], messages: list[nats_source.ReceivedMessage]) -> None:
        """Commit fetched messages as one version (redeliveries skipped); runs before they are acknowledged."""
        dataset_id, source_id = key
        source = self.store.get_source(dataset_id, source_id)
        dataset = self.store.get_dataset(dataset_id)
        spec = source.nats
        decoded = nats_source.decode_messages(messages, spec, dataset.schema, spec.stream)
        with self.store.transaction() as session:
            seen = self.store.seen_keys(session, dataset_id, source_id, decoded.all_digests)
        kept, duplicates = decoded.without(seen)
        highest = max((msg.sequence for msg in messages), default=0)

        def progress(status: m.SourceStatus, ingestion: m.Ingestion | None) -> None:
            status.messages_received += len(messages)
            status.messages_deduplicated += duplicates
            status.last_acked_sequence = max(status.last_acked_sequence, highest)
            status.last_run_time.FromDatetime(now_utc())
            status.last_error = ""
            if ingestion is not None:
                status.last_ingestion = ingestion.name

        if not kept.records and not kept.failures:
            with self.store.transaction() as session:
                self.store.update_source_status(session, dataset_id, source_id, lambda status: progress(status, None))
            return
        url, _ = self._nats_url(spec)
        hooks = _SourceHooks(self.store, dataset_id, source_id, progress, seen=kept.all_digests)
        self.committer.run(
            dataset_id,
            lambda: kept.to_input(dataset.schema, len(messages)),
            Origin(m.SOURCE_KIND_NATS, f"nats {url} stream {spec.stream} subject {spec.subject}", source=source.name),
            Options(source.write_mode or m.WRITE_MODE_APPEND),
            lambda ingestion: ingestion,
            m.Ingestion,
            source.create_stamp.actor or "spiffe://falaj.local/service/ingest",
            hooks=hooks,
        )

    def record_pending(self, key: tuple[str, str], pending: int) -> None:
        dataset_id, source_id = key

        def note(status: m.SourceStatus) -> None:
            status.messages_pending = pending

        try:
            with self.store.transaction() as session:
                self.store.update_source_status(session, dataset_id, source_id, note)
        except FalajError:
            pass


class SourceWorker:
    """The background thread of scheduled runs and NATS subscriptions (started on demand, stoppable)."""

    def __init__(self, manager: SourceManager, poll_seconds: float):
        self.manager = manager
        self.poll_seconds = poll_seconds
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._consumers: dict[tuple[str, str], tuple[nats_source.NatsConsumer, asyncio.Task[None]]] = {}

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def ensure_running(self) -> None:
        with self._lock:
            if self.running or self._stopping.is_set():
                return
            self._ready.clear()
            self._thread = threading.Thread(target=self._thread_main, name="ingest-sources", daemon=True)
            self._thread.start()
        self._ready.wait(timeout=10)

    def wake(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None and not loop.is_closed():
            loop.call_soon_threadsafe(wake.set)

    def stop_consumer(self, key: tuple[str, str], timeout: float = 60.0) -> None:
        """Stop one subscription after it commits what it holds; returns when it has."""
        loop = self._loop
        if loop is None or loop.is_closed() or not self.running:
            return
        future = asyncio.run_coroutine_threadsafe(self._stop_consumer(key), loop)
        future.result(timeout=timeout)

    def close(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        self.wake()
        thread = self._thread
        if thread is not None:
            thread.join(timeout=timeout)

    def _thread_main(self) -> None:
        try:
            asyncio.run(self._main())
        except Exception as error:
            log.error("source worker stopped", exc_info=error)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._ready.set()
        try:
            while not self._stopping.is_set():
                try:
                    await self._reconcile()
                    await self._run_due()
                except FalajError as error:
                    log.warning("source worker pass failed", error=error.message)
                except Exception as error:
                    log.error("source worker pass failed", exc_info=error)
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=self.poll_seconds)
                except TimeoutError:
                    pass
                self._wake.clear()
        finally:
            for key in list(self._consumers):
                await self._stop_consumer(key)

    async def _stop_consumer(self, key: tuple[str, str]) -> None:
        entry = self._consumers.pop(key, None)
        if entry is None:
            return
        consumer, task = entry
        consumer.stopping.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=60)
        except TimeoutError:
            task.cancel()

    async def _reconcile(self) -> None:
        for key, (_, task) in list(self._consumers.items()):
            if task.done():
                self._consumers.pop(key, None)
        active = set(await asyncio.to_thread(self.manager.store.active_nats_sources))
        for key in list(self._consumers):
            if key not in active:
                await self._stop_consumer(key)
        for key in active - set(self._consumers):
            try:
                settings = await asyncio.to_thread(self.manager.consumer_settings, key)
            except FalajError as error:
                await asyncio.to_thread(self.manager.record_error, key, error.message, MAX_CONSECUTIVE_FAILURES)
                continue
            consumer = nats_source.NatsConsumer(
                key,
                settings,
                commit=functools.partial(self.manager.commit_nats, key),
                on_error=functools.partial(self.manager.record_error, key),
                report_pending=functools.partial(self.manager.record_pending, key),
            )
            self._consumers[key] = (consumer, asyncio.create_task(consumer.run(), name=f"nats-{key[0]}-{key[1]}"))

    async def _run_due(self) -> None:
        due = await asyncio.to_thread(self.manager.store.due_sources, now_utc())
        for key in due:
            if self._stopping.is_set():
                return
            await asyncio.to_thread(self.manager.run_scheduled, key)
