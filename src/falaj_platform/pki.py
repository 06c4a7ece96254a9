"""The platform PKI: a CA and one EC P-256 certificate per workload and client.

Every certificate carries exactly one SPIFFE URI SAN, which is the identity the
gateway and the services authorize. Server certificates also name localhost so that
clients verify the host they dial. Lifetimes are short by default; `init` is safe to
run again: it keeps the CA and renews only certificates that are close to expiry.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from falaj_platform.runtime.errors import InvalidArgument, StartupError
from falaj_platform.runtime.identity import client_id, service_id
from falaj_platform.runtime.settings import COMPONENTS

CA_DAYS = 365
SERVICE_DAYS = 7
CLIENT_DAYS = 7
RENEW_BEFORE = dt.timedelta(days=1)
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
ROLE_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")


@dataclass(frozen=True)
class IssuedIdentity:
    """Where an identity's files are and what it is."""

    spiffe_id: str
    cert_path: Path
    key_path: Path
    serial: int
    not_after: dt.datetime


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


class PKI:
    """The CA under `root` (normally $FALAJ_HOME/pki) and the identities it issued."""

    def __init__(self, root: Path):
        self.root = root

    @property
    def ca_cert_path(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_key_path(self) -> Path:
        return self.root / "ca-key.pem"

    def service_dir(self, name: str) -> Path:
        return self.root / "services" / name

    def client_dir(self, name: str) -> Path:
        return self.root / "clients" / name

    # -- CA ---------------------------------------------------------------------------
    def _load_ca(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        try:
            cert = x509.load_pem_x509_certificate(self.ca_cert_path.read_bytes())
            key = serialization.load_pem_private_key(self.ca_key_path.read_bytes(), password=None)
        except FileNotFoundError:
            raise StartupError(f"no CA under {self.root}; run `falaj pki init`") from None
        except ValueError:
            raise StartupError(f"the CA files under {self.root} are not valid PEM") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise StartupError("the CA key is not an EC key")
        return cert, key

    def _ensure_ca(self, days: int) -> bool:
        if self.ca_cert_path.exists() and self.ca_key_path.exists():
            cert, _ = self._load_ca()
            if cert.not_valid_after_utc - _now() > RENEW_BEFORE:
                return False
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Falaj"), x509.NameAttribute(NameOID.COMMON_NAME, "Falaj platform CA")]
        )
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        _write_private(self.ca_key_path, _key_pem(key))
        self.ca_cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return True

    # -- leaf certificates ----------------------------------------------------------------
    def _issue(self, folder: Path, spiffe: str, *, server: bool, days: int, extra: dict[str, str]) -> IssuedIdentity:
        ca_cert, ca_key = self._load_ca()
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe)]
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if server:
            names += [
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.IPAddress(ipaddress.ip_address("::1")),
            ]
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        serial = x509.random_serial_number()
        cert = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Falaj"),
                        x509.NameAttribute(NameOID.COMMON_NAME, spiffe.rsplit("/", 1)[-1]),
                    ]
                )
            )
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        _write_private(folder / "key.pem", _key_pem(key))
        (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        info = {"spiffe_id": spiffe, "serial": str(serial), "not_after": not_after.isoformat(), **extra}
        (folder / "identity.json").write_text(json.dumps(info, indent=2) + "\n")
        return IssuedIdentity(spiffe, folder / "cert.pem", folder / "key.pem", serial, not_after)

    def _needs_renewal(self, folder: Path) -> bool:
        try:
            cert = x509.load_pem_x509_certificate((folder / "cert.pem").read_bytes())
            ca_cert, _ = self._load_ca()
        except (FileNotFoundError, ValueError):
            return True
        if not (folder / "key.pem").exists() or cert.issuer != ca_cert.subject:
            return True
        try:
            cert.verify_directly_issued_by(ca_cert)
        except (ValueError, TypeError, Exception):  # noqa: BLE001 - any failure means reissue
            return True
        return cert.not_valid_after_utc - _now() < RENEW_BEFORE

    def init(self, *, ca_days: int = CA_DAYS, service_days: int = SERVICE_DAYS, client_days: int = CLIENT_DAYS) -> list[str]:
        """Create the CA, every service and gateway certificate, and the `admin` client.

        Existing, valid material is kept; returns the names of what was (re)issued.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        issued = ["ca"] if self._ensure_ca(ca_days) else []
        for name in COMPONENTS:
            folder = self.service_dir(name)
            if issued[:1] == ["ca"] or self._needs_renewal(folder):
                self._issue(folder, service_id(name), server=True, days=service_days, extra={"kind": "service"})
                issued.append(name)
        if issued[:1] == ["ca"] or self._needs_renewal(self.client_dir("admin")):
            self.issue_client("admin", role="admin", days=client_days)
            issued.append("admin")
        if not self.audit_key_path.exists():
            key = ed25519.Ed25519PrivateKey.generate()
            _write_private(self.audit_key_path, _key_pem(key))
            public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            self.audit_key_path.with_name("signing-key.pub.pem").write_bytes(public)
            issued.append("audit-signing-key")
        return issued

    @property
    def audit_key_path(self) -> Path:
        """Ed25519 key the gateway signs audit checkpoints with."""
        return self.root / "audit" / "signing-key.pem"

    def issue_client(self, name: str, *, role: str, days: int = CLIENT_DAYS) -> IssuedIdentity:
        """Issue (or reissue) the client identity `spiffe://falaj.local/client/<name>`."""
        if not NAME_PATTERN.match(name):
            raise InvalidArgument(f"client name {name!r} must be lowercase letters, digits and '-' (at most 63)")
        if not ROLE_PATTERN.match(role):
            raise InvalidArgument(f"role {role!r} must be lowercase letters, digits, '_' and '-'")
        if days < 1:
            raise InvalidArgument("--days must be at least 1")
        return self._issue(self.client_dir(name), client_id(name), server=False, days=days, extra={"kind": "client", "role": role})
