"""SQLAlchemy store of the gateway: Casbin policy lines, roles, revoked serials, the audit chain."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import sqlalchemy as sa
from google.protobuf.message import Message
from sqlalchemy.orm import Session

from falaj_platform.gateway.chain import GENESIS_HASH, AuditEntry, ChainedRecord, Checkpoint, chain
from falaj_platform.gateway.policy import PolicyLine
from falaj_platform.runtime.db import Database, request_log_columns
from falaj_platform.runtime.errors import AlreadyExists, FailedPrecondition, NotFound
from falaj_platform.runtime.idempotency import ResponseT, remember, replayed_response

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
    sa.Column("description", sa.Text, nullable=False, server_default=""),
    sa.Column("expire_time", sa.DateTime(timezone=True), nullable=True),
    sa.Column("created_by", sa.String(256), nullable=False, server_default=""),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=True),
    sa.UniqueConstraint("ptype", "v0", "v1", "v2", "v3", "v4", "v5", name="uq_policy_rules_line"),
)

# One row: bumped in the same transaction as every policy change, so every gateway
# replica notices a change by reading one number.
policy_state = sa.Table(
    "policy_state",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("revision", sa.BigInteger, nullable=False),
)

roles = sa.Table(
    "roles",
    metadata,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("description", sa.Text, nullable=False, server_default=""),
    sa.Column("parent_roles_json", sa.Text, nullable=False, server_default="[]"),
    sa.Column("created_by", sa.String(256), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("etag", sa.String(64), nullable=False),
)

revoked_certificates = sa.Table(
    "revoked_certificates",
    metadata,
    sa.Column("serial", sa.String(64), primary_key=True),
    sa.Column("reason", sa.Text, nullable=False, server_default=""),
    sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("subject", sa.String(256), nullable=False, server_default=""),
    sa.Column("note", sa.Text, nullable=False, server_default=""),
    sa.Column("created_by", sa.String(256), nullable=False, server_default=""),
)

# Append-only and hash-chained (see chain.py).
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
    sa.Column("kind", sa.String(16), nullable=False, server_default="call"),
    sa.Column("method", sa.String(512), nullable=False, server_default=""),
    sa.Column("detail", sa.Text, nullable=False, server_default=""),
    sa.Column("status_code", sa.Integer, nullable=False, server_default="0"),
    sa.Column("source_address", sa.String(128), nullable=False, server_default=""),
    sa.Column("duration_us", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("event_type", sa.String(64), nullable=False, server_default=""),
    sa.Column("reporter", sa.String(256), nullable=False, server_default=""),
    sa.Column("attributes_json", sa.Text, nullable=False, server_default="{}"),
    sa.Column("report_id", sa.String(256), nullable=True),
    sa.Index("ix_audit_records_report_id", "report_id", unique=True),
)

# One row: the chain's head, locked while a batch is appended so that several gateway
# replicas writing to one PostgreSQL database still build a single chain.
audit_head = sa.Table(
    "audit_head",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("sequence", sa.BigInteger, nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
)

audit_checkpoints = sa.Table(
    "audit_checkpoints",
    metadata,
    sa.Column("sequence", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("hash", sa.String(64), nullable=False),
    sa.Column("time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("signature", sa.LargeBinary, nullable=False),
    sa.Column("key_id", sa.String(32), nullable=False),
)

request_log = sa.Table("request_log", metadata, *request_log_columns())


@dataclass(frozen=True)
class StoredLine:
    """A policy line with its catalog data."""

    id: int
    line: PolicyLine
    description: str
    created_by: str
    created_at: dt.datetime | None
    expire_time: dt.datetime | None


@dataclass(frozen=True)
class StoredRole:
    name: str
    description: str
    parent_roles: list[str]
    created_by: str
    created_at: dt.datetime
    updated_at: dt.datetime
    etag: str


@dataclass(frozen=True)
class StoredRevocation:
    serial: str
    subject: str
    reason: str
    note: str
    revoked_at: dt.datetime
    created_by: str


@dataclass(frozen=True)
class AuditFilter:
    caller: str = ""
    method: str = ""
    decision: str = ""
    domain: str = ""
    request_id: str = ""
    kind: str = ""
    event_type: str = ""
    start_time: dt.datetime | None = None
    end_time: dt.datetime | None = None


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value


def _line_values(line: PolicyLine) -> dict[str, str]:
    values = list(line.values) + [""] * (6 - len(line.values))
    return {"ptype": line.ptype, **{f"v{i}": values[i] for i in range(6)}}


def _row_line(row: sa.Row[tuple[object, ...]]) -> PolicyLine:
    width = 5 if row.ptype == "p" else 3
    return PolicyLine(str(row.ptype), tuple(str(getattr(row, f"v{i}")) for i in range(width)))


class GatewayStore:
    """Every read and write of the gateway's own database goes through here."""

    def __init__(self, database: Database):
        self.database = database

    # -- idempotent writes --------------------------------------------------------------
    def replayed_response(self, method: str, request: Message, response_type: type[ResponseT]) -> ResponseT | None:
        """The stored answer to an earlier identical write with this request's id, or None."""
        with self.database.session_scope() as session:
            return replayed_response(session, request_log, method, request, response_type)

    def remember_response(self, method: str, request: Message, response: Message) -> None:
        with self.database.session_scope() as session:
            remember(session, request_log, method, request, response)

    # -- policy -------------------------------------------------------------------------
    def policy_revision(self) -> int:
        with self.database.session_scope() as session:
            return int(session.execute(sa.select(policy_state.c.revision).where(policy_state.c.id == 1)).scalar() or 0)

    def _bump(self, session: Session) -> int:
        current = session.execute(sa.select(policy_state.c.revision).where(policy_state.c.id == 1).with_for_update()).scalar()
        if current is None:
            session.execute(policy_state.insert().values(id=1, revision=1))
            return 1
        session.execute(policy_state.update().where(policy_state.c.id == 1).values(revision=current + 1))
        return int(current) + 1

    def lines(self) -> list[StoredLine]:
        """Every policy line, oldest first; expired bindings are left out."""
        now = _now()
        with self.database.session_scope() as session:
            rows = session.execute(sa.select(policy_rules).order_by(policy_rules.c.id)).all()
        return [
            StoredLine(row.id, _row_line(row), row.description, row.created_by, _utc(row.created_at), _utc(row.expire_time))
            for row in rows
            if row.expire_time is None or _utc(row.expire_time) > now  # type: ignore[operator]
        ]

    def add_lines(
        self, lines: Iterable[PolicyLine], *, actor: str, description: str = "", expire_time: dt.datetime | None = None
    ) -> tuple[list[int], int]:
        """Insert lines (AlreadyExists if one is present); returns their ids and the new revision."""
        ids = []
        with self.database.session_scope() as session:
            for line in lines:
                result = session.connection().execute(
                    policy_rules.insert().values(
                        **_line_values(line), description=description, expire_time=expire_time, created_by=actor, created_at=_now()
                    )
                )
                ids.append(int(result.inserted_primary_key[0]))  # type: ignore[index]
            revision = self._bump(session)
        return ids, revision

    def get_line(self, line_id: int) -> StoredLine:
        with self.database.session_scope() as session:
            row = session.execute(sa.select(policy_rules).where(policy_rules.c.id == line_id)).first()
        if row is None:
            raise NotFound(f"policy line {line_id} does not exist", reason="POLICY_NOT_FOUND")
        return StoredLine(row.id, _row_line(row), row.description, row.created_by, _utc(row.created_at), _utc(row.expire_time))

    def delete_line(self, line_id: int, ptype: str) -> int:
        with self.database.session_scope() as session:
            deleted = (
                session.connection()
                .execute(policy_rules.delete().where(policy_rules.c.id == line_id, policy_rules.c.ptype == ptype))
                .rowcount
            )
            if not deleted:
                raise NotFound(f"policy line {line_id} does not exist", reason="POLICY_NOT_FOUND")
            return self._bump(session)

    def apply_lines(self, wanted: list[PolicyLine], *, replace: bool, actor: str, dry_run: bool) -> tuple[int, int, int, int]:
        """Merge (add missing) or replace (add missing, remove others); returns (added, removed, unchanged, revision)."""
        with self.database.session_scope() as session:
            rows = session.execute(sa.select(policy_rules)).all()
            present = {_row_line(row): row.id for row in rows}
            want = list(dict.fromkeys(wanted))
            to_add = [line for line in want if line not in present]
            built_in = {row.id for row in rows if row.created_by in ("falaj:bootstrap", "falaj:pki")}
            # REPLACE keeps the built-in role lines, service bindings and the roles declared
            # when identities were issued, as the contract says.
            to_remove = [line_id for line, line_id in present.items() if replace and line not in set(want) and line_id not in built_in]
            unchanged = len(want) - len(to_add)
            if dry_run:
                return len(to_add), len(to_remove), unchanged, int(session.execute(sa.select(policy_state.c.revision)).scalar() or 0)
            for line in to_add:
                session.execute(policy_rules.insert().values(**_line_values(line), created_by=actor, created_at=_now()))
            if to_remove:
                session.execute(policy_rules.delete().where(policy_rules.c.id.in_(to_remove)))
            revision = (
                self._bump(session) if to_add or to_remove else int(session.execute(sa.select(policy_state.c.revision)).scalar() or 0)
            )
        return len(to_add), len(to_remove), unchanged, revision

    def seed(self, lines: list[PolicyLine], built_in_roles: dict[str, str]) -> bool:
        """Install the default policy and roles into an empty store; False if it had a policy."""
        with self.database.session_scope() as session:
            if session.execute(sa.select(sa.func.count()).select_from(policy_rules)).scalar_one():
                return False
            now = _now()
            for line in lines:
                session.execute(policy_rules.insert().values(**_line_values(line), created_by="falaj:bootstrap", created_at=now))
            for name, description in built_in_roles.items():
                session.execute(
                    roles.insert().values(
                        name=name,
                        description=description,
                        created_by="falaj:bootstrap",
                        created_at=now,
                        updated_at=now,
                        etag=uuid.uuid4().hex,
                    )
                )
            self._bump(session)
        return True

    # -- roles --------------------------------------------------------------------------
    def roles(self) -> list[StoredRole]:
        with self.database.session_scope() as session:
            rows = session.execute(sa.select(roles).order_by(roles.c.name)).all()
        return [self._role(row) for row in rows]

    def role(self, name: str) -> StoredRole:
        with self.database.session_scope() as session:
            row = session.execute(sa.select(roles).where(roles.c.name == name)).first()
        if row is None:
            raise NotFound(f"role {name!r} does not exist", reason="ROLE_NOT_FOUND")
        return self._role(row)

    @staticmethod
    def _role(row: sa.Row[tuple[object, ...]]) -> StoredRole:
        return StoredRole(
            str(row.name),
            str(row.description),
            json.loads(str(row.parent_roles_json)),
            str(row.created_by),
            _utc(row.created_at),  # type: ignore[arg-type]
            _utc(row.updated_at),  # type: ignore[arg-type]
            str(row.etag),
        )

    def create_role(self, name: str, description: str, parents: list[str], actor: str) -> StoredRole:
        now = _now()
        with self.database.session_scope() as session:
            if session.execute(sa.select(roles.c.name).where(roles.c.name == name)).first():
                raise AlreadyExists(f"role {name!r} already exists", reason="ROLE_EXISTS")
            session.execute(
                roles.insert().values(
                    name=name,
                    description=description,
                    parent_roles_json=json.dumps(parents),
                    created_by=actor,
                    created_at=now,
                    updated_at=now,
                    etag=uuid.uuid4().hex,
                )
            )
            for parent in parents:
                session.execute(
                    policy_rules.insert().values(**_line_values(PolicyLine("g", (name, parent, "*"))), created_by=actor, created_at=now)
                )
            self._bump(session)
        return self.role(name)

    def update_role(self, name: str, description: str | None, parents: list[str] | None, etag: str) -> StoredRole:
        current = self.role(name)
        if etag and etag != current.etag:
            raise FailedPrecondition(f"role {name!r} changed since you read it (etag mismatch)", reason="ETAG_MISMATCH")
        with self.database.session_scope() as session:
            values: dict[str, object] = {"updated_at": _now(), "etag": uuid.uuid4().hex}
            if description is not None:
                values["description"] = description
            if parents is not None:
                values["parent_roles_json"] = json.dumps(parents)
                session.execute(
                    policy_rules.delete().where(policy_rules.c.ptype == "g", policy_rules.c.v0 == name, policy_rules.c.v2 == "*")
                )
                for parent in parents:
                    session.execute(policy_rules.insert().values(**_line_values(PolicyLine("g", (name, parent, "*"))), created_at=_now()))
            session.execute(roles.update().where(roles.c.name == name).values(**values))
            self._bump(session)
        return self.role(name)

    def delete_role(self, name: str, *, force: bool, etag: str) -> None:
        current = self.role(name)
        if etag and etag != current.etag:
            raise FailedPrecondition(f"role {name!r} changed since you read it (etag mismatch)", reason="ETAG_MISMATCH")
        with self.database.session_scope() as session:
            in_use = session.execute(
                sa.select(sa.func.count())
                .select_from(policy_rules)
                .where(
                    sa.or_(
                        sa.and_(policy_rules.c.ptype == "p", policy_rules.c.v0 == name),
                        sa.and_(policy_rules.c.ptype == "g", policy_rules.c.v1 == name),
                    )
                )
            ).scalar_one()
            if in_use and not force:
                raise FailedPrecondition(f"role {name!r} is used by {in_use} policy lines; delete them or pass force", reason="ROLE_IN_USE")
            session.execute(
                policy_rules.delete().where(
                    sa.or_(
                        sa.and_(policy_rules.c.ptype == "p", policy_rules.c.v0 == name),
                        sa.and_(policy_rules.c.ptype == "g", sa.or_(policy_rules.c.v1 == name, policy_rules.c.v0 == name)),
                    )
                )
            )
            session.execute(roles.delete().where(roles.c.name == name))
            self._bump(session)

    # -- revocations --------------------------------------------------------------------
    def revoke(self, serial: str, subject: str, reason: str, note: str, actor: str) -> StoredRevocation:
        with self.database.session_scope() as session:
            if session.execute(sa.select(revoked_certificates.c.serial).where(revoked_certificates.c.serial == serial)).first():
                raise AlreadyExists(f"certificate {serial} is already revoked", reason="ALREADY_REVOKED")
            session.execute(
                revoked_certificates.insert().values(
                    serial=serial, subject=subject, reason=reason, note=note, revoked_at=_now(), created_by=actor
                )
            )
        return self.revocation(serial)

    def revocation(self, serial: str) -> StoredRevocation:
        with self.database.session_scope() as session:
            row = session.execute(sa.select(revoked_certificates).where(revoked_certificates.c.serial == serial)).first()
        if row is None:
            raise NotFound(f"no revocation for serial {serial}", reason="REVOCATION_NOT_FOUND")
        return StoredRevocation(row.serial, row.subject, row.reason, row.note, _utc(row.revoked_at), row.created_by)  # type: ignore[arg-type]

    def revocations(self, subject: str = "") -> list[StoredRevocation]:
        query = sa.select(revoked_certificates).order_by(revoked_certificates.c.revoked_at)
        if subject:
            query = query.where(revoked_certificates.c.subject == subject)
        with self.database.session_scope() as session:
            rows = session.execute(query).all()
        return [StoredRevocation(r.serial, r.subject, r.reason, r.note, _utc(r.revoked_at), r.created_by) for r in rows]  # type: ignore[arg-type]

    def revoked_serials(self) -> frozenset[str]:
        with self.database.session_scope() as session:
            return frozenset(str(s) for s in session.execute(sa.select(revoked_certificates.c.serial)).scalars())

    # -- audit --------------------------------------------------------------------------
    def append_audit(self, entries: list[AuditEntry]) -> list[ChainedRecord]:
        """Append entries after the locked head in one transaction; returns them chained.

        An entry whose report_id is already recorded (a retried report) is not written
        again: the stored record is returned in its place.
        """
        with self.database.session_scope() as session:
            head = session.execute(
                sa.select(audit_head.c.sequence, audit_head.c.hash).where(audit_head.c.id == 1).with_for_update()
            ).first()
            if head is None:
                session.execute(audit_head.insert().values(id=1, sequence=0, hash=GENESIS_HASH))
                head_sequence, head_hash = 0, GENESIS_HASH
            else:
                head_sequence, head_hash = int(head.sequence), str(head.hash)
            report_ids = [e.report_id for e in entries if e.report_id]
            existing: dict[str, ChainedRecord] = {}
            if report_ids:
                rows = session.execute(sa.select(audit_records).where(audit_records.c.report_id.in_(report_ids))).all()
                existing = {str(row.report_id): self._record(row) for row in rows}
            slots: list[ChainedRecord | int] = []
            fresh: list[AuditEntry] = []
            first_of_report: dict[str, int] = {}
            for entry in entries:
                report_id = entry.report_id
                if report_id and report_id in existing:
                    slots.append(existing[report_id])
                elif report_id and report_id in first_of_report:
                    slots.append(first_of_report[report_id])
                else:
                    if report_id:
                        first_of_report[report_id] = len(fresh)
                    slots.append(len(fresh))
                    fresh.append(entry)
            records = chain(fresh, head_sequence, head_hash)
            if records:
                session.execute(audit_records.insert(), [self._row_values(record) for record in records])
                session.execute(
                    audit_head.update().where(audit_head.c.id == 1).values(sequence=records[-1].sequence, hash=records[-1].hash)
                )
        return [records[slot] if isinstance(slot, int) else slot for slot in slots]

    @staticmethod
    def _row_values(record: ChainedRecord) -> dict[str, object]:
        entry = record.entry
        return {
            "sequence": record.sequence,
            "time": entry.time,
            "actor": entry.caller,
            "action": entry.action,
            "resource": entry.resource,
            "domain": entry.domain,
            "decision": entry.decision,
            "reason": entry.reason,
            "request_id": entry.request_id,
            "prev_hash": record.prev_hash,
            "hash": record.hash,
            "kind": entry.kind,
            "method": entry.method,
            "detail": entry.detail,
            "status_code": entry.status_code,
            "source_address": entry.source_address,
            "duration_us": entry.duration_us,
            "event_type": entry.event_type,
            "reporter": entry.reporter,
            "attributes_json": json.dumps(dict(entry.attributes), sort_keys=True),
            "report_id": entry.report_id,
        }

    @staticmethod
    def _record(row: sa.Row[tuple[object, ...]]) -> ChainedRecord:
        entry = AuditEntry(
            kind=str(row.kind),
            caller=str(row.actor),
            domain=str(row.domain),
            method=str(row.method),
            resource=str(row.resource),
            action=str(row.action),
            decision=str(row.decision),
            reason=str(row.reason),
            detail=str(row.detail),
            status_code=int(row.status_code),
            request_id=str(row.request_id),
            source_address=str(row.source_address),
            duration_us=int(row.duration_us),
            event_type=str(row.event_type),
            reporter=str(row.reporter),
            attributes=json.loads(str(row.attributes_json)),
            report_id=None if row.report_id is None else str(row.report_id),
            time=_utc(row.time),  # type: ignore[arg-type]
        )
        return ChainedRecord(int(row.sequence), entry, str(row.prev_hash), str(row.hash))

    def head(self) -> tuple[int, str]:
        with self.database.session_scope() as session:
            row = session.execute(sa.select(audit_head.c.sequence, audit_head.c.hash).where(audit_head.c.id == 1)).first()
        return (int(row.sequence), str(row.hash)) if row else (0, GENESIS_HASH)

    def add_checkpoint(self, checkpoint: Checkpoint) -> None:
        with self.database.session_scope() as session:
            exists = session.execute(
                sa.select(audit_checkpoints.c.sequence).where(audit_checkpoints.c.sequence == checkpoint.sequence)
            ).first()
            if not exists:
                session.execute(
                    audit_checkpoints.insert().values(
                        sequence=checkpoint.sequence,
                        hash=checkpoint.hash,
                        time=checkpoint.time,
                        signature=checkpoint.signature,
                        key_id=checkpoint.key_id,
                    )
                )

    def checkpoints(self, after_sequence: int = 0, limit: int | None = None) -> list[Checkpoint]:
        query = sa.select(audit_checkpoints).where(audit_checkpoints.c.sequence > after_sequence).order_by(audit_checkpoints.c.sequence)
        if limit:
            query = query.limit(limit)
        with self.database.session_scope() as session:
            rows = session.execute(query).all()
        return [Checkpoint(int(r.sequence), str(r.hash), _utc(r.time), bytes(r.signature), str(r.key_id)) for r in rows]  # type: ignore[arg-type]

    def iter_records(self, start_sequence: int = 1, end_sequence: int = 0, batch: int = 5000) -> Iterator[ChainedRecord]:
        """Records in sequence order, read in batches (never the whole log at once)."""
        next_sequence = start_sequence
        while True:
            query = (
                sa.select(audit_records).where(audit_records.c.sequence >= next_sequence).order_by(audit_records.c.sequence).limit(batch)
            )
            if end_sequence:
                query = query.where(audit_records.c.sequence <= end_sequence)
            with self.database.session_scope() as session:
                rows = session.execute(query).all()
            if not rows:
                return
            for row in rows:
                yield self._record(row)
            next_sequence = int(rows[-1].sequence) + 1

    def record_before(self, sequence: int) -> ChainedRecord | None:
        with self.database.session_scope() as session:
            row = session.execute(
                sa.select(audit_records).where(audit_records.c.sequence < sequence).order_by(audit_records.c.sequence.desc()).limit(1)
            ).first()
        return self._record(row) if row else None

    def query_audit(self, flt: AuditFilter, *, after: int, limit: int, newest_first: bool) -> list[ChainedRecord]:
        """A page of records matching the filter, continuing after sequence `after`."""
        c = audit_records.c
        query = sa.select(audit_records)
        equal = {c.actor: flt.caller, c.method: flt.method, c.decision: flt.decision, c.domain: flt.domain}
        equal |= {c.request_id: flt.request_id, c.kind: flt.kind, c.event_type: flt.event_type}
        for column, wanted in equal.items():
            if wanted:
                query = query.where(column == wanted)
        if flt.start_time is not None:
            query = query.where(c.time >= flt.start_time)
        if flt.end_time is not None:
            query = query.where(c.time < flt.end_time)
        if after:
            query = query.where(c.sequence < after if newest_first else c.sequence > after)
        query = query.order_by(c.sequence.desc() if newest_first else c.sequence).limit(limit)
        with self.database.session_scope() as session:
            rows = session.execute(query).all()
        return [self._record(row) for row in rows]

    def count_audit_records(self) -> int:
        with self.database.session_scope() as session:
            return int(session.execute(sa.select(sa.func.count()).select_from(audit_records)).scalar_one())
