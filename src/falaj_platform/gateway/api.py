"""Thin servicer of `falaj.gateway.v1.GatewayAdminService`: policies, roles, revocations, audit."""

from __future__ import annotations

import base64
import datetime as dt
import functools
import hashlib
import io
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import grpc
import pyarrow as pa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from google.protobuf import duration_pb2, timestamp_pb2

from falaj.common.v1 import common_pb2
from falaj.gateway.v1 import message_pb2 as m
from falaj.gateway.v1 import request_response_pb2 as rr
from falaj.gateway.v1 import service_pb2_grpc
from falaj_platform.gateway.auditlog import AuditLog, read_anchor
from falaj_platform.gateway.chain import GENESIS_HASH, AuditEntry, ChainedRecord, Checkpoint, Verification, verify
from falaj_platform.gateway.hooks import Reloader
from falaj_platform.gateway.policy import ACTIONS, Authorizer, PolicyLine, action_of
from falaj_platform.gateway.store import AuditFilter, GatewayStore, StoredLine, StoredRevocation, StoredRole
from falaj_platform.runtime.errors import AlreadyExists, InvalidArgument, NotFound, StartupError
from falaj_platform.runtime.interceptors import current_caller, current_request_id
from falaj_platform.runtime.settings import Settings
from falaj_platform.runtime.validate import enum_name, timestamp_to_datetime

T = TypeVar("T")
RequestT = TypeVar("RequestT")
ResponseT = TypeVar("ResponseT")
ROLE_ID = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
MAX_PAGE = 1000
_DECISION = {"allow": m.DECISION_ALLOW, "deny": m.DECISION_DENY}
_DECISION_NAME = {v: k for k, v in _DECISION.items()}
_REASONS = {
    "POLICY_ALLOW": m.DECISION_REASON_POLICY_ALLOW,
    "POLICY_DENY": m.DECISION_REASON_POLICY_DENY,
    "NO_MATCHING_POLICY": m.DECISION_REASON_NO_MATCHING_POLICY,
    "ENFORCER_UNAVAILABLE": m.DECISION_REASON_ENFORCER_UNAVAILABLE,
    "CERTIFICATE_REVOKED": m.DECISION_REASON_CERTIFICATE_REVOKED,
    "NO_PEER_IDENTITY": m.DECISION_REASON_UNAUTHENTICATED,
}
_BREAKS = {
    "RECORD_MODIFIED": m.CHAIN_BREAK_KIND_RECORD_MODIFIED,
    "LINK_BROKEN": m.CHAIN_BREAK_KIND_LINK_BROKEN,
    "SEQUENCE_GAP": m.CHAIN_BREAK_KIND_SEQUENCE_GAP,
    "CHECKPOINT_SIGNATURE_INVALID": m.CHAIN_BREAK_KIND_CHECKPOINT_SIGNATURE_INVALID,
    "CHECKPOINT_MISMATCH": m.CHAIN_BREAK_KIND_CHECKPOINT_MISMATCH,
    "TRUNCATED": m.CHAIN_BREAK_KIND_TRUNCATED,
}


def line_id(line: PolicyLine) -> str:
    """Stable id of a policy line, derived from its content."""
    return hashlib.sha256(line.csv().encode()).hexdigest()[:20]


