"""SQLAlchemy store of the gateway: Casbin policy lines, revoked serials, the audit chain."""

from __future__ import annotations

import sqlalchemy as sa

from falaj_platform.runtime.db import Database, request_log_columns

metadata = sa.MetaData()

# The layout pycasbin's SQL adapters use: one row per policy line.
policy_rules = sa.Table(
    "policy_rules",
    metadata,
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

revoked_certificates = sa.Table(
    "revoked_certificates",
    metadata,
    sa.Column("serial", sa.String(64), primary_key=True),
    sa.Column("reason", sa.Text, nullable=False, server_default=""),
    sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=False),
)

# Append-only and hash-chained: hash = sha256(prev_hash || canonical record).
audit_records = sa.Table(
    "audit_records",
    metadata,
    sa.Column("sequence", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("time", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("actor", sa.String(256), nullable=False, index=True),
    sa.Column("action", sa.String(256), nullable=False),
    sa.Column("resource", sa.String(512), nullable=False),
    sa.Column("domain", sa.String(64), nullable=False),
    sa.Column("decision", sa.String(16), nullable=False),
    sa.Column("reason", sa.Text, nullable=False, server_default=""),
    sa.Column("request_id", sa.String(128), nullable=False),
    sa.Column("prev_hash", sa.String(64), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False, unique=True),
)

request_log = sa.Table("request_log", metadata, *request_log_columns())


class GatewayStore:
    """Every read and write of the gateway's own database goes through here."""

    def __init__(self, database: Database):
        self.database = database

    def count_audit_records(self) -> int:
        with self.database.session_scope() as session:
            return int(session.execute(sa.select(sa.func.count()).select_from(audit_records)).scalar_one())
