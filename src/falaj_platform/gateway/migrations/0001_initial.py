"""Gateway: policy lines, revoked certificate serials, hash-chained audit records, request log.

Revision ID: gateway_0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

from falaj_platform.runtime.db import request_log_columns

revision = "gateway_0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "policy_rules",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("ptype", sa.String(8), nullable=False),
        sa.Column("v0", sa.String(256), nullable=False, server_default=""),
        sa.Column("v1", sa.String(256), nullable=False, server_default=""),
        sa.Column("v2", sa.String(256), nullable=False, server_default=""),
        sa.Column("v3", sa.String(256), nullable=False, server_default=""),
        sa.Column("v4", sa.String(256), nullable=False, server_default=""),
        sa.Column("v5", sa.String(256), nullable=False, server_default=""),
        sa.UniqueConstraint("ptype", "v0", "v1", "v2", "v3", "v4", "v5", name="uq_policy_rules_line"),
    )
    op.create_table(
        "revoked_certificates",
        sa.Column("serial", sa.String(64), primary_key=True),
        sa.Column("reason", sa.Text, nullable=False, server_default=""),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "audit_records",
        sa.Column("sequence", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(256), nullable=False),
        sa.Column("action", sa.String(256), nullable=False),
        sa.Column("resource", sa.String(512), nullable=False),
        sa.Column("domain", sa.String(64), nullable=False),
        sa.Column("decision", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=False, server_default=""),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False, unique=True),
    )
    op.create_index("ix_audit_records_time", "audit_records", ["time"])
    op.create_index("ix_audit_records_actor", "audit_records", ["actor"])
    op.create_table("request_log", *request_log_columns())


def downgrade() -> None:
    op.drop_table("request_log")
    op.drop_table("audit_records")
    op.drop_table("revoked_certificates")
    op.drop_table("policy_rules")
