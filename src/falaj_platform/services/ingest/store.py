"""SQLAlchemy store of the ingest service: the catalog of datasets, versions and what surrounds them.

Datasets with their schema versions; dataset versions with the Parquet files each one
lists (append versions share their parent's files); ingestions with their reports and
the batch ids they committed; quarantined rows; stored sources and the keys a NATS
source has committed; consent records; erasure receipts. Nested contract parts that are
only ever read whole (schemas, cleansing policies, reports, lineage, profiles) are kept
as proto JSON; what is filtered, joined or checked is a column.

Methods take the caller's session where several writes must commit together (a
version, its files, its quarantined rows, its batch ids and the request log are one
transaction); reads open their own.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import sqlalchemy as sa
from google.protobuf import json_format
from google.protobuf.message import Message
from sqlalchemy.orm import Session

from falaj.common.v1 import common_pb2 as common
from falaj.ingest.v1 import message_pb2 as m
from falaj_platform.runtime.db import Database, request_log_columns
from falaj_platform.runtime.errors import Aborted, AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from falaj_platform.runtime.idempotency import MAX_REQUEST_ID_LENGTH, remember, replayed_response
from falaj_platform.runtime.validate import enum_name
from falaj_platform.services.ingest import names
from falaj_platform.services.ingest.storage import StoredFile, content_hash

metadata = sa.MetaData()

datasets = sa.Table(
    "datasets",
    metadata,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("owner", sa.String(256), nullable=False),
    sa.Column("residency_region", sa.String(32), nullable=False),
    sa.Column("description", sa.Text, nullable=False, server_default=""),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    # Added by 0002.
    sa.Column("display_name", sa.String(256), nullable=False, server_default=""),
    sa.Column("labels_json", sa.Text, nullable=False, server_default="{}"),
    sa.Column("cleansing_json", sa.Text, nullable=False, server_default="{}"),
    sa.Column("schema_major", sa.Integer, nullable=False, server_default="1"),
    sa.Column("schema_minor", sa.Integer, nullable=False, server_default="0"),
    sa.Column("latest_version_number", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("etag", sa.String(64), nullable=False, server_default=""),
    sa.Column("created_by", sa.String(256), nullable=False, server_default=""),
    sa.Column("updated_by", sa.String(256), nullable=False, server_default=""),
)

schema_versions = sa.Table(
    "schema_versions",
    metadata,
    sa.Column("dataset", sa.String(128), sa.ForeignKey("datasets.name", ondelete="CASCADE"), primary_key=True),
    sa.Column("major", sa.Integer, primary_key=True),
    sa.Column("minor", sa.Integer, primary_key=True),
    sa.Column("schema_json", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    # Added by 0002.
    sa.Column("change_kind", sa.String(32), nullable=False, server_default="SCHEMA_CHANGE_KIND_INITIAL"),
    sa.Column("changes_json", sa.Text, nullable=False, server_default="[]"),
    sa.Column("migration_json", sa.Text, nullable=True),
    sa.Column("migrated_dataset_version", sa.BigInteger, nullable=True),
    sa.Column("created_by", sa.String(256), nullable=False, server_default=""),
)

# One row per commit. `path` is the folder of the files the commit added; `sha256` the
# current content hash (changed only by erasure rewrites, recorded in lineage_json).
dataset_versions = sa.Table(
    "dataset_versions",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("dataset", sa.String(128), sa.ForeignKey("datasets.name", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("schema_major", sa.Integer, nullable=False),
    sa.Column("schema_minor", sa.Integer, nullable=False),
    sa.Column("row_count", sa.BigInteger, nullable=False),
    sa.Column("quarantined_count", sa.BigInteger, nullable=False),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    # Added by 0002.
    sa.Column("version_number", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("added_row_count", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("size_bytes", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("partition_count", sa.Integer, nullable=False, server_default="0"),
    sa.Column("min_event_time", sa.DateTime(timezone=True), nullable=True),
    sa.Column("max_event_time", sa.DateTime(timezone=True), nullable=True),
    sa.Column("ingestion", sa.String(64), nullable=True),
    sa.Column("source_kind", sa.String(48), nullable=False, server_default="SOURCE_KIND_UNSPECIFIED"),
    sa.Column("source_description", sa.Text, nullable=False, server_default=""),
    sa.Column("write_mode", sa.String(32), nullable=False, server_default="WRITE_MODE_APPEND"),
    sa.Column("lineage_json", sa.Text, nullable=False, server_default="{}"),
    sa.Column("created_by", sa.String(256), nullable=False, server_default=""),
    sa.Index("ix_dataset_versions_dataset_version_number", "dataset", "version_number", unique=True),
)

version_files = sa.Table(
    "version_files",
    metadata,
    sa.Column("version_id", sa.String(64), sa.ForeignKey("dataset_versions.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("position", sa.Integer, primary_key=True),
    sa.Column("path", sa.String(512), nullable=False),
    sa.Column("event_date", sa.String(16), nullable=False),
    sa.Column("row_count", sa.BigInteger, nullable=False),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("min_event_time", sa.DateTime(timezone=True), nullable=True),
    sa.Column("max_event_time", sa.DateTime(timezone=True), nullable=True),
    sa.Index("ix_version_files_path", "path"),
)

dataset_profiles = sa.Table(
    "dataset_profiles",
    metadata,
    sa.Column("version_id", sa.String(64), sa.ForeignKey("dataset_versions.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("profile_json", sa.Text, nullable=False),
    sa.Column("computed_at", sa.DateTime(timezone=True), nullable=False),
)

ingestions = sa.Table(
    "ingestions",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("dataset", sa.String(128), sa.ForeignKey("datasets.name", ondelete="CASCADE"), nullable=False),
    sa.Column("request_id", sa.String(128), nullable=True),
    sa.Column("source_kind", sa.String(48), nullable=False),
    sa.Column("source", sa.String(256), nullable=True),
    sa.Column("source_description", sa.Text, nullable=False, server_default=""),
    sa.Column("state", sa.String(32), nullable=False),
    sa.Column("report_json", sa.Text, nullable=False, server_default="{}"),
    sa.Column("dataset_version_number", sa.BigInteger, nullable=True),
    sa.Column("schema_version", sa.String(32), nullable=False, server_default=""),
    sa.Column("write_mode", sa.String(32), nullable=False),
    sa.Column("validate_only", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("watermark_start", sa.Text, nullable=True),
    sa.Column("watermark_end", sa.Text, nullable=True),
    sa.Column("error_message", sa.Text, nullable=False, server_default=""),
    sa.Column("created_by", sa.String(256), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("end_time", sa.DateTime(timezone=True), nullable=True),
    sa.Index("ix_ingestions_dataset_created_at", "dataset", "created_at"),
)

# Batch ids of IngestBatches streams already committed, so a retried stream skips them.
ingested_batches = sa.Table(
    "ingested_batches",
    metadata,
    sa.Column("dataset", sa.String(128), sa.ForeignKey("datasets.name", ondelete="CASCADE"), primary_key=True),
    sa.Column("batch_id", sa.String(256), primary_key=True),
    sa.Column("ingestion", sa.String(64), sa.ForeignKey("ingestions.id", ondelete="CASCADE"), nullable=False, index=True),
    # SHA-256 of the batch's bytes: a retry re-sends the same bytes; other bytes under a committed id are refused.
    sa.Column("sha256", sa.String(64), nullable=False),
)

# Row ids sort by time then position, so ordering by id is "oldest first".
quarantined_rows = sa.Table(
    "quarantined_rows",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("dataset", sa.String(128), sa.ForeignKey("datasets.name", ondelete="CASCADE"), nullable=False),
    sa.Column("ingestion", sa.String(64), sa.ForeignKey("ingestions.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("batch_id", sa.String(256), nullable=False, server_default=""),
    sa.Column("row_index", sa.BigInteger, nullable=False),
    sa.Column("values_json", sa.Text, nullable=False),
    sa.Column("violations_json", sa.Text, nullable=False),
    # "|RULE:column|..." for filtering by rule and column without a join.
    sa.Column("violation_keys", sa.Text, nullable=False),
    sa.Column("state", sa.String(32), nullable=False),
    sa.Column("schema_version", sa.String(32), nullable=False),
    sa.Column("subject_id", sa.String(256), nullable=True, index=True),
    sa.Column("resubmit_attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("accepted_by_ingestion", sa.String(64), nullable=True),
    sa.Column("discard_reason", sa.Text, nullable=False, server_default=""),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("resolved_by", sa.String(256), nullable=True),
    sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
    sa.Index("ix_quarantined_rows_dataset_state", "dataset", "state"),
)

sources = sa.Table(
    "sources",
    metadata,
    sa.Column("dataset", sa.String(128), sa.ForeignKey("datasets.name", ondelete="CASCADE"), primary_key=True),
    sa.Column("source_id", sa.String(128), primary_key=True),
    sa.Column("description", sa.Text, nullable=False, server_default=""),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("spec_json", sa.Text, nullable=False),
    sa.Column("schedule", sa.String(128), nullable=False, server_default=""),
    sa.Column("write_mode", sa.String(32), nullable=False),
    sa.Column("state", sa.String(32), nullable=False),
    sa.Column("status_json", sa.Text, nullable=False, server_default="{}"),
    sa.Column("next_run_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("etag", sa.String(64), nullable=False),
    sa.Column("created_by", sa.String(256), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_by", sa.String(256), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_sources_state", "state"),
)

# Digests of (dedup key, event time) a NATS source committed: redeliveries are skipped.
source_seen_keys = sa.Table(
    "source_seen_keys",
    metadata,
    sa.Column("dataset", sa.String(128), primary_key=True),
    sa.Column("source_id", sa.String(128), primary_key=True),
    sa.Column("key_digest", sa.String(64), primary_key=True),
    sa.ForeignKeyConstraint(
        ["dataset", "source_id"], ["sources.dataset", "sources.source_id"], name="fk_source_seen_keys_source", ondelete="CASCADE"
    ),
)

consents = sa.Table(
    "consents",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("subject_id", sa.String(256), nullable=False),
    sa.Column("purpose", sa.String(48), nullable=False),
    sa.Column("state", sa.String(32), nullable=False),
    sa.Column("grant_time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("withdraw_time", sa.DateTime(timezone=True), nullable=True),
    sa.Column("expire_time", sa.DateTime(timezone=True), nullable=True),
    sa.Column("evidence", sa.Text, nullable=False, server_default=""),
    sa.Column("created_by", sa.String(256), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_by", sa.String(256), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_consents_subject_id_purpose", "subject_id", "purpose", unique=True),
    sa.Index("ix_consents_updated_at", "updated_at"),
)

erasure_receipts = sa.Table(
    "erasure_receipts",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("request_id", sa.String(128), nullable=True),
    sa.Column("state", sa.String(32), nullable=False),
    sa.Column("receipt_json", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
    sa.Index("ix_erasure_receipts_request_id", "request_id", unique=True),
)

request_log = sa.Table("request_log", metadata, *request_log_columns())

ResponseT = TypeVar("ResponseT", bound=Message)


# -- conversions ----------------------------------------------------------------------------


def utc(value: dt.datetime | None) -> dt.datetime | None:
    """Timestamps as aware UTC (SQLite hands them back naive)."""
    if value is None:
        return None
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def to_json(message: Message) -> str:
    return json_format.MessageToJson(message, indent=None, preserving_proto_field_name=True, sort_keys=True)


def from_json(text: str | None, message_type: type[ResponseT]) -> ResponseT:
    message = message_type()
    if text:
        json_format.Parse(text, message, ignore_unknown_fields=True)
    return message


def _stamp(actor: str | None, when: dt.datetime | None) -> common.AuditStamp:
    stamp = common.AuditStamp(actor=actor or "")
    if when is not None:
        stamp.time.FromDatetime(utc(when))  # type: ignore[arg-type]
    return stamp


def _set_time(target: Any, when: dt.datetime | None) -> None:
    if when is not None:
        target.FromDatetime(utc(when))


def definition_etag(dataset: m.Dataset) -> str:
    """Checksum of a dataset's definition (what Update and EvolveSchema change)."""
    copy = m.Dataset()
    copy.CopyFrom(dataset)
    for output_only in ("etag", "create_stamp", "update_stamp", "latest_version", "name"):
        copy.ClearField(output_only)
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).hexdigest()[:32]


