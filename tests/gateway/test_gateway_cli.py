"""`falaj policy list|add|remove|test` and `falaj pki revoke` against a running gateway."""

from __future__ import annotations

import os
import subprocess
import sys

import grpc

from tests.gateway.conftest import Platform, call


def _falaj(platform: Platform, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FALAJ_GATEWAY_ADDR": platform.gateway_addr, "FALAJ_PKI_DIR": str(platform.pki.root)}
    return subprocess.run(
        [sys.executable, "-m", "falaj_platform.cli", *args, "--identity", "root"], env=env, capture_output=True, text=True, timeout=60
    )


def test_policy_commands_add_test_list_and_remove_a_line(platform: Platform) -> None:
    line = "p, spiffe://falaj.local/client/nobody, *, /falaj.experiments.v1.ExperimentsService/Get*, read"
    method = "/falaj.experiments.v1.ExperimentsService/GetExperiment"
    test_args = ["policy", "test", "--subject", "spiffe://falaj.local/client/nobody", "--object", method]
    denied = _falaj(platform, *test_args)
    assert denied.returncode == 1 and denied.stdout.startswith("deny: no policy allows")
    added = _falaj(platform, "policy", "add", line)
    assert added.returncode == 0, added.stderr
    allowed = _falaj(platform, *test_args)
    assert allowed.returncode == 0 and allowed.stdout.startswith("allow:")
    assert f"matched: {line}, allow" in allowed.stdout
    assert call(platform.channel("nobody"), method) is not grpc.StatusCode.PERMISSION_DENIED
    listed = _falaj(platform, "policy", "list")
    assert f"{line}, allow" in listed.stdout.splitlines()
    assert "g, spiffe://falaj.local/client/vic, viewer, *" in listed.stdout.splitlines()
    removed = _falaj(platform, "policy", "remove", line)
    assert removed.returncode == 0, removed.stderr
    assert call(platform.channel("nobody"), method) is grpc.StatusCode.PERMISSION_DENIED


def test_policy_add_refuses_a_malformed_line_in_one_line(platform: Platform) -> None:
    result = _falaj(platform, "policy", "add", "p, x, *, /no-slashes, read")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("falaj: error: invalid policy line:")


def test_pki_revoke_cuts_a_client_off(platform: Platform) -> None:
    platform.pki.issue_client("temp-worker", role="viewer")
    result = _falaj(platform, "pki", "revoke", "temp-worker", "--note", "contract ended")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("revoked spiffe://falaj.local/client/temp-worker")
    assert call(platform.channel("temp-worker"), "/inference.GRPCInferenceService/ServerLive") is grpc.StatusCode.UNAUTHENTICATED
