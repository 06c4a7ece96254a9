"""Gateway: policy metadata and revision, roles, revocation details, full audit records, chain head, checkpoints.

Revision ID: gateway_0002
Revises: gateway_0001
"""

import sqlalchemy as sa
from alembic import op

revision = "gateway_0002"
down_revision = "gateway_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("policy_rules") as batch:
        batch.add_column(sa.Column("description", sa.Text, nullable=False, server_default=""))
        batch.add_column(sa.Column("expire_time", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("created_by", sa.String(256), nullable=False, server_default=""))
        batch.add_column(sa.Column("created_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "policy_state",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("revision", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "roles",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("description", sa.Text, nullable=False, server_default=""),
        sa.Column("parent_roles_json", sa.Text, nullable=False, server_default="[]"),
        sa.Column("created_by", sa.String(256), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("etag", sa.String(64), nullable=False),
    )
    with op.batch_alter_table("revoked_certificates") as batch:
        batch.add_column(sa.Column("subject", sa.String(256), nullable=False, server_default=""))
        batch.add_column(sa.Column("note", sa.Text, nullable=False, server_default=""))
        batch.add_column(sa.Column("created_by", sa.String(256), nullable=False, server_default=""))
    with op.batch_alter_table("audit_records") as batch:
        batch.add_column(sa.Column("kind", sa.String(16), nullable=False, server_default="call"))
        batch.add_column(sa.Column("method", sa.String(512), nullable=False, server_default=""))
        batch.add_column(sa.Column("detail", sa.Text, nullable=False, server_default=""))
        batch.add_column(sa.Column("status_code", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("source_address", sa.String(128), nullable=False, server_default=""))
        batch.add_column(sa.Column("duration_us", sa.BigInteger, nullable=False, server_default="0"))
        batch.add_column(sa.Column("event_type", sa.String(64), nullable=False, server_default=""))
        batch.add_column(sa.Column("reporter", sa.String(256), nullable=False, server_default=""))
        batch.add_column(sa.Column("attributes_json", sa.Text, nullable=False, server_default="{}"))
        batch.add_column(sa.Column("report_id", sa.String(256), nullable=True))
        batch.create_index("ix_audit_records_report_id", ["report_id"], unique=True)
    op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("sequence", sa.BigInteger, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    op.create_table(
        "audit_checkpoints",
        sa.Column("sequence", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("signature", sa.LargeBinary, nullable=False),
        sa.Column("key_id", sa.String(32), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("audit_checkpoints")
    op.drop_table("audit_head")
    with op.batch_alter_table("audit_records") as batch:
        batch.drop_index("ix_audit_records_report_id")
        for name in (
            "report_id",
            "attributes_json",
            "reporter",
            "event_type",
            "duration_us",
            "source_address",
            "status_code",
            "detail",
            "method",
            "kind",
        ):
            batch.drop_column(name)
    with op.batch_alter_table("revoked_certificates") as batch:
        for name in ("created_by", "note", "subject"):
            batch.drop_column(name)
    op.drop_table("roles")
    op.drop_table("policy_state")
    with op.batch_alter_table("policy_rules") as batch:
        for name in ("created_at", "created_by", "expire_time", "description"):
            batch.drop_column(name)
