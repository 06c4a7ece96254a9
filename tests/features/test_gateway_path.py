"""The whole path: clients through the real gateway (mTLS, policy, audit) to the features
service, which pulls ingest data over gRPC through the gateway with its own identity.

The ingest side is a small servicer of the real ingest contract over Arrow tables (the
ingest service itself is tested on its own), so what is exercised here is the features
service's ingest client, the gateway's routing of Feast's contract, and audit records
landing in the gateway's hash-chained log.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pyarrow as pa
import pytest
from feast.protos.feast.serving import ServingService_pb2 as feast_serving
from feast.protos.feast.serving import ServingService_pb2_grpc as feast_serving_grpc
from feast.protos.feast.types.Value_pb2 import RepeatedValue
from feast.protos.feast.types.Value_pb2 import Value as FeastValue

from falaj.common.v1 import common_pb2
from falaj.features.v1 import message_pb2 as messages
from falaj.features.v1 import request_response_pb2 as requests
from falaj.features.v1 import service_pb2_grpc
from falaj.gateway.v1 import message_pb2 as gateway_messages
from falaj.gateway.v1 import request_response_pb2 as gateway_requests
from falaj.gateway.v1 import service_pb2_grpc as gateway_service
from falaj.ingest.v1 import message_pb2 as ingest
from falaj.ingest.v1 import request_response_pb2 as ingest_requests
from falaj.ingest.v1 import service_pb2_grpc as ingest_service
from falaj_platform.gateway.server import Gateway, start_gateway
from falaj_platform.pki import PKI
from falaj_platform.runtime import tls
from falaj_platform.runtime.db import Database
from falaj_platform.runtime.identity import GATEWAY_SPIFFE_ID
from falaj_platform.runtime.server import RunningServer, create_server
from falaj_platform.runtime.service import start_service
from falaj_platform.runtime.settings import load_settings
from falaj_platform.services.features.server import build_spec
from falaj_platform.services.features.sources import ErasedKeys, ErasureInfo, InMemoryDatasetSource
from tests.backends import backend_env
from tests.conftest import free_port, identity
from tests.features.conftest import NOW, TRANSACTION_COLUMNS, transactions, unique

H = dt.timedelta(hours=1)


class ArrowIngest(ingest_service.IngestServiceServicer):
    """The read side of `falaj.ingest.v1.IngestService`, served from Arrow tables."""

    def __init__(self, source: InMemoryDatasetSource):
        self.source = source

    def GetDataset(self, request: ingest_requests.GetDatasetRequest, context: grpc.ServicerContext) -> ingest_requests.GetDatasetResponse:
        info = self.source.get_dataset(request.name)
        dataset = ingest.Dataset(name=info.name, latest_version=info.latest_version)
        dataset.residency.region = info.residency_region
        dataset.schema.event_time_column = info.event_time_column
        dataset.schema.entity_key_columns.extend(info.entity_key_columns)
        dataset.schema.columns.extend(
            ingest.Column(name=name, type=ingest.ColumnType.ValueType(kind)) for name, kind in info.columns.items()
        )
        return ingest_requests.GetDatasetResponse(dataset=dataset)

    def GetDatasetVersion(
        self, request: ingest_requests.GetDatasetVersionRequest, context: grpc.ServicerContext
    ) -> ingest_requests.GetDatasetVersionResponse:
        info = self.source.get_version(request.name)
        version = ingest.DatasetVersion(
            name=info.name, version_number=info.version_number, content_hash=info.content_hash, row_count=info.row_count
        )
        version.residency.region = info.residency_region
        return ingest_requests.GetDatasetVersionResponse(dataset_version=version)

    def ReadDatasetVersion(
        self, request: ingest_requests.ReadDatasetVersionRequest, context: grpc.ServicerContext
    ) -> Iterator[ingest_requests.ReadDatasetVersionResponse]:
        offset = 0
        for batch in self.source.read_version(request.name, list(request.columns), expected_content_hash=request.expected_content_hash):
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, batch.schema) as writer:
                writer.write_batch(batch)
            yield ingest_requests.ReadDatasetVersionResponse(
                batch=common_pb2.ArrowBatch(arrow_ipc=sink.getvalue().to_pybytes(), row_count=batch.num_rows), row_offset=offset
            )
            offset += batch.num_rows

    def GetErasureReceipt(
        self, request: ingest_requests.GetErasureReceiptRequest, context: grpc.ServicerContext
    ) -> ingest_requests.GetErasureReceiptResponse:
        info = self.source.get_erasure_receipt(request.name)
        receipt = ingest.ErasureReceipt(name=info.name, receipt_digest=info.receipt_digest, state=ingest.ERASURE_STATE_COMPLETED)
        for erased in info.datasets:
            receipt.datasets.add(
                dataset=erased.dataset,
                entity_key_columns=list(erased.entity_key_columns),
                erased_entity_keys_json=[json.dumps(list(key)) for key in erased.keys],
            )
        return ingest_requests.GetErasureReceiptResponse(receipt=receipt)


@dataclass
class Platform:
    pki: PKI
    gateway: Gateway
    ingest: RunningServer
    features: tuple[RunningServer, Database]
    source: InMemoryDatasetSource
    gateway_addr: str

    def channel(self, client: str) -> grpc.Channel:
        creds = tls.channel_credentials(identity(self.pki, "client", client))
        return grpc.secure_channel(self.gateway_addr, creds, options=[("grpc.ssl_target_name_override", "localhost")])


@pytest.fixture(scope="module")
def platform(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    for name, role in (("fx-root", "admin"), ("fx-dora", "data-engineer")):
        pki.issue_client(name, role=role)
    gateway_addr = f"127.0.0.1:{free_port()}"
    home = tmp_path_factory.mktemp("path")
    env = {
        **backend_env(home),
        "FALAJ_HOME": str(home),
        "FALAJ_PKI_DIR": str(pki.root),
        "FALAJ_LOG_LEVEL": "warning",
        "FALAJ_RELOAD_SECONDS": "0.2",
        "FALAJ_GATEWAY_ADDR": gateway_addr,
    }
    source = InMemoryDatasetSource()

    def register_ingest(server: grpc.Server) -> list[str]:
        ingest_service.add_IngestServiceServicer_to_server(ArrowIngest(source), server)  # type: ignore[abstract]
        return ["falaj.ingest.v1.IngestService"]

    ingest_server = create_server(
        load_settings("ingest", env=env), register_ingest, listen_addr="127.0.0.1:0", allowed_peers=frozenset({GATEWAY_SPIFFE_ID})
    )
    env["FALAJ_INGEST_ADDR"] = f"127.0.0.1:{ingest_server.port}"
    # The production spec: ingest client through the gateway, the real audit reporter.
    features = start_service(build_spec(), load_settings("features", env=env), listen_addr="127.0.0.1:0")
    env["FALAJ_FEATURES_ADDR"] = f"127.0.0.1:{features[0].port}"
    gateway = start_gateway(load_settings("gateway", env=env), listen_addr=gateway_addr)
    yield Platform(pki, gateway, ingest_server, features, source, gateway_addr)
    gateway.stop(0)
    features[0].stop(0)
    features[1].dispose()
    ingest_server.stop(0)


def audit_records(platform: Platform, event_type: int) -> list[gateway_messages.AuditRecord]:
    with platform.channel("fx-root") as channel:
        stub = gateway_service.GatewayAdminServiceStub(channel)
        records = stub.QueryAuditRecords(gateway_requests.QueryAuditRecordsRequest(page_size=1000), timeout=10).records
    return [r for r in records if r.event_type == event_type]


def test_apply_materialize_and_read_through_the_gateway_with_feast_stub(platform: Platform) -> None:
    dataset = platform.source.add_dataset(unique("tx"), TRANSACTION_COLUMNS, event_time_column="event_time", residency_region="ae-dxb")
    platform.source.commit(
        dataset, transactions([(1, 1.0, "a", False, NOW - 2 * H), (1, 4.0, "b", True, NOW - H), (2, None, "c", False, NOW - H)])
    )
    with platform.channel("fx-dora") as channel:
        stub = service_pb2_grpc.FeaturesServiceStub(channel)
        definitions = messages.FeatureDefinitions(
            entities=[
                messages.Entity(
                    name="entities/gw_customer", join_keys=[messages.JoinKey(name="customer_id", value_type=messages.VALUE_TYPE_INT64)]
                )
            ],
            feature_views=[
                messages.FeatureView(
                    name="featureViews/gw_spend",
                    entities=["entities/gw_customer"],
                    source=messages.DatasetSource(dataset=dataset),
                    features=[messages.Feature(name="amount", value_type=messages.VALUE_TYPE_DOUBLE)],
                    online=True,
                )
            ],
        )
        applied = stub.ApplyFeatureDefinitions(requests.ApplyFeatureDefinitionsRequest(definitions=definitions), timeout=60)
        assert [c.action for c in applied.changes] == [messages.APPLY_ACTION_CREATE] * 2
        run = stub.Materialize(
            requests.MaterializeRequest(mode=messages.MATERIALIZATION_MODE_FULL, feature_views=["featureViews/gw_spend"]), timeout=60
        )
        assert run.materialization.state == messages.MATERIALIZATION_STATE_SUCCEEDED, run.materialization.error_message
        assert run.materialization.rows_written == 2  # pulled from ingest over gRPC through the gateway

        feast = feast_serving_grpc.ServingServiceStub(channel)
        assert feast.GetFeastServingInfo(feast_serving.GetFeastServingInfoRequest(), timeout=10).version
        reply = feast.GetOnlineFeatures(
            feast_serving.GetOnlineFeaturesRequest(
                features=feast_serving.FeatureList(val=["gw_spend:amount"]),
                entities={"customer_id": RepeatedValue(val=[FeastValue(int64_val=k) for k in (1, 2, 3)])},
            ),
            timeout=10,
        )
        amount = reply.results[list(reply.metadata.feature_names.val).index("amount")]
        assert amount.values[0].double_val == 4.0
        assert list(amount.statuses) == [feast_serving.PRESENT, feast_serving.NULL_VALUE, feast_serving.NOT_FOUND]

        receipt = f"erasureReceipts/{unique('r')}"
        platform.source.add_erasure_receipt(ErasureInfo(receipt, "e" * 64, True, (ErasedKeys(dataset, ("customer_id",), ((1,),)),)))
        erased = stub.ApplyErasureReceipt(requests.ApplyErasureReceiptRequest(erasure_receipt=receipt), timeout=60).erasure_application
        assert erased.online_keys_removed == 1
        reply = feast.GetOnlineFeatures(
            feast_serving.GetOnlineFeaturesRequest(
                features=feast_serving.FeatureList(val=["gw_spend:amount"]),
                entities={"customer_id": RepeatedValue(val=[FeastValue(int64_val=1)])},
            ),
            timeout=10,
        )
        assert list(reply.results[-1].statuses) == [feast_serving.NOT_FOUND]
    erasures = audit_records(platform, gateway_messages.SECURITY_EVENT_TYPE_DATA_ERASED)
    assert [r.resource for r in erasures] == [erased.name]
    assert erasures[0].reporter == "spiffe://falaj.local/service/features"


def test_cross_region_view_is_refused_and_recorded_in_the_gateway_audit_log(platform: Platform) -> None:
    dataset = platform.source.add_dataset(unique("tx_auh"), TRANSACTION_COLUMNS, event_time_column="event_time", residency_region="ae-auh")
    with platform.channel("fx-dora") as channel:
        stub = service_pb2_grpc.FeaturesServiceStub(channel)
        stub.CreateEntity(
            requests.CreateEntityRequest(
                entity_id="auh_customer",
                entity=messages.Entity(join_keys=[messages.JoinKey(name="customer_id", value_type=messages.VALUE_TYPE_INT64)]),
            ),
            timeout=30,
        )
        view = messages.FeatureView(
            entities=["entities/auh_customer"],
            source=messages.DatasetSource(dataset=dataset),
            features=[messages.Feature(name="amount", value_type=messages.VALUE_TYPE_DOUBLE)],
        )
        with pytest.raises(grpc.RpcError) as refused:
            stub.CreateFeatureView(requests.CreateFeatureViewRequest(feature_view_id="auh_spend", feature_view=view), timeout=30)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    records = [
        r
        for r in audit_records(platform, gateway_messages.SECURITY_EVENT_TYPE_CROSS_REGION_ACCESS)
        if r.resource == "featureViews/auh_spend"
    ]
    assert len(records) == 1
    assert records[0].decision == gateway_messages.DECISION_DENY
    assert records[0].caller == "spiffe://falaj.local/client/fx-dora"
    assert records[0].attributes["dataset_region"] == "ae-auh"
