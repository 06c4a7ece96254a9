"""Online reads through Falaj's API and Feast's own ServingService contract, with every field status."""

from __future__ import annotations

import datetime as dt

import grpc
import pytest
from feast.protos.feast.serving import ServingService_pb2 as feast_serving
from feast.protos.feast.types.Value_pb2 import RepeatedValue
from feast.protos.feast.types.Value_pb2 import Value as FeastValue

from falaj.features.v1 import message_pb2 as messages
from falaj.features.v1 import request_response_pb2 as requests
from tests.features.conftest import ALICE, NOW, Features, add_transactions, define_customer_view, int_keys, materialize, status_code, unique

HOUR = dt.timedelta(hours=1)
PRESENT, NULL_VALUE, NOT_FOUND, OUTSIDE_MAX_AGE = (
    messages.FIELD_STATUS_PRESENT,
    messages.FIELD_STATUS_NULL_VALUE,
    messages.FIELD_STATUS_NOT_FOUND,
    messages.FIELD_STATUS_OUTSIDE_MAX_AGE,
)


@pytest.fixture(scope="module")
def customer_view(features: Features) -> tuple[str, str]:
    """Customer 1: fresh value; 2: fresh null; 3: three days old (TTL one day); 4: never seen."""
    dataset = add_transactions(
        features.source,
        [
            (1, 1.0, "food", False, NOW - 5 * HOUR),
            (1, 2.5, "travel", True, NOW - HOUR),
            (2, None, "food", False, NOW - 2 * HOUR),
            (3, 4.0, "fuel", False, NOW - 72 * HOUR),
        ],
    )
    entity_id, view_id = define_customer_view(features, dataset, ttl_seconds=86400)
    materialize(features, view_id)
    return entity_id, view_id


def test_falaj_online_read_gives_each_value_its_status(features: Features, customer_view: tuple[str, str]) -> None:
    _, view = customer_view
    reply = features.stub.GetOnlineFeatures(
        requests.GetOnlineFeaturesRequest(
            features=messages.FeatureSelection(features=messages.FeatureReferences(references=[f"{view}:amount", f"{view}:category"])),
            entities=int_keys(1, 2, 3, 4, 1),
        ),
        metadata=ALICE,
        timeout=10,
    )
    assert list(reply.feature_names) == ["amount", "category"]
    amount, category = reply.columns
    assert list(amount.statuses) == [PRESENT, NULL_VALUE, OUTSIDE_MAX_AGE, NOT_FOUND, PRESENT]
    assert [v.WhichOneof("kind") for v in amount.values] == ["double_value", None, None, None, "double_value"]
    assert amount.values[0].double_value == 2.5  # the latest event, not the first
    assert amount.event_timestamps[0].ToDatetime(dt.UTC) == NOW - HOUR
    assert list(category.statuses) == [PRESENT, PRESENT, OUTSIDE_MAX_AGE, NOT_FOUND, PRESENT]
    assert category.values[1].string_value == "food"


def test_feast_serving_stub_reads_the_same_store(features: Features, customer_view: tuple[str, str]) -> None:
    _, view = customer_view
    info = features.feast.GetFeastServingInfo(feast_serving.GetFeastServingInfoRequest(), metadata=ALICE, timeout=10)
    assert info.version
    request = feast_serving.GetOnlineFeaturesRequest(
        features=feast_serving.FeatureList(val=[f"{view}:amount", f"{view}:flagged"]),
        entities={"customer_id": RepeatedValue(val=[FeastValue(int64_val=k) for k in (1, 2, 3, 4)])},
        full_feature_names=True,
    )
    reply = features.feast.GetOnlineFeatures(request, metadata=ALICE, timeout=10)
    names = list(reply.metadata.feature_names.val)
    assert sorted(names) == sorted(["customer_id", f"{view}__amount", f"{view}__flagged"])
    amount = reply.results[names.index(f"{view}__amount")]
    assert list(amount.statuses) == [PRESENT, NULL_VALUE, OUTSIDE_MAX_AGE, NOT_FOUND]
    assert amount.values[0].double_val == 2.5
    assert not amount.values[2].HasField("double_val")  # outside max age is returned null
    flagged = reply.results[names.index(f"{view}__flagged")]
    assert flagged.values[0].bool_val is True


