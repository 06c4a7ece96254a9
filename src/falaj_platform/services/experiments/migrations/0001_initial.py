"""Experiments catalog: experiments, variants, exposures, outcomes, request log.

Revision ID: experiments_0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

from falaj_platform.runtime.db import request_log_columns

revision = "experiments_0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "experiments",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("display_name", sa.String(256), nullable=False, server_default=""),
        sa.Column("description", sa.Text, nullable=False, server_default=""),
        sa.Column("hypothesis", sa.Text, nullable=False, server_default=""),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("residency_region", sa.String(32), nullable=False),
        sa.Column("unit_attribute", sa.String(128), nullable=False),
        sa.Column("hash_salt", sa.String(256), nullable=False),
        sa.Column("hash_algorithm", sa.String(32), nullable=False),
        sa.Column("coverage_bps", sa.Integer, nullable=False),
        sa.Column("config_revision", sa.BigInteger, nullable=False, server_default="1"),
        sa.Column("design_json", sa.Text, nullable=False, server_default="{}"),
        sa.Column("start_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("stop_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("stop_reason_json", sa.Text, nullable=True),
        sa.Column("conclusion_json", sa.Text, nullable=True),
        sa.Column("state_history_json", sa.Text, nullable=False, server_default="[]"),
        sa.Column("labels_json", sa.Text, nullable=False, server_default="{}"),
        sa.Column("etag", sa.String(64), nullable=False),
        sa.Column("created_by", sa.String(256), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(256), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_experiments_state", "experiments", ["state"])
    op.create_index("ix_experiments_residency_region", "experiments", ["residency_region"])
    op.create_table(
        "variants",
        sa.Column("experiment", sa.String(128), sa.ForeignKey("experiments.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("variant_id", sa.String(128), primary_key=True),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("display_name", sa.String(256), nullable=False, server_default=""),
        sa.Column("description", sa.Text, nullable=False, server_default=""),
        sa.Column("is_control", sa.Boolean, nullable=False),
        sa.Column("weight_bps", sa.Integer, nullable=False),
        sa.Column("model_version", sa.String(256), nullable=True),
        sa.Column("deployment", sa.String(256), nullable=True),
    )
    op.create_table(
        "exposures",
        sa.Column("experiment", sa.String(128), sa.ForeignKey("experiments.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("event_id", sa.String(128), primary_key=True),
        sa.Column("unit_id", sa.String(256), nullable=False),
        sa.Column("variant_id", sa.String(128), nullable=False),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("source", sa.String(256), nullable=False, server_default=""),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["experiment", "variant_id"],
            ["variants.experiment", "variants.variant_id"],
            name="fk_exposures_variant",
            ondelete="CASCADE",
        ),
    )
    op.create_index("ix_exposures_experiment_variant_id_unit_id", "exposures", ["experiment", "variant_id", "unit_id"])
    op.create_index("ix_exposures_experiment_unit_id", "exposures", ["experiment", "unit_id"])
    op.create_table(
        "outcomes",
        sa.Column("experiment", sa.String(128), sa.ForeignKey("experiments.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("event_id", sa.String(128), primary_key=True),
        sa.Column("unit_id", sa.String(256), nullable=False),
        sa.Column("metric_id", sa.String(128), nullable=False),
        sa.Column("value", sa.Float, nullable=False),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_outcomes_experiment_metric_id_unit_id", "outcomes", ["experiment", "metric_id", "unit_id"])
    op.create_table("request_log", *request_log_columns())


def downgrade() -> None:
    op.drop_table("request_log")
    op.drop_index("ix_outcomes_experiment_metric_id_unit_id", "outcomes")
    op.drop_table("outcomes")
    op.drop_index("ix_exposures_experiment_unit_id", "exposures")
    op.drop_index("ix_exposures_experiment_variant_id_unit_id", "exposures")
    op.drop_table("exposures")
    op.drop_table("variants")
    op.drop_index("ix_experiments_residency_region", "experiments")
    op.drop_index("ix_experiments_state", "experiments")
    op.drop_table("experiments")
