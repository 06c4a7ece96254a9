"""A process killed mid-commit leaves no partial version, and the next boot removes what it wrote."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from falaj.common.v1 import common_pb2 as common
from falaj.ingest.v1 import message_pb2 as m
from falaj.ingest.v1 import request_response_pb2 as rr
from falaj.ingest.v1 import service_pb2_grpc
from falaj_platform.pki import PKI
from falaj_platform.runtime.clients import health_status, secure_channel
from tests.backends import backend_env
from tests.conftest import free_port, identity
from tests.ingest.conftest import ALICE, IngestUnderTest, ingest_tables, payments, payments_schema, read_version, stream, versions_of

ROOT = Path(__file__).resolve().parents[2]


def test_a_kill_between_writing_files_and_committing_leaves_no_version_and_a_restart_cleans_up(
    start_ingest: Callable[..., IngestUnderTest], pki: PKI, tmp_path: Path
) -> None:
    port = free_port()
    marker = tmp_path / "files-written"
    env = {
        **os.environ,
        **backend_env(tmp_path / "home"),
        "FALAJ_HOME": str(tmp_path / "home"),
        "FALAJ_PKI_DIR": str(pki.root),
        "FALAJ_INGEST_ADDR": f"127.0.0.1:{port}",
        "FALAJ_LOG_LEVEL": "warning",
        "CRASH_MARKER": str(marker),
        "PYTHONPATH": str(ROOT),
    }
    child = subprocess.Popen([sys.executable, str(Path(__file__).parent / "crashing_service.py")], env=env, cwd=ROOT)
    try:
        gateway = identity(pki, "service", "gateway")
        deadline = time.monotonic() + 30
        while health_status(f"127.0.0.1:{port}", gateway, timeout=1) != "SERVING":
            assert child.poll() is None and time.monotonic() < deadline, "the child service did not start"
            time.sleep(0.1)
        with secure_channel(f"127.0.0.1:{port}", gateway) as channel:
            stub = service_pb2_grpc.IngestServiceStub(channel)
            dataset = m.Dataset(schema=payments_schema(), residency=common.Residency(region="ae-dxb"))
            stub.CreateDataset(rr.CreateDatasetRequest(dataset_id="payments", dataset=dataset), metadata=ALICE, timeout=30)
            sent = stream("datasets/payments", [payments(range(40))], request_id="crash-1", batch_ids=["till-9:1"])
            call = stub.IngestBatches.future(sent, metadata=ALICE, timeout=60)
            while not marker.exists():
                assert child.poll() is None and time.monotonic() < deadline + 30, "the commit never reached the catalog"
                time.sleep(0.05)
            commit_dir = tmp_path / "home" / "ingest" / marker.read_text()
            assert list(commit_dir.rglob("*.parquet")), "the files are in place when the process dies"
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=10)
            try:
                call.result(timeout=10)
                raise AssertionError("the stream cannot have succeeded")
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()

    # Restart on the same catalog and data dir.
    ingest = start_ingest()
    assert versions_of(ingest, "datasets/payments") == []
    assert ingest.stub.ListIngestions(rr.ListIngestionsRequest(parent="datasets/payments"), metadata=ALICE).ingestions == []
    assert not commit_dir.exists()
    assert list((tmp_path / "home" / "ingest").rglob("*.parquet")) == []
    # The client retries the same request: it commits now, once.
    retried = ingest_tables(ingest, "datasets/payments", [payments(range(40))], request_id="crash-1", batch_ids=["till-9:1"])
    assert retried.dataset_version == "datasets/payments/versions/1"
    assert read_version(ingest, retried.dataset_version).num_rows == 40
