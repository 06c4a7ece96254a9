"""Authentication at the gateway: only current certificates of the platform CA get in."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from falaj.gateway.v1 import message_pb2 as gm
from falaj.gateway.v1 import request_response_pb2 as gr
from falaj.gateway.v1 import service_pb2_grpc as gs
from falaj_platform.pki import PKI
from tests.gateway.conftest import Platform, call

LIVE = "/inference.GRPCInferenceService/ServerLive"


def _channel(platform: Platform, *, key: bytes | None, cert: bytes | None, ca: bytes | None = None) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca or platform.pki.ca_cert_path.read_bytes(), private_key=key, certificate_chain=cert
    )
    channel = grpc.secure_channel(platform.gateway_addr, creds, options=[("grpc.ssl_target_name_override", "localhost")])
    platform.channels.append(channel)
    return channel


def _expired_client(pki: PKI, tmp_path: Path) -> tuple[bytes, bytes]:
    """A client certificate from the real CA that expired an hour ago."""
    ca_cert = x509.load_pem_x509_certificate(pki.ca_cert_path.read_bytes())
    ca_key = serialization.load_pem_private_key(pki.ca_key_path.read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "late")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=2))
        .not_valid_after(now - dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier("spiffe://falaj.local/client/root")]), critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def _eventually(check: Callable[[], bool], seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_plaintext_and_certificate_less_clients_are_refused(platform: Platform) -> None:
    with grpc.insecure_channel(platform.gateway_addr) as plaintext:
        assert call(plaintext, LIVE) is grpc.StatusCode.UNAVAILABLE
    assert call(_channel(platform, key=None, cert=None), LIVE) is grpc.StatusCode.UNAVAILABLE


def test_a_client_of_another_ca_is_refused(platform: Platform, tmp_path: Path) -> None:
    foreign = PKI(tmp_path / "foreign")
    foreign.init()
    key = (foreign.client_dir("admin") / "key.pem").read_bytes()
    cert = (foreign.client_dir("admin") / "cert.pem").read_bytes()
    assert call(_channel(platform, key=key, cert=cert), LIVE) is grpc.StatusCode.UNAVAILABLE


def test_an_expired_client_certificate_is_refused(platform: Platform, tmp_path: Path) -> None:
    key, cert = _expired_client(platform.pki, tmp_path)
    assert call(_channel(platform, key=key, cert=cert), LIVE) is grpc.StatusCode.UNAVAILABLE


def test_a_revoked_client_is_refused_at_once_and_audited(fresh_platform: Callable[..., Platform]) -> None:
    platform = fresh_platform()
    victim = platform.pki.issue_client("leaver", role="viewer")
    channel = platform.channel("leaver")
    assert _eventually(lambda: call(channel, LIVE) is grpc.StatusCode.OK)  # the role arrives with the next reload
    admin = gs.GatewayAdminServiceStub(platform.channel("root"))
    revocation = gm.Revocation(
        serial_number=format(victim.serial, "x"), subject=victim.spiffe_id, reason=gm.REVOCATION_REASON_CESSATION_OF_OPERATION
    )
    admin.CreateRevocation(gr.CreateRevocationRequest(revocation=revocation), timeout=5)
    # The channel opened before the revocation is refused too: the check runs per call.
    assert call(channel, LIVE) is grpc.StatusCode.UNAUTHENTICATED
    denied = admin.QueryAuditRecords(
        gr.QueryAuditRecordsRequest(filter=gm.AuditRecordFilter(caller=victim.spiffe_id, decision=gm.DECISION_DENY)), timeout=5
    ).records
    assert denied and denied[-1].decision_reason == gm.DECISION_REASON_CERTIFICATE_REVOKED
    listed = admin.ListRevocations(gr.ListRevocationsRequest(), timeout=5).revocations
    assert [r.subject for r in listed] == [victim.spiffe_id]


def test_a_revocation_made_by_another_replica_is_reloaded(fresh_platform: Callable[..., Platform]) -> None:
    platform = fresh_platform()
    victim = platform.pki.issue_client("contractor", role="viewer")
    channel = platform.channel("contractor")
    assert _eventually(lambda: call(channel, LIVE) is grpc.StatusCode.OK)
    # Written straight into the shared store, as another gateway replica would.
    platform.gateway.store.revoke(format(victim.serial, "x"), victim.spiffe_id, "KEY_COMPROMISE", "", "replica-2")
    assert _eventually(lambda: call(channel, LIVE) is grpc.StatusCode.UNAUTHENTICATED)


def _served_serial(addr: str, platform: Platform) -> int:
    context = ssl.create_default_context(cafile=str(platform.pki.ca_cert_path))
    context.load_cert_chain(platform.pki.client_dir("root") / "cert.pem", platform.pki.client_dir("root") / "key.pem")
    context.set_alpn_protocols(["h2"])
    host, port = addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as raw, context.wrap_socket(raw, server_hostname="localhost") as tls_socket:
        der = tls_socket.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_gateway_certificate_rotates_without_restart(fresh_platform: Callable[..., Platform]) -> None:
    platform = fresh_platform()
    channel = platform.channel("root")
    assert call(channel, LIVE) is grpc.StatusCode.OK
    before = _served_serial(platform.gateway_addr, platform)
    time.sleep(0.01)  # a new modification time for the rewritten files
    platform.pki._issue(
        platform.pki.service_dir("gateway"), "spiffe://falaj.local/service/gateway", server=True, days=7, extra={"kind": "service"}
    )
    after = _served_serial(platform.gateway_addr, platform)
    assert after != before
    assert call(channel, LIVE) is grpc.StatusCode.OK  # the existing channel keeps working
    assert call(platform.channel("root"), LIVE) is grpc.StatusCode.OK  # and new ones get in


def test_identity_metadata_from_a_client_is_not_trusted(platform: Platform) -> None:
    spoofed = [("x-falaj-caller", "spiffe://falaj.local/client/root")]
    assert (
        call(platform.channel("nobody"), "/falaj.ingest.v1.IngestService/ListDatasets", metadata=spoofed)
        is grpc.StatusCode.PERMISSION_DENIED
    )


def test_upstream_down_is_unavailable_naming_the_service(fresh_platform: Callable[..., Platform]) -> None:
    from tests.conftest import free_port

    platform = fresh_platform(FALAJ_MONITORING_ADDR=f"127.0.0.1:{free_port()}")
    with pytest.raises(grpc.RpcError) as raised:
        platform.channel("root").unary_unary("/falaj.monitoring.v1.MonitoringService/ListAlerts")(b"", timeout=5)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "service monitoring is unavailable" in raised.value.details()
