"""Load through the real gateway: 64 concurrent clients mixing online features, predictions and ingest.

The local stack runs as processes (`falaj stack up`) with the default limits. For a bounded
time the clients call features GetOnlineFeatures (after a materialization), the Open
Inference Protocol's ModelInfer on a tiny ONNX model deployed through serving, and small
IngestBatches streams. No call may fail except with RESOURCE_EXHAUSTED (a configured limit);
the gateway's memory stays bounded; p50/p99 per kind are printed; afterwards every process
is SERVING and the audit chain, now holding every one of those calls, verifies.
"""

from __future__ import annotations

import collections
import random
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest

from falaj.features.v1 import service_pb2_grpc as fs
from falaj.gateway.v1 import request_response_pb2 as gr
from falaj.gateway.v1 import service_pb2_grpc as gs
from falaj.inference import open_inference_grpc_pb2 as oip
from falaj.inference import open_inference_grpc_pb2_grpc as oip_grpc
from falaj.ingest.v1 import service_pb2_grpc as isvc
from falaj_platform.runtime.settings import COMPONENTS
from tests.reliability.conftest import LocalStack
from tests.reliability.flows import (
    FEATURES,
    apply_customer_features,
    create_dataset,
    customer_table,
    doubling_model,
    import_and_deploy,
    ingest_customers,
    ingest_stream,
    ipc,
    online_request,
)

pytestmark = pytest.mark.slow

CLIENTS = 64
CHANNELS = 8
DURATION_S = 20.0
CUSTOMERS = 2_000
GATEWAY_GROWTH_LIMIT_MIB = 256


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q)) if values else float("nan")


def test_64_clients_mixing_features_predictions_and_ingest(local_stack: LocalStack) -> None:
    admin = local_stack.channel()
    ingest_customers(admin, "load_customers", rows=CUSTOMERS)
    apply_customer_features(admin, "load_customers", "load_customers", materialize=True)
    import_and_deploy(admin, "doubler", doubling_model(local_stack.home / "doubler.onnx"))
    create_dataset(admin, "load_events")
    small_batch = ipc(customer_table(0, 50))

    channels = [local_stack.channel() for _ in range(CHANNELS)]
    x = np.ones((4, len(FEATURES)), dtype=np.float32)
    infer = oip.ModelInferRequest(model_name="doubler")
    infer.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    infer.raw_input_contents.append(x.tobytes())

    def features_call(channel: grpc.Channel, rng: random.Random) -> None:
        request = online_request("load_customers", [rng.randrange(CUSTOMERS) for _ in range(5)])
        response = fs.FeaturesServiceStub(channel).GetOnlineFeatures(request, timeout=30)
        assert len(response.columns) == len(FEATURES)

    def predict_call(channel: grpc.Channel, rng: random.Random) -> None:
        response = oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(infer, timeout=30)
        assert np.allclose(np.frombuffer(response.raw_output_contents[0], dtype=np.float32), 2.0)

    def ingest_call(channel: grpc.Channel, rng: random.Random) -> None:
        stream = ingest_stream("datasets/load_events", f"load-{uuid.uuid4().hex}", [small_batch], 50)
        isvc.IngestServiceStub(channel).IngestBatches(stream, timeout=60)

    kinds: dict[str, Callable[[grpc.Channel, random.Random], None]] = {
        "online features": features_call,
        "ModelInfer": predict_call,
        "IngestBatches": ingest_call,
    }
    latencies: dict[str, list[float]] = collections.defaultdict(list)
    errors: collections.Counter[tuple[str, str]] = collections.Counter()
    lock = threading.Lock()
    stop = threading.Event()

    def client(index: int) -> None:
        kind = list(kinds)[index % len(kinds)]
        channel, rng = channels[index % CHANNELS], random.Random(index)
        while not stop.is_set():
            started = time.perf_counter()
            try:
                kinds[kind](channel, rng)
            except grpc.RpcError as error:
                with lock:
                    errors[(kind, f"{error.code().name}: {(error.details() or '')[:120]}")] += 1  # type: ignore[attr-defined]
                continue
            with lock:
                latencies[kind].append(time.perf_counter() - started)

    gateway_pid = local_stack.pid("gateway")
    baseline = _rss_mib(gateway_pid)
    peak = baseline
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    while time.monotonic() - began < DURATION_S:
        peak = max(peak, _rss_mib(gateway_pid))
        time.sleep(0.25)
    stop.set()
    for thread in threads:
        thread.join(timeout=90)
    elapsed = time.monotonic() - began
    assert not any(thread.is_alive() for thread in threads), "a client is stuck in a call"

    lines = [f"{CLIENTS} clients over {CHANNELS} mTLS channels for {elapsed:.1f}s through the gateway:"]
    for kind in kinds:
        done = latencies[kind]
        lines.append(
            f"  {kind:16s} {len(done):6d} calls {len(done) / elapsed:7.1f}/s  "
            f"p50 {_percentile(done, 50) * 1000:7.1f} ms  p99 {_percentile(done, 99) * 1000:7.1f} ms"
        )
    lines.append(f"  gateway RSS {baseline:.0f} MiB -> peak {peak:.0f} MiB; errors {dict(errors) or 'none'}")
    print("\n".join(lines))

    unexpected = {key: count for key, count in errors.items() if not key[1].startswith("RESOURCE_EXHAUSTED")}
    assert not unexpected, unexpected
    for kind in kinds:
        assert len(latencies[kind]) >= 10, f"{kind}: only {len(latencies[kind])} calls succeeded"
    assert peak - baseline < GATEWAY_GROWTH_LIMIT_MIB, f"gateway RSS grew {peak - baseline:.0f} MiB under load"
    assert all(local_stack.health(name) == "SERVING" for name in COMPONENTS)
    verified = gs.GatewayAdminServiceStub(admin).VerifyAuditChain(gr.VerifyAuditChainRequest(), timeout=300)
    assert verified.intact, verified.first_break.detail
    assert verified.records_checked >= sum(len(v) for v in latencies.values())