def enum_value(enum: Any, name: str) -> int:
    return int(enum.Value(name))


@dataclass(frozen=True)
class VersionRecord:
    """A dataset version as the commit path needs it."""

    id: str
    dataset: str
    number: int
    schema_major: int
    schema_minor: int
    files: list[StoredFile]
    content_hash: str
    row_count: int


@dataclass(frozen=True)
class NewVersion:
    """Everything one commit writes to the catalog besides the files themselves."""

    dataset: str
    number: int
    schema_major: int
    schema_minor: int
    files: list[StoredFile]  # parent's (append) plus this commit's, in order
    added_rows: int
    commit_dir: str
    quarantined_count: int
    ingestion: str
    source_kind: int
    source_description: str
    source: str
    write_mode: int
    lineage: m.DatasetVersionLineage
    profile: m.DatasetProfile
    actor: str
    created_at: dt.datetime


@dataclass(frozen=True)
class NewQuarantinedRow:
    id: str
    batch_id: str
    row_index: int
    values_json: str
    violations: Sequence[m.RowViolation]
    subject_id: str | None


class IngestStore:
    """Every read and write of the ingest catalog goes through here."""

    def __init__(self, database: Database):
        self.database = database

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        with self.database.session_scope() as session:
            yield session

    def count_datasets(self) -> int:
        with self.database.session_scope() as session:
            return int(session.execute(sa.select(sa.func.count()).select_from(datasets)).scalar_one())

    # -- idempotency ---------------------------------------------------------------------------
    def idempotent(self, method: str, request: Message, response_type: type[ResponseT], write: Callable[[Session], ResponseT]) -> ResponseT:
        """Run `write` once per request id: a retry gets the stored answer, another body is refused."""
        for attempt in (1, 2):
            try:
                with self.database.session_scope() as session:
                    replay = replayed_response(session, request_log, method, request, response_type)
                    if replay is not None:
                        return replay
                    response = write(session)
                    remember(session, request_log, method, request, response)
                    return response
            except AlreadyExists:
                # A concurrent call with the same request id may have won the race; its
                # answer is the one to give. Anything else conflicts for real.
                if attempt == 2 or not getattr(request, "request_id", ""):
                    raise
        raise AssertionError("unreachable")

    def replay(self, method: str, request: Message, response_type: type[ResponseT]) -> ResponseT | None:
        """The stored answer of an earlier identical call with this request id, if any (read-only)."""
        with self.database.session_scope() as session:
            return replayed_response(session, request_log, method, request, response_type)

    def remember_response(self, method: str, request: Message, response: Message) -> None:
        """Record the answer of a write whose steps committed separately (the last step done)."""
        if getattr(request, "request_id", ""):
            with self.database.session_scope() as session:
                remember(session, request_log, method, request, response)

    def update_remembered(self, request_id: str, response: Message) -> None:
        """Replace the answer stored for a request id (a write that finished in two steps)."""
        if request_id:
            with self.database.session_scope() as session:
                session.execute(
                    request_log.update()
                    .where(request_log.c.request_id == request_id)
                    .values(response=response.SerializeToString(deterministic=True))
                )

    def replayed_stream(
        self, session: Session, method: str, request_id: str, digest: str, response_type: type[ResponseT]
    ) -> ResponseT | None:
        """request-log lookup for a client stream, whose body digest the caller computes."""
        if not request_id:
            return None
        if len(request_id) > MAX_REQUEST_ID_LENGTH:
            raise InvalidArgument(f"request_id is longer than {MAX_REQUEST_ID_LENGTH} characters", reason="REQUEST_ID_TOO_LONG")
        row = session.execute(
            sa.select(request_log.c.method, request_log.c.request_sha256, request_log.c.response).where(
                request_log.c.request_id == request_id
            )
        ).first()
        if row is None:
            return None
        if row.method != method or row.request_sha256 != digest:
            raise FailedPrecondition(
                f"request_id {request_id!r} was already used for a different request; use a new request id",
                reason="REQUEST_ID_REUSED",
                metadata={"request_id": request_id},
            )
        response = response_type()
        response.ParseFromString(row.response or b"")
        return response

    def remember_stream(self, session: Session, method: str, request_id: str, digest: str, response: Message) -> None:
        if request_id:
            session.execute(
                request_log.insert().values(
                    request_id=request_id,
                    method=method,
                    request_sha256=digest,
                    response=response.SerializeToString(deterministic=True),
                    created_at=dt.datetime.now(dt.UTC),
                )
            )

    # -- datasets ------------------------------------------------------------------------------
    def insert_dataset(self, session: Session, dataset_id: str, dataset: m.Dataset, actor: str, now: dt.datetime) -> m.Dataset:
        exists = session.execute(sa.select(datasets.c.name).where(datasets.c.name == dataset_id)).first()
        if exists is not None:
            raise AlreadyExists(f"dataset {names.dataset_name(dataset_id)} already exists", reason="DATASET_EXISTS")
        stored = m.Dataset()
        stored.CopyFrom(dataset)
        stored.name = names.dataset_name(dataset_id)
        etag = definition_etag(stored)
        session.execute(
            datasets.insert().values(
                name=dataset_id,
                owner=dataset.owner,
                residency_region=dataset.residency.region,
                description=dataset.description,
                display_name=dataset.display_name,
                labels_json=json.dumps(dict(dataset.labels), sort_keys=True),
                cleansing_json=to_json(dataset.cleansing),
                schema_major=1,
                schema_minor=0,
                latest_version_number=0,
                etag=etag,
                created_by=actor,
                created_at=now,
                updated_by=actor,
                updated_at=now,
            )
        )
        session.execute(
            schema_versions.insert().values(
                dataset=dataset_id,
                major=1,
                minor=0,
                schema_json=to_json(dataset.schema),
                change_kind="SCHEMA_CHANGE_KIND_INITIAL",
                changes_json="[]",
                created_by=actor,
                created_at=now,
            )
        )
        return self.get_dataset(dataset_id, session)

    def _dataset_row(self, session: Session, dataset_id: str, *, lock: bool = False) -> sa.Row[Any]:
        query = sa.select(datasets).where(datasets.c.name == dataset_id)
        if lock and session.get_bind().dialect.name == "postgresql":
            query = query.with_for_update()
        row = session.execute(query).first()
        if row is None:
            raise NotFound(
                f"dataset {names.dataset_name(dataset_id)} does not exist", reason="DATASET_NOT_FOUND", metadata={"dataset": dataset_id}
            )
        return row

    def _dataset_from_row(self, session: Session, row: sa.Row[Any]) -> m.Dataset:
        schema_json = session.execute(
            sa.select(schema_versions.c.schema_json).where(
                schema_versions.c.dataset == row.name,
                schema_versions.c.major == row.schema_major,
                schema_versions.c.minor == row.schema_minor,
            )
        ).scalar_one()
        dataset = m.Dataset(
            name=names.dataset_name(row.name),
            display_name=row.display_name,
            description=row.description,
            owner=row.owner,
            residency=common.Residency(region=row.residency_region),
            schema=from_json(schema_json, m.Schema),
            schema_version=names.schema_version_name(row.name, row.schema_major, row.schema_minor),
            cleansing=from_json(row.cleansing_json, m.CleansingPolicy),
            labels=json.loads(row.labels_json or "{}"),
            latest_version=names.version_name(row.name, row.latest_version_number) if row.latest_version_number else "",
            create_stamp=_stamp(row.created_by, row.created_at),
            update_stamp=_stamp(row.updated_by, row.updated_at),
            etag=row.etag,
        )
        return dataset

    def get_dataset(self, dataset_id: str, session: Session | None = None) -> m.Dataset:
        if session is not None:
            return self._dataset_from_row(session, self._dataset_row(session, dataset_id))
        with self.database.session_scope() as own:
            return self._dataset_from_row(own, self._dataset_row(own, dataset_id))

    def lock_dataset(self, session: Session, dataset_id: str) -> m.Dataset:
        """The dataset, row-locked on PostgreSQL for the rest of the transaction."""
        return self._dataset_from_row(session, self._dataset_row(session, dataset_id, lock=True))

    def list_datasets(self, owner: str, region: str) -> list[m.Dataset]:
        query = sa.select(datasets).order_by(datasets.c.name)
        if owner:
            query = query.where(datasets.c.owner == owner)
        if region:
            query = query.where(datasets.c.residency_region == region)
        with self.database.session_scope() as session:
            return [self._dataset_from_row(session, row) for row in session.execute(query).all()]

    def dataset_ids_with_subject_column(self) -> list[str]:
        with self.database.session_scope() as session:
            return list(session.execute(sa.select(datasets.c.name).order_by(datasets.c.name)).scalars())

    def update_dataset(self, session: Session, dataset_id: str, updated: m.Dataset, actor: str, now: dt.datetime) -> m.Dataset:
        updated.etag = definition_etag(updated)
        session.execute(
            datasets.update()
            .where(datasets.c.name == dataset_id)
            .values(
                display_name=updated.display_name,
                description=updated.description,
                owner=updated.owner,
                cleansing_json=to_json(updated.cleansing),
                labels_json=json.dumps(dict(updated.labels), sort_keys=True),
                etag=updated.etag,
                updated_by=actor,
                updated_at=now,
            )
        )
        return self.get_dataset(dataset_id, session)

    def delete_dataset(self, session: Session, dataset_id: str, etag: str, force: bool) -> int:
        row = self._dataset_row(session, dataset_id, lock=True)
        if etag and etag != row.etag:
            raise Aborted(f"dataset {names.dataset_name(dataset_id)} changed since it was read (etag mismatch)", reason="ETAG_MISMATCH")
        versions = int(session.execute(sa.select(sa.func.count()).where(dataset_versions.c.dataset == dataset_id)).scalar_one())
        source_count = int(session.execute(sa.select(sa.func.count()).where(sources.c.dataset == dataset_id)).scalar_one())
        if (versions or source_count) and not force:
            raise FailedPrecondition(
                f"dataset {names.dataset_name(dataset_id)} has {versions} version(s) and {source_count} source(s); delete with force to remove them",
                reason="DATASET_NOT_EMPTY",
            )
        session.execute(source_seen_keys.delete().where(source_seen_keys.c.dataset == dataset_id))
        session.execute(sources.delete().where(sources.c.dataset == dataset_id))
        version_ids = sa.select(dataset_versions.c.id).where(dataset_versions.c.dataset == dataset_id)
        session.execute(version_files.delete().where(version_files.c.version_id.in_(version_ids)))
        session.execute(dataset_profiles.delete().where(dataset_profiles.c.version_id.in_(version_ids)))
        session.execute(dataset_versions.delete().where(dataset_versions.c.dataset == dataset_id))
        session.execute(quarantined_rows.delete().where(quarantined_rows.c.dataset == dataset_id))
        session.execute(ingested_batches.delete().where(ingested_batches.c.dataset == dataset_id))
        session.execute(ingestions.delete().where(ingestions.c.dataset == dataset_id))
        session.execute(schema_versions.delete().where(schema_versions.c.dataset == dataset_id))
        session.execute(datasets.delete().where(datasets.c.name == dataset_id))
        return versions

    # -- schema versions -----------------------------------------------------------------------
    def insert_schema_version(
        self,
        session: Session,
        dataset_id: str,
        version: m.SchemaVersion,
        actor: str,
        now: dt.datetime,
    ) -> None:
        session.execute(
            schema_versions.insert().values(
                dataset=dataset_id,
                major=version.major,
                minor=version.minor,
                schema_json=to_json(version.schema),
                change_kind=enum_name(m.SchemaChangeKind, version.change_kind, "change_kind"),
                changes_json=json.dumps([json.loads(to_json(c)) for c in version.changes]),
                migration_json=to_json(version.migration) if version.HasField("migration") else None,
                migrated_dataset_version=None,
                created_by=actor,
                created_at=now,
            )
        )
        row = self._dataset_row(session, dataset_id)
        dataset = self._dataset_from_row(session, row)
        dataset.schema.CopyFrom(version.schema)
        session.execute(
            datasets.update()
            .where(datasets.c.name == dataset_id)
            .values(schema_major=version.major, schema_minor=version.minor, etag=definition_etag(dataset), updated_by=actor, updated_at=now)
        )

    def set_migrated_version(self, session: Session, dataset_id: str, major: int, minor: int, version_number: int) -> None:
        session.execute(
            schema_versions.update()
            .where(schema_versions.c.dataset == dataset_id, schema_versions.c.major == major, schema_versions.c.minor == minor)
            .values(migrated_dataset_version=version_number)
        )

    def _schema_version_from_row(self, row: sa.Row[Any]) -> m.SchemaVersion:
        version = m.SchemaVersion(
            name=names.schema_version_name(row.dataset, row.major, row.minor),
            major=row.major,
            minor=row.minor,
            schema=from_json(row.schema_json, m.Schema),
            change_kind=enum_value(m.SchemaChangeKind, row.change_kind),  # type: ignore[arg-type]
            create_stamp=_stamp(row.created_by, row.created_at),
        )
        for change in json.loads(row.changes_json or "[]"):
            json_format.ParseDict(change, version.changes.add())
        if row.migration_json:
            version.migration.CopyFrom(from_json(row.migration_json, m.SchemaMigration))
        if row.migrated_dataset_version:
            version.migrated_dataset_version = names.version_name(row.dataset, row.migrated_dataset_version)
        return version

    def get_schema_version(self, dataset_id: str, major: int, minor: int) -> m.SchemaVersion:
        with self.database.session_scope() as session:
            return self.get_schema_version_in(session, dataset_id, major, minor)

    def get_schema_version_in(self, session: Session, dataset_id: str, major: int, minor: int) -> m.SchemaVersion:
        self._dataset_row(session, dataset_id)
        row = session.execute(
            sa.select(schema_versions).where(
                schema_versions.c.dataset == dataset_id, schema_versions.c.major == major, schema_versions.c.minor == minor
            )
        ).first()
        if row is None:
            raise NotFound(
                f"schema version {major}.{minor} of {names.dataset_name(dataset_id)} does not exist", reason="SCHEMA_VERSION_NOT_FOUND"
            )
        return self._schema_version_from_row(row)

    def list_schema_versions(self, dataset_id: str) -> list[m.SchemaVersion]:
        with self.database.session_scope() as session:
            self._dataset_row(session, dataset_id)
            rows = session.execute(
                sa.select(schema_versions)
                .where(schema_versions.c.dataset == dataset_id)
                .order_by(schema_versions.c.major.desc(), schema_versions.c.minor.desc())
            ).all()
            return [self._schema_version_from_row(row) for row in rows]

    def schema_of(self, session: Session, dataset_id: str, major: int, minor: int) -> m.Schema:
        text = session.execute(
            sa.select(schema_versions.c.schema_json).where(
                schema_versions.c.dataset == dataset_id, schema_versions.c.major == major, schema_versions.c.minor == minor
            )
        ).scalar_one()
        return from_json(text, m.Schema)

    # -- versions ---------------------------------------------------------------------------------
    def _files_of(self, session: Session, version_id: str) -> list[StoredFile]:
        rows = session.execute(
            sa.select(version_files).where(version_files.c.version_id == version_id).order_by(version_files.c.position)
        ).all()
        return [
            StoredFile(r.path, r.event_date, r.row_count, r.size_bytes, r.sha256, utc(r.min_event_time), utc(r.max_event_time))
            for r in rows
        ]

    def _version_record(self, session: Session, row: sa.Row[Any]) -> VersionRecord:
        return VersionRecord(
            row.id,
            row.dataset,
            row.version_number,
            row.schema_major,
            row.schema_minor,
            self._files_of(session, row.id),
            row.sha256,
            row.row_count,
        )

    def version_record(self, session: Session, dataset_id: str, number: int | None) -> VersionRecord | None:
        """A version (None for latest) with its files; None when the dataset has no versions yet."""
        query = sa.select(dataset_versions).where(dataset_versions.c.dataset == dataset_id)
        query = (
            query.where(dataset_versions.c.version_number == number)
            if number is not None
            else query.order_by(dataset_versions.c.version_number.desc()).limit(1)
        )
        row = session.execute(query).first()
        return None if row is None else self._version_record(session, row)

    def insert_version(self, session: Session, version: NewVersion) -> str:
        """Catalog rows of a commit: the version, its file list and profile, and the dataset's latest pointer."""
        version_id = hashlib.sha256(f"{version.dataset}/{version.number}/{version.commit_dir}".encode()).hexdigest()[:32]
        digest = content_hash(version.files)
        lineage = m.DatasetVersionLineage()
        lineage.CopyFrom(version.lineage)
        lineage.original_content_hash = digest
        times = [f.min_event_time for f in version.files if f.min_event_time] + [
            f.max_event_time for f in version.files if f.max_event_time
        ]
        session.execute(
            dataset_versions.insert().values(
                id=version_id,
                dataset=version.dataset,
                version_number=version.number,
                schema_major=version.schema_major,
                schema_minor=version.schema_minor,
                row_count=sum(f.row_count for f in version.files),
                added_row_count=version.added_rows,
                quarantined_count=version.quarantined_count,
                path=version.commit_dir,
                sha256=digest,
                size_bytes=sum(f.size_bytes for f in version.files),
                partition_count=len({f.event_date for f in version.files}),
                min_event_time=min(times) if times else None,
                max_event_time=max(times) if times else None,
                ingestion=version.ingestion,
                source_kind=enum_name(m.SourceKind, version.source_kind, "source_kind"),
                source_description=version.source_description,
                write_mode=enum_name(m.WriteMode, version.write_mode, "write_mode"),
                lineage_json=to_json(lineage),
                created_by=version.actor,
                created_at=version.created_at,
            )
        )
        if version.files:
            session.execute(
                version_files.insert(),
                [
                    {
                        "version_id": version_id,
                        "position": i,
                        "path": f.path,
                        "event_date": f.event_date,
                        "row_count": f.row_count,
                        "size_bytes": f.size_bytes,
                        "sha256": f.sha256,
                        "min_event_time": f.min_event_time,
                        "max_event_time": f.max_event_time,
                    }
                    for i, f in enumerate(version.files)
                ],
            )
        session.execute(
            dataset_profiles.insert().values(version_id=version_id, profile_json=to_json(version.profile), computed_at=version.created_at)
        )
        moved = session.execute(
            datasets.update()
            .where(datasets.c.name == version.dataset, datasets.c.latest_version_number == version.number - 1)
            .values(latest_version_number=version.number)
        )
        if _rowcount(moved) != 1:
            raise Aborted(f"another commit to {names.dataset_name(version.dataset)} won the race; retry", reason="CONCURRENT_COMMIT")
        return version_id

    def _version_from_row(self, row: sa.Row[Any], region: str) -> m.DatasetVersion:
        version = m.DatasetVersion(
            name=names.version_name(row.dataset, row.version_number),
            version_number=row.version_number,
            schema_version=names.schema_version_name(row.dataset, row.schema_major, row.schema_minor),
            row_count=row.row_count,
            added_row_count=row.added_row_count,
            content_hash=row.sha256,
            size_bytes=row.size_bytes,
            partition_count=row.partition_count,
            ingestion=names.ingestion_name(row.dataset, row.ingestion) if row.ingestion else "",
            source_kind=enum_value(m.SourceKind, row.source_kind),  # type: ignore[arg-type]
            source_description=row.source_description,
            lineage=from_json(row.lineage_json, m.DatasetVersionLineage),
            residency=common.Residency(region=region),
            write_mode=enum_value(m.WriteMode, row.write_mode),  # type: ignore[arg-type]
            create_stamp=_stamp(row.created_by, row.created_at),
        )
        _set_time(version.min_event_time, row.min_event_time)
        _set_time(version.max_event_time, row.max_event_time)
        return version

    def get_version(self, dataset_id: str, number: int | None) -> tuple[m.DatasetVersion, VersionRecord]:
        with self.database.session_scope() as session:
            dataset = self._dataset_row(session, dataset_id)
            query = sa.select(dataset_versions).where(dataset_versions.c.dataset == dataset_id)
            if number is None:
                query = query.order_by(dataset_versions.c.version_number.desc()).limit(1)
            else:
                query = query.where(dataset_versions.c.version_number == number)
            row = session.execute(query).first()
            if row is None:
                which = "has no versions yet" if number is None else f"has no version {number}"
                raise NotFound(f"dataset {names.dataset_name(dataset_id)} {which}", reason="VERSION_NOT_FOUND")
            return self._version_from_row(row, dataset.residency_region), self._version_record(session, row)

    def list_versions(self, dataset_id: str, created_after: dt.datetime | None) -> list[m.DatasetVersion]:
        with self.database.session_scope() as session:
            dataset = self._dataset_row(session, dataset_id)
            query = (
                sa.select(dataset_versions)
                .where(dataset_versions.c.dataset == dataset_id)
                .order_by(dataset_versions.c.version_number.desc())
            )
            if created_after is not None:
                query = query.where(dataset_versions.c.created_at >= created_after)
            return [self._version_from_row(row, dataset.residency_region) for row in session.execute(query).all()]

    def get_profile(self, version_id: str) -> tuple[m.DatasetProfile, dt.datetime]:
        with self.database.session_scope() as session:
            row = session.execute(sa.select(dataset_profiles).where(dataset_profiles.c.version_id == version_id)).one()
            return from_json(row.profile_json, m.DatasetProfile), utc(row.computed_at)  # type: ignore[return-value]

    def referenced_paths(self) -> set[str]:
        with self.database.session_scope() as session:
            return set(session.execute(sa.select(version_files.c.path).distinct()).scalars())

    def dataset_file_paths(self, session: Session, dataset_id: str) -> set[str]:
        query = (
            sa.select(version_files.c.path)
            .join(dataset_versions, dataset_versions.c.id == version_files.c.version_id)
            .where(dataset_versions.c.dataset == dataset_id)
            .distinct()
        )
        return set(session.execute(query).scalars())

    def versions_using(self, session: Session, dataset_id: str, paths: Iterable[str]) -> list[sa.Row[Any]]:
        wanted = list(paths)
        if not wanted:
            return []
        query = (
            sa.select(dataset_versions)
            .where(dataset_versions.c.dataset == dataset_id)
            .where(dataset_versions.c.id.in_(sa.select(version_files.c.version_id).where(version_files.c.path.in_(wanted))))
            .order_by(dataset_versions.c.version_number)
        )
        return list(session.execute(query).all())

    def replace_files(
        self,
        session: Session,
        dataset_id: str,
        replacements: dict[str, StoredFile],
        rewrite_of: Callable[[str, str, str], m.VersionRewrite],
        profiles: dict[str, m.DatasetProfile],
        now: dt.datetime,
    ) -> list[tuple[str, int, str, str]]:
        """Point every version listing a rewritten file at its replacement; returns (version id, number, old hash, new hash)."""
        changed: list[tuple[str, int, str, str]] = []
        for row in self.versions_using(session, dataset_id, replacements):
            files = self._files_of(session, row.id)
            new_files = [replacements.get(f.path, f) for f in files]
            for position, stored in enumerate(new_files):
                if stored is not files[position]:
                    session.execute(
                        version_files.update()
                        .where(version_files.c.version_id == row.id, version_files.c.position == position)
                        .values(
                            path=stored.path,
                            row_count=stored.row_count,
                            size_bytes=stored.size_bytes,
                            sha256=stored.sha256,
                            min_event_time=stored.min_event_time,
                            max_event_time=stored.max_event_time,
                        )
                    )
            new_hash = content_hash(new_files)
            lineage = from_json(row.lineage_json, m.DatasetVersionLineage)
            rewrite = rewrite_of(row.id, row.sha256, new_hash)
            rewrite.rows_removed = row.row_count - sum(f.row_count for f in new_files)
            lineage.rewrites.add().CopyFrom(rewrite)
            live = [f for f in new_files]
            times = [f.min_event_time for f in live if f.min_event_time] + [f.max_event_time for f in live if f.max_event_time]
            session.execute(
                dataset_versions.update()
                .where(dataset_versions.c.id == row.id)
                .values(
                    row_count=sum(f.row_count for f in new_files),
                    sha256=new_hash,
                    size_bytes=sum(f.size_bytes for f in new_files),
                    min_event_time=min(times) if times else None,
                    max_event_time=max(times) if times else None,
                    lineage_json=to_json(lineage),
                )
            )
            if row.id in profiles:
                session.execute(
                    dataset_profiles.update()
                    .where(dataset_profiles.c.version_id == row.id)
                    .values(profile_json=to_json(profiles[row.id]), computed_at=now)
                )
            changed.append((row.id, row.version_number, row.sha256, new_hash))
        return changed

    # -- ingestions ---------------------------------------------------------------------------------
    def insert_ingestion(self, session: Session, ingestion_id: str, dataset_id: str, ingestion: m.Ingestion, now: dt.datetime) -> None:
        session.execute(
            ingestions.insert().values(
                id=ingestion_id,
                dataset=dataset_id,
                request_id=ingestion.request_id or None,
                source_kind=enum_name(m.SourceKind, ingestion.source_kind, "source_kind"),
                source=ingestion.source or None,
                source_description=ingestion.source_description,
                state=enum_name(m.IngestionState, ingestion.state, "state"),
                report_json=to_json(ingestion.report),
                dataset_version_number=None,
                schema_version=ingestion.schema_version.rsplit("/", 1)[-1] if ingestion.schema_version else "",
                write_mode=enum_name(m.WriteMode, ingestion.write_mode, "write_mode"),
                validate_only=ingestion.validate_only,
                watermark_start=ingestion.watermark_start or None,
                watermark_end=ingestion.watermark_end or None,
                error_message=ingestion.error_message,
                created_by=ingestion.create_stamp.actor,
                created_at=now,
            )
        )

    def finish_ingestion(
        self,
        session: Session,
        ingestion_id: str,
        *,
        state: int,
        report: m.IngestReport,
        version_number: int | None,
        schema_version: str,
        error_message: str = "",
        watermark_end: str = "",
        now: dt.datetime,
    ) -> None:
        session.execute(
            ingestions.update()
            .where(ingestions.c.id == ingestion_id)
            .values(
                state=enum_name(m.IngestionState, state, "state"),
                report_json=to_json(report),
                dataset_version_number=version_number,
                schema_version=schema_version,
                error_message=error_message[:4000],
                watermark_end=watermark_end or None,
                end_time=now,
            )
        )

    def _ingestion_from_row(self, row: sa.Row[Any]) -> m.Ingestion:
        ingestion = m.Ingestion(
            name=names.ingestion_name(row.dataset, row.id),
            request_id=row.request_id or "",
            source_kind=enum_value(m.SourceKind, row.source_kind),  # type: ignore[arg-type]
            source=row.source or "",
            source_description=row.source_description,
            state=enum_value(m.IngestionState, row.state),  # type: ignore[arg-type]
            report=from_json(row.report_json, m.IngestReport),
            dataset_version=names.version_name(row.dataset, row.dataset_version_number) if row.dataset_version_number else "",
            schema_version=(f"{names.dataset_name(row.dataset)}/schemaVersions/{row.schema_version}" if row.schema_version else ""),
            write_mode=enum_value(m.WriteMode, row.write_mode),  # type: ignore[arg-type]
            validate_only=bool(row.validate_only),
            watermark_start=row.watermark_start or "",
            watermark_end=row.watermark_end or "",
            error_message=row.error_message,
            create_stamp=_stamp(row.created_by, row.created_at),
        )
        _set_time(ingestion.end_time, row.end_time)
        return ingestion

    def get_ingestion(self, dataset_id: str, ingestion_id: str, session: Session | None = None) -> m.Ingestion:
        def read(s: Session) -> m.Ingestion:
            row = s.execute(sa.select(ingestions).where(ingestions.c.id == ingestion_id, ingestions.c.dataset == dataset_id)).first()
            if row is None:
                raise NotFound(f"ingestion {names.ingestion_name(dataset_id, ingestion_id)} does not exist", reason="INGESTION_NOT_FOUND")
            return self._ingestion_from_row(row)

        if session is not None:
            return read(session)
        with self.database.session_scope() as own:
            return read(own)

    def list_ingestions(self, dataset_id: str, state: int, source_kind: int, source: str) -> list[m.Ingestion]:
        with self.database.session_scope() as session:
            self._dataset_row(session, dataset_id)
            query = (
                sa.select(ingestions)
                .where(ingestions.c.dataset == dataset_id)
                .order_by(ingestions.c.created_at.desc(), ingestions.c.id.desc())
            )
            if state:
                query = query.where(ingestions.c.state == enum_name(m.IngestionState, state, "state"))
            if source_kind:
                query = query.where(ingestions.c.source_kind == enum_name(m.SourceKind, source_kind, "source_kind"))
            if source:
                query = query.where(ingestions.c.source == source)
            return [self._ingestion_from_row(row) for row in session.execute(query).all()]

    def fail_unfinished_ingestions(self, message: str, now: dt.datetime) -> int:
        """Ingestions a previous process left QUEUED or RUNNING committed nothing; say so."""
        with self.database.session_scope() as session:
            result = session.execute(
                ingestions.update()
                .where(ingestions.c.state.in_(["INGESTION_STATE_QUEUED", "INGESTION_STATE_RUNNING"]))
                .values(state="INGESTION_STATE_FAILED", error_message=message, end_time=now)
            )
            return _rowcount(result)

    # -- stream batch ids ---------------------------------------------------------------------------
    def committed_batches(self, session: Session, dataset_id: str, batch_ids: Sequence[str]) -> dict[str, tuple[str, str]]:
        """Which of `batch_ids` a previous commit of the dataset already holds: id -> (ingestion, sha256)."""
        found: dict[str, tuple[str, str]] = {}
        ids = list(batch_ids)
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            rows = session.execute(
                sa.select(ingested_batches.c.batch_id, ingested_batches.c.ingestion, ingested_batches.c.sha256).where(
                    ingested_batches.c.dataset == dataset_id, ingested_batches.c.batch_id.in_(chunk)
                )
            ).all()
            found.update({row.batch_id: (row.ingestion, row.sha256) for row in rows})
        return found

    def insert_batches(self, session: Session, dataset_id: str, ingestion_id: str, batches: Sequence[tuple[str, str]]) -> None:
        """Record (batch id, sha256) of every batch a stream committed."""
        rows = [{"dataset": dataset_id, "batch_id": b, "ingestion": ingestion_id, "sha256": d} for b, d in batches]
        for start in range(0, len(rows), 1000):
            session.execute(ingested_batches.insert(), rows[start : start + 1000])

    # -- quarantine ---------------------------------------------------------------------------------
    def insert_quarantined(
        self, session: Session, dataset_id: str, ingestion_id: str, schema_version: str, rows: Sequence[NewQuarantinedRow], now: dt.datetime
    ) -> None:
        for start in range(0, len(rows), 1000):
            session.execute(
                quarantined_rows.insert(),
                [
                    {
                        "id": row.id,
                        "dataset": dataset_id,
                        "ingestion": ingestion_id,
                        "batch_id": row.batch_id,
                        "row_index": row.row_index,
                        "values_json": row.values_json,
                        "violations_json": json.dumps([json.loads(to_json(v)) for v in row.violations]),
                        "violation_keys": "|"
                        + "|".join(f"{enum_name(m.ValidationRule, v.rule, 'rule')}:{v.column}" for v in row.violations)
                        + "|",
                        "state": "QUARANTINE_STATE_QUARANTINED",
                        "schema_version": schema_version,
                        "subject_id": row.subject_id,
                        "created_at": now,
                    }
                    for row in rows[start : start + 1000]
                ],
            )

    def _quarantined_from_row(self, row: sa.Row[Any]) -> m.QuarantinedRow:
        message = m.QuarantinedRow(
            name=names.quarantined_row_name(row.dataset, row.id),
            ingestion=names.ingestion_name(row.dataset, row.ingestion),
            batch_id=row.batch_id,
            row_index=row.row_index,
            values_json=row.values_json,
            state=enum_value(m.QuarantineState, row.state),  # type: ignore[arg-type]
            schema_version=f"{names.dataset_name(row.dataset)}/schemaVersions/{row.schema_version}",
            resubmit_attempts=row.resubmit_attempts,
            accepted_by_ingestion=names.ingestion_name(row.dataset, row.accepted_by_ingestion) if row.accepted_by_ingestion else "",
            discard_reason=row.discard_reason,
        )
        for violation in json.loads(row.violations_json):
            json_format.ParseDict(violation, message.violations.add())
        _set_time(message.create_time, row.created_at)
        if row.resolved_at is not None:
            message.resolve_stamp.CopyFrom(_stamp(row.resolved_by, row.resolved_at))
        return message

    def list_quarantined(
        self, dataset_id: str, *, state: int, rule: int, column: str, ingestion: str, offset: int, limit: int
    ) -> tuple[list[m.QuarantinedRow], bool]:
        """One page, oldest first, and whether more follow."""
        with self.database.session_scope() as session:
            self._dataset_row(session, dataset_id)
            query = (
                sa.select(quarantined_rows)
                .where(quarantined_rows.c.dataset == dataset_id)
                .where(quarantined_rows.c.state == enum_name(m.QuarantineState, state or m.QUARANTINE_STATE_QUARANTINED, "state"))
                .order_by(quarantined_rows.c.id)
            )
            if rule or column:

                def literal(text: str) -> str:
                    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")

                rule_part = literal(enum_name(m.ValidationRule, rule, "rule")) if rule else "%"
                pattern = f"%|{rule_part}:{literal(column)}|%" if column else f"%|{rule_part}:%"
                query = query.where(quarantined_rows.c.violation_keys.like(pattern, escape="\\"))
            if ingestion:
                query = query.where(quarantined_rows.c.ingestion == ingestion)
            rows = session.execute(query.offset(offset).limit(limit + 1)).all()
            return [self._quarantined_from_row(r) for r in rows[:limit]], len(rows) > limit

    def quarantined_by_ids(self, session: Session, dataset_id: str, row_ids: Sequence[str]) -> list[m.QuarantinedRow]:
        found: dict[str, m.QuarantinedRow] = {}
        for start in range(0, len(row_ids), 500):
            chunk = list(row_ids[start : start + 500])
            rows = session.execute(
                sa.select(quarantined_rows).where(quarantined_rows.c.dataset == dataset_id, quarantined_rows.c.id.in_(chunk))
            ).all()
            found.update({r.id: self._quarantined_from_row(r) for r in rows})
        missing = [r for r in row_ids if r not in found]
        if missing:
            raise NotFound(
                f"quarantined row(s) {', '.join(names.quarantined_row_name(dataset_id, r) for r in missing[:5])} do not exist",
                reason="QUARANTINED_ROW_NOT_FOUND",
            )
        return [found[r] for r in row_ids]

    def quarantined_ids_of_ingestion(self, session: Session, dataset_id: str, ingestion_id: str) -> list[str]:
        return list(
            session.execute(
                sa.select(quarantined_rows.c.id)
                .where(
                    quarantined_rows.c.dataset == dataset_id,
                    quarantined_rows.c.ingestion == ingestion_id,
                    quarantined_rows.c.state == "QUARANTINE_STATE_QUARANTINED",
                )
                .order_by(quarantined_rows.c.id)
            ).scalars()
        )

    def resolve_resubmitted(
        self, session: Session, dataset_id: str, row_ids: Sequence[str], ingestion_id: str, actor: str, now: dt.datetime
    ) -> None:
        for start in range(0, len(row_ids), 500):
            session.execute(
                quarantined_rows.update()
                .where(quarantined_rows.c.dataset == dataset_id, quarantined_rows.c.id.in_(list(row_ids[start : start + 500])))
                .values(state="QUARANTINE_STATE_RESUBMITTED", accepted_by_ingestion=ingestion_id, resolved_by=actor, resolved_at=now)
            )

    def requarantine(
        self, session: Session, dataset_id: str, row_id: str, values_json: str, violations: Sequence[m.RowViolation], schema_version: str
    ) -> None:
        session.execute(
            quarantined_rows.update()
            .where(quarantined_rows.c.dataset == dataset_id, quarantined_rows.c.id == row_id)
            .values(
                values_json=values_json,
                violations_json=json.dumps([json.loads(to_json(v)) for v in violations]),
                violation_keys="|" + "|".join(f"{enum_name(m.ValidationRule, v.rule, 'rule')}:{v.column}" for v in violations) + "|",
                schema_version=schema_version,
                resubmit_attempts=quarantined_rows.c.resubmit_attempts + 1,
            )
        )

    def discard_quarantined(
        self, session: Session, dataset_id: str, row_ids: Sequence[str], reason: str, actor: str, now: dt.datetime
    ) -> int:
        discarded = 0
        for start in range(0, len(row_ids), 500):
            result = session.execute(
                quarantined_rows.update()
                .where(
                    quarantined_rows.c.dataset == dataset_id,
                    quarantined_rows.c.id.in_(list(row_ids[start : start + 500])),
                    quarantined_rows.c.state == "QUARANTINE_STATE_QUARANTINED",
                )
                .values(state="QUARANTINE_STATE_DISCARDED", discard_reason=reason, resolved_by=actor, resolved_at=now)
            )
            discarded += _rowcount(result)
        return discarded

    def count_quarantined_of_subject(self, session: Session, dataset_id: str, subject_id: str) -> int:
        return int(
            session.execute(
                sa.select(sa.func.count()).where(quarantined_rows.c.dataset == dataset_id, quarantined_rows.c.subject_id == subject_id)
            ).scalar_one()
        )

    def delete_quarantined_of_subject(self, session: Session, dataset_id: str, subject_id: str) -> int:
        result = session.execute(
            quarantined_rows.delete().where(quarantined_rows.c.dataset == dataset_id, quarantined_rows.c.subject_id == subject_id)
        )
        return _rowcount(result)

    # -- sources ------------------------------------------------------------------------------------
    def insert_source(self, session: Session, dataset_id: str, source_id: str, source: m.Source, actor: str, now: dt.datetime) -> m.Source:
        exists = session.execute(
            sa.select(sources.c.source_id).where(sources.c.dataset == dataset_id, sources.c.source_id == source_id)
        ).first()
        if exists is not None:
            raise AlreadyExists(f"source {names.source_name(dataset_id, source_id)} already exists", reason="SOURCE_EXISTS")
        kind = source.WhichOneof("spec") or ""
        spec = getattr(source, kind)
        session.execute(
            sources.insert().values(
                dataset=dataset_id,
                source_id=source_id,
                description=source.description,
                kind=kind,
                spec_json=to_json(spec),
                schedule=source.schedule,
                write_mode=enum_name(m.WriteMode, source.write_mode or m.WRITE_MODE_APPEND, "write_mode"),
                state=enum_name(m.SourceState, source.state, "state"),
                status_json=to_json(source.status),
                next_run_at=None,
                etag=_source_etag(source),
                created_by=actor,
                created_at=now,
                updated_by=actor,
                updated_at=now,
            )
        )
        return self.get_source(dataset_id, source_id, session)

    def _source_from_row(self, row: sa.Row[Any]) -> m.Source:
        source = m.Source(
            name=names.source_name(row.dataset, row.source_id),
            description=row.description,
            schedule=row.schedule,
            write_mode=enum_value(m.WriteMode, row.write_mode),  # type: ignore[arg-type]
            state=enum_value(m.SourceState, row.state),  # type: ignore[arg-type]
            status=from_json(row.status_json, m.SourceStatus),
            create_stamp=_stamp(row.created_by, row.created_at),
            update_stamp=_stamp(row.updated_by, row.updated_at),
            etag=row.etag,
        )
        spec_type = {"file": m.FileImportSpec, "sql": m.SqlImportSpec, "nats": m.NatsSubscriptionSpec}[row.kind]
        getattr(source, row.kind).CopyFrom(from_json(row.spec_json, spec_type))
        _set_time(source.status.next_run_time, row.next_run_at)
        return source

    def get_source(self, dataset_id: str, source_id: str, session: Session | None = None) -> m.Source:
        def read(s: Session) -> m.Source:
            row = s.execute(sa.select(sources).where(sources.c.dataset == dataset_id, sources.c.source_id == source_id)).first()
            if row is None:
                raise NotFound(f"source {names.source_name(dataset_id, source_id)} does not exist", reason="SOURCE_NOT_FOUND")
            return self._source_from_row(row)

        if session is not None:
            return read(session)
        with self.database.session_scope() as own:
            return read(own)

    def list_sources(self, dataset_id: str | None, state: int) -> list[m.Source]:
        with self.database.session_scope() as session:
            query = sa.select(sources).order_by(sources.c.dataset, sources.c.source_id)
            if dataset_id is not None:
                self._dataset_row(session, dataset_id)
                query = query.where(sources.c.dataset == dataset_id)
            if state:
                query = query.where(sources.c.state == enum_name(m.SourceState, state, "state"))
            return [self._source_from_row(row) for row in session.execute(query).all()]

    def update_source(self, session: Session, dataset_id: str, source_id: str, source: m.Source, actor: str, now: dt.datetime) -> m.Source:
        kind = source.WhichOneof("spec") or ""
        session.execute(
            sources.update()
            .where(sources.c.dataset == dataset_id, sources.c.source_id == source_id)
            .values(
                description=source.description,
                spec_json=to_json(getattr(source, kind)),
                schedule=source.schedule,
                write_mode=enum_name(m.WriteMode, source.write_mode or m.WRITE_MODE_APPEND, "write_mode"),
                state=enum_name(m.SourceState, source.state, "state"),
                etag=_source_etag(source),
                updated_by=actor,
                updated_at=now,
            )
        )
        return self.get_source(dataset_id, source_id, session)

    def set_source_state(self, session: Session, dataset_id: str, source_id: str, state: int, actor: str, now: dt.datetime) -> None:
        session.execute(
            sources.update()
            .where(sources.c.dataset == dataset_id, sources.c.source_id == source_id)
            .values(state=enum_name(m.SourceState, state, "state"), updated_by=actor, updated_at=now)
        )

    def update_source_status(
        self,
        session: Session,
        dataset_id: str,
        source_id: str,
        change: Callable[[m.SourceStatus], None],
        *,
        state: int | None = None,
        next_run_at: dt.datetime | None | bool = False,
    ) -> m.SourceStatus:
        row = session.execute(
            sa.select(sources.c.status_json).where(sources.c.dataset == dataset_id, sources.c.source_id == source_id)
        ).first()
        if row is None:
            raise NotFound(f"source {names.source_name(dataset_id, source_id)} does not exist", reason="SOURCE_NOT_FOUND")
        status = from_json(row.status_json, m.SourceStatus)
        change(status)
        values: dict[str, Any] = {"status_json": to_json(status)}
        if state is not None:
            values["state"] = enum_name(m.SourceState, state, "state")
        if next_run_at is not False:
            values["next_run_at"] = next_run_at
        session.execute(sources.update().where(sources.c.dataset == dataset_id, sources.c.source_id == source_id).values(**values))
        return status

    def delete_source(self, session: Session, dataset_id: str, source_id: str, etag: str) -> m.Source:
        source = self.get_source(dataset_id, source_id, session)
        if etag and etag != source.etag:
            raise Aborted(f"source {source.name} changed since it was read (etag mismatch)", reason="ETAG_MISMATCH")
        session.execute(
            source_seen_keys.delete().where(source_seen_keys.c.dataset == dataset_id, source_seen_keys.c.source_id == source_id)
        )
        session.execute(sources.delete().where(sources.c.dataset == dataset_id, sources.c.source_id == source_id))
        return source

    def due_sources(self, now: dt.datetime) -> list[tuple[str, str]]:
        with self.database.session_scope() as session:
            rows = session.execute(
                sa.select(sources.c.dataset, sources.c.source_id).where(
                    sources.c.state == "SOURCE_STATE_ACTIVE",
                    sources.c.kind != "nats",
                    sources.c.next_run_at.is_not(None),
                    sources.c.next_run_at <= now,
                )
            ).all()
            return [(r.dataset, r.source_id) for r in rows]

    def active_nats_sources(self) -> list[tuple[str, str]]:
        with self.database.session_scope() as session:
            rows = session.execute(
                sa.select(sources.c.dataset, sources.c.source_id).where(sources.c.state == "SOURCE_STATE_ACTIVE", sources.c.kind == "nats")
            ).all()
            return [(r.dataset, r.source_id) for r in rows]

    def has_background_sources(self) -> bool:
        with self.database.session_scope() as session:
            query = sa.select(sa.func.count()).where(
                sources.c.state == "SOURCE_STATE_ACTIVE", sa.or_(sources.c.kind == "nats", sources.c.schedule != "")
            )
            return int(session.execute(query).scalar_one()) > 0

    def seen_keys(self, session: Session, dataset_id: str, source_id: str, digests: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for start in range(0, len(digests), 500):
            chunk = list(digests[start : start + 500])
            found.update(
                session.execute(
                    sa.select(source_seen_keys.c.key_digest).where(
                        source_seen_keys.c.dataset == dataset_id,
                        source_seen_keys.c.source_id == source_id,
                        source_seen_keys.c.key_digest.in_(chunk),
                    )
                ).scalars()
            )
        return found

    def insert_seen_keys(self, session: Session, dataset_id: str, source_id: str, digests: Iterable[str]) -> None:
        rows = [{"dataset": dataset_id, "source_id": source_id, "key_digest": d} for d in digests]
        for start in range(0, len(rows), 1000):
            session.execute(source_seen_keys.insert(), rows[start : start + 1000])

    # -- consent --------------------------------------------------------------------------------------
    def _consent_from_row(self, row: sa.Row[Any], now: dt.datetime) -> m.ConsentRecord:
        state = enum_value(m.ConsentState, row.state)
        expire = utc(row.expire_time)
        if state == m.CONSENT_STATE_GRANTED and expire is not None and expire <= now:
            state = m.CONSENT_STATE_EXPIRED
        record = m.ConsentRecord(
            name=names.consent_name(row.id),
            subject_id=row.subject_id,
            purpose=enum_value(m.ConsentPurpose, row.purpose),  # type: ignore[arg-type]
            state=state,  # type: ignore[arg-type]
            evidence=row.evidence,
            create_stamp=_stamp(row.created_by, row.created_at),
            update_stamp=_stamp(row.updated_by, row.updated_at),
        )
        _set_time(record.grant_time, row.grant_time)
        _set_time(record.withdraw_time, row.withdraw_time)
        _set_time(record.expire_time, row.expire_time)
        return record

    def upsert_consent(
        self,
        session: Session,
        subject_id: str,
        purpose: int,
        *,
        granted: bool,
        when: dt.datetime,
        expire_time: dt.datetime | None,
        evidence: str,
        actor: str,
        now: dt.datetime,
    ) -> m.ConsentRecord:
        purpose_name = enum_name(m.ConsentPurpose, purpose, "purpose")
        row = session.execute(sa.select(consents).where(consents.c.subject_id == subject_id, consents.c.purpose == purpose_name)).first()
        state = "CONSENT_STATE_GRANTED" if granted else "CONSENT_STATE_WITHDRAWN"
        if row is None:
            if not granted:
                raise FailedPrecondition(
                    f"subject {subject_id!r} has no consent recorded for {purpose_name}", reason="CONSENT_NOT_RECORDED"
                )
            consent_id = hashlib.sha256(f"{subject_id}\x00{purpose_name}".encode()).hexdigest()[:32]
            session.execute(
                consents.insert().values(
                    id=consent_id,
                    subject_id=subject_id,
                    purpose=purpose_name,
                    state=state,
                    grant_time=when,
                    withdraw_time=None,
                    expire_time=expire_time,
                    evidence=evidence,
                    created_by=actor,
                    created_at=now,
                    updated_by=actor,
                    updated_at=now,
                )
            )
        else:
            consent_id = row.id
            values: dict[str, Any] = {"state": state, "updated_by": actor, "updated_at": now, "evidence": evidence or row.evidence}
            if granted:
                values.update(grant_time=when, withdraw_time=None, expire_time=expire_time)
            else:
                values.update(withdraw_time=when)
            session.execute(consents.update().where(consents.c.id == consent_id).values(**values))
        stored = session.execute(sa.select(consents).where(consents.c.id == consent_id)).one()
        return self._consent_from_row(stored, now)

    def list_consents(self, subject_id: str, purpose: int, changed_after: dt.datetime | None, now: dt.datetime) -> list[m.ConsentRecord]:
        with self.database.session_scope() as session:
            query = sa.select(consents).order_by(consents.c.updated_at, consents.c.id)
            if subject_id:
                query = query.where(consents.c.subject_id == subject_id)
            if purpose:
                query = query.where(consents.c.purpose == enum_name(m.ConsentPurpose, purpose, "purpose"))
            if changed_after is not None:
                query = query.where(consents.c.updated_at >= changed_after)
            return [self._consent_from_row(row, now) for row in session.execute(query).all()]

    def consents_of(self, subject_ids: Sequence[str], purpose: int) -> dict[str, sa.Row[Any]]:
        found: dict[str, sa.Row[Any]] = {}
        with self.database.session_scope() as session:
            for start in range(0, len(subject_ids), 500):
                chunk = list(subject_ids[start : start + 500])
                rows = session.execute(
                    sa.select(consents).where(
                        consents.c.subject_id.in_(chunk), consents.c.purpose == enum_name(m.ConsentPurpose, purpose, "purpose")
                    )
                ).all()
                found.update({r.subject_id: r for r in rows})
        return found

    # -- erasure receipts -----------------------------------------------------------------------------
    def receipt_by_request(self, request_id: str) -> m.ErasureReceipt | None:
        if not request_id:
            return None
        with self.database.session_scope() as session:
            text = session.execute(
                sa.select(erasure_receipts.c.receipt_json).where(erasure_receipts.c.request_id == request_id)
            ).scalar_one_or_none()
            return None if text is None else from_json(text, m.ErasureReceipt)

    def save_receipt(self, session: Session, receipt_id: str, receipt: m.ErasureReceipt, now: dt.datetime) -> None:
        completed = receipt.complete_time.ToDatetime(tzinfo=dt.UTC) if receipt.HasField("complete_time") else None
        exists = session.execute(sa.select(erasure_receipts.c.id).where(erasure_receipts.c.id == receipt_id)).first()
        values = {
            "state": enum_name(m.ErasureState, receipt.state, "state"),
            "receipt_json": to_json(receipt),
            "completed_at": completed,
        }
        if exists is None:
            session.execute(
                erasure_receipts.insert().values(id=receipt_id, request_id=receipt.request_id or None, created_at=now, **values)
            )
        else:
            session.execute(erasure_receipts.update().where(erasure_receipts.c.id == receipt_id).values(**values))

    def get_receipt(self, receipt_id: str) -> m.ErasureReceipt:
        with self.database.session_scope() as session:
            text = session.execute(
                sa.select(erasure_receipts.c.receipt_json).where(erasure_receipts.c.id == receipt_id)
            ).scalar_one_or_none()
        if text is None:
            raise NotFound(f"erasure receipt {names.receipt_name(receipt_id)} does not exist", reason="RECEIPT_NOT_FOUND")
        return from_json(text, m.ErasureReceipt)

    def list_receipts(self, completed_after: dt.datetime | None, state: int) -> list[m.ErasureReceipt]:
        with self.database.session_scope() as session:
            query = sa.select(erasure_receipts.c.receipt_json).order_by(
                erasure_receipts.c.completed_at.is_(None), erasure_receipts.c.completed_at, erasure_receipts.c.created_at
            )
            if completed_after is not None:
                query = query.where(erasure_receipts.c.completed_at >= completed_after)
            if state:
                query = query.where(erasure_receipts.c.state == enum_name(m.ErasureState, state, "state"))
            return [from_json(text, m.ErasureReceipt) for text in session.execute(query).scalars()]


def _rowcount(result: Any) -> int:
    """Rows an UPDATE or DELETE touched."""
    return int(getattr(result, "rowcount", 0) or 0)


def _source_etag(source: m.Source) -> str:
    copy = m.Source()
    copy.CopyFrom(source)
    for output_only in ("etag", "create_stamp", "update_stamp", "status", "name", "state"):
        copy.ClearField(output_only)
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).hexdigest()[:32]
