"""Caller identity: SPIFFE IDs from peer certificates, and the metadata the gateway sets."""

from __future__ import annotations

import grpc
from cryptography import x509

from falaj_platform.runtime.settings import TRUST_DOMAIN

CALLER_METADATA_KEY = "x-falaj-caller"
"""Set by the gateway to the SPIFFE ID of the original caller; trusted only from the gateway."""

GATEWAY_SPIFFE_ID = f"spiffe://{TRUST_DOMAIN}/service/gateway"


def service_id(name: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/service/{name}"


def client_id(name: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/client/{name}"


def is_spiffe_id(value: str) -> bool:
    prefix = f"spiffe://{TRUST_DOMAIN}/"
    if not value.startswith(prefix):
        return False
    kind, _, name = value[len(prefix) :].partition("/")
    return kind in ("service", "client") and bool(name) and "/" not in name


def spiffe_id_from_cert(cert: x509.Certificate) -> str | None:
    """The one SPIFFE URI SAN of a certificate, or None when it has not exactly one."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1 or not is_spiffe_id(uris[0]):
        return None
    return uris[0]


def peer_spiffe_id(context: grpc.ServicerContext) -> str | None:
    """SPIFFE ID of the mTLS peer, from `context.auth_context()`; None when not mTLS."""
    auth = context.auth_context()
    ids = auth.get("peer_spiffe_id")
    if ids:
        return ids[0].decode()
    pem = auth.get("x509_pem_cert")
    if not pem:
        return None
    return spiffe_id_from_cert(x509.load_pem_x509_certificate(pem[0]))
