"""Features benchmark: online reads, Falaj's gRPC vs Feast's own `feast serve`, same store, same run.

One features service (real Feast store: SQL registry, SQLite online store) holds a view
of 10 features over 1,000 materialized entities. The same registry and online store are
then served by `feast serve` (Feast's HTTP feature server) as a subprocess on a free
loopback port. GetOnlineFeatures for 1 entity x 10 features and 100 entities x 10
features, sequential calls, p50/p99 of:
- Falaj, Feast's ServingService contract over gRPC + mTLS, through the gateway
  (authorization and an audit record per call) and straight to the service;
- `feast serve`, POST /get-online-features over HTTP/1.1 keep-alive.
Ratios are Falaj's time over Feast's (below 1 is faster).

Run: .venv/bin/python bench/bench_features.py [--calls 1000] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.peers import row, write_rows  # noqa: E402

ENTITIES = 1_000
FEATURES = 10
VIEW = "bench_stats"


class _NoAudit:
    """The bench exercises reads; definitions stay in the service's region, so nothing is reported."""

    def report(self, *args: Any, **kwargs: Any) -> None:
        return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def _measure(call: Callable[[], object], calls: int, warmup: int) -> tuple[float, float]:
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1000)
    return _percentiles(samples)


def _dataset_table(now: dt.datetime) -> Any:
    import pyarrow as pa

    columns: dict[str, Any] = {"customer_id": pa.array(range(ENTITIES), pa.int64())}
    for index in range(FEATURES):
        columns[f"f{index}"] = pa.array([float(i * FEATURES + index) for i in range(ENTITIES)], pa.float64())
    columns["event_time"] = pa.array([now - dt.timedelta(minutes=5)] * ENTITIES, pa.timestamp("us", tz="UTC"))
    return pa.table(columns)


