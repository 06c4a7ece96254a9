"""SQLAlchemy store of the ingest service: the catalog of datasets and their versions."""

from __future__ import annotations

import sqlalchemy as sa

from falaj_platform.runtime.db import Database, request_log_columns

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
)

schema_versions = sa.Table(
    "schema_versions",
    metadata,
    sa.Column("dataset", sa.String(128), sa.ForeignKey("datasets.name", ondelete="CASCADE"), primary_key=True),
    sa.Column("major", sa.Integer, primary_key=True),
    sa.Column("minor", sa.Integer, primary_key=True),
    sa.Column("schema_json", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

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
)

request_log = sa.Table("request_log", metadata, *request_log_columns())


class IngestStore:
    """Every read and write of the ingest catalog goes through here."""

    def __init__(self, database: Database):
        self.database = database

    def count_datasets(self) -> int:
        with self.database.session_scope() as session:
            return int(session.execute(sa.select(sa.func.count()).select_from(datasets)).scalar_one())
