"""SQLAlchemy store of the features service: its own catalog of feature definitions and runs.

Feast keeps its registry, offline and online stores apart; these tables are what the
service itself answers for: definitions as the API sees them (owner, residency, etag,
audit stamps), per-view materialization state, the ingest versions copied into the
offline store, the history of materialization runs and the erasures applied.

Definitions travel as `falaj.features.v1` messages: the indexed columns (name, dataset,
residency, owner, ...) are authoritative, and `definition_json` holds the rest.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import sqlalchemy as sa
from google.protobuf import json_format, timestamp_pb2
from google.protobuf.message import Message
from sqlalchemy.orm import Session

from falaj.common.v1 import common_pb2
from falaj.features.v1 import message_pb2 as messages
from falaj_platform.runtime.db import Database, request_log_columns

metadata = sa.MetaData()

entities = sa.Table(
    "entities",
    metadata,
    sa.Column("name", sa.String(128), primary_key=True),
    # [{"name": ..., "value_type": ...}] in key order.
    sa.Column("join_keys_json", sa.Text, nullable=False),
    sa.Column("description", sa.Text, nullable=False, server_default=""),
    sa.Column("owner", sa.String(256), nullable=False),
    sa.Column("tags_json", sa.Text, nullable=False, server_default="{}"),
    sa.Column("etag", sa.String(64), nullable=False),
    sa.Column("created_by", sa.String(256), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_by", sa.String(256), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

feature_views = sa.Table(
    "feature_views",
    metadata,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("source_dataset", sa.String(256), nullable=False, index=True),
    sa.Column("pinned_dataset_version", sa.String(256), nullable=True),
    # Column-level definition: features, field mapping, timestamp columns.
    sa.Column("definition_json", sa.Text, nullable=False),
    sa.Column("ttl_seconds", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("online", sa.Boolean, nullable=False),
    sa.Column("residency_region", sa.String(32), nullable=False, index=True),
    sa.Column("materialization_schedule", sa.String(128), nullable=False, server_default=""),
    sa.Column("materialize_on_new_dataset_version", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("description", sa.Text, nullable=False, server_default=""),
    sa.Column("owner", sa.String(256), nullable=False),
    sa.Column("tags_json", sa.Text, nullable=False, server_default="{}"),
    sa.Column("etag", sa.String(64), nullable=False),
    sa.Column("created_by", sa.String(256), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_by", sa.String(256), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

# Which entities key which view; RESTRICT so an entity in use cannot be deleted.
feature_view_entities = sa.Table(
    "feature_view_entities",
    metadata,
    sa.Column("feature_view", sa.String(128), sa.ForeignKey("feature_views.name", ondelete="CASCADE"), primary_key=True),
    sa.Column("entity", sa.String(128), sa.ForeignKey("entities.name", ondelete="RESTRICT"), primary_key=True),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Index("ix_feature_view_entities_entity", "entity"),
)

feature_services = sa.Table(
    "feature_services",
    metadata,
    sa.Column("name", sa.String(128), primary_key=True),
    # [{"feature_view": ..., "features": [...], "name_alias": ...}]
    sa.Column("projections_json", sa.Text, nullable=False),
    sa.Column("residency_region", sa.String(32), nullable=False, index=True),
    sa.Column("description", sa.Text, nullable=False, server_default=""),
    sa.Column("owner", sa.String(256), nullable=False),
    sa.Column("tags_json", sa.Text, nullable=False, server_default="{}"),
    sa.Column("etag", sa.String(64), nullable=False),
    sa.Column("created_by", sa.String(256), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_by", sa.String(256), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

on_demand_feature_views = sa.Table(
    "on_demand_feature_views",
    metadata,
    sa.Column("name", sa.String(128), primary_key=True),
    # Sources, request fields, output features and the transformation.
    sa.Column("definition_json", sa.Text, nullable=False),
    sa.Column("residency_region", sa.String(32), nullable=False, index=True),
    sa.Column("description", sa.Text, nullable=False, server_default=""),
    sa.Column("owner", sa.String(256), nullable=False),
    sa.Column("tags_json", sa.Text, nullable=False, server_default="{}"),
    sa.Column("etag", sa.String(64), nullable=False),
    sa.Column("created_by", sa.String(256), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_by", sa.String(256), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

materialization_runs = sa.Table(
    "materialization_runs",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    # Views materialized, in request order: ["featureViews/...", ...].
    sa.Column("feature_views_json", sa.Text, nullable=False),
    sa.Column("mode", sa.String(32), nullable=False),
    sa.Column("trigger", sa.String(32), nullable=False),
    sa.Column("state", sa.String(32), nullable=False),
    sa.Column("window_start", sa.DateTime(timezone=True), nullable=True),
    sa.Column("window_end", sa.DateTime(timezone=True), nullable=True),
    # One result per view: dataset version read, window, rows written, state, error.
    sa.Column("results_json", sa.Text, nullable=False, server_default="[]"),
    sa.Column("rows_written", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("request_id", sa.String(128), nullable=True),
    sa.Column("error_message", sa.Text, nullable=False, server_default=""),
    sa.Column("created_by", sa.String(256), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("run_start_time", sa.DateTime(timezone=True), nullable=True),
    sa.Column("run_end_time", sa.DateTime(timezone=True), nullable=True),
    sa.Index("ix_materialization_runs_state_created_at", "state", "created_at"),
    sa.Index("ix_materialization_runs_request_id", "request_id", unique=True),
)

# Where each view's online and offline data stand; one row per view once it has data.
feature_view_state = sa.Table(
    "feature_view_state",
    metadata,
    sa.Column("feature_view", sa.String(128), sa.ForeignKey("feature_views.name", ondelete="CASCADE"), primary_key=True),
    # Ingest version the view's Feast source currently reads (its offline data).
    sa.Column("offline_dataset_version", sa.String(256), nullable=True),
    sa.Column("materialized_dataset_version", sa.String(256), nullable=True),
    sa.Column("materialized_until", sa.DateTime(timezone=True), nullable=True),
    sa.Column("newest_event_time", sa.DateTime(timezone=True), nullable=True),
    sa.Column("last_materialization", sa.String(64), nullable=True),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

# Ingest versions copied into the Parquet offline store (one file per version).
offline_snapshots = sa.Table(
    "offline_snapshots",
    metadata,
    sa.Column("dataset_version", sa.String(256), primary_key=True),
    sa.Column("dataset", sa.String(256), nullable=False, index=True),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("content_hash", sa.String(64), nullable=False, server_default=""),
    sa.Column("row_count", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("min_event_time", sa.DateTime(timezone=True), nullable=True),
    sa.Column("max_event_time", sa.DateTime(timezone=True), nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

erasure_applications = sa.Table(
    "erasure_applications",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("erasure_receipt", sa.String(256), nullable=False),
    sa.Column("receipt_digest", sa.String(64), nullable=False, server_default=""),
    sa.Column("state", sa.String(48), nullable=False),
    sa.Column("feature_views_json", sa.Text, nullable=False, server_default="[]"),
    sa.Column("offline_rows_removed", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("online_keys_removed", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("request_id", sa.String(128), nullable=True),
    sa.Column("error_message", sa.Text, nullable=False, server_default=""),
    sa.Column("created_by", sa.String(256), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("complete_time", sa.DateTime(timezone=True), nullable=True),
    sa.Index("ix_erasure_applications_erasure_receipt", "erasure_receipt", unique=True),
)

request_log = sa.Table("request_log", metadata, *request_log_columns())


# -- conversions ---------------------------------------------------------------------------

M = TypeVar("M", bound=Message)


def message_json(message: Message) -> str:
    return json_format.MessageToJson(message, indent=None, preserving_proto_field_name=True, sort_keys=True)


def parse_json(raw: str, message_type: type[M]) -> M:
    return json_format.Parse(raw or "{}", message_type(), ignore_unknown_fields=True)


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    if value is None:
        return None
    # SQLite hands timezone-aware columns back naive; they were written in UTC.
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def _stamp(actor: str, time: dt.datetime) -> common_pb2.AuditStamp:
    stamp = common_pb2.AuditStamp(actor=actor)
    stamp.time.FromDatetime(_utc(time) or time)
    return stamp


def _stamp_columns(message: Any) -> dict[str, Any]:
    return {
        "created_by": message.create_stamp.actor,
        "created_at": message.create_stamp.time.ToDatetime(dt.UTC),
        "updated_by": message.update_stamp.actor,
        "updated_at": message.update_stamp.time.ToDatetime(dt.UTC),
    }


def _set_stamps(message: Any, row: Any) -> None:
    message.create_stamp.CopyFrom(_stamp(row.created_by, row.created_at))
    message.update_stamp.CopyFrom(_stamp(row.updated_by, row.updated_at))
    message.etag = row.etag


def _entity_row(entity_id: str, entity: messages.Entity) -> dict[str, Any]:
    keys = [{"name": k.name, "value_type": messages.ValueType.Name(k.value_type)} for k in entity.join_keys]
    return {
        "name": entity_id,
        "join_keys_json": json.dumps(keys),
        "description": entity.description,
        "owner": entity.owner,
        "tags_json": json.dumps(dict(entity.tags), sort_keys=True),
        "etag": entity.etag,
        **_stamp_columns(entity),
    }


def _entity_from_row(row: Any) -> messages.Entity:
    entity = messages.Entity(
        name=f"entities/{row.name}", description=row.description, owner=row.owner, tags=json.loads(row.tags_json or "{}")
    )
    for key in json.loads(row.join_keys_json or "[]"):
        entity.join_keys.add(name=key["name"], value_type=messages.ValueType.Value(key["value_type"]))
    _set_stamps(entity, row)
    return entity


def _definition_only(message: M, output_fields: tuple[str, ...]) -> M:
    copy = type(message)()
    copy.CopyFrom(message)
    for field in ("name", "etag", "create_stamp", "update_stamp", *output_fields):
        copy.ClearField(field)
    return copy


def _feature_view_row(view_id: str, view: messages.FeatureView) -> dict[str, Any]:
    return {
        "name": view_id,
        "source_dataset": view.source.dataset,
        "pinned_dataset_version": view.source.pinned_version or None,
        "definition_json": message_json(_definition_only(view, ("freshness",))),
        "ttl_seconds": view.ttl.seconds,
        "online": view.online,
        "residency_region": view.residency.region,
        "materialization_schedule": view.materialization.schedule,
        "materialize_on_new_dataset_version": view.materialization.on_new_dataset_version,
        "description": view.description,
        "owner": view.owner,
        "tags_json": json.dumps(dict(view.tags), sort_keys=True),
        "etag": view.etag,
        **_stamp_columns(view),
    }


def _feature_view_from_row(row: Any, entity_ids: list[str]) -> messages.FeatureView:
    view = parse_json(row.definition_json, messages.FeatureView)
    view.name = f"featureViews/{row.name}"
    view.source.dataset = row.source_dataset
    view.source.pinned_version = row.pinned_dataset_version or ""
    view.ttl.seconds = int(row.ttl_seconds)
    view.online = bool(row.online)
    view.residency.region = row.residency_region
    view.materialization.schedule = row.materialization_schedule
    view.materialization.on_new_dataset_version = bool(row.materialize_on_new_dataset_version)
    view.description = row.description
    view.owner = row.owner
    view.tags.clear()
    view.tags.update(json.loads(row.tags_json or "{}"))
    del view.entities[:]
    view.entities.extend(f"entities/{e}" for e in entity_ids)
    _set_stamps(view, row)
    return view


def _feature_service_row(service_id: str, service: messages.FeatureService) -> dict[str, Any]:
    return {
        "name": service_id,
        "projections_json": json.dumps([json_format.MessageToDict(p, preserving_proto_field_name=True) for p in service.projections]),
        "residency_region": service.residency.region,
        "description": service.description,
        "owner": service.owner,
        "tags_json": json.dumps(dict(service.tags), sort_keys=True),
        "etag": service.etag,
        **_stamp_columns(service),
    }


def _feature_service_from_row(row: Any) -> messages.FeatureService:
    service = messages.FeatureService(
        name=f"featureServices/{row.name}", description=row.description, owner=row.owner, tags=json.loads(row.tags_json or "{}")
    )
    service.residency.region = row.residency_region
    for projection in json.loads(row.projections_json or "[]"):
        json_format.ParseDict(projection, service.projections.add(), ignore_unknown_fields=True)
    _set_stamps(service, row)
    return service


def _odfv_row(view_id: str, view: messages.OnDemandFeatureView) -> dict[str, Any]:
    return {
        "name": view_id,
        "definition_json": message_json(_definition_only(view, ())),
        "residency_region": view.residency.region,
        "description": view.description,
        "owner": view.owner,
        "tags_json": json.dumps(dict(view.tags), sort_keys=True),
        "etag": view.etag,
        **_stamp_columns(view),
    }


def _odfv_from_row(row: Any) -> messages.OnDemandFeatureView:
    view = parse_json(row.definition_json, messages.OnDemandFeatureView)
    view.name = f"onDemandFeatureViews/{row.name}"
    view.residency.region = row.residency_region
    view.description = row.description
    view.owner = row.owner
    view.tags.clear()
    view.tags.update(json.loads(row.tags_json or "{}"))
    _set_stamps(view, row)
    return view


@dataclass(frozen=True)
class ViewState:
    """Where one feature view's offline and online data stand."""

    feature_view: str
    offline_dataset_version: str | None = None
    materialized_dataset_version: str | None = None
    materialized_until: dt.datetime | None = None
    newest_event_time: dt.datetime | None = None
    last_materialization: str | None = None


