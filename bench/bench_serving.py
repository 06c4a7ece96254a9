"""Serving benchmark: OIP ModelInfer on an MLP 30-64-2 ONNX model, Falaj beside KServe.

Both servers answer the same model over the Open Inference Protocol (gRPC) on loopback,
driven by the same load generator: stock tritonclient clients in separate processes.

- Falaj: the serving service in this process (its production wiring, the model from a
  local file instead of the registry), mTLS, dynamic batching on (the default), called
  straight (as the gateway calls it); and, for sequential latency, also through the real
  gateway (authorization and a durable audit record per call). FALAJ_WORKER_THREADS=4
  (--worker-threads) and log level warning (--log-level) unless told otherwise.
- KServe 0.21: its Python ModelServer with a small custom `kserve.Model` running the same
  ONNX file in onnxruntime (plaintext gRPC, its default), in its own virtual environment
  (`.bench/venvs/kserve`, created on first use).
- The floor: a bare grpc-python server of the same OIP service over the same mTLS, in a
  process of its own, that answers ModelInfer with the first elements of its input (no
  model, no routing, no interceptors): what gRPC, TLS and protobuf alone cost a call.

Figures: batch-1 p50/p99 of sequential calls (all three, and Falaj through the gateway),
and inferences/s at 8 and 32 concurrent clients (bounded in count and time). Goal: Falaj
>= 2x KServe at 32 clients.

Run: .venv/bin/python bench/bench_serving.py [--seconds 8] [--calls 2000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from peers import peer_python, row, write_rows  # noqa: E402

KSERVE_REQUIREMENTS = ["kserve==0.21.0", "onnxruntime", "numpy"]
GOAL_RATIO = 2.0

# The load generator: one process, `threads` tritonclient clients, each with its own channel.
LOADGEN = r"""
import json, sys, threading, time
import numpy as np
import tritonclient.grpc as triton

args = json.loads(sys.argv[1])
tls = args.get("tls")
def client():
    if tls:
        return triton.InferenceServerClient(url=args["url"], ssl=True, root_certificates=tls["ca"], private_key=tls["key"],
            certificate_chain=tls["cert"], channel_args=[("grpc.ssl_target_name_override", "localhost")])
    return triton.InferenceServerClient(url=args["url"])

x = np.random.default_rng(0).normal(size=(1, 30)).astype(np.float32)
def one(c, tensor):
    result = c.infer(args["model"], [tensor])
    assert result.as_numpy("output").shape == (1, 2)

def prepared():
    c = client()
    tensor = triton.InferInput("input", [1, 30], "FP32")
    tensor.set_data_from_numpy(x)
    return c, tensor

deadline = time.time() + 120
c, tensor = prepared()
while True:  # wait for the server
    try:
        if c.is_model_ready(args["model"]):
            break
    except Exception:
        pass
    if time.time() > deadline:
        raise SystemExit("server never became ready")
    time.sleep(0.2)

if args["mode"] == "sequential":
    for _ in range(200):
        one(c, tensor)
    samples = []
    for _ in range(args["calls"]):
        started = time.perf_counter()
        one(c, tensor)
        samples.append((time.perf_counter() - started) * 1000)
    print(json.dumps({"samples": samples}))
    raise SystemExit(0)

counts = [0] * args["threads"]
errors = [0] * args["threads"]
def worker(index, start_at, stop_at):
    c, tensor = prepared()
    for _ in range(20):
        one(c, tensor)
    while time.time() < start_at:
        time.sleep(0.001)
    done = 0
    while time.time() < stop_at and done < args["max_calls"]:
        try:
            one(c, tensor)
            done += 1
        except Exception:
            errors[index] += 1
    counts[index] = done

threads = [threading.Thread(target=worker, args=(i, args["start_at"], args["stop_at"])) for i in range(args["threads"])]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps({"count": sum(counts), "errors": sum(errors)}))
"""

KSERVE_SERVER = r"""
import sys
import numpy as np
import onnxruntime as ort
import kserve
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer

path, grpc_port, http_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

