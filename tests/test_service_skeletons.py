"""Skeletons of the features, training, serving, experiments and monitoring services.

Each service's store must read what its first migration built, and its `register()`
must wire the servicers it names. (tests/test_migrations.py checks that every
component's migrations build exactly the schema of its store, on SQLite and PostgreSQL.)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest
import sqlalchemy as sa

from falaj_platform.runtime.db import Database
from falaj_platform.runtime.metrics import ServerMetrics
from falaj_platform.runtime.service import ServiceRuntime, ServiceSpec, open_database
from falaj_platform.runtime.settings import Settings, load_settings
from tests.backends import backend_env

SERVICES = ("features", "training", "serving", "experiments", "monitoring")

NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
STAMPS = {"created_by": "spiffe://falaj.local/client/admin", "created_at": NOW}
UPDATE_STAMPS = {**STAMPS, "updated_by": "spiffe://falaj.local/client/admin", "updated_at": NOW}


@dataclass(frozen=True)
class Service:
    name: str
    server: ModuleType
    store: ModuleType

    @property
    def spec(self) -> ServiceSpec:
        spec: ServiceSpec = self.server.SPEC
        return spec

    def store_class(self) -> Any:
        return getattr(self.store, f"{self.name.capitalize()}Store")


def load(name: str) -> Service:
    return Service(
        name,
        importlib.import_module(f"falaj_platform.services.{name}.server"),
        importlib.import_module(f"falaj_platform.services.{name}.store"),
    )


def settings_for(name: str, tmp_path: Path) -> Settings:
    return load_settings(name, env={**backend_env(tmp_path), "FALAJ_HOME": str(tmp_path)})


@pytest.fixture(params=SERVICES)
def service(request: pytest.FixtureRequest) -> Service:
    return load(request.param)


@pytest.fixture
def database(service: Service, tmp_path: Path) -> Iterator[Database]:
    database = open_database(service.spec, settings_for(service.name, tmp_path))
    yield database
    database.dispose()


# -- per-service seeds and reads ----------------------------------------------------------
# Each case inserts a few rows through the store's own tables (so foreign keys between
# them are exercised) and says what the store's read method must answer before and after.


def seed_features(store: ModuleType, connection: sa.Connection) -> None:
    view = {
        "definition_json": "{}",
        "online": True,
        "owner": "team-risk",
        "etag": "e1",
        **UPDATE_STAMPS,
    }
    connection.execute(
        store.entities.insert(), [{"name": "customer", "join_keys_json": "[]", "owner": "team-risk", "etag": "e1", **UPDATE_STAMPS}]
    )
    connection.execute(
        store.feature_views.insert(),
        [
            {"name": "customer_spend", "source_dataset": "datasets/tx", "residency_region": "ae-dxb", **view},
            {"name": "auh_spend", "source_dataset": "datasets/tx_auh", "residency_region": "ae-auh", **view},
            {"name": "customer_age", "source_dataset": "datasets/kyc", "residency_region": "ae-dxb", **view},
        ],
    )
    connection.execute(store.feature_view_entities.insert(), [{"feature_view": "customer_spend", "entity": "customer", "position": 0}])


def seed_training(store: ModuleType, connection: sa.Connection) -> None:
    connection.execute(
        store.registered_models.insert(),
        [
            {
                "name": "churn",
                "owner": "team-risk",
                "residency_region": "ae-dxb",
                "task": "BINARY_CLASSIFICATION",
                "etag": "e1",
                **UPDATE_STAMPS,
            }
        ],
    )
    version = {
        "model": "churn",
        "source": "IMPORTED",
        "state": "READY",
        "residency_region": "ae-dxb",
        "signature_json": "{}",
        "lineage_json": "{}",
        "artifact_format": "ONNX",
        "artifact_path": "artifacts/churn/1",
        "artifact_size_bytes": 10,
        "artifact_sha256": "0" * 64,
        "encryption_algorithm": "AES_256_GCM",
        "key_id": "kek-1",
        "wrapped_data_key": b"wrapped",
        "chunk_size_bytes": 1 << 20,
        "chunk_count": 1,
        "trained_by": "spiffe://falaj.local/client/trainer",
        "etag": "e1",
        **UPDATE_STAMPS,
    }
    connection.execute(store.model_versions.insert(), [{**version, "version_number": 1}, {**version, "version_number": 2}])
    connection.execute(
        store.model_aliases.insert(),
        [
            {
                "model": "churn",
                "alias": "production",
                "version_number": 2,
                "updated_by": "spiffe://falaj.local/client/admin",
                "updated_at": NOW,
            }
        ],
    )


def seed_serving(store: ModuleType, connection: sa.Connection) -> None:
    connection.execute(
        store.deployments.insert(),
        [
            {
                "id": "churn",
                "model": "models/churn",
                "residency_region": "ae-dxb",
                "current_revision": 2,
                "state": "READY",
                "etag": "e1",
                **UPDATE_STAMPS,
            }
        ],
    )
    rollout = {"deployment": "churn", "state": "SUCCEEDED", "trigger": "USER_UPDATE", **STAMPS}
    connection.execute(
        store.rollouts.insert(),
        [
            {**rollout, "revision": 1, "traffic_split_json": '{"single": {"model_version": "models/churn/versions/1"}}'},
            {
                **rollout,
                "revision": 2,
                "previous_revision": 1,
                "traffic_split_json": '{"single": {"model_version": "models/churn/versions/2"}}',
            },
        ],
    )


def seed_experiments(store: ModuleType, connection: sa.Connection) -> None:
    connection.execute(
        store.experiments.insert(),
        [
            {
                "id": "checkout",
                "state": "RUNNING",
                "residency_region": "ae-dxb",
                "unit_attribute": "user_id",
                "hash_salt": "checkout",
                "hash_algorithm": "SHA256",
                "coverage_bps": 10000,
                "etag": "e1",
                **UPDATE_STAMPS,
            }
        ],
    )
    connection.execute(
        store.variants.insert(),
        [
            {"experiment": "checkout", "variant_id": "control", "position": 0, "is_control": True, "weight_bps": 5000},
            {"experiment": "checkout", "variant_id": "treatment", "position": 1, "is_control": False, "weight_bps": 5000},
        ],
    )
    exposures = [("e1", "u1", "control"), ("e2", "u1", "control"), ("e3", "u2", "control"), ("e4", "u3", "treatment")]
    connection.execute(
        store.exposures.insert(),
        [
            {"experiment": "checkout", "event_id": event, "unit_id": unit, "variant_id": variant, "time": NOW, "recorded_at": NOW}
            for event, unit, variant in exposures
        ],
    )


def seed_monitoring(store: ModuleType, connection: sa.Connection) -> None:
    model_version = "models/churn/versions/2"
    connection.execute(
        store.reference_profiles.insert(),
        [{"id": "p1", "model_version": model_version, "source": "MODEL_LINEAGE", "state": "READY", "residency_region": "ae-dxb", **STAMPS}],
    )
    connection.execute(
        store.model_monitors.insert(),
        [
            {
                "id": "m1",
                "model_version": model_version,
                "reference_profile": "p1",
                "residency_region": "ae-dxb",
                "etag": "e1",
                **UPDATE_STAMPS,
            },
            {
                "id": "m2",
                "model_version": "models/churn/versions/1",
                "reference_profile": "p1",
                "residency_region": "ae-dxb",
                "etag": "e1",
                **UPDATE_STAMPS,
            },
        ],
    )
    connection.execute(
        store.alert_rules.insert(),
        [
            {
                "id": "r1",
                "monitor": "m1",
                "metric": "DRIFT_SHARE",
                "comparator": "GREATER_THAN",
                "threshold": 0.3,
                "severity": "CRITICAL",
                "etag": "e1",
                **UPDATE_STAMPS,
            }
        ],
    )
    alert = {"alert_rule": "r1", "model_version": model_version, "severity": "CRITICAL", "value": 0.5, "threshold": 0.3, "summary": "drift"}
    connection.execute(
        store.alerts.insert(),
        [
            {**alert, "id": "a1", "monitor": "m1", "state": "FIRING", "start_time": NOW},
            {**alert, "id": "a2", "monitor": "m1", "state": "FIRING", "start_time": NOW},
            {**alert, "id": "a3", "monitor": "m1", "state": "RESOLVED", "start_time": NOW},
            {**alert, "id": "a4", "monitor": "m2", "state": "FIRING", "start_time": NOW},
        ],
    )


@dataclass(frozen=True)
class ReadCase:
    seed: Callable[[ModuleType, sa.Connection], None]
    read: Callable[[Any], object]
    empty: object
    seeded: object


READ_CASES: dict[str, ReadCase] = {
    "features": ReadCase(seed_features, lambda store: store.list_feature_view_names("ae-dxb"), [], ["customer_age", "customer_spend"]),
    "training": ReadCase(seed_training, lambda store: store.resolve_alias("churn", "production"), None, 2),
    "serving": ReadCase(
        seed_serving,
        lambda store: store.current_traffic_split_json("churn"),
        None,
        '{"single": {"model_version": "models/churn/versions/2"}}',
    ),
    "experiments": ReadCase(seed_experiments, lambda store: store.count_exposed_units("checkout"), {}, {"control": 2, "treatment": 1}),
    "monitoring": ReadCase(seed_monitoring, lambda store: store.count_alerts_by_state("m1"), {}, {"FIRING": 2, "RESOLVED": 1}),
}


def test_first_migration_builds_an_empty_database_and_the_store_reads_it(service: Service, database: Database) -> None:
    store = service.store_class()(database)
    case = READ_CASES[service.name]
    assert case.read(store) == case.empty

    with database.engine.begin() as connection:
        case.seed(service.store, connection)
    assert case.read(store) == case.seeded


# -- wiring -----------------------------------------------------------------------------

EXPECTED_SERVICE_NAMES = {
    "features": ["falaj.features.v1.FeaturesService", "feast.serving.ServingService"],
    "training": ["falaj.training.v1.TrainingService"],
    "serving": ["falaj.serving.v1.ServingService", "inference.GRPCInferenceService"],
    "experiments": ["falaj.experiments.v1.ExperimentsService"],
    "monitoring": ["falaj.monitoring.v1.MonitoringService"],
}


def add_servicers(spec: ServiceSpec, server: grpc.Server, database: Database, settings: Settings) -> list[str]:
    """What start_service does with a spec, without mTLS: `setup` or `register`."""
    if spec.setup is not None:
        runtime = ServiceRuntime(database, settings, ServerMetrics(spec.component))
        names = list(spec.setup(server, runtime))
        for callback in runtime.stop_callbacks:
            callback()  # background work is not under test here
        return names
    assert spec.register is not None
    return list(spec.register(server, database, settings))


@pytest.fixture
def plain_server() -> Iterator[grpc.Server]:
    # The runtime's mTLS wrapper is tested on its own; here only the servicers matter.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    yield server
    server.stop(None)


def test_register_wires_the_named_services(service: Service, database: Database, tmp_path: Path, plain_server: grpc.Server) -> None:
    names = list(add_servicers(service.spec, plain_server, database, settings_for(service.name, tmp_path)))
    assert names == EXPECTED_SERVICE_NAMES[service.name]
    assert service.spec.component == service.name


def test_serving_answers_open_inference_protocol_server_calls(tmp_path: Path, plain_server: grpc.Server) -> None:
    from falaj.inference import open_inference_grpc_pb2 as oip
    from falaj.inference import open_inference_grpc_pb2_grpc

    serving = load("serving")
    settings = settings_for("serving", tmp_path)
    database = open_database(serving.spec, settings)
    try:
        add_servicers(serving.spec, plain_server, database, settings)
        port = plain_server.add_insecure_port("127.0.0.1:0")
        plain_server.start()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = open_inference_grpc_pb2_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ServerLive(oip.ServerLiveRequest(), timeout=5).live is True
            assert stub.ServerReady(oip.ServerReadyRequest(), timeout=5).ready is True
            metadata = stub.ServerMetadata(oip.ServerMetadataRequest(), timeout=5)
            assert (metadata.name, metadata.version, list(metadata.extensions)) == ("falaj-serving", "0.1.0", [])
            with pytest.raises(grpc.RpcError) as raised:
                stub.ModelInfer(oip.ModelInferRequest(model_name="churn"), timeout=5)
            # No model "churn" is loaded: NOT_FOUND through the runtime's error interceptor,
            # UNKNOWN on this plain server that has none.
            assert raised.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNKNOWN)
    finally:
        database.dispose()
