"""The shared audit log: every call recorded, tampering found and named, nothing acknowledged lost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa

from falaj.gateway.v1 import message_pb2 as gm
from falaj.gateway.v1 import request_response_pb2 as gr
from falaj.gateway.v1 import service_pb2_grpc as gs
from falaj_platform.gateway.store import audit_head, audit_records
from tests.backends import backend_env
from tests.conftest import free_port
from tests.gateway.conftest import Platform, call

LIVE = "/inference.GRPCInferenceService/ServerLive"


def _admin(platform: Platform) -> gs.GatewayAdminServiceStub:
    return gs.GatewayAdminServiceStub(platform.channel("root"))


def _make_records(platform: Platform, count: int) -> None:
    channel = platform.channel("mia")
    for i in range(count):
        channel.unary_unary(LIVE)(b"", timeout=5, metadata=[("x-request-id", f"r-{i}")])


def _verify(platform: Platform) -> gr.VerifyAuditChainResponse:
    return _admin(platform).VerifyAuditChain(gr.VerifyAuditChainRequest(), timeout=10)


def test_an_untouched_chain_verifies_with_signed_checkpoints(fresh_platform: Callable[..., Platform]) -> None:
    platform = fresh_platform()
    _make_records(platform, 20)
    platform.gateway.audit.checkpoint_now()
    result = _verify(platform)
    assert result.intact, result.first_break.detail
    assert result.records_checked >= 20 and result.checkpoints_checked >= 1
    assert result.last_valid_checkpoint.sequence == result.head_sequence


def _swap_records(connection: sa.Connection, first: int, second: int) -> None:
    """Move record `first` to `second`'s place and back, hashes and all (a reordering)."""
    rows = {
        r.sequence: r._asdict() for r in connection.execute(sa.select(audit_records).where(audit_records.c.sequence.in_([first, second])))
    }
    connection.execute(audit_records.update().where(audit_records.c.sequence == first).values(hash="moving"))
    for place, content in ((second, first), (first, second)):
        values = {k: v for k, v in rows[content].items() if k not in ("sequence", "report_id")}
        connection.execute(audit_records.update().where(audit_records.c.sequence == place).values(**values))


TAMPERING: dict[str, tuple[Callable[[sa.Connection], None], int, int]] = {
    "modified": (
        lambda c: c.execute(audit_records.update().where(audit_records.c.sequence == 5).values(actor="spiffe://falaj.local/client/root")),
        5,
        gm.CHAIN_BREAK_KIND_RECORD_MODIFIED,
    ),
    "deleted": (lambda c: c.execute(audit_records.delete().where(audit_records.c.sequence == 6)), 6, gm.CHAIN_BREAK_KIND_SEQUENCE_GAP),
    "reordered": (lambda c: _swap_records(c, 7, 8), 7, gm.CHAIN_BREAK_KIND_LINK_BROKEN),
    "truncated": (
        lambda c: (
            c.execute(audit_records.delete().where(audit_records.c.sequence > 9)),
            c.execute(audit_head.update().values(sequence=9)),
        ),
        10,
        gm.CHAIN_BREAK_KIND_TRUNCATED,
    ),
}


