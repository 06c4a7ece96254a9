"""The platform PKI: what `falaj pki init` and `falaj pki issue` must produce."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from falaj_platform.cli import main as falaj
from falaj_platform.pki import PKI
from falaj_platform.runtime.errors import InvalidArgument
from falaj_platform.runtime.identity import spiffe_id_from_cert
from falaj_platform.runtime.settings import COMPONENTS


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_init_issues_every_service_and_admin_with_one_spiffe_san(pki: PKI) -> None:
    ca = _cert(pki.ca_cert_path)
    for name in COMPONENTS:
        cert = _cert(pki.service_dir(name) / "cert.pem")
        cert.verify_directly_issued_by(ca)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://falaj.local/service/{name}"]
        assert "localhost" in san.get_values_for_type(x509.DNSName)
        assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
        assert cert.public_key().curve.name == "secp256r1"
    admin = _cert(pki.client_dir("admin") / "cert.pem")
    assert spiffe_id_from_cert(admin) == "spiffe://falaj.local/client/admin"


def test_leaf_certificates_are_short_lived_and_keys_private(pki: PKI) -> None:
    cert = _cert(pki.service_dir("gateway") / "cert.pem")
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= dt.timedelta(days=8)
    for key in [pki.ca_key_path, pki.service_dir("ingest") / "key.pem", pki.client_dir("admin") / "key.pem"]:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_init_twice_keeps_valid_material(tmp_path: Path) -> None:
    authority = PKI(tmp_path)
    first = authority.init()
    assert first[0] == "ca" and "admin" in first
    before = (authority.service_dir("serving") / "cert.pem").read_bytes()
    assert authority.init() == []
    assert (authority.service_dir("serving") / "cert.pem").read_bytes() == before


def test_issue_client_records_role_and_rejects_bad_names(pki: PKI) -> None:
    issued = pki.issue_client("analyst-1", role="data_scientist", days=1)
    assert spiffe_id_from_cert(_cert(issued.cert_path)) == "spiffe://falaj.local/client/analyst-1"
    assert '"role": "data_scientist"' in (issued.cert_path.parent / "identity.json").read_text()
    with pytest.raises(InvalidArgument):
        pki.issue_client("../evil", role="admin")
    with pytest.raises(InvalidArgument):
        pki.issue_client("ok", role="Bad Role")


def test_cli_pki_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("FALAJ_HOME", str(tmp_path))
    monkeypatch.delenv("FALAJ_PKI_DIR", raising=False)
    assert falaj(["pki", "init"]) == 0
    assert (tmp_path / "pki" / "ca.pem").exists()
    assert falaj(["pki", "issue", "app", "--role", "predictor"]) == 0
    assert (tmp_path / "pki" / "clients" / "app" / "cert.pem").exists()
    assert falaj(["pki", "issue", "Bad/Name", "--role", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("falaj: error: client name")
