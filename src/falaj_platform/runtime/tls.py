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
