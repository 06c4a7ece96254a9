"""SQLAlchemy store of the serving service: deployments, their traffic-split revisions
(rollouts) and the model versions loaded for inference.

A deployment's live traffic split is the split of its current revision; every change
opens a new rollout row, so the history of splits and of canary promotions and
rollbacks is the rollouts table.
"""

from __future__ import annotations

import sqlalchemy as sa

from falaj_platform.runtime.db import Database, request_log_columns

metadata = sa.MetaData()

deployments = sa.Table(
    "deployments",
    metadata,
    # The id is the OIP model name callers send.
    sa.Column("id", sa.String(128), primary_key=True),
    sa.Column("display_name", sa.String(256), nullable=False, server_default=""),
    sa.Column("description", sa.Text, nullable=False, server_default=""),
    sa.Column("model", sa.String(256), nullable=False, index=True),
    sa.Column("residency_region", sa.String(32), nullable=False, index=True),
    sa.Column("current_revision", sa.BigInteger, nullable=False),
    # ONNX Runtime, batching and warm-up settings.
    sa.Column("runtime_json", sa.Text, nullable=False, server_default="{}"),
    sa.Column("feature_enrichment_json", sa.Text, nullable=True),
    sa.Column("prediction_log_json", sa.Text, nullable=False, server_default="{}"),
    sa.Column("state", sa.String(32), nullable=False),
    sa.Column("state_reason", sa.Text, nullable=False, server_default=""),
    sa.Column("labels_json", sa.Text, nullable=False, server_default="{}"),
    sa.Column("etag", sa.String(64), nullable=False),
    sa.Column("created_by", sa.String(256), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_by", sa.String(256), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

# One row per traffic-split revision of a deployment.
rollouts = sa.Table(
    "rollouts",
    metadata,
    sa.Column("deployment", sa.String(128), sa.ForeignKey("deployments.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("revision", sa.BigInteger, primary_key=True),
    # The TrafficSplit: single, canary or A-B strategy, plus shadows.
    sa.Column("traffic_split_json", sa.Text, nullable=False),
    sa.Column("previous_revision", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("state", sa.String(32), nullable=False),
    sa.Column("trigger", sa.String(32), nullable=False),
    sa.Column("reason", sa.Text, nullable=False, server_default=""),
    sa.Column("canary_step", sa.Integer, nullable=False, server_default="0"),
    # Route metrics when the rollout ended.
    sa.Column("route_statuses_json", sa.Text, nullable=False, server_default="[]"),
    sa.Column("created_by", sa.String(256), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("end_time", sa.DateTime(timezone=True), nullable=True),
)

served_models = sa.Table(
    "served_models",
    metadata,
    sa.Column("id", sa.String(128), primary_key=True),
    sa.Column("model_version", sa.String(256), nullable=False),
    sa.Column("state", sa.String(32), nullable=False),
    sa.Column("state_reason", sa.Text, nullable=False, server_default=""),
    sa.Column("runtime_json", sa.Text, nullable=False, server_default="{}"),
    sa.Column("residency_region", sa.String(32), nullable=False),
    sa.Column("artifact_sha256", sa.String(64), nullable=False, server_default=""),
    sa.Column("created_by", sa.String(256), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("load_start_time", sa.DateTime(timezone=True), nullable=True),
    sa.Column("ready_time", sa.DateTime(timezone=True), nullable=True),
    sa.Index("ix_served_models_model_version", "model_version", unique=True),
)

request_log = sa.Table("request_log", metadata, *request_log_columns())


class ServingStore:
    """Every read and write of deployments, rollouts and served models goes through here."""

    def __init__(self, database: Database):
        self.database = database

    def current_traffic_split_json(self, deployment_id: str) -> str | None:
        """The traffic split (JSON) of the deployment's current revision; None for an unknown deployment."""
        query = (
            sa.select(rollouts.c.traffic_split_json)
            .join(deployments, sa.and_(rollouts.c.deployment == deployments.c.id, rollouts.c.revision == deployments.c.current_revision))
            .where(deployments.c.id == deployment_id)
        )
        with self.database.session_scope() as session:
            return session.execute(query).scalar_one_or_none()