@dataclass(frozen=True)
class OfflineSnapshot:
    """An ingest dataset version copied into the Parquet offline store."""

    dataset_version: str
    dataset: str
    path: str
    content_hash: str
    row_count: int
    min_event_time: dt.datetime | None
    max_event_time: dt.datetime | None


def _timestamp(value: dt.datetime | None) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    if value is not None:
        stamp.FromDatetime(_utc(value) or value)
    return stamp


def short_name(enum_name: str) -> str:
    """`MATERIALIZATION_TRIGGER_ON_DEMAND` -> `ON_DEMAND`: the columns are 32 characters wide."""
    return enum_name.split("_", 2)[2]


def _materialization_from_row(row: Any) -> messages.Materialization:
    run = messages.Materialization(
        name=f"materializations/{row.id}",
        feature_views=json.loads(row.feature_views_json),
        mode=messages.MaterializationMode.Value(f"MATERIALIZATION_MODE_{row.mode}"),
        trigger=messages.MaterializationTrigger.Value(f"MATERIALIZATION_TRIGGER_{row.trigger}"),
        state=messages.MaterializationState.Value(f"MATERIALIZATION_STATE_{row.state}"),
        rows_written=int(row.rows_written),
        request_id=row.request_id or "",
        error_message=row.error_message,
    )
    if row.window_start is not None:
        run.window_start.CopyFrom(_timestamp(row.window_start))
    if row.window_end is not None:
        run.window_end.CopyFrom(_timestamp(row.window_end))
    for result in json.loads(row.results_json or "[]"):
        json_format.ParseDict(result, run.results.add(), ignore_unknown_fields=True)
    run.create_stamp.CopyFrom(_stamp(row.created_by, row.created_at))
    if row.run_start_time is not None:
        run.run_start_time.CopyFrom(_timestamp(row.run_start_time))
    if row.run_end_time is not None:
        run.run_end_time.CopyFrom(_timestamp(row.run_end_time))
    return run


