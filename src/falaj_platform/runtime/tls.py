"""mTLS credentials from the PKI files; every hop in Falaj is mutually authenticated."""

from __future__ import annotations

from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from falaj_platform.runtime.errors import StartupError
from falaj_platform.runtime.settings import PkiPaths


def read_pem(path: Path, what: str) -> bytes:
    """Read a PEM file, failing with one clear line when it is missing or malformed."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise StartupError(f"{what} file not found: {path} (run `falaj pki init`)") from None
    except OSError as exc:
        raise StartupError(f"cannot read {what} file {path}: {exc.strerror}") from None
    try:
        if what.endswith("key"):
            load_pem_private_key(data, password=None)
        else:
            x509.load_pem_x509_certificates(data)
    except (ValueError, TypeError):
        raise StartupError(f"{what} file is not a valid PEM {('key' if what.endswith('key') else 'certificate')}: {path}") from None
    return data


def load_identity(pki: PkiPaths) -> tuple[bytes, bytes, bytes]:
    """(ca, cert, key) PEM bytes of an identity, validated."""
    return (
        read_pem(pki.ca_cert, "CA certificate"),
        read_pem(pki.cert, "certificate"),
        read_pem(pki.key, "private key"),
    )


def server_credentials(pki: PkiPaths) -> grpc.ServerCredentials:
    """Server credentials that require a client certificate from the platform CA."""
    ca, cert, key = load_identity(pki)
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)


def channel_credentials(pki: PkiPaths) -> grpc.ChannelCredentials:
    """Channel credentials presenting this identity's certificate."""
    ca, cert, key = load_identity(pki)
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def rotating_server_credentials(pki: PkiPaths) -> grpc.ServerCredentials:
    """Server credentials that pick up renewed certificate files without a restart.

    grpc asks the fetcher at each new handshake; it reloads the files when their
    modification times change. Connections already open keep the certificate they
    were made with.
    """
    ca, cert, key = load_identity(pki)
    state = {"stamp": _stamp(pki)}

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        stamp = _stamp(pki)
        if stamp == state["stamp"]:
            return None
        try:
            new_ca, new_cert, new_key = load_identity(pki)
        except StartupError:
            return None  # half-written files: keep serving with the current ones
        state["stamp"] = stamp
        return grpc.ssl_server_certificate_configuration([(new_key, new_cert)], root_certificates=new_ca)

    initial = grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)
    return grpc.dynamic_ssl_server_credentials(initial, fetch, require_client_authentication=True)


def _stamp(pki: PkiPaths) -> tuple[int, ...]:
    try:
        return tuple(path.stat().st_mtime_ns for path in (pki.ca_cert, pki.cert, pki.key))
    except FileNotFoundError:
        return ()
