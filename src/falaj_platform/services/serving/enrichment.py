"""Feature enrichment: a request carries entity keys; serving fetches the features online.

The deployment names a feature service and binds each of its join keys to a request
input tensor. Serving calls the features service's GetOnlineFeatures (through the
gateway, as itself), then builds the model's input tensor with one column per feature in
the order of the model signature's feature references (`{view}:{feature}`), so the
model sees exactly the layout it was trained on. Missing or stale values are refused or
filled, as the deployment says.
"""

from __future__ import annotations

import datetime as dt
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc
import numpy as np

from falaj.features.v1 import message_pb2 as feat_pb
from falaj.features.v1 import request_response_pb2 as feat_rr
from falaj.features.v1 import service_pb2_grpc as feat_service
from falaj.serving.v1 import message_pb2 as pb
from falaj_platform.runtime.clients import secure_channel
from falaj_platform.runtime.errors import FailedPrecondition, InvalidArgument, Unavailable
from falaj_platform.runtime.interceptors import REQUEST_ID_KEY, current_request_id
from falaj_platform.runtime.settings import PkiPaths
from falaj_platform.services.serving.tensors import NUMPY_OF, TensorSpec


class FeaturesClient(Protocol):
    """The features service's online read (falaj.features.v1 GetOnlineFeatures)."""

    def get_online_features(self, request: feat_rr.GetOnlineFeaturesRequest, timeout: float) -> feat_rr.GetOnlineFeaturesResponse: ...


class GatewayFeaturesClient:
    """GetOnlineFeatures through the gateway with serving's identity."""

    def __init__(self, gateway_addr: str, pki: PkiPaths):
        self.gateway_addr = gateway_addr
        self.pki = pki
        self._channel: grpc.Channel | None = None
        self._lock = threading.Lock()

    def get_online_features(self, request: feat_rr.GetOnlineFeaturesRequest, timeout: float) -> feat_rr.GetOnlineFeaturesResponse:
        with self._lock:
            if self._channel is None:
                self._channel = secure_channel(self.gateway_addr, self.pki)
            channel = self._channel
        metadata = [(REQUEST_ID_KEY, current_request_id())] if current_request_id() else []
        try:
            return feat_service.FeaturesServiceStub(channel).GetOnlineFeatures(request, timeout=timeout, metadata=metadata)
        except grpc.RpcError as error:
            code = error.code() if isinstance(error, grpc.Call) else None
            details = (error.details() if isinstance(error, grpc.Call) else "") or ""
            if code == grpc.StatusCode.NOT_FOUND:
                raise FailedPrecondition(
                    f"the features service cannot find what the deployment names: {details}", reason="FEATURES_NOT_FOUND"
                ) from None
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidArgument(f"the features service refused the entity keys: {details}", reason="BAD_ENTITY_KEYS") from None
            raise Unavailable(
                f"the features service did not answer ({code.name if code else 'error'})", reason="FEATURES_UNAVAILABLE"
            ) from None

    def close(self) -> None:
        with self._lock:
            if self._channel is not None:
                self._channel.close()
                self._channel = None


def feature_service_name(name: str) -> str:
    return name if name.startswith("featureServices/") else f"featureServices/{name}"


def _key_value(value: object, join_key: str) -> feat_pb.Value:
    if isinstance(value, bytes):
        return feat_pb.Value(string_value=value.decode("utf-8", "replace"))
    if isinstance(value, str):
        return feat_pb.Value(string_value=value)
    if isinstance(value, (int, np.integer)):
        return feat_pb.Value(int64_value=int(value))
    raise InvalidArgument(f"entity key {join_key!r} must be INT64 or BYTES values", reason="BAD_ENTITY_KEYS")


def _number(value: feat_pb.Value) -> float | None:
    which = value.WhichOneof("kind")
    if which in ("int32_value", "int64_value", "float_value", "double_value"):
        return float(getattr(value, which))
    if which == "bool_value":
        return 1.0 if value.bool_value else 0.0
    return None


@dataclass(frozen=True)
class EnrichedInputs:
    """The model inputs built from features, and the features themselves (for logs)."""

    arrays: dict[str, np.ndarray]
    features: dict[str, np.ndarray]  # feature name -> one value per row


