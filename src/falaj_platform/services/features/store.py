"""SQLAlchemy store of the features service: its own catalog of feature definitions and runs.

Feast keeps its registry, offline and online stores apart; these tables are what the
service itself answers for: definitions as the API sees them (owner, residency, etag,
audit stamps) and the history of materialization runs.
"""

from __future__ import annotations

import sqlalchemy as sa

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

request_log = sa.Table("request_log", metadata, *request_log_columns())


class FeaturesStore:
    """Every read and write of the features catalog goes through here."""

    def __init__(self, database: Database):
        self.database = database

    def list_feature_view_names(self, residency_region: str | None = None) -> list[str]:
        """Names of the feature views, sorted; only those of `residency_region` when given."""
        query = sa.select(feature_views.c.name).order_by(feature_views.c.name)
        if residency_region is not None:
            query = query.where(feature_views.c.residency_region == residency_region)
        with self.database.session_scope() as session:
            return list(session.execute(query).scalars())