def _materialization_row(run: messages.Materialization) -> dict[str, Any]:
    message: Any = run

    def when(field: str) -> dt.datetime | None:
        return getattr(message, field).ToDatetime(dt.UTC) if message.HasField(field) else None

    return {
        "id": run.name.rpartition("/")[2],
        "feature_views_json": json.dumps(list(run.feature_views)),
        "mode": short_name(messages.MaterializationMode.Name(run.mode)),
        "trigger": short_name(messages.MaterializationTrigger.Name(run.trigger)),
        "state": short_name(messages.MaterializationState.Name(run.state)),
        "window_start": when("window_start"),
        "window_end": when("window_end"),
        "results_json": json.dumps([json_format.MessageToDict(r, preserving_proto_field_name=True) for r in run.results]),
        "rows_written": run.rows_written,
        "request_id": run.request_id or None,
        "error_message": run.error_message,
        "created_by": run.create_stamp.actor,
        "created_at": run.create_stamp.time.ToDatetime(dt.UTC),
        "run_start_time": when("run_start_time"),
        "run_end_time": when("run_end_time"),
    }


def _erasure_from_row(row: Any) -> messages.ErasureApplication:
    application = messages.ErasureApplication(
        name=f"erasureApplications/{row.id}",
        erasure_receipt=row.erasure_receipt,
        receipt_digest=row.receipt_digest,
        state=messages.ErasureApplicationState.Value(row.state),
        feature_views=json.loads(row.feature_views_json),
        offline_rows_removed=int(row.offline_rows_removed),
        online_keys_removed=int(row.online_keys_removed),
        request_id=row.request_id or "",
        error_message=row.error_message,
    )
    application.create_stamp.CopyFrom(_stamp(row.created_by, row.created_at))
    if row.complete_time is not None:
        application.complete_time.CopyFrom(_timestamp(row.complete_time))
    return application


