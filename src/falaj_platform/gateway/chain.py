"""The audit chain: canonical record hashing, signed checkpoints, and verification.

Each record carries the SHA-256 of the record before it; its own hash covers its
content and that link, so modifying, deleting, inserting or reordering records breaks
the chain at a place `verify` names. Truncating the tail is caught by checkpoints:
Ed25519 signatures over (sequence, hash) kept beside the records and, as an anchor
outside the database, in a head file.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

GENESIS_HASH = "0" * 64
MAX_FIELD_LENGTH = 1024


def clean(value: str, limit: int = MAX_FIELD_LENGTH) -> str:
    """Audit fields are single-line and bounded: CR, LF and other control characters go."""
    return "".join(ch for ch in value if ch >= " " and ch != "\x7f")[:limit]


def _utc(value: dt.datetime) -> dt.datetime:
    # SQLite hands back naive datetimes; every audit time is UTC.
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


@dataclass
class AuditEntry:
    """One audit record before it is chained (what the gateway and services report)."""

    kind: str  # "call" or "event"
    caller: str
    domain: str
    method: str
    resource: str
    action: str
    decision: str  # "allow" or "deny"
    reason: str
    detail: str
    status_code: int
    request_id: str
    source_address: str
    duration_us: int
    event_type: str = ""
    reporter: str = ""
    attributes: Mapping[str, str] = field(default_factory=dict)
    report_id: str | None = None
    time: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))

    def cleaned(self) -> AuditEntry:
        text = {
            name: clean(getattr(self, name))
            for name in (
                "caller",
                "domain",
                "method",
                "resource",
                "action",
                "reason",
                "detail",
                "request_id",
                "source_address",
                "event_type",
                "reporter",
            )
        }
        attributes = {clean(k, 128): clean(v) for k, v in list(self.attributes.items())[:64]}
        return AuditEntry(
            kind=self.kind,
            decision=self.decision,
            status_code=self.status_code,
            duration_us=self.duration_us,
            attributes=attributes,
            report_id=self.report_id,
            time=_utc(self.time),
            **text,
        )


@dataclass(frozen=True)
class ChainedRecord:
    """A stored record: its entry plus its place in the chain."""

    sequence: int
    entry: AuditEntry
    prev_hash: str
    hash: str


def canonical(sequence: int, entry: AuditEntry, prev_hash: str) -> bytes:
    """The bytes a record's hash covers; stable across SQLite and PostgreSQL."""
    body = {
        "sequence": sequence,
        "time": _utc(entry.time).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "kind": entry.kind,
        "caller": entry.caller,
        "domain": entry.domain,
        "method": entry.method,
        "resource": entry.resource,
        "action": entry.action,
        "decision": entry.decision,
        "reason": entry.reason,
        "detail": entry.detail,
        "status_code": entry.status_code,
        "request_id": entry.request_id,
        "source_address": entry.source_address,
        "duration_us": entry.duration_us,
        "event_type": entry.event_type,
        "reporter": entry.reporter,
        "attributes": dict(sorted(entry.attributes.items())),
        "prev_hash": prev_hash,
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def record_hash(sequence: int, entry: AuditEntry, prev_hash: str) -> str:
    return hashlib.sha256(canonical(sequence, entry, prev_hash)).hexdigest()


def chain(entries: Iterable[AuditEntry], head_sequence: int, head_hash: str) -> list[ChainedRecord]:
    """Link new entries after the head (sequence, hash) of the stored chain."""
    records = []
    sequence, prev = head_sequence, head_hash
    for entry in entries:
        sequence += 1
        digest = record_hash(sequence, entry, prev)
        records.append(ChainedRecord(sequence, entry, prev, digest))
        prev = digest
    return records


# -- checkpoints ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    sequence: int
    hash: str
    time: dt.datetime
    signature: bytes
    key_id: str


def _checkpoint_message(sequence: int, digest: str) -> bytes:
    return f"falaj-audit-checkpoint:{sequence}:{digest}".encode()


def key_id(public_key: ed25519.Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign_checkpoint(key: ed25519.Ed25519PrivateKey, sequence: int, digest: str) -> Checkpoint:
    return Checkpoint(sequence, digest, dt.datetime.now(dt.UTC), key.sign(_checkpoint_message(sequence, digest)), key_id(key.public_key()))


def checkpoint_valid(public_key: ed25519.Ed25519PublicKey, checkpoint: Checkpoint) -> bool:
    try:
        public_key.verify(checkpoint.signature, _checkpoint_message(checkpoint.sequence, checkpoint.hash))
    except InvalidSignature:
        return False
    return True


# -- verification ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ChainBreak:
    sequence: int
    kind: str  # RECORD_MODIFIED, LINK_BROKEN, SEQUENCE_GAP, CHECKPOINT_SIGNATURE_INVALID, CHECKPOINT_MISMATCH, TRUNCATED
    detail: str


@dataclass(frozen=True)
class Verification:
    intact: bool
    records_checked: int
    checkpoints_checked: int
    head_sequence: int
    head_hash: str
    first_break: ChainBreak | None
    last_valid_checkpoint: Checkpoint | None


def verify(
    records: Iterator[ChainedRecord],
    checkpoints: Iterable[Checkpoint],
    public_key: ed25519.Ed25519PublicKey,
    *,
    start_sequence: int = 1,
    start_prev_hash: str = GENESIS_HASH,
) -> Verification:
    """Walk the records in sequence order and the checkpoints; report the first break."""
    expected_sequence, prev = start_sequence, start_prev_hash
    hashes_at: dict[int, str] = {}
    checkpoint_list = sorted(checkpoints, key=lambda c: c.sequence)
    wanted = {c.sequence for c in checkpoint_list}
    checked = 0
    first_break: ChainBreak | None = None
    for record in records:
        if first_break is None:
            if record.sequence != expected_sequence:
                first_break = ChainBreak(
                    expected_sequence,
                    "SEQUENCE_GAP" if record.sequence > expected_sequence else "LINK_BROKEN",
                    f"expected record {expected_sequence}, found {record.sequence}: a record was deleted or moved",
                )
            elif record.prev_hash != prev:
                first_break = ChainBreak(
                    record.sequence, "LINK_BROKEN", f"record {record.sequence} does not link to record {record.sequence - 1}"
                )
            elif record_hash(record.sequence, record.entry, record.prev_hash) != record.hash:
                first_break = ChainBreak(record.sequence, "RECORD_MODIFIED", f"record {record.sequence} was modified after it was written")
        if record.sequence in wanted:
            hashes_at[record.sequence] = record.hash
        prev, expected_sequence = record.hash, record.sequence + 1
        checked += 1
    head_sequence, head_hash = expected_sequence - 1, prev
    last_valid: Checkpoint | None = None
    checkpoints_checked = 0
    for checkpoint in checkpoint_list:
        checkpoints_checked += 1
        problem: ChainBreak | None = None
        if not checkpoint_valid(public_key, checkpoint):
            problem = ChainBreak(
                checkpoint.sequence, "CHECKPOINT_SIGNATURE_INVALID", f"the checkpoint at record {checkpoint.sequence} has a bad signature"
            )
        elif checkpoint.sequence > head_sequence:
            problem = ChainBreak(
                head_sequence + 1,
                "TRUNCATED",
                f"a signed checkpoint names record {checkpoint.sequence} but the chain ends at {head_sequence}",
            )
        elif checkpoint.sequence >= start_sequence and hashes_at.get(checkpoint.sequence) != checkpoint.hash:
            problem = ChainBreak(
                checkpoint.sequence, "CHECKPOINT_MISMATCH", f"record {checkpoint.sequence} differs from its signed checkpoint"
            )
        if problem is not None:
            if first_break is None or problem.sequence < first_break.sequence:
                first_break = problem
        elif first_break is None or checkpoint.sequence < first_break.sequence:
            last_valid = checkpoint
    return Verification(first_break is None, checked, checkpoints_checked, head_sequence, head_hash, first_break, last_valid)