class Enricher:
    """Builds model inputs from entity keys for one deployment's enrichment config."""

    def __init__(self, client: FeaturesClient, default_timeout_s: float):
        self.client = client
        self.default_timeout_s = default_timeout_s

    @staticmethod
    def target_of(config: pb.FeatureEnrichmentConfig, inputs: Sequence[TensorSpec]) -> TensorSpec:
        if config.target_input:
            for spec in inputs:
                if spec.name == config.target_input:
                    return spec
            raise FailedPrecondition(f"the model has no input {config.target_input!r} to enrich", reason="BAD_ENRICHMENT_TARGET")
        if len(inputs) != 1:
            raise FailedPrecondition("the model has several inputs; name the enriched one in target_input", reason="BAD_ENRICHMENT_TARGET")
        return inputs[0]

    def enrich(
        self,
        config: pb.FeatureEnrichmentConfig,
        model_inputs: Sequence[TensorSpec],
        request_arrays: Mapping[str, np.ndarray],
        now: dt.datetime | None = None,
    ) -> EnrichedInputs:
        target = self.target_of(config, model_inputs)
        rows = -1
        request = feat_rr.GetOnlineFeaturesRequest(full_feature_names=True)
        request.features.feature_service = feature_service_name(config.feature_service)
        for binding in config.entity_keys:
            keys = request_arrays.get(binding.input_tensor)
            if keys is None:
                raise InvalidArgument(
                    f"input {binding.input_tensor!r} with the {binding.join_key!r} entity keys is missing",
                    reason="MISSING_INPUT",
                    metadata={"input": binding.input_tensor},
                )
            flat = keys.reshape(-1)
            if rows >= 0 and flat.shape[0] != rows:
                raise InvalidArgument("every entity key input must hold the same number of rows", reason="ENTITY_ROWS_MISMATCH")
            rows = flat.shape[0]
            request.entities[binding.join_key].values.extend(_key_value(v, binding.join_key) for v in flat.tolist())
        timeout = config.timeout.ToTimedelta().total_seconds() if config.HasField("timeout") else self.default_timeout_s
        response = self.client.get_online_features(request, timeout)
        by_name = {name: column for name, column in zip(response.feature_names, response.columns, strict=False)}
        # The signature's references fix the column order; without them, the service's order.
        references = list(target.feature_references) or [name.replace("__", ":", 1) for name in response.feature_names]
        width = target.shape[-1] if len(target.shape) >= 2 and target.shape[-1] > 0 else len(references)
        if len(references) != width:
            raise FailedPrecondition(
                f"input {target.name!r} takes {width} features but {len(references)} are referenced", reason="BAD_ENRICHMENT_TARGET"
            )
        dtype = NUMPY_OF[target.datatype]
        matrix = np.empty((max(rows, 0), width), dtype=np.float64)
        max_age = config.max_feature_age.ToTimedelta() if config.HasField("max_feature_age") else None
        moment = now or dt.datetime.now(dt.UTC)
        features: dict[str, np.ndarray] = {}
        for column_index, reference in enumerate(references):
            name = reference.replace(":", "__", 1)
            column = by_name.get(name)
            if column is None:
                raise FailedPrecondition(f"the feature service did not return {reference}", reason="FEATURE_MISSING_FROM_SERVICE")
            feature_name = reference.split(":", 1)[-1]
            for row in range(max(rows, 0)):
                value = _number(column.values[row]) if row < len(column.values) else None
                present = row < len(column.statuses) and column.statuses[row] == feat_pb.FIELD_STATUS_PRESENT
                if present and max_age is not None and row < len(column.event_timestamps):
                    stamp = column.event_timestamps[row]
                    if stamp.seconds and moment - stamp.ToDatetime(dt.UTC) > max_age:
                        present = False
                if value is None or not present:
                    if config.missing_feature_action != pb.MISSING_FEATURE_ACTION_FILL_DEFAULT:
                        entity = {b.join_key: str(request_arrays[b.input_tensor].reshape(-1)[row]) for b in config.entity_keys}
                        raise FailedPrecondition(
                            f"feature {reference} is missing for entity {entity}",
                            reason="FEATURE_VALUE_MISSING",
                            metadata={"feature": reference, **{f"entity.{k}": v for k, v in entity.items()}},
                        )
                    value = config.default_values.get(feature_name, config.default_values.get(reference, math.nan))
                matrix[row, column_index] = value
            features[feature_name] = matrix[:, column_index]
        shape = (max(rows, 0), *[(width if i == len(target.shape) - 1 else 1) for i in range(1, len(target.shape))])
        arrays = {name: array for name, array in request_arrays.items() if name not in {b.input_tensor for b in config.entity_keys}}
        arrays[target.name] = matrix.astype(dtype).reshape(shape) if len(target.shape) >= 2 else matrix.astype(dtype).reshape(-1)
        return EnrichedInputs(arrays, features)


def entity_specs(config: pb.FeatureEnrichmentConfig) -> list[TensorSpec]:
    """What callers send instead of the enriched input: one key tensor per binding."""
    return [TensorSpec(binding.input_tensor, "INT64", (-1,)) for binding in config.entity_keys]