def _start_feast_serve(home: Path, project: str, workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    feast_dir = home / "features" / "feast"
    repo = workdir / "feast_repo"
    repo.mkdir()
    (repo / "feature_store.yaml").write_text(
        "\n".join(
            [
                f"project: {project}",
                "provider: local",
                "registry:",
                "  registry_type: sql",
                f"  path: sqlite:///{feast_dir / 'registry.db'}",
                "  cache_ttl_seconds: 60",
                "online_store:",
                "  type: sqlite",
                f"  path: {feast_dir / 'online.db'}",
                "offline_store:",
                "  type: file",
                "entity_key_serialization_version: 3",
                "",
            ]
        )
    )
    port = _free_port()
    feast = Path(sys.executable).with_name("feast")
    command = [
        str(feast),
        "--chdir",
        str(repo),
        "serve",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "--no-access-log",
        "--max-requests",
        "10000000",
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "FEAST_USAGE": "False"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"feast serve exited: {process.stderr.read().decode()[-2000:] if process.stderr else ''}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                connection.close()
                return process, port
        except OSError:
            time.sleep(0.3)
    process.terminate()
    raise RuntimeError("feast serve did not become healthy within 120 s")


def bench(calls: int) -> dict[str, float]:
    import grpc
    from feast.protos.feast.serving import ServingService_pb2 as serving
    from feast.protos.feast.serving import ServingService_pb2_grpc as serving_grpc
    from feast.protos.feast.types.Value_pb2 import RepeatedValue, Value

    from falaj.features.v1 import message_pb2 as messages
    from falaj.features.v1 import request_response_pb2 as requests
    from falaj.features.v1 import service_pb2_grpc
    from falaj.ingest.v1 import message_pb2 as ingest
    from falaj_platform.gateway.server import start_gateway
    from falaj_platform.pki import PKI
    from falaj_platform.runtime import tls
    from falaj_platform.runtime.service import start_service
    from falaj_platform.runtime.settings import PkiPaths, load_settings
    from falaj_platform.services.features.server import build_spec
    from falaj_platform.services.features.sources import InMemoryDatasetSource

    def channel_to(addr: str, folder: Path) -> grpc.Channel:
        paths = PkiPaths(pki.ca_cert_path, folder / "cert.pem", folder / "key.pem")
        return grpc.secure_channel(addr, tls.channel_credentials(paths), options=[("grpc.ssl_target_name_override", "localhost")])

    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        pki = PKI(workdir / "pki")
        pki.init()
        home = workdir / "home"
        gateway_addr = f"127.0.0.1:{_free_port()}"
        env = {"FALAJ_HOME": str(home), "FALAJ_PKI_DIR": str(pki.root), "FALAJ_LOG_LEVEL": "error", "FALAJ_GATEWAY_ADDR": gateway_addr}
        source = InMemoryDatasetSource()
        columns = {"customer_id": ingest.COLUMN_TYPE_INT, **{f"f{i}": ingest.COLUMN_TYPE_FLOAT for i in range(FEATURES)}}
        dataset = source.add_dataset(
            "bench_customers",
            {**columns, "event_time": ingest.COLUMN_TYPE_TIMESTAMP},
            event_time_column="event_time",
            residency_region="ae-dxb",
        )
        source.commit(dataset, _dataset_table(dt.datetime.now(dt.UTC)))
        running, database = start_service(
            build_spec(source=lambda _: source, audit=lambda _: _NoAudit()), load_settings("features", env=env), listen_addr="127.0.0.1:0"
        )
        env["FALAJ_FEATURES_ADDR"] = f"127.0.0.1:{running.port}"
        gateway = start_gateway(load_settings("gateway", env=env), listen_addr=gateway_addr)
        feast_process = None
        try:
            admin = channel_to(gateway_addr, pki.client_dir("admin"))
            direct = channel_to(f"127.0.0.1:{running.port}", pki.service_dir("gateway"))
            stub = service_pb2_grpc.FeaturesServiceStub(admin)
            view = messages.FeatureView(
                name=f"featureViews/{VIEW}",
                entities=["entities/customer"],
                source=messages.DatasetSource(dataset=dataset),
                features=[messages.Feature(name=f"f{i}", value_type=messages.VALUE_TYPE_DOUBLE) for i in range(FEATURES)],
                online=True,
            )
            view.ttl.seconds = 86400
            definitions = messages.FeatureDefinitions(
                entities=[
                    messages.Entity(
                        name="entities/customer", join_keys=[messages.JoinKey(name="customer_id", value_type=messages.VALUE_TYPE_INT64)]
                    )
                ],
                feature_views=[view],
            )
            stub.ApplyFeatureDefinitions(requests.ApplyFeatureDefinitionsRequest(definitions=definitions), timeout=120)
            run = stub.Materialize(requests.MaterializeRequest(mode=messages.MATERIALIZATION_MODE_FULL), timeout=300).materialization
            assert run.state == messages.MATERIALIZATION_STATE_SUCCEEDED and run.rows_written == ENTITIES, run.error_message

            feast_process, port = _start_feast_serve(home, "falaj", workdir)
            http_connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            references = [f"{VIEW}:f{i}" for i in range(FEATURES)]

            for size, count in ((1, calls), (100, max(calls // 4, 50))):
                keys = [7] if size == 1 else list(range(size))
                request = serving.GetOnlineFeaturesRequest(
                    features=serving.FeatureList(val=references),
                    entities={"customer_id": RepeatedValue(val=[Value(int64_val=k) for k in keys])},
                )
                body = json.dumps({"features": references, "entities": {"customer_id": keys}}).encode()

                def feast_http(body: bytes = body) -> object:
                    http_connection.request("POST", "/get-online-features", body=body, headers={"Content-Type": "application/json"})
                    response = http_connection.getresponse()
                    payload = response.read()
                    if response.status != 200:
                        raise RuntimeError(f"feast serve answered {response.status}: {payload[:200]!r}")
                    return payload

                # Same answer from both servers before timing them.
                answer = serving_grpc.ServingServiceStub(admin).GetOnlineFeatures(request, timeout=10)
                names = list(answer.metadata.feature_names.val)
                feast_answer = json.loads(feast_http())  # type: ignore[arg-type]
                first = answer.results[names.index("f3")].values[0].double_val
                assert feast_answer["results"][feast_answer["metadata"]["feature_names"].index("f3")]["values"][0] == first

                for label, channel in (("gateway", admin), ("direct", direct)):
                    serving_stub = serving_grpc.ServingServiceStub(channel)

                    def falaj_grpc(serving_stub: Any = serving_stub, request: Any = request) -> object:
                        return serving_stub.GetOnlineFeatures(request, timeout=10)

                    results[f"{label}_{size}_p50"], results[f"{label}_{size}_p99"] = _measure(falaj_grpc, count, warmup=100)
                results[f"feast_{size}_p50"], results[f"feast_{size}_p99"] = _measure(feast_http, count, warmup=100)
            http_connection.close()
            admin.close()
            direct.close()
        finally:
            if feast_process is not None:
                feast_process.terminate()
                try:
                    feast_process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    feast_process.kill()
            gateway.stop(0)
            running.stop(0)
            database.dispose()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=1000, help="calls per measurement for 1 entity (a quarter for 100 entities)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = bench(args.calls)

    print(f"{'GetOnlineFeatures, 10 features':<34} {'p50 ms':>8} {'p99 ms':>8} {'p50 vs feast':>13} {'p99 vs feast':>13}")
    for size in (1, 100):
        feast_p50, feast_p99 = results[f"feast_{size}_p50"], results[f"feast_{size}_p99"]
        for label, title in (
            ("gateway", "falaj gRPC via gateway (mTLS)"),
            ("direct", "falaj gRPC direct (mTLS)"),
            ("feast", "feast serve HTTP"),
        ):
            p50, p99 = results[f"{label}_{size}_p50"], results[f"{label}_{size}_p99"]
            print(f"{title + f' x{size}':<34} {p50:>8.2f} {p99:>8.2f} {p50 / feast_p50:>12.2f}x {p99 / feast_p99:>12.2f}x")
    met = all(results[f"gateway_{size}_p50"] < results[f"feast_{size}_p50"] for size in (1, 100))
    print(
        "goal met: Falaj's p50 through the gateway is below feast serve's"
        if met
        else "goal missed: Falaj's p50 through the gateway is not below feast serve's"
    )
    write_rows(
        args.json,
        [
            row(
                f"online features {size} entit{'y' if size == 1 else 'ies'} x 10 p50 / p99",
                f"{results[f'gateway_{size}_p50']:.2f} / {results[f'gateway_{size}_p99']:.2f} ms (direct {results[f'direct_{size}_p50']:.2f})",
                f"feast serve {results[f'feast_{size}_p50']:.2f} / {results[f'feast_{size}_p99']:.2f} ms",
                results[f"feast_{size}_p50"] / results[f"gateway_{size}_p50"],
                "p50 below feast serve",
                results[f"gateway_{size}_p50"] < results[f"feast_{size}_p50"],
            )
            for size in (1, 100)
        ],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