class FeaturesStore:
    """Every read and write of the features catalog goes through here.

    Methods taking a `session` run inside the caller's transaction (`transaction()`),
    so a definition change, its idempotency record and its Feast projection commit or
    roll back together.
    """

    def __init__(self, database: Database):
        self.database = database

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        with self.database.session_scope() as session:
            yield session

    def list_feature_view_names(self, residency_region: str | None = None) -> list[str]:
        """Names of the feature views, sorted; only those of `residency_region` when given."""
        query = sa.select(feature_views.c.name).order_by(feature_views.c.name)
        if residency_region is not None:
            query = query.where(feature_views.c.residency_region == residency_region)
        with self.database.session_scope() as session:
            return list(session.execute(query).scalars())

    # -- entities ----------------------------------------------------------------------
    def get_entity(self, session: Session, entity_id: str) -> messages.Entity | None:
        row = session.execute(sa.select(entities).where(entities.c.name == entity_id)).first()
        return None if row is None else _entity_from_row(row)

    def list_entities(self, session: Session) -> list[messages.Entity]:
        return [_entity_from_row(row) for row in session.execute(sa.select(entities).order_by(entities.c.name))]

    def insert_entity(self, session: Session, entity_id: str, entity: messages.Entity) -> None:
        session.execute(entities.insert().values(**_entity_row(entity_id, entity)))

    def update_entity(self, session: Session, entity_id: str, entity: messages.Entity) -> None:
        row = _entity_row(entity_id, entity)
        del row["name"], row["created_by"], row["created_at"]
        session.execute(entities.update().where(entities.c.name == entity_id).values(**row))

    def delete_entity(self, session: Session, entity_id: str) -> None:
        session.execute(feature_view_entities.delete().where(feature_view_entities.c.entity == entity_id))
        session.execute(entities.delete().where(entities.c.name == entity_id))

    def views_keyed_by(self, session: Session, entity_id: str) -> list[str]:
        query = sa.select(feature_view_entities.c.feature_view).where(feature_view_entities.c.entity == entity_id)
        return sorted(session.execute(query).scalars())

    # -- feature views -----------------------------------------------------------------
    def _view_entities(self, session: Session, view_ids: list[str]) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {view_id: [] for view_id in view_ids}
        if not view_ids:
            return found
        query = (
            sa.select(feature_view_entities.c.feature_view, feature_view_entities.c.entity)
            .where(feature_view_entities.c.feature_view.in_(view_ids))
            .order_by(feature_view_entities.c.feature_view, feature_view_entities.c.position)
        )
        for view_id, entity_id in session.execute(query):
            found[view_id].append(entity_id)
        return found

    def get_feature_view(self, session: Session, view_id: str) -> messages.FeatureView | None:
        row = session.execute(sa.select(feature_views).where(feature_views.c.name == view_id)).first()
        if row is None:
            return None
        return _feature_view_from_row(row, self._view_entities(session, [view_id])[view_id])

    def list_feature_views(
        self, session: Session, *, entity: str = "", dataset: str = "", residency_region: str = ""
    ) -> list[messages.FeatureView]:
        query = sa.select(feature_views).order_by(feature_views.c.name)
        if dataset:
            query = query.where(feature_views.c.source_dataset == dataset)
        if residency_region:
            query = query.where(feature_views.c.residency_region == residency_region)
        if entity:
            keyed = sa.select(feature_view_entities.c.feature_view).where(feature_view_entities.c.entity == entity)
            query = query.where(feature_views.c.name.in_(keyed))
        rows = list(session.execute(query))
        keys = self._view_entities(session, [row.name for row in rows])
        return [_feature_view_from_row(row, keys[row.name]) for row in rows]

    def _write_view_entities(self, session: Session, view_id: str, view: messages.FeatureView) -> None:
        session.execute(feature_view_entities.delete().where(feature_view_entities.c.feature_view == view_id))
        rows = [
            {"feature_view": view_id, "entity": name.rpartition("/")[2], "position": position}
            for position, name in enumerate(view.entities)
        ]
        if rows:
            session.execute(feature_view_entities.insert(), rows)

    def insert_feature_view(self, session: Session, view_id: str, view: messages.FeatureView) -> None:
        session.execute(feature_views.insert().values(**_feature_view_row(view_id, view)))
        self._write_view_entities(session, view_id, view)

    def update_feature_view(self, session: Session, view_id: str, view: messages.FeatureView) -> None:
        row = _feature_view_row(view_id, view)
        del row["name"], row["created_by"], row["created_at"]
        session.execute(feature_views.update().where(feature_views.c.name == view_id).values(**row))
        self._write_view_entities(session, view_id, view)

    def delete_feature_view(self, session: Session, view_id: str) -> None:
        session.execute(feature_view_state.delete().where(feature_view_state.c.feature_view == view_id))
        session.execute(feature_view_entities.delete().where(feature_view_entities.c.feature_view == view_id))
        session.execute(feature_views.delete().where(feature_views.c.name == view_id))

    # -- on-demand feature views -------------------------------------------------------
    def get_on_demand_feature_view(self, session: Session, view_id: str) -> messages.OnDemandFeatureView | None:
        row = session.execute(sa.select(on_demand_feature_views).where(on_demand_feature_views.c.name == view_id)).first()
        return None if row is None else _odfv_from_row(row)

    def list_on_demand_feature_views(self, session: Session) -> list[messages.OnDemandFeatureView]:
        rows = session.execute(sa.select(on_demand_feature_views).order_by(on_demand_feature_views.c.name))
        return [_odfv_from_row(row) for row in rows]

    def insert_on_demand_feature_view(self, session: Session, view_id: str, view: messages.OnDemandFeatureView) -> None:
        session.execute(on_demand_feature_views.insert().values(**_odfv_row(view_id, view)))

    def update_on_demand_feature_view(self, session: Session, view_id: str, view: messages.OnDemandFeatureView) -> None:
        row = _odfv_row(view_id, view)
        del row["name"], row["created_by"], row["created_at"]
        session.execute(on_demand_feature_views.update().where(on_demand_feature_views.c.name == view_id).values(**row))

    def delete_on_demand_feature_view(self, session: Session, view_id: str) -> None:
        session.execute(on_demand_feature_views.delete().where(on_demand_feature_views.c.name == view_id))

    # -- feature services --------------------------------------------------------------
    def get_feature_service(self, session: Session, service_id: str) -> messages.FeatureService | None:
        row = session.execute(sa.select(feature_services).where(feature_services.c.name == service_id)).first()
        return None if row is None else _feature_service_from_row(row)

    def list_feature_services(self, session: Session) -> list[messages.FeatureService]:
        return [_feature_service_from_row(row) for row in session.execute(sa.select(feature_services).order_by(feature_services.c.name))]

    def insert_feature_service(self, session: Session, service_id: str, service: messages.FeatureService) -> None:
        session.execute(feature_services.insert().values(**_feature_service_row(service_id, service)))

    def update_feature_service(self, session: Session, service_id: str, service: messages.FeatureService) -> None:
        row = _feature_service_row(service_id, service)
        del row["name"], row["created_by"], row["created_at"]
        session.execute(feature_services.update().where(feature_services.c.name == service_id).values(**row))

    def delete_feature_service(self, session: Session, service_id: str) -> None:
        session.execute(feature_services.delete().where(feature_services.c.name == service_id))

    # -- per-view state ----------------------------------------------------------------
    def get_view_state(self, session: Session, view_id: str) -> ViewState:
        row = session.execute(sa.select(feature_view_state).where(feature_view_state.c.feature_view == view_id)).first()
        if row is None:
            return ViewState(view_id)
        return ViewState(
            view_id,
            row.offline_dataset_version,
            row.materialized_dataset_version,
            _utc(row.materialized_until),
            _utc(row.newest_event_time),
            row.last_materialization,
        )

    def put_view_state(self, session: Session, state: ViewState) -> None:
        values = {
            "offline_dataset_version": state.offline_dataset_version,
            "materialized_dataset_version": state.materialized_dataset_version,
            "materialized_until": state.materialized_until,
            "newest_event_time": state.newest_event_time,
            "last_materialization": state.last_materialization,
            "updated_at": dt.datetime.now(dt.UTC),
        }
        updated = session.execute(
            feature_view_state.update().where(feature_view_state.c.feature_view == state.feature_view).values(**values)
        )
        if updated.rowcount == 0:  # type: ignore[attr-defined]
            session.execute(feature_view_state.insert().values(feature_view=state.feature_view, **values))

    # -- offline snapshots -------------------------------------------------------------
    def get_snapshot(self, session: Session, dataset_version: str) -> OfflineSnapshot | None:
        row = session.execute(sa.select(offline_snapshots).where(offline_snapshots.c.dataset_version == dataset_version)).first()
        if row is None:
            return None
        return OfflineSnapshot(
            row.dataset_version,
            row.dataset,
            row.path,
            row.content_hash,
            int(row.row_count),
            _utc(row.min_event_time),
            _utc(row.max_event_time),
        )

    def put_snapshot(self, session: Session, snapshot: OfflineSnapshot) -> None:
        session.execute(offline_snapshots.delete().where(offline_snapshots.c.dataset_version == snapshot.dataset_version))
        session.execute(
            offline_snapshots.insert().values(
                dataset_version=snapshot.dataset_version,
                dataset=snapshot.dataset,
                path=snapshot.path,
                content_hash=snapshot.content_hash,
                row_count=snapshot.row_count,
                min_event_time=snapshot.min_event_time,
                max_event_time=snapshot.max_event_time,
                created_at=dt.datetime.now(dt.UTC),
            )
        )

    def snapshots_of(self, session: Session, dataset: str) -> list[OfflineSnapshot]:
        query = sa.select(offline_snapshots.c.dataset_version).where(offline_snapshots.c.dataset == dataset)
        found = [self.get_snapshot(session, version) for version in session.execute(query).scalars()]
        return [snapshot for snapshot in found if snapshot is not None]

    # -- materializations --------------------------------------------------------------
    def insert_materialization(self, session: Session, run: messages.Materialization) -> None:
        session.execute(materialization_runs.insert().values(**_materialization_row(run)))

    def update_materialization(self, session: Session, run: messages.Materialization) -> None:
        row = _materialization_row(run)
        run_id = row.pop("id")
        session.execute(materialization_runs.update().where(materialization_runs.c.id == run_id).values(**row))

    def get_materialization(self, session: Session, run_id: str) -> messages.Materialization | None:
        row = session.execute(sa.select(materialization_runs).where(materialization_runs.c.id == run_id)).first()
        return None if row is None else _materialization_from_row(row)

    def materialization_by_request_id(self, session: Session, request_id: str) -> messages.Materialization | None:
        row = session.execute(sa.select(materialization_runs).where(materialization_runs.c.request_id == request_id)).first()
        return None if row is None else _materialization_from_row(row)

    def list_materializations(self, session: Session, *, state: str = "", trigger: str = "") -> list[messages.Materialization]:
        query = sa.select(materialization_runs).order_by(materialization_runs.c.created_at.desc(), materialization_runs.c.id.desc())
        if state:
            query = query.where(materialization_runs.c.state == short_name(state))
        if trigger:
            query = query.where(materialization_runs.c.trigger == short_name(trigger))
        return [_materialization_from_row(row) for row in session.execute(query)]

    # -- erasure -----------------------------------------------------------------------
    def get_erasure_application(self, session: Session, receipt: str) -> messages.ErasureApplication | None:
        row = session.execute(sa.select(erasure_applications).where(erasure_applications.c.erasure_receipt == receipt)).first()
        return None if row is None else _erasure_from_row(row)

    def put_erasure_application(self, session: Session, application: messages.ErasureApplication) -> None:
        application_id = application.name.rpartition("/")[2]
        session.execute(erasure_applications.delete().where(erasure_applications.c.id == application_id))
        session.execute(
            erasure_applications.insert().values(
                id=application_id,
                erasure_receipt=application.erasure_receipt,
                receipt_digest=application.receipt_digest,
                state=messages.ErasureApplicationState.Name(application.state),
                feature_views_json=json.dumps(list(application.feature_views)),
                offline_rows_removed=application.offline_rows_removed,
                online_keys_removed=application.online_keys_removed,
                request_id=application.request_id or None,
                error_message=application.error_message,
                created_by=application.create_stamp.actor,
                created_at=application.create_stamp.time.ToDatetime(dt.UTC),
                complete_time=application.complete_time.ToDatetime(dt.UTC) if application.HasField("complete_time") else None,
            )
        )

    def list_erasure_applications(self, session: Session, receipt: str = "") -> list[messages.ErasureApplication]:
        query = sa.select(erasure_applications).order_by(erasure_applications.c.created_at.desc())
        if receipt:
            query = query.where(erasure_applications.c.erasure_receipt == receipt)
        return [_erasure_from_row(row) for row in session.execute(query)]