def _ts(value: dt.datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def _stamp(actor: str, time: dt.datetime | None) -> common_pb2.AuditStamp:
    return common_pb2.AuditStamp(actor=actor, time=_ts(time))


def _page(items: Sequence[T], page_size: int, page_token: str) -> tuple[Sequence[T], str]:
    """Offset pagination with an opaque token (lists here are small and held in memory)."""
    try:
        offset = int(base64.urlsafe_b64decode(page_token.encode()).decode().removeprefix("o:")) if page_token else 0
    except ValueError:
        raise InvalidArgument("page_token is not one this API returned", reason="INVALID_PAGE_TOKEN") from None
    if page_size < 0:
        raise InvalidArgument("page_size must not be negative", reason="INVALID_PAGE_SIZE")
    size = min(page_size or 100, MAX_PAGE)
    chunk = items[offset : offset + size]
    more = offset + size < len(items)
    return chunk, base64.urlsafe_b64encode(f"o:{offset + size}".encode()).decode() if more else ""


def _resource_id(name: str, collection: str) -> str:
    prefix = f"{collection}/"
    if not name.startswith(prefix) or len(name) == len(prefix):
        raise InvalidArgument(f"name must look like '{prefix}{{id}}'", reason="INVALID_NAME")
    return name[len(prefix) :]


def idempotent(
    handler: Callable[[GatewayAdminApi, RequestT, grpc.ServicerContext], ResponseT],
) -> Callable[[GatewayAdminApi, RequestT, grpc.ServicerContext], ResponseT]:
    """A write whose request carries a request_id: a retry with the same body gets the first answer.

    A reused id with another body is refused (FAILED_PRECONDITION, REQUEST_ID_REUSED) and
    nothing is written. Failed writes are not remembered, so their retry runs again.
    """
    method = handler.__name__
    response_type = getattr(rr, f"{method}Response")

    @functools.wraps(handler)
    def wrapper(self: GatewayAdminApi, request: RequestT, context: grpc.ServicerContext) -> ResponseT:
        if not getattr(request, "request_id", ""):
            return handler(self, request, context)
        with self._writes:  # admin writes are rare; one at a time keeps check-then-write whole
            replayed = self.store.replayed_response(method, request, response_type)  # type: ignore[arg-type]
            if replayed is not None:
                return replayed
            response = handler(self, request, context)
            self.store.remember_response(method, request, response)  # type: ignore[arg-type]
            return response

    return wrapper


class GatewayAdminApi(service_pb2_grpc.GatewayAdminServiceServicer):
    def __init__(
        self,
        store: GatewayStore,
        settings: Settings,
        authorizer: Authorizer,
        reloader: Reloader,
        audit: AuditLog,
        signing_key: ed25519.Ed25519PrivateKey,
    ):
        self.store = store
        self.settings = settings
        self.authorizer = authorizer
        self.reloader = reloader
        self.audit = audit
        self.public_key = signing_key.public_key()
        self._writes = threading.Lock()

    # -- helpers ------------------------------------------------------------------------
    def _policy_changed(self, action: str, detail: str) -> None:
        """Apply a policy change at once on this replica and record it in the audit log."""
        self.reloader.reload_now()
        self.audit.append(self._event("POLICY_CHANGED", resource="policies", action=action, detail=detail))

    def _event(self, event_type: str, *, resource: str, action: str, detail: str, caller: str = "") -> AuditEntry:
        return AuditEntry(
            kind="event",
            caller=caller or current_caller(),
            domain=self.settings.region,
            method="",
            resource=resource,
            action=action,
            decision="allow",
            reason="",
            detail=detail,
            status_code=0,
            request_id=current_request_id(),
            source_address="",
            duration_us=0,
            event_type=event_type,
            reporter=current_caller(),
        )

    def _find_line(self, name: str, collection: str, ptype: str) -> StoredLine:
        wanted = _resource_id(name, collection)
        for stored in self.store.lines():
            if stored.line.ptype == ptype and line_id(stored.line) == wanted:
                return stored
        raise NotFound(f"{name} does not exist", reason="POLICY_NOT_FOUND" if ptype == "p" else "ROLE_BINDING_NOT_FOUND")

    @staticmethod
    def _policy(stored: StoredLine) -> m.Policy:
        subject, domain, obj, action, effect = stored.line.values
        return m.Policy(
            name=f"policies/{line_id(stored.line)}",
            subject=subject,
            domain=domain,
            object=obj,
            action=action,
            effect=m.POLICY_EFFECT_DENY if effect == "deny" else m.POLICY_EFFECT_ALLOW,
            description=stored.description,
            casbin_line=stored.line.csv(),
            created=_stamp(stored.created_by, stored.created_at),
        )

    @staticmethod
    def _binding(stored: StoredLine) -> m.RoleBinding:
        member, role, domain = stored.line.values
        return m.RoleBinding(
            name=f"roleBindings/{line_id(stored.line)}",
            member=member,
            role=role,
            domain=domain,
            expire_time=_ts(stored.expire_time),
            description=stored.description,
            casbin_line=stored.line.csv(),
            created=_stamp(stored.created_by, stored.created_at),
        )

    def _role(self, role: StoredRole, lines: list[StoredLine]) -> m.Role:
        return m.Role(
            name=f"roles/{role.name}",
            description=role.description,
            parent_roles=role.parent_roles,
            built_in=role.created_by == "falaj:bootstrap",
            policy_count=sum(1 for s in lines if s.line.ptype == "p" and s.line.values[0] == role.name),
            binding_count=sum(1 for s in lines if s.line.ptype == "g" and s.line.values[1] == role.name),
            created=_stamp(role.created_by, role.created_at),
            updated=_stamp(role.created_by, role.updated_at),
            etag=role.etag,
        )

    @staticmethod
    def _revocation(stored: StoredRevocation) -> m.Revocation:
        reason = m.RevocationReason.Value(stored.reason) if stored.reason in m.RevocationReason.keys() else m.REVOCATION_REASON_UNSPECIFIED
        return m.Revocation(
            name=f"revocations/{stored.serial}",
            serial_number=stored.serial,
            subject=stored.subject,
            reason=reason,
            note=stored.note,
            revoke_time=_ts(stored.revoked_at),
            created=_stamp(stored.created_by, stored.revoked_at),
        )

    @staticmethod
    def _record(record: ChainedRecord) -> m.AuditRecord:
        entry = record.entry
        return m.AuditRecord(
            sequence=record.sequence,
            time=_ts(entry.time),
            kind=m.AUDIT_RECORD_KIND_SECURITY_EVENT if entry.kind == "event" else m.AUDIT_RECORD_KIND_CALL,
            caller=entry.caller,
            domain=entry.domain,
            method=entry.method,
            resource=entry.resource,
            action=entry.action,
            decision=_DECISION.get(entry.decision, m.DECISION_UNSPECIFIED),
            decision_reason=_REASONS.get(entry.reason, m.DECISION_REASON_UNSPECIFIED),
            decision_detail=entry.detail or entry.reason,
            status_code=entry.status_code,
            request_id=entry.request_id,
            source_address=entry.source_address,
            duration=duration_pb2.Duration(seconds=entry.duration_us // 1_000_000, nanos=(entry.duration_us % 1_000_000) * 1000),
            event_type=m.SecurityEventType.Value(f"SECURITY_EVENT_TYPE_{entry.event_type}")
            if entry.event_type
            else m.SECURITY_EVENT_TYPE_UNSPECIFIED,
            reporter=entry.reporter,
            attributes=dict(entry.attributes),
            previous_hash=bytes.fromhex(record.prev_hash),
            record_hash=bytes.fromhex(record.hash),
        )

    @staticmethod
    def _checkpoint(checkpoint: Checkpoint) -> m.AuditCheckpoint:
        return m.AuditCheckpoint(
            sequence=checkpoint.sequence,
            record_hash=bytes.fromhex(checkpoint.hash) if checkpoint.hash else b"",
            time=_ts(checkpoint.time),
            signature=checkpoint.signature,
            key_id=checkpoint.key_id,
        )

    @staticmethod
    def _parse(line: str) -> PolicyLine:
        try:
            return PolicyLine.parse(line)
        except ValueError as error:
            raise InvalidArgument(f"invalid policy line {line!r}: {error}", reason="INVALID_POLICY") from None

    # -- policies -----------------------------------------------------------------------
    @idempotent
    def CreatePolicy(self, request: rr.CreatePolicyRequest, context: grpc.ServicerContext) -> rr.CreatePolicyResponse:
        p = request.policy
        effect = "deny" if p.effect == m.POLICY_EFFECT_DENY else "allow"
        line = self._parse(", ".join(("p", p.subject, p.domain or "*", p.object, p.action or "*", effect)))
        if any(s.line == line for s in self.store.lines()):
            raise AlreadyExists(f"policies/{line_id(line)} already exists: {line.csv()}", reason="POLICY_EXISTS")
        _, revision = self.store.add_lines([line], actor=current_caller(), description=p.description)
        self._policy_changed("add", line.csv())
        return rr.CreatePolicyResponse(
            policy=self._policy(self._find_line(f"policies/{line_id(line)}", "policies", "p")), policy_revision=revision
        )

    def GetPolicy(self, request: rr.GetPolicyRequest, context: grpc.ServicerContext) -> rr.GetPolicyResponse:
        return rr.GetPolicyResponse(policy=self._policy(self._find_line(request.name, "policies", "p")))

    def ListPolicies(self, request: rr.ListPoliciesRequest, context: grpc.ServicerContext) -> rr.ListPoliciesResponse:
        effect = {m.POLICY_EFFECT_ALLOW: "allow", m.POLICY_EFFECT_DENY: "deny"}.get(request.effect)
        rows = [
            s
            for s in self.store.lines()
            if s.line.ptype == "p"
            and (not request.subject or s.line.values[0] == request.subject)
            and (not request.domain or s.line.values[1] == request.domain)
            and s.line.values[2].startswith(request.object_prefix)
            and (effect is None or s.line.values[4] == effect)
        ]
        page, token = _page(rows, request.page_size, request.page_token)
        return rr.ListPoliciesResponse(
            policies=[self._policy(s) for s in page], next_page_token=token, policy_revision=self.store.policy_revision()
        )

    @idempotent
    def DeletePolicy(self, request: rr.DeletePolicyRequest, context: grpc.ServicerContext) -> rr.DeletePolicyResponse:
        stored = self._find_line(request.name, "policies", "p")
        revision = self.store.delete_line(stored.id, "p")
        self._policy_changed("remove", stored.line.csv())
        return rr.DeletePolicyResponse(name=request.name, policy_revision=revision)

    @idempotent
    def ImportPolicies(self, request: rr.ImportPoliciesRequest, context: grpc.ServicerContext) -> rr.ImportPoliciesResponse:
        lines, errors = [], []
        for number, raw in enumerate(request.casbin_csv.splitlines(), start=1):
            text = raw.strip()
            if not text or text.startswith("#"):
                continue
            try:
                lines.append(PolicyLine.parse(text))
            except ValueError as error:
                errors.append(rr.PolicyLineError(line_number=number, line=text[:512], message=str(error)))
        if errors:
            return rr.ImportPoliciesResponse(errors=errors, policy_revision=self.store.policy_revision())
        added, removed, unchanged, revision = self.store.apply_lines(
            lines, replace=request.mode == m.IMPORT_MODE_REPLACE, actor=current_caller(), dry_run=request.dry_run
        )
        if not request.dry_run and (added or removed):
            self._policy_changed("import", f"added {added}, removed {removed}")
        return rr.ImportPoliciesResponse(added_count=added, removed_count=removed, unchanged_count=unchanged, policy_revision=revision)

    def ExportPolicies(self, request: rr.ExportPoliciesRequest, context: grpc.ServicerContext) -> rr.ExportPoliciesResponse:
        def in_domain(line: PolicyLine) -> bool:
            domain = line.values[1] if line.ptype == "p" else line.values[2]
            return not request.domain or domain in (request.domain, "*")

        text = "".join(s.line.csv() + "\n" for s in self.store.lines() if in_domain(s.line))
        return rr.ExportPoliciesResponse(casbin_csv=text, policy_revision=self.store.policy_revision())

    def CheckAccess(self, request: rr.CheckAccessRequest, context: grpc.ServicerContext) -> rr.CheckAccessResponse:
        if not request.subject or not request.object:
            raise InvalidArgument("subject and object are required", reason="INVALID_CHECK")
        action = request.action or action_of(request.object)
        if action not in ACTIONS:
            raise InvalidArgument(f"action must be one of {', '.join(ACTIONS)}", reason="INVALID_ACTION")
        decision, matched, roles = self.authorizer.explain(request.subject, request.domain or self.settings.region, request.object, action)
        return rr.CheckAccessResponse(
            decision=m.DECISION_ALLOW if decision.allowed else m.DECISION_DENY,
            reason=_REASONS.get(decision.reason, m.DECISION_REASON_UNSPECIFIED),
            detail=decision.detail,
            matched_policies=matched,
            effective_roles=roles,
            policy_revision=self.authorizer.revision,
        )

    # -- roles and bindings -------------------------------------------------------------
    @idempotent
    def CreateRole(self, request: rr.CreateRoleRequest, context: grpc.ServicerContext) -> rr.CreateRoleResponse:
        name = request.role_id or _resource_id(request.role.name, "roles")
        if not ROLE_ID.match(name):
            raise InvalidArgument("role_id must be lowercase letters, digits, '-' and '_' (at most 63)", reason="INVALID_ROLE")
        role = self.store.create_role(name, request.role.description, list(request.role.parent_roles), current_caller())
        self._policy_changed("create-role", name)
        return rr.CreateRoleResponse(role=self._role(role, self.store.lines()))

    def GetRole(self, request: rr.GetRoleRequest, context: grpc.ServicerContext) -> rr.GetRoleResponse:
        return rr.GetRoleResponse(role=self._role(self.store.role(_resource_id(request.name, "roles")), self.store.lines()))

    def ListRoles(self, request: rr.ListRolesRequest, context: grpc.ServicerContext) -> rr.ListRolesResponse:
        lines = self.store.lines()
        page, token = _page(self.store.roles(), request.page_size, request.page_token)
        return rr.ListRolesResponse(roles=[self._role(r, lines) for r in page], next_page_token=token)

    @idempotent
    def UpdateRole(self, request: rr.UpdateRoleRequest, context: grpc.ServicerContext) -> rr.UpdateRoleResponse:
        name = _resource_id(request.role.name, "roles")
        paths = set(request.update_mask.paths) or {"description", "parent_roles"}
        unknown = paths - {"description", "parent_roles"}
        if unknown:
            raise InvalidArgument(f"cannot update {', '.join(sorted(unknown))}", reason="INVALID_UPDATE_MASK")
        role = self.store.update_role(
            name,
            request.role.description if "description" in paths else None,
            list(request.role.parent_roles) if "parent_roles" in paths else None,
            request.role.etag,
        )
        self._policy_changed("update-role", name)
        return rr.UpdateRoleResponse(role=self._role(role, self.store.lines()))

    @idempotent
    def DeleteRole(self, request: rr.DeleteRoleRequest, context: grpc.ServicerContext) -> rr.DeleteRoleResponse:
        name = _resource_id(request.name, "roles")
        self.store.delete_role(name, force=request.force, etag=request.etag)
        self._policy_changed("delete-role", name)
        return rr.DeleteRoleResponse(name=request.name)

    @idempotent
    def CreateRoleBinding(self, request: rr.CreateRoleBindingRequest, context: grpc.ServicerContext) -> rr.CreateRoleBindingResponse:
        b = request.binding
        line = self._parse(", ".join(("g", b.member, b.role, b.domain or "*")))
        if any(s.line == line for s in self.store.lines()):
            raise AlreadyExists(f"roleBindings/{line_id(line)} already exists: {line.csv()}", reason="ROLE_BINDING_EXISTS")
        expire = timestamp_to_datetime(b.expire_time, "binding.expire_time") if b.HasField("expire_time") else None
        _, revision = self.store.add_lines([line], actor=current_caller(), description=b.description, expire_time=expire)
        self._policy_changed("bind", line.csv())
        return rr.CreateRoleBindingResponse(
            binding=self._binding(self._find_line(f"roleBindings/{line_id(line)}", "roleBindings", "g")), policy_revision=revision
        )

    def GetRoleBinding(self, request: rr.GetRoleBindingRequest, context: grpc.ServicerContext) -> rr.GetRoleBindingResponse:
        return rr.GetRoleBindingResponse(binding=self._binding(self._find_line(request.name, "roleBindings", "g")))

    def ListRoleBindings(self, request: rr.ListRoleBindingsRequest, context: grpc.ServicerContext) -> rr.ListRoleBindingsResponse:
        rows = [
            s
            for s in self.store.lines()
            if s.line.ptype == "g"
            and (not request.member or s.line.values[0] == request.member)
            and (not request.role or s.line.values[1] == request.role)
            and (not request.domain or s.line.values[2] == request.domain)
        ]
        page, token = _page(rows, request.page_size, request.page_token)
        return rr.ListRoleBindingsResponse(bindings=[self._binding(s) for s in page], next_page_token=token)

    @idempotent
    def DeleteRoleBinding(self, request: rr.DeleteRoleBindingRequest, context: grpc.ServicerContext) -> rr.DeleteRoleBindingResponse:
        stored = self._find_line(request.name, "roleBindings", "g")
        revision = self.store.delete_line(stored.id, "g")
        self._policy_changed("unbind", stored.line.csv())
        return rr.DeleteRoleBindingResponse(name=request.name, policy_revision=revision)

    # -- revocations --------------------------------------------------------------------
    @idempotent
    def CreateRevocation(self, request: rr.CreateRevocationRequest, context: grpc.ServicerContext) -> rr.CreateRevocationResponse:
        r = request.revocation
        serial = r.serial_number.lower().removeprefix("0x")
        if not serial or any(ch not in "0123456789abcdef" for ch in serial) or len(serial) > 64:
            raise InvalidArgument("serial_number must be the certificate serial in hex", reason="INVALID_SERIAL")
        stored = self.store.revoke(
            serial.lstrip("0") or "0", r.subject, enum_name(m.RevocationReason, r.reason, "revocation.reason"), r.note, current_caller()
        )
        self.reloader.reload_now()
        self.audit.append(self._event("CERTIFICATE_REVOKED", resource=f"revocations/{stored.serial}", action="revoke", detail=r.subject))
        return rr.CreateRevocationResponse(revocation=self._revocation(stored))

    def GetRevocation(self, request: rr.GetRevocationRequest, context: grpc.ServicerContext) -> rr.GetRevocationResponse:
        return rr.GetRevocationResponse(revocation=self._revocation(self.store.revocation(_resource_id(request.name, "revocations"))))

    def ListRevocations(self, request: rr.ListRevocationsRequest, context: grpc.ServicerContext) -> rr.ListRevocationsResponse:
        page, token = _page(self.store.revocations(request.subject), request.page_size, request.page_token)
        return rr.ListRevocationsResponse(revocations=[self._revocation(r) for r in page], next_page_token=token)

    # -- audit --------------------------------------------------------------------------
    @staticmethod
    def _filter(f: m.AuditRecordFilter) -> AuditFilter:
        kind = {m.AUDIT_RECORD_KIND_CALL: "call", m.AUDIT_RECORD_KIND_SECURITY_EVENT: "event"}.get(f.kind, "")
        event = enum_name(m.SecurityEventType, f.event_type, "filter.event_type", prefix="SECURITY_EVENT_TYPE_") if f.event_type else ""
        return AuditFilter(
            caller=f.caller,
            method=f.method,
            decision=_DECISION_NAME.get(f.decision, ""),
            domain=f.domain,
            request_id=f.request_id,
            kind=kind,
            event_type=event,
            start_time=timestamp_to_datetime(f.start_time, "filter.start_time") if f.HasField("start_time") else None,
            end_time=timestamp_to_datetime(f.end_time, "filter.end_time") if f.HasField("end_time") else None,
        )

    def QueryAuditRecords(self, request: rr.QueryAuditRecordsRequest, context: grpc.ServicerContext) -> rr.QueryAuditRecordsResponse:
        if request.page_size < 0:
            raise InvalidArgument("page_size must not be negative", reason="INVALID_PAGE_SIZE")
        try:
            after = int(base64.urlsafe_b64decode(request.page_token.encode()).decode().removeprefix("s:")) if request.page_token else 0
        except ValueError:
            raise InvalidArgument("page_token is not one this API returned", reason="INVALID_PAGE_TOKEN") from None
        size = min(request.page_size or 100, MAX_PAGE)
        records = self.store.query_audit(self._filter(request.filter), after=after, limit=size + 1, newest_first=request.newest_first)
        token = base64.urlsafe_b64encode(f"s:{records[size - 1].sequence}".encode()).decode() if len(records) > size else ""
        return rr.QueryAuditRecordsResponse(records=[self._record(r) for r in records[:size]], next_page_token=token)

    def ExportAuditRecords(
        self, request: rr.ExportAuditRecordsRequest, context: grpc.ServicerContext
    ) -> Iterator[rr.ExportAuditRecordsResponse]:
        if request.batch_rows < 0:
            raise InvalidArgument("batch_rows must not be negative", reason="INVALID_BATCH_ROWS")
        rows = min(request.batch_rows or 10_000, 100_000)
        after = 0
        flt = self._filter(request.filter)
        while True:
            records = self.store.query_audit(flt, after=after, limit=rows, newest_first=False)
            if not records:
                return
            after = records[-1].sequence
            table = pa.table(
                {
                    "sequence": [r.sequence for r in records],
                    "time": pa.array([r.entry.time for r in records], pa.timestamp("us", tz="UTC")),
                    "kind": [r.entry.kind for r in records],
                    "caller": [r.entry.caller for r in records],
                    "domain": [r.entry.domain for r in records],
                    "method": [r.entry.method for r in records],
                    "resource": [r.entry.resource for r in records],
                    "action": [r.entry.action for r in records],
                    "decision": [r.entry.decision for r in records],
                    "reason": [r.entry.reason for r in records],
                    "status_code": pa.array([r.entry.status_code for r in records], pa.int32()),
                    "request_id": [r.entry.request_id for r in records],
                    "duration_us": [r.entry.duration_us for r in records],
                    "event_type": [r.entry.event_type for r in records],
                    "record_hash": [r.hash for r in records],
                }
            )
            sink = io.BytesIO()
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
            yield rr.ExportAuditRecordsResponse(
                batch=common_pb2.ArrowBatch(arrow_ipc=sink.getvalue(), batch_id=str(after), row_count=len(records))
            )

    def VerifyAuditChain(self, request: rr.VerifyAuditChainRequest, context: grpc.ServicerContext) -> rr.VerifyAuditChainResponse:
        result = verify_chain(self.store, self.public_key, self.audit.anchor_path, request.start_sequence, request.end_sequence)
        response = rr.VerifyAuditChainResponse(
            intact=result.intact,
            records_checked=result.records_checked,
            checkpoints_checked=result.checkpoints_checked,
            head_sequence=result.head_sequence,
            head_hash=bytes.fromhex(result.head_hash),
        )
        if result.first_break:
            response.first_break.CopyFrom(
                m.ChainBreak(sequence=result.first_break.sequence, kind=_BREAKS[result.first_break.kind], detail=result.first_break.detail)
            )
        if result.last_valid_checkpoint:
            response.last_valid_checkpoint.CopyFrom(self._checkpoint(result.last_valid_checkpoint))
        return response

    def ListAuditCheckpoints(
        self, request: rr.ListAuditCheckpointsRequest, context: grpc.ServicerContext
    ) -> rr.ListAuditCheckpointsResponse:
        page, token = _page(self.store.checkpoints(), request.page_size, request.page_token)
        return rr.ListAuditCheckpointsResponse(checkpoints=[self._checkpoint(c) for c in page], next_page_token=token)

    def ReportAuditEvent(self, request: rr.ReportAuditEventRequest, context: grpc.ServicerContext) -> rr.ReportAuditEventResponse:
        if request.event_type == m.SECURITY_EVENT_TYPE_UNSPECIFIED:
            raise InvalidArgument("event_type is required", reason="INVALID_EVENT")
        if not request.resource or not request.action:
            raise InvalidArgument("resource and action are required", reason="INVALID_EVENT")
        event = enum_name(m.SecurityEventType, request.event_type, "event_type", prefix="SECURITY_EVENT_TYPE_")
        report_id = request.report_id or (f"{request.request_id}:{event}:{request.resource}" if request.request_id else None)
        entry = self._event(event, resource=request.resource, action=request.action, detail=request.detail, caller=request.caller)
        entry.decision = _DECISION_NAME.get(request.decision, "allow")
        entry.domain = request.domain or self.settings.region
        entry.request_id = request.request_id or entry.request_id
        entry.attributes = dict(request.attributes)
        entry.report_id = f"{current_caller()}:{report_id}" if report_id else None
        return rr.ReportAuditEventResponse(record=self._record(self.audit.append(entry)))


def verify_chain(
    store: GatewayStore, public_key: ed25519.Ed25519PublicKey, anchor_path: Path, start: int = 0, end: int = 0
) -> Verification:
    """Walk the stored chain (or a range of it) against its checkpoints and the anchor file."""
    start = max(start, 1)
    before = store.record_before(start) if start > 1 else None
    checkpoints = store.checkpoints()
    anchor = read_anchor(anchor_path)
    if anchor is not None and all(c.sequence != anchor.sequence for c in checkpoints):
        checkpoints.append(anchor)
    return verify(
        store.iter_records(start, end),
        [c for c in checkpoints if not end or c.sequence <= end],
        public_key,
        start_sequence=start,
        start_prev_hash=before.hash if before else GENESIS_HASH,
    )


def load_signing_key(path: Path) -> ed25519.Ed25519PrivateKey:
    """The Ed25519 key that signs audit checkpoints (made by `falaj pki init`)."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise StartupError(f"audit signing key not found: {path} (run `falaj pki init`)") from None
    except ValueError:
        raise StartupError(f"audit signing key is not a valid PEM key: {path}") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise StartupError(f"audit signing key is not an Ed25519 key: {path}")
    return key
