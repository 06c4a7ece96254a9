"""A real features service in-process: real Feast store (SQL registry, Parquet offline
store, SQLite or Redis online store), reached over mTLS with the gateway's identity.

Data comes from an in-memory ingest source (Arrow tables); the gRPC ingest client is
exercised through a real gateway in test_gateway_path.py.
"""

from __future__ import annotations

import datetime as dt
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pyarrow as pa
import pytest
from feast.protos.feast.serving import ServingService_pb2_grpc as feast_serving_grpc

from falaj.features.v1 import message_pb2 as messages
from falaj.features.v1 import request_response_pb2 as requests
from falaj.features.v1 import service_pb2_grpc
from falaj.ingest.v1 import message_pb2 as ingest
from falaj_platform.pki import PKI
from falaj_platform.runtime.clients import secure_channel
from falaj_platform.runtime.db import Database
from falaj_platform.runtime.server import RunningServer
from falaj_platform.runtime.service import start_service
from falaj_platform.runtime.settings import load_settings
from falaj_platform.services.features.config import FeaturesConfig
from falaj_platform.services.features.server import FeaturesService, build_spec
from falaj_platform.services.features.sources import InMemoryDatasetSource
from tests.backends import backend_env
from tests.conftest import caller, identity, missing_service

REDIS_URL = os.environ.get("FALAJ_TEST_REDIS_URL", "")
NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
ALICE = caller("alice")

TRANSACTION_COLUMNS = {
    "customer_id": ingest.COLUMN_TYPE_INT,
    "amount": ingest.COLUMN_TYPE_FLOAT,
    "category": ingest.COLUMN_TYPE_CATEGORY,
    "flagged": ingest.COLUMN_TYPE_BOOL,
    "event_time": ingest.COLUMN_TYPE_TIMESTAMP,
}


@dataclass
class AuditEvent:
    event_type: int
    resource: str
    action: str
    allowed: bool
    detail: str
    attributes: dict[str, str]


@dataclass
class RecordingAudit:
    """Stands in for the gateway's audit log where no gateway runs (see test_gateway_path.py)."""

    events: list[AuditEvent] = field(default_factory=list)

    def report(
        self, event_type: Any, *, resource: str, action: str, allowed: bool = True, detail: str = "", attributes: Any = None, **_: Any
    ) -> None:
        self.events.append(AuditEvent(int(event_type), resource, action, allowed, detail, dict(attributes or {})))


@dataclass
class Features:
    running: RunningServer
    database: Database
    channel: grpc.Channel
    source: InMemoryDatasetSource
    audit: RecordingAudit
    service: FeaturesService

    @property
    def stub(self) -> service_pb2_grpc.FeaturesServiceStub:
        return service_pb2_grpc.FeaturesServiceStub(self.channel)

    @property
    def feast(self) -> feast_serving_grpc.ServingServiceStub:
        return feast_serving_grpc.ServingServiceStub(self.channel)

    def stop(self) -> None:
        self.channel.close()
        self.running.stop(0)
        self.service.repo.close()
        self.database.dispose()


def start_features(pki: PKI, home: Path, *, configure: Callable[[FeaturesConfig], FeaturesConfig] = lambda c: c, **env: str) -> Features:
    source = InMemoryDatasetSource()
    audit = RecordingAudit()
    holder: list[FeaturesService] = []
    spec = build_spec(
        source=lambda _: source, audit=lambda _: audit, configure=configure, schedule_poll_seconds=3600, on_service=holder.append
    )
    base = {**backend_env(home), "FALAJ_HOME": str(home), "FALAJ_PKI_DIR": str(pki.root), "FALAJ_LOG_LEVEL": "warning"}
    settings = load_settings("features", env={**base, **env})
    running, database = start_service(spec, settings, listen_addr="127.0.0.1:0")
    channel = secure_channel(f"127.0.0.1:{running.port}", identity(pki, "service", "gateway"))
    return Features(running, database, channel, source, audit, holder[0])


@pytest.fixture(scope="module")
def features(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Features]:
    """One features service per test module (SQLite store, SQLite online store)."""
    started = start_features(pki, tmp_path_factory.mktemp("features"))
    yield started
    started.stop()