def test_feature_service_and_on_demand_view_are_served(features: Features, customer_view: tuple[str, str]) -> None:
    _, view = customer_view
    odfv = unique("in_aed")
    features.stub.CreateOnDemandFeatureView(
        requests.CreateOnDemandFeatureViewRequest(
            on_demand_feature_view_id=odfv,
            on_demand_feature_view=messages.OnDemandFeatureView(
                source_feature_views=[f"featureViews/{view}"],
                request_fields=[messages.RequestField(name="rate", value_type=messages.VALUE_TYPE_DOUBLE)],
                features=[messages.Feature(name="amount_aed", value_type=messages.VALUE_TYPE_DOUBLE)],
                transformation=messages.Transformation(
                    mode=messages.TRANSFORMATION_MODE_PYTHON,
                    function_name="to_aed",
                    function_source="def to_aed(inputs):\n    return {'amount_aed': [(a or 0.0) * r for a, r in zip(inputs['amount'], inputs['rate'])]}\n",
                ),
            ),
        ),
        metadata=ALICE,
        timeout=30,
    )
    service = unique("model")
    features.stub.CreateFeatureService(
        requests.CreateFeatureServiceRequest(
            feature_service_id=service,
            feature_service=messages.FeatureService(
                projections=[
                    messages.FeatureViewProjection(feature_view=f"featureViews/{view}", features=["amount"]),
                    messages.FeatureViewProjection(feature_view=f"onDemandFeatureViews/{odfv}"),
                ]
            ),
        ),
        metadata=ALICE,
        timeout=30,
    )
    reply = features.stub.GetOnlineFeatures(
        requests.GetOnlineFeaturesRequest(
            features=messages.FeatureSelection(feature_service=f"featureServices/{service}"),
            entities=int_keys(1),
            request_context={"rate": messages.ValueColumn(values=[messages.Value(double_value=3.67)])},
        ),
        metadata=ALICE,
        timeout=10,
    )
    assert list(reply.feature_names) == ["amount", "amount_aed"]
    assert reply.columns[0].values[0].double_value == 2.5
    assert reply.columns[1].values[0].double_value == pytest.approx(2.5 * 3.67)


def test_bad_online_requests_get_clear_statuses(features: Features, customer_view: tuple[str, str]) -> None:
    _, view = customer_view

    def read(references: list[str], entities: dict[str, messages.ValueColumn]) -> tuple[grpc.StatusCode, str]:
        request = requests.GetOnlineFeaturesRequest(
            features=messages.FeatureSelection(features=messages.FeatureReferences(references=references)), entities=entities
        )
        return status_code(lambda: features.stub.GetOnlineFeatures(request, metadata=ALICE, timeout=10))

    code, details = read(["no_such_view:amount"], int_keys(1))
    assert code == grpc.StatusCode.NOT_FOUND and "no_such_view" in details
    code, details = read([f"{view}:no_such_feature"], int_keys(1))
    assert code == grpc.StatusCode.NOT_FOUND and f"{view}:no_such_feature" in details
    code, details = read([f"{view}:amount"], {"customer_id": messages.ValueColumn(values=[messages.Value(string_value="1")])})
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "customer_id" in details
    code, details = read([f"{view}:amount"], {})
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "customer_id" in details
    code, _ = read(["not a reference"], int_keys(1))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    bad_feast = feast_serving.GetOnlineFeaturesRequest(
        features=feast_serving.FeatureList(val=[f"{view}:amount"]),
        entities={"customer_id": RepeatedValue(val=[FeastValue(double_val=1.0)])},
    )
    code, _ = status_code(lambda: features.feast.GetOnlineFeatures(bad_feast, metadata=ALICE, timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_redis_online_store_serves_the_same_statuses(redis_features: Features) -> None:
    dataset = add_transactions(
        redis_features.source,
        [(1, 7.0, "food", False, NOW - HOUR), (2, None, "food", False, NOW - HOUR), (3, 1.0, "fuel", False, NOW - 72 * HOUR)],
    )
    _, view = define_customer_view(redis_features, dataset, ttl_seconds=86400)
    run = materialize(redis_features, view)
    assert run.rows_written == 3
    import redis

    from tests.features.conftest import REDIS_URL

    project = redis_features.service.config.feast_project
    assert list(redis.Redis.from_url(REDIS_URL).scan_iter(match=f"*{project}".encode()))  # the values really are in Redis
    reply = redis_features.stub.GetOnlineFeatures(
        requests.GetOnlineFeaturesRequest(
            features=messages.FeatureSelection(features=messages.FeatureReferences(references=[f"{view}:amount"])),
            entities=int_keys(1, 2, 3, 4),
        ),
        metadata=ALICE,
        timeout=10,
    )
    assert list(reply.columns[0].statuses) == [PRESENT, NULL_VALUE, OUTSIDE_MAX_AGE, NOT_FOUND]
    assert reply.columns[0].values[0].double_value == 7.0
