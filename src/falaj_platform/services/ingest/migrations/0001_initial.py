"""Ingest catalog: datasets, schema versions, dataset versions, request log.

Revision ID: ingest_0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

from falaj_platform.runtime.db import request_log_columns

revision = "ingest_0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "datasets",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("owner", sa.String(256), nullable=False),
        sa.Column("residency_region", sa.String(32), nullable=False),
        sa.Column("description", sa.Text, nullable=False, server_default=""),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "schema_versions",
        sa.Column("dataset", sa.String(128), sa.ForeignKey("datasets.name", ondelete="CASCADE"), primary_key=True),
        sa.Column("major", sa.Integer, primary_key=True),
        sa.Column("minor", sa.Integer, primary_key=True),
        sa.Column("schema_json", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "dataset_versions",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("dataset", sa.String(128), sa.ForeignKey("datasets.name", ondelete="CASCADE"), nullable=False),
        sa.Column("schema_major", sa.Integer, nullable=False),
        sa.Column("schema_minor", sa.Integer, nullable=False),
        sa.Column("row_count", sa.BigInteger, nullable=False),
        sa.Column("quarantined_count", sa.BigInteger, nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_dataset_versions_dataset", "dataset_versions", ["dataset"])
    op.create_table("request_log", *request_log_columns())


def downgrade() -> None:
    op.drop_table("request_log")
    op.drop_index("ix_dataset_versions_dataset", "dataset_versions")
    op.drop_table("dataset_versions")
    op.drop_table("schema_versions")
    op.drop_table("datasets")
