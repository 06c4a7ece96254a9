"""Feature enrichment: entity keys in the request, features from the features service, in signature order."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import numpy as np
import pytest

from falaj.features.v1 import message_pb2 as feat_pb
from falaj.features.v1 import request_response_pb2 as feat_rr
from falaj.inference import open_inference_grpc_pb2 as oip
from falaj.serving.v1 import message_pb2 as pb
from falaj_platform.services.serving.sources import LocalModel
from tests.conftest import caller
from tests.serving.conftest import Serving, output_array
from tests.serving.models import scaled_model

# The online store of the fake features service, by customer: feature -> value.
ONLINE = {
    7: {"age": 31.0, "spend": 120.5, "visits": 4.0},
    8: {"age": 45.0, "spend": 10.0, "visits": 9.0},
    9: {"age": 22.0, "visits": 1.0},  # spend never materialized
}


class FakeFeatures:
    """Answers GetOnlineFeatures like the features service, columns in its own order."""

    def __init__(self) -> None:
        self.requests: list[feat_rr.GetOnlineFeaturesRequest] = []

    def get_online_features(self, request: feat_rr.GetOnlineFeaturesRequest, timeout: float) -> feat_rr.GetOnlineFeaturesResponse:
        self.requests.append(request)
        keys = [v.int64_value for v in request.entities["customer_id"].values]
        response = feat_rr.GetOnlineFeaturesResponse()
        for feature in ("visits", "spend", "age"):  # not the model's order
            response.feature_names.append(f"customer_stats__{feature}")
            column = response.columns.add()
            for key in keys:
                value = ONLINE.get(key, {}).get(feature)
                if value is None:
                    column.values.add()
                    column.statuses.append(feat_pb.FIELD_STATUS_NOT_FOUND)
                else:
                    column.values.add(double_value=value)
                    column.statuses.append(feat_pb.FIELD_STATUS_PRESENT)
                column.event_timestamps.add()
        return response


def _serving(start_serving: Callable[..., Serving], action: int = pb.MISSING_FEATURE_ACTION_REJECT) -> tuple[Serving, FakeFeatures]:
    features = FakeFeatures()
    serving = start_serving(features=features)
    path = scaled_model(serving.models_dir / "m1.onnx", 1.0, width=3)
    references = ("customer_stats:age", "customer_stats:spend", "customer_stats:visits")
    serving.source.register(
        "models/m/versions/1", LocalModel(path, "ae-dxb", feature_references={"x": references}, feature_service="churn")
    )
    enrichment = pb.FeatureEnrichmentConfig(
        feature_service="churn",
        entity_keys=[pb.EntityKeyBinding(join_key="customer_id", input_tensor="customer_id")],
        missing_feature_action=action,  # type: ignore[arg-type]
        default_values={"spend": -1.0},
    )
    serving.deploy(
        "m",
        pb.TrafficSplit(single=pb.SingleVersionRouting(model_version="models/m/versions/1")),
        feature_enrichment=enrichment,
        prediction_log=pb.PredictionLogConfig(enabled=True, log_features=True),
    )
    return serving, features


def _keys_request(keys: list[int]) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="customer_id", datatype="INT64", shape=[len(keys)])
    tensor.contents.int64_contents.extend(keys)
    return request


def test_requests_with_entity_keys_get_the_features_in_signature_order(start_serving: Callable[..., Serving]) -> None:
    serving, features = _serving(start_serving)
    response = serving.oip.ModelInfer(_keys_request([8, 7]), timeout=5, metadata=caller())
    expected = np.array([[45.0, 10.0, 9.0], [31.0, 120.5, 4.0]], dtype=np.float32)
    np.testing.assert_array_equal(output_array(response), expected)
    assert features.requests[0].features.feature_service == "featureServices/churn"
    metadata = serving.oip.ModelMetadata(oip.ModelMetadataRequest(name="m"), timeout=5, metadata=caller())
    assert [(t.name, t.datatype) for t in metadata.inputs] == [("customer_id", "INT64")]


def test_a_missing_feature_is_refused_naming_entity_and_feature(start_serving: Callable[..., Serving]) -> None:
    serving, _ = _serving(start_serving)
    with pytest.raises(grpc.RpcError) as raised:
        serving.oip.ModelInfer(_keys_request([9]), timeout=5, metadata=caller())
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "customer_stats:spend" in raised.value.details() and "9" in raised.value.details()


def test_a_missing_feature_can_be_filled_with_its_default(start_serving: Callable[..., Serving]) -> None:
    serving, _ = _serving(start_serving, pb.MISSING_FEATURE_ACTION_FILL_DEFAULT)
    response = serving.oip.ModelInfer(_keys_request([9]), timeout=5, metadata=caller())
    np.testing.assert_array_equal(output_array(response), np.array([[22.0, -1.0, 1.0]], dtype=np.float32))