class OnnxModel(Model):
    def __init__(self, name, model_path):
        super().__init__(name)
        self.model_path = model_path
        self.load()

    def load(self):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(self.model_path, options, providers=["CPUExecutionProvider"])
        self.ready = True
        return self.ready

    def predict(self, payload: InferRequest, headers=None) -> InferResponse:
        x = payload.inputs[0].as_numpy()
        y = self.session.run(None, {"input": x})[0]
        output = InferOutput(name="output", shape=list(y.shape), datatype="FP32")
        output.set_data_from_numpy(y, binary_data=True)
        return InferResponse(model_name=self.name, infer_outputs=[output], response_id=payload.id)

ModelServer(grpc_port=grpc_port, http_port=http_port, workers=1, enable_latency_logging=False).start([OnnxModel("mlp", path)])
"""


# The floor: grpc-python and the OIP messages, nothing else (run with this interpreter).
ECHO_SERVER = r"""
import sys
from concurrent import futures
import grpc
from falaj.inference import open_inference_grpc_pb2 as oip
from falaj.inference import open_inference_grpc_pb2_grpc as oip_grpc

ca, cert, key, port, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])

class Echo(oip_grpc.GRPCInferenceServiceServicer):
    def ServerLive(self, request, context):
        return oip.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return oip.ServerReadyResponse(ready=True)

    def ModelReady(self, request, context):
        return oip.ModelReadyResponse(ready=True)

    def ModelInfer(self, request, context):
        response = oip.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)
        response.outputs.add(name="output", datatype="FP32", shape=[1, 2])
        response.raw_output_contents.append(request.raw_input_contents[0][:8])
        return response

def read(path):
    with open(path, "rb") as f:
        return f.read()