@pytest.mark.parametrize("tampering", sorted(TAMPERING))
def test_audit_verify_names_the_first_broken_record(fresh_platform: Callable[..., Platform], tampering: str) -> None:
    platform = fresh_platform()
    _make_records(platform, 15)
    platform.gateway.audit.checkpoint_now()
    change, broken_at, kind = TAMPERING[tampering]
    with platform.gateway.database.engine.begin() as connection:
        change(connection)
    result = _verify(platform)
    assert not result.intact
    assert result.first_break.sequence == broken_at, result.first_break.detail
    if tampering != "reordered":  # a swap shows as a broken link or a modified record
        assert result.first_break.kind == kind
    # The CLI says the same, in one line, and exits non-zero.
    env = {**os.environ, "FALAJ_GATEWAY_ADDR": platform.gateway_addr, "FALAJ_PKI_DIR": str(platform.pki.root)}
    cli = subprocess.run(
        [sys.executable, "-m", "falaj_platform.cli", "audit", "verify", "--identity", "root"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 1, cli.stderr
    assert cli.stdout.startswith(f"audit chain BROKEN at record {broken_at} (")


def test_records_hold_no_payload_and_no_line_breaks(platform: Platform) -> None:
    secret = b"\x0a\x0dcard=4111111111111111"
    call(platform.channel("vic"), "/falaj.ingest.v1.IngestService/CreateDataset", secret, metadata=[("x-request-id", "inj\r\nected")])
    records = _admin(platform).QueryAuditRecords(gr.QueryAuditRecordsRequest(page_size=1000), timeout=5).records
    text = "".join(str(r) for r in records)
    assert "4111111111111111" not in text
    assert all("\n" not in r.request_id and "\r" not in r.request_id for r in records)


def test_audit_query_cli_filters_by_identity_and_decision(platform: Platform) -> None:
    call(platform.channel("nobody"), "/falaj.serving.v1.ServingService/CreateDeployment")
    env = {**os.environ, "FALAJ_GATEWAY_ADDR": platform.gateway_addr, "FALAJ_PKI_DIR": str(platform.pki.root)}
    args = ["audit", "query", "--identity", "root", "--caller", "spiffe://falaj.local/client/nobody", "--decision", "deny", "--since", "10"]
    cli = subprocess.run([sys.executable, "-m", "falaj_platform.cli", *args], env=env, capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, cli.stderr
    lines = cli.stdout.strip().splitlines()
    assert lines and all(" deny  spiffe://falaj.local/client/nobody " in line for line in lines)
    assert any("/falaj.serving.v1.ServingService/CreateDeployment" in line for line in lines)


def _stack_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FALAJ_")}
    env.update(backend_env(home))
    env["FALAJ_HOME"] = str(home)
    for name in ("ingest", "features", "training", "serving", "experiments", "monitoring"):
        env[f"FALAJ_{name.upper()}_ADDR"] = f"127.0.0.1:{free_port()}"
        env[f"FALAJ_{name.upper()}_METRICS_ADDR"] = f"127.0.0.1:{free_port()}"
    env["FALAJ_GATEWAY_ADDR"] = f"127.0.0.1:{free_port()}"
    env["FALAJ_GATEWAY_METRICS_ADDR"] = f"127.0.0.1:{free_port()}"
    return env


def test_no_acknowledged_call_loses_its_record_when_the_gateway_is_killed(tmp_path: Path) -> None:
    from falaj_platform.runtime.clients import secure_channel
    from falaj_platform.runtime.settings import PkiPaths

    env = _stack_env(tmp_path)
    falaj = [sys.executable, "-m", "falaj_platform.cli"]
    assert subprocess.run([*falaj, "stack", "up"], env=env, capture_output=True, timeout=120).returncode == 0
    try:
        pki = tmp_path / "pki"
        admin = PkiPaths(pki / "ca.pem", pki / "clients/admin/cert.pem", pki / "clients/admin/key.pem")
        acknowledged = []
        with secure_channel(env["FALAJ_GATEWAY_ADDR"], admin) as channel:
            for i in range(300):
                channel.unary_unary(LIVE)(b"", timeout=5, metadata=[("x-request-id", f"ack-{i}")])
                acknowledged.append(f"ack-{i}")
        gateway_pid = int((tmp_path / "run" / "gateway.pid").read_text())
        os.kill(gateway_pid, signal.SIGKILL)
        up = subprocess.run([*falaj, "stack", "up"], env=env, capture_output=True, text=True, timeout=120)
        assert up.returncode == 0, up.stderr
        with secure_channel(env["FALAJ_GATEWAY_ADDR"], admin) as channel:
            stub = gs.GatewayAdminServiceStub(channel)
            found: set[str] = set()
            token = ""
            while True:
                page = stub.QueryAuditRecords(
                    gr.QueryAuditRecordsRequest(filter=gm.AuditRecordFilter(method=LIVE), page_size=1000, page_token=token), timeout=10
                )
                found |= {r.request_id for r in page.records}
                token = page.next_page_token
                if not token:
                    break
            assert set(acknowledged) <= found
            assert stub.VerifyAuditChain(gr.VerifyAuditChainRequest(), timeout=30).intact
    finally:
        subprocess.run([*falaj, "stack", "down"], env=env, capture_output=True, timeout=60)