@pytest.fixture
def redis_features(pki: PKI, tmp_path: Path) -> Iterator[Features]:
    """A features service whose online store is the real Redis, under a project of its own."""
    if not REDIS_URL:
        missing_service("FALAJ_TEST_REDIS_URL is not set")
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.RedisError as error:
        missing_service(f"Redis at {REDIS_URL} is not reachable: {error}")
    project = f"t_{uuid.uuid4().hex[:12]}"
    started = start_features(pki, tmp_path, configure=lambda c: c.with_overrides(online_store=REDIS_URL, feast_project=project))
    yield started
    started.stop()
    # Feast's Redis keys end with the project name.
    for key in client.scan_iter(match=f"*{project}".encode()):
        client.delete(key)
    client.close()


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def transactions(rows: Sequence[tuple[int, float | None, str, bool, dt.datetime]]) -> pa.Table:
    customer, amount, category, flagged, event_time = zip(*rows, strict=True) if rows else ((), (), (), (), ())
    return pa.table(
        {
            "customer_id": pa.array(customer, pa.int64()),
            "amount": pa.array(amount, pa.float64()),
            "category": pa.array(category, pa.string()).dictionary_encode(),
            "flagged": pa.array(flagged, pa.bool_()),
            "event_time": pa.array(event_time, pa.timestamp("us", tz="UTC")),
        }
    )


def add_transactions(
    source: InMemoryDatasetSource, rows: Sequence[tuple[int, float | None, str, bool, dt.datetime]], *, region: str = "ae-dxb"
) -> str:
    """A new transactions dataset with one version holding `rows`; returns its resource name."""
    dataset = source.add_dataset(
        unique("tx"), TRANSACTION_COLUMNS, event_time_column="event_time", residency_region=region, entity_key_columns=["customer_id"]
    )
    if rows:
        source.commit(dataset, transactions(rows))
    return dataset


def define_customer_view(
    features: Features, dataset: str, *, ttl_seconds: int = 86400, entity: str | None = None, view_id: str | None = None
) -> tuple[str, str]:
    """A customer entity and an online view (amount, category, flagged) over `dataset`; returns their ids."""
    entity_id = entity or unique("customer")
    if entity is None:
        features.stub.CreateEntity(
            requests.CreateEntityRequest(
                entity_id=entity_id,
                entity=messages.Entity(join_keys=[messages.JoinKey(name="customer_id", value_type=messages.VALUE_TYPE_INT64)]),
            ),
            metadata=ALICE,
            timeout=30,
        )
    view_id = view_id or unique("spend")
    view = messages.FeatureView(
        entities=[f"entities/{entity_id}"],
        source=messages.DatasetSource(dataset=dataset),
        features=[
            messages.Feature(name="amount", value_type=messages.VALUE_TYPE_DOUBLE),
            messages.Feature(name="category", value_type=messages.VALUE_TYPE_STRING),
            messages.Feature(name="flagged", value_type=messages.VALUE_TYPE_BOOL),
        ],
        online=True,
    )
    view.ttl.seconds = ttl_seconds
    features.stub.CreateFeatureView(
        requests.CreateFeatureViewRequest(feature_view_id=view_id, feature_view=view), metadata=ALICE, timeout=30
    )
    return entity_id, view_id


def materialize(
    features: Features, view_id: str, mode: messages.MaterializationMode.ValueType = messages.MATERIALIZATION_MODE_FULL
) -> messages.Materialization:
    reply = features.stub.Materialize(
        requests.MaterializeRequest(feature_views=[f"featureViews/{view_id}"], mode=mode), metadata=ALICE, timeout=60
    )
    assert reply.materialization.state == messages.MATERIALIZATION_STATE_SUCCEEDED, reply.materialization.error_message
    return reply.materialization


def int_keys(*keys: int) -> dict[str, messages.ValueColumn]:
    return {"customer_id": messages.ValueColumn(values=[messages.Value(int64_value=k) for k in keys])}


def status_code(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as error:
        return error.code(), error.details()
    return grpc.StatusCode.OK, ""
