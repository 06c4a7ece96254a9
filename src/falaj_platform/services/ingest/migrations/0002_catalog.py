"""Ingest catalog, full: dataset definitions, version manifests and files, profiles,
ingestions and batch ids, quarantine, sources, consent and erasure receipts.

Revision ID: ingest_0002
Revises: ingest_0001
"""

import sqlalchemy as sa
from alembic import op

revision = "ingest_0002"
down_revision = "ingest_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # New NOT NULL columns of existing tables carry server defaults, so rows written
    # before this revision stay valid.
    op.add_column("datasets", sa.Column("display_name", sa.String(256), nullable=False, server_default=""))
    op.add_column("datasets", sa.Column("labels_json", sa.Text, nullable=False, server_default="{}"))
    op.add_column("datasets", sa.Column("cleansing_json", sa.Text, nullable=False, server_default="{}"))
    op.add_column("datasets", sa.Column("schema_major", sa.Integer, nullable=False, server_default="1"))
    op.add_column("datasets", sa.Column("schema_minor", sa.Integer, nullable=False, server_default="0"))
    op.add_column("datasets", sa.Column("latest_version_number", sa.BigInteger, nullable=False, server_default="0"))
    op.add_column("datasets", sa.Column("etag", sa.String(64), nullable=False, server_default=""))
    op.add_column("datasets", sa.Column("created_by", sa.String(256), nullable=False, server_default=""))
    op.add_column("datasets", sa.Column("updated_by", sa.String(256), nullable=False, server_default=""))

    op.add_column("schema_versions", sa.Column("change_kind", sa.String(32), nullable=False, server_default="SCHEMA_CHANGE_KIND_INITIAL"))
    op.add_column("schema_versions", sa.Column("changes_json", sa.Text, nullable=False, server_default="[]"))
    op.add_column("schema_versions", sa.Column("migration_json", sa.Text, nullable=True))
    op.add_column("schema_versions", sa.Column("migrated_dataset_version", sa.BigInteger, nullable=True))
    op.add_column("schema_versions", sa.Column("created_by", sa.String(256), nullable=False, server_default=""))

    op.add_column("dataset_versions", sa.Column("version_number", sa.BigInteger, nullable=False, server_default="0"))
    op.add_column("dataset_versions", sa.Column("added_row_count", sa.BigInteger, nullable=False, server_default="0"))
    op.add_column("dataset_versions", sa.Column("size_bytes", sa.BigInteger, nullable=False, server_default="0"))
    op.add_column("dataset_versions", sa.Column("partition_count", sa.Integer, nullable=False, server_default="0"))
    op.add_column("dataset_versions", sa.Column("min_event_time", sa.DateTime(timezone=True), nullable=True))
    op.add_column("dataset_versions", sa.Column("max_event_time", sa.DateTime(timezone=True), nullable=True))
    op.add_column("dataset_versions", sa.Column("ingestion", sa.String(64), nullable=True))
    op.add_column("dataset_versions", sa.Column("source_kind", sa.String(48), nullable=False, server_default="SOURCE_KIND_UNSPECIFIED"))
    op.add_column("dataset_versions", sa.Column("source_description", sa.Text, nullable=False, server_default=""))
    op.add_column("dataset_versions", sa.Column("write_mode", sa.String(32), nullable=False, server_default="WRITE_MODE_APPEND"))
    op.add_column("dataset_versions", sa.Column("lineage_json", sa.Text, nullable=False, server_default="{}"))
    op.add_column("dataset_versions", sa.Column("created_by", sa.String(256), nullable=False, server_default=""))
    op.create_index("ix_dataset_versions_dataset_version_number", "dataset_versions", ["dataset", "version_number"], unique=True)

    op.create_table(
        "version_files",
        sa.Column("version_id", sa.String(64), sa.ForeignKey("dataset_versions.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("position", sa.Integer, primary_key=True),
        sa.Column("path", sa.String(512), nullable=False),
        sa.Column("event_date", sa.String(16), nullable=False),
        sa.Column("row_count", sa.BigInteger, nullable=False),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("min_event_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("max_event_time", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_version_files_path", "version_files", ["path"])
    op.create_table(
        "dataset_profiles",
        sa.Column("version_id", sa.String(64), sa.ForeignKey("dataset_versions.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("profile_json", sa.Text, nullable=False),
        sa.Column("computed_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "ingestions",
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
    )
    op.create_index("ix_ingestions_dataset_created_at", "ingestions", ["dataset", "created_at"])
    op.create_table(
        "ingested_batches",
        sa.Column("dataset", sa.String(128), sa.ForeignKey("datasets.name", ondelete="CASCADE"), primary_key=True),
        sa.Column("batch_id", sa.String(256), primary_key=True),
        sa.Column("ingestion", sa.String(64), sa.ForeignKey("ingestions.id", ondelete="CASCADE"), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
    )
    op.create_index("ix_ingested_batches_ingestion", "ingested_batches", ["ingestion"])
    op.create_table(
        "quarantined_rows",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("dataset", sa.String(128), sa.ForeignKey("datasets.name", ondelete="CASCADE"), nullable=False),
        sa.Column("ingestion", sa.String(64), sa.ForeignKey("ingestions.id", ondelete="CASCADE"), nullable=False),
        sa.Column("batch_id", sa.String(256), nullable=False, server_default=""),
        sa.Column("row_index", sa.BigInteger, nullable=False),
        sa.Column("values_json", sa.Text, nullable=False),
        sa.Column("violations_json", sa.Text, nullable=False),
        sa.Column("violation_keys", sa.Text, nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("schema_version", sa.String(32), nullable=False),
        sa.Column("subject_id", sa.String(256), nullable=True),
        sa.Column("resubmit_attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("accepted_by_ingestion", sa.String(64), nullable=True),
        sa.Column("discard_reason", sa.Text, nullable=False, server_default=""),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("resolved_by", sa.String(256), nullable=True),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_quarantined_rows_ingestion", "quarantined_rows", ["ingestion"])
    op.create_index("ix_quarantined_rows_subject_id", "quarantined_rows", ["subject_id"])
    op.create_index("ix_quarantined_rows_dataset_state", "quarantined_rows", ["dataset", "state"])
    op.create_table(
        "sources",
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
    )
    op.create_index("ix_sources_state", "sources", ["state"])
    op.create_table(
        "source_seen_keys",
        sa.Column("dataset", sa.String(128), primary_key=True),
        sa.Column("source_id", sa.String(128), primary_key=True),
        sa.Column("key_digest", sa.String(64), primary_key=True),
        sa.ForeignKeyConstraint(
            ["dataset", "source_id"], ["sources.dataset", "sources.source_id"], name="fk_source_seen_keys_source", ondelete="CASCADE"
        ),
    )
    op.create_table(
        "consents",
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
    )
    op.create_index("ix_consents_subject_id_purpose", "consents", ["subject_id", "purpose"], unique=True)
    op.create_index("ix_consents_updated_at", "consents", ["updated_at"])
    op.create_table(
        "erasure_receipts",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("request_id", sa.String(128), nullable=True),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("receipt_json", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_erasure_receipts_request_id", "erasure_receipts", ["request_id"], unique=True)


def downgrade() -> None:
    op.drop_index("ix_erasure_receipts_request_id", "erasure_receipts")
    op.drop_table("erasure_receipts")
    op.drop_index("ix_consents_updated_at", "consents")
    op.drop_index("ix_consents_subject_id_purpose", "consents")
    op.drop_table("consents")
    op.drop_table("source_seen_keys")
    op.drop_index("ix_sources_state", "sources")
    op.drop_table("sources")
    op.drop_index("ix_quarantined_rows_dataset_state", "quarantined_rows")
    op.drop_index("ix_quarantined_rows_subject_id", "quarantined_rows")
    op.drop_index("ix_quarantined_rows_ingestion", "quarantined_rows")
    op.drop_table("quarantined_rows")
    op.drop_index("ix_ingested_batches_ingestion", "ingested_batches")
    op.drop_table("ingested_batches")
    op.drop_index("ix_ingestions_dataset_created_at", "ingestions")
    op.drop_table("ingestions")
    op.drop_table("dataset_profiles")
    op.drop_index("ix_version_files_path", "version_files")
    op.drop_table("version_files")
    op.drop_index("ix_dataset_versions_dataset_version_number", "dataset_versions")
    with op.batch_alter_table("dataset_versions") as batch:
        for column in (
            "created_by",
            "lineage_json",
            "write_mode",
            "source_description",
            "source_kind",
            "ingestion",
            "max_event_time",
            "min_event_time",
            "partition_count",
            "size_bytes",
            "added_row_count",
            "version_number",
        ):
            batch.drop_column(column)
    with op.batch_alter_table("schema_versions") as batch:
        for column in ("created_by", "migrated_dataset_version", "migration_json", "changes_json", "change_kind"):
            batch.drop_column(column)
    with op.batch_alter_table("datasets") as batch:
        for column in (
            "updated_by",
            "created_by",
            "etag",
            "latest_version_number",
            "schema_minor",
            "schema_major",
            "cleansing_json",
            "labels_json",
            "display_name",
        ):
            batch.drop_column(column)
