"""A 1 GiB client stream passes through the gateway while the gateway's memory stays bounded."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from falaj_platform.pki import PKI
from falaj_platform.runtime.clients import secure_channel
from falaj_platform.runtime.identity import GATEWAY_SPIFFE_ID
from falaj_platform.runtime.server import create_server
from falaj_platform.runtime.settings import PkiPaths, load_settings
from tests.backends import backend_env
from tests.conftest import free_port

SINK = "/falaj.ingest.v1.ProbeService/Sink"
CHUNK = 1024 * 1024
CHUNKS = 1024  # 1 GiB


def _sink(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
    return str(sum(len(r) for r in requests)).encode()


class Sink(grpc.GenericRpcHandler):
    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        return grpc.stream_unary_rpc_method_handler(_sink) if details.method == SINK else None


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.mark.slow
def test_one_gib_client_stream_passes_with_bounded_gateway_memory(tmp_path: Path) -> None:
    pki = PKI(tmp_path / "pki")
    pki.init()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FALAJ_")}
    env |= {**backend_env(tmp_path), "FALAJ_HOME": str(tmp_path), "FALAJ_LOG_LEVEL": "warning"}
    upstream = create_server(
        load_settings("ingest", env=env),
        lambda s: [],
        listen_addr="127.0.0.1:0",
        allowed_peers=frozenset({GATEWAY_SPIFFE_ID}),
        handlers=[Sink()],
    )
    env |= {"FALAJ_INGEST_ADDR": f"127.0.0.1:{upstream.port}", "FALAJ_GATEWAY_ADDR": f"127.0.0.1:{free_port()}"}
    env["FALAJ_GATEWAY_METRICS_ADDR"] = f"127.0.0.1:{free_port()}"
    gateway = subprocess.Popen([sys.executable, "-m", "falaj_platform.gateway"], env=env, stderr=subprocess.PIPE)
    admin = PkiPaths(pki.ca_cert_path, pki.client_dir("admin") / "cert.pem", pki.client_dir("admin") / "key.pem")
    try:
        channel = secure_channel(env["FALAJ_GATEWAY_ADDR"], admin)
        grpc.channel_ready_future(channel).result(timeout=30)
        baseline = _peak_rss_mib(gateway.pid)
        payload = os.urandom(CHUNK)
        started = time.perf_counter()
        total = channel.stream_unary(SINK)((payload for _ in range(CHUNKS)), timeout=300)
        elapsed = time.perf_counter() - started
        assert int(total) == CHUNK * CHUNKS
        peak = _peak_rss_mib(gateway.pid)
        print(
            f"1 GiB through the gateway in {elapsed:.1f}s ({CHUNKS / elapsed:.0f} MiB/s); gateway peak RSS {baseline:.0f} -> {peak:.0f} MiB"
        )
        assert peak - baseline < 128, f"gateway memory grew by {peak - baseline:.0f} MiB for a 1 GiB stream"
        channel.close()
    finally:
        gateway.terminate()
        gateway.wait(timeout=30)
        upstream.stop(0)