server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
oip_grpc.add_GRPCInferenceServiceServicer_to_server(Echo(), server)
credentials = grpc.ssl_server_credentials([(read(key), read(cert))], root_certificates=read(ca), require_client_auth=True)
server.add_secure_port(f"127.0.0.1:{port}", credentials)
server.start()
server.wait_for_termination()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def _loadgen(python: str, args: dict[str, Any], timeout: float) -> dict[str, Any]:
    result = subprocess.run([python, "-c", LOADGEN, json.dumps(args)], capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"load generator failed: {result.stderr[-2000:]}")
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def measure(target: dict[str, Any], calls: int, seconds: float, levels: list[int]) -> dict[str, Any]:
    """Sequential p50/p99 and throughput at each concurrency level for one server."""
    python = sys.executable
    figures: dict[str, Any] = {}
    sequential = _loadgen(python, {**target, "mode": "sequential", "calls": calls}, timeout=300)
    figures["p50_ms"], figures["p99_ms"] = _percentiles(sequential["samples"])
    for clients in levels:
        processes = min(clients, 4)
        per_process = [clients // processes + (1 if i < clients % processes else 0) for i in range(processes)]
        start_at = time.time() + 4.0  # every client connected and warm before the clock starts
        stop_at = start_at + seconds
        spec = {**target, "mode": "load", "start_at": start_at, "stop_at": stop_at, "max_calls": 200_000}
        running = [
            subprocess.Popen(
                [python, "-c", LOADGEN, json.dumps({**spec, "threads": n})], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            for n in per_process
        ]
        total = errors = 0
        for process in running:
            out, err = process.communicate(timeout=seconds + 120)
            if process.returncode != 0:
                raise RuntimeError(f"load generator failed: {err[-2000:]}")
            answer = json.loads(out.strip().splitlines()[-1])
            total += answer["count"]
            errors += answer["errors"]
        figures[f"rps_{clients}"] = total / seconds
        figures[f"errors_{clients}"] = errors
    return figures


def start_falaj(tmp: Path, model_path: Path, batching: bool = True, worker_threads: int = 4) -> tuple[Any, dict[str, Any], Any]:
    """The serving service in-process (production wiring, local model file); returns its stopper and targets."""
    import grpc

    from falaj.serving.v1 import message_pb2 as pb
    from falaj.serving.v1 import request_response_pb2 as rr
    from falaj.serving.v1 import service_pb2_grpc
    from falaj_platform.gateway.server import start_gateway
    from falaj_platform.pki import PKI
    from falaj_platform.runtime.audit import AuditReporter
    from falaj_platform.runtime.clients import secure_channel
    from falaj_platform.runtime.service import start_service
    from falaj_platform.runtime.settings import load_settings
    from falaj_platform.services.serving.security import GatewayAuditor
    from falaj_platform.services.serving.server import Collaborators, build_spec
    from falaj_platform.services.serving.sources import LocalModelSource
    from tests.conftest import caller, identity

    pki = PKI(tmp / "pki")
    pki.init()
    env = {
        "FALAJ_HOME": str(tmp / "home"),
        "FALAJ_PKI_DIR": str(pki.root),
        "FALAJ_LOG_LEVEL": "warning",
        "FALAJ_GATEWAY_ADDR": f"127.0.0.1:{free_port()}",
        "FALAJ_SERVING_ADDR": f"127.0.0.1:{free_port()}",
        "FALAJ_WORKER_THREADS": str(worker_threads),
    }
    settings = load_settings("serving", env=env)
    source = LocalModelSource(settings.region)
    source.register("models/mlp/versions/1", model_path)

    def collaborators(config: Any) -> Collaborators:
        return Collaborators(source=source, auditor=GatewayAuditor(settings, AuditReporter(settings, attempts=1, timeout=1.0)))

    running, database = start_service(build_spec(collaborators=collaborators), settings)
    gateway = start_gateway(load_settings("gateway", env=env))
    channel = secure_channel(env["FALAJ_SERVING_ADDR"], identity(pki, "service", "gateway"))
    split = pb.TrafficSplit(single=pb.SingleVersionRouting(model_version="models/mlp/versions/1"))
    service_pb2_grpc.ServingServiceStub(channel).CreateDeployment(
        rr.CreateDeploymentRequest(
            deployment_id="mlp",
            deployment=pb.Deployment(
                model="models/mlp", traffic_split=split, runtime=pb.ModelRuntimeConfig(batching=pb.DynamicBatchingConfig(enabled=batching))
            ),
        ),
        timeout=60,
        metadata=caller(),
    )
    channel.close()
    as_gateway = identity(pki, "service", "gateway")
    admin = identity(pki, "client", "admin")

    def tls(paths: Any) -> dict[str, str]:
        return {"ca": str(paths.ca_cert), "cert": str(paths.cert), "key": str(paths.key)}

    direct = {"url": env["FALAJ_SERVING_ADDR"], "model": "mlp", "tls": tls(as_gateway)}
    through_gateway = {"url": env["FALAJ_GATEWAY_ADDR"], "model": "mlp", "tls": tls(admin)}

    def stop() -> None:
        gateway.stop(0)
        running.stop(0)
        database.dispose()

    del grpc
    return stop, {"direct": direct, "gateway": through_gateway}, model_path


def start_kserve(model_path: Path) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    python = peer_python("kserve", KSERVE_REQUIREMENTS)
    grpc_port, http_port = free_port(), free_port()
    process = subprocess.Popen(
        [str(python), "-c", KSERVE_SERVER, str(model_path), str(grpc_port), str(http_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    return process, {"url": f"127.0.0.1:{grpc_port}", "model": "mlp"}


def start_echo(tmp: Path, worker_threads: int) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """The bare grpc-python mTLS echo, with the serving service's certificate from Falaj's PKI (made by start_falaj)."""
    from falaj_platform.pki import PKI
    from tests.conftest import identity

    pki = PKI(tmp / "pki")
    server, client = identity(pki, "service", "serving"), identity(pki, "service", "gateway")
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-c", ECHO_SERVER, str(server.ca_cert), str(server.cert), str(server.key), str(port), str(worker_threads)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    tls = {"ca": str(client.ca_cert), "cert": str(client.cert), "key": str(client.key)}
    return process, {"url": f"127.0.0.1:{port}", "model": "mlp", "tls": tls}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000, help="sequential calls per server")
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per concurrency level")
    parser.add_argument("--json", type=Path, default=None, help="write the result rows here")
    parser.add_argument(
        "--worker-threads",
        type=int,
        default=4,
        help="FALAJ_WORKER_THREADS for serving: on 2 cores a few threads beat the default 32 (less GIL contention)",
    )
    parser.add_argument("--log-level", default="warning", help="Falaj's log level (info writes one JSON line per call)")
    options = parser.parse_args()
    from falaj_platform.runtime.logs import configure_logging

    configure_logging("serving", options.log_level, stream=sys.stderr)
    levels = [8, 32]

    from tests.serving.models import mlp_model

    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        model_path = mlp_model(tmp / "mlp.onnx")
        kserve, kserve_target = start_kserve(model_path)
        try:
            print("[bench] KServe ModelServer ...", file=sys.stderr, flush=True)
            peer = measure(kserve_target, options.calls, options.seconds, levels)
        finally:
            kserve.terminate()
            kserve.wait(timeout=30)
        stop, targets, _ = start_falaj(tmp, model_path, worker_threads=options.worker_threads)
        try:
            print("[bench] Falaj serving ...", file=sys.stderr, flush=True)
            falaj = measure(targets["direct"], options.calls, options.seconds, levels)
            gateway = _loadgen(
                sys.executable, {**targets["gateway"], "mode": "sequential", "calls": max(options.calls // 4, 200)}, timeout=300
            )
            falaj["gateway_p50_ms"], falaj["gateway_p99_ms"] = _percentiles(gateway["samples"])
        finally:
            stop()
        echo, echo_target = start_echo(tmp, options.worker_threads)
        try:
            print("[bench] bare grpc-python mTLS echo ...", file=sys.stderr, flush=True)
            floor = _loadgen(sys.executable, {**echo_target, "mode": "sequential", "calls": options.calls}, timeout=300)
            falaj["echo_p50_ms"], falaj["echo_p99_ms"] = _percentiles(floor["samples"])
        finally:
            echo.terminate()
            echo.wait(timeout=30)

    rows = [
        row(
            "OIP ModelInfer batch 1, sequential p50 (MLP 30-64-2)",
            f"{falaj['p50_ms']:.3f} ms",
            f"{peer['p50_ms']:.3f} ms",
            round(peer["p50_ms"] / falaj["p50_ms"], 2),
            "shown (no goal)",
            None,
        ),
        row(
            "OIP ModelInfer batch 1, sequential p99",
            f"{falaj['p99_ms']:.3f} ms",
            f"{peer['p99_ms']:.3f} ms",
            round(peer["p99_ms"] / falaj["p99_ms"], 2),
            "shown (no goal)",
            None,
        ),
        row(
            "OIP ModelInfer sequential p50/p99 through the gateway (mTLS, authz, audit)",
            f"{falaj['gateway_p50_ms']:.3f} / {falaj['gateway_p99_ms']:.3f} ms",
            f"{peer['p50_ms']:.3f} / {peer['p99_ms']:.3f} ms (no gateway)",
            round(peer["p50_ms"] / falaj["gateway_p50_ms"], 2),
            "shown (no goal)",
            None,
        ),
        row(
            "OIP ModelInfer batch 1, sequential p50/p99 straight to serving, against a bare grpc-python mTLS echo (floor)",
            f"{falaj['p50_ms']:.3f} / {falaj['p99_ms']:.3f} ms",
            f"{falaj['echo_p50_ms']:.3f} / {falaj['echo_p99_ms']:.3f} ms (bare grpc-python echo, no model)",
            round(falaj["echo_p50_ms"] / falaj["p50_ms"], 2),
            "floor (no goal)",
            None,
        ),
    ]
    for clients in levels:
        ratio = falaj[f"rps_{clients}"] / peer[f"rps_{clients}"]
        goal = f">= {GOAL_RATIO:.0f}x KServe" if clients == 32 else "shown (no goal)"
        rows.append(
            row(
                f"OIP ModelInfer throughput, {clients} concurrent clients",
                f"{falaj[f'rps_{clients}']:,.0f} inf/s ({falaj[f'errors_{clients}']} errors)",
                f"{peer[f'rps_{clients}']:,.0f} inf/s ({peer[f'errors_{clients}']} errors)",
                round(ratio, 2),
                goal,
                ratio >= GOAL_RATIO if clients == 32 else None,
            )
        )
    for item in rows:
        print(
            f"{item['benchmark']}: Falaj {item['falaj']} | peer {item['peer']} | ratio {item['ratio']} | goal {item['goal']}"
            + (f" | met {item['met']}" if item["met"] is not None else "")
        )
    write_rows(options.json, rows)


if __name__ == "__main__":
    main()
