"""What the gateway does around every call: refuse revoked certificates, authorize, audit."""

from __future__ import annotations

import datetime as dt
import json
import threading
from pathlib import Path

import grpc
from cryptography import x509

from falaj_platform.gateway.auditlog import AuditLog
from falaj_platform.gateway.chain import AuditEntry
from falaj_platform.gateway.policy import Authorizer, PolicyLine, action_of, validate_domain
from falaj_platform.gateway.store import GatewayStore
from falaj_platform.runtime.errors import InvalidArgument, PermissionDenied, Unauthenticated
from falaj_platform.runtime.identity import client_id
from falaj_platform.runtime.interceptors import OPEN_METHOD_PREFIXES, CallInfo
from falaj_platform.runtime.logs import get_logger

DOMAIN_METADATA_KEY = "x-falaj-domain"
"""Tenant or region a call acts in; the gateway's own region when absent."""


class RevocationList:
    """Serial numbers of revoked certificates, reloaded from the store."""

    def __init__(self, store: GatewayStore):
        self.store = store
        self.serials: frozenset[str] = store.revoked_serials()
        self._serial_of_pem: dict[bytes, str] = {}

    def reload(self) -> None:
        self.serials = self.store.revoked_serials()

    def serial_of(self, context: grpc.ServicerContext) -> str:
        pem = (context.auth_context().get("x509_pem_cert") or [b""])[0]
        serial = self._serial_of_pem.get(pem)
        if serial is None:
            serial = format(x509.load_pem_x509_certificate(pem).serial_number, "x") if pem else ""
            if len(self._serial_of_pem) > 10_000:
                self._serial_of_pem.clear()
            self._serial_of_pem[pem] = serial
        return serial


class GatewayHooks:
    """CallHooks of the gateway's server (see runtime.interceptors.CallHooks)."""

    def __init__(self, authorizer: Authorizer, revocations: RevocationList, audit: AuditLog, region: str):
        self.authorizer = authorizer
        self.revocations = revocations
        self.audit = audit
        self.region = region

    def authorize(self, call: CallInfo, context: grpc.ServicerContext) -> None:
        if call.method.startswith(OPEN_METHOD_PREFIXES):
            call.decision, call.reason = "allow", "OPEN_METHOD"
            return
        call.domain = call.metadata.get(DOMAIN_METADATA_KEY, self.region)
        serial = self.revocations.serial_of(context)
        if serial in self.revocations.serials:
            call.decision, call.reason = "deny", "CERTIFICATE_REVOKED"
            raise Unauthenticated(f"certificate {serial} of {call.caller} is revoked", reason="CERTIFICATE_REVOKED")
        if validate_domain(call.domain) or call.domain == "*":
            call.decision, call.reason = "deny", "INVALID_DOMAIN"
            raise InvalidArgument(f"{DOMAIN_METADATA_KEY} must name one tenant or region, like 'ae-dxb'", reason="INVALID_DOMAIN")
        decision = self.authorizer.decide(call.caller, call.domain, call.method)
        call.decision, call.reason = ("allow" if decision.allowed else "deny"), decision.reason
        if not decision.allowed:
            raise PermissionDenied(decision.detail, reason=decision.reason, metadata={"method": call.method, "domain": call.domain})

    def completed(self, call: CallInfo, code: grpc.StatusCode, duration_s: float) -> None:
        if call.reason == "OPEN_METHOD":
            return  # health checks and reflection are not audited
        self.audit.append(
            AuditEntry(
                kind="call",
                caller=call.caller,
                domain=call.domain or self.region,
                method=call.method,
                resource=call.method,
                action=action_of(call.method),
                decision=call.decision or "deny",
                reason=call.reason or "REFUSED",
                detail="" if call.decision == "allow" else code.name,
                status_code=code.value[0],
                request_id=call.request_id,
                source_address=call.source_address,
                duration_us=int(duration_s * 1_000_000),
            )
        )


def pki_role_bindings(pki_dir: Path) -> list[PolicyLine]:
    """Role bindings declared when client identities were issued (`falaj pki issue NAME --role ROLE`)."""
    lines = []
    for info in sorted((pki_dir / "clients").glob("*/identity.json")):
        try:
            data = json.loads(info.read_text())
            lines.append(PolicyLine.parse(f"g, {client_id(info.parent.name)}, {data['role']}, *"))
        except (OSError, ValueError, KeyError):
            get_logger().warning("ignoring unreadable client identity", path=str(info))
    return lines


class Reloader:
    """Keeps this replica's policy, revocations and PKI-declared roles current.

    Every `interval` seconds it reads the store's policy revision (one number), the
    revoked serials, and whether a client identity was issued since; a change made
    through any replica's admin API or `falaj pki issue` applies without a restart.
    """

    def __init__(self, store: GatewayStore, authorizer: Authorizer, revocations: RevocationList, interval: float, pki_dir: Path):
        self.store, self.authorizer, self.revocations, self.interval = store, authorizer, revocations, interval
        self.pki_dir = pki_dir
        self._pki_stamp: tuple[tuple[str, int], ...] = ()
        self._next_expiry: dt.datetime | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="policy-reloader", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _sync_pki_roles(self) -> None:
        stamp = tuple((str(p), p.stat().st_mtime_ns) for p in sorted((self.pki_dir / "clients").glob("*/identity.json")))
        if stamp != self._pki_stamp:
            self.store.apply_lines(pki_role_bindings(self.pki_dir), replace=False, actor="falaj:pki", dry_run=False)
            self._pki_stamp = stamp

    def reload_now(self) -> None:
        self._sync_pki_roles()
        revision = self.store.policy_revision()
        expired = self._next_expiry is not None and dt.datetime.now(dt.UTC) >= self._next_expiry
        if revision != self.authorizer.revision or expired:
            stored = self.store.lines()
            self.authorizer.replace([s.line for s in stored], revision)
            expiries = [s.expire_time for s in stored if s.expire_time is not None]
            self._next_expiry = min(expiries) if expiries else None
        self.revocations.reload()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.reload_now()
            except Exception as error:  # noqa: BLE001 - keep the last good policy, try again
                get_logger().error("policy reload failed", error=type(error).__name__)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
