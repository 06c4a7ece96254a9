"""The request path of inference: route, enrich, run, answer; then log, mirror, expose.

Everything after the answer is built (prediction logs, shadow copies, exposures) is a
queue append; their work runs on background threads, so neither their latency nor their
failures reach the caller.
"""

from __future__ import annotations

import datetime as dt
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import numpy as np

from falaj.inference import open_inference_grpc_pb2 as oip
from falaj.serving.v1 import message_pb2 as pb
from falaj_platform.runtime.errors import FalajError, InvalidArgument, NotFound, Unavailable
from falaj_platform.runtime.interceptors import current_request_id
from falaj_platform.runtime.logs import get_logger
from falaj_platform.services.serving.assignment import ExposureEvent, ExposureRecorder, VariantAssigner
from falaj_platform.services.serving.enrichment import Enricher, entity_specs
from falaj_platform.services.serving.models import LoadedModel, ModelManager
from falaj_platform.services.serving.prediction_log import PredictionLogger, PredictionRecord
from falaj_platform.services.serving.routing import ROUTING_KEY_METADATA, ActiveDeployment, Choice, Route
from falaj_platform.services.serving.tensors import TensorSpec, check_against, decode_inputs, fill_response, parameter_value

log = get_logger()
PLATFORM = "onnxruntime_onnx"

# Failures that are the version's fault (they count against a canary); the others are
# the caller's (bad input, unknown names).
SERVER_FAULTS = frozenset(
    {
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DATA_LOSS,
    }
)


@dataclass
class _Answer:
    model: LoadedModel
    outputs: Sequence[np.ndarray]
    inputs: Mapping[str, np.ndarray]
    features: Mapping[str, np.ndarray] | None


class InferenceEngine:
    """Answers OIP model calls from the active deployments and the loaded versions."""

    def __init__(
        self,
        manager: ModelManager,
        logger: PredictionLogger,
        *,
        assigner: VariantAssigner | None = None,
        exposures: ExposureRecorder | None = None,
        enricher: Enricher | None = None,
        shadow_queue_size: int = 256,
        on_route_failure: Callable[[str], None] = lambda deployment: None,
    ):
        self.manager = manager
        self.logger = logger
        self.assigner = assigner
        self.exposures = exposures
        self.enricher = enricher
        self.on_route_failure = on_route_failure
        self.deployments: dict[str, ActiveDeployment] = {}
        self.shadow_queue_size = shadow_queue_size
        self.shadows_dropped = 0
        self._shadow_pending = 0
        self._shadow_lock = threading.Lock()
        self._shadow_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="shadow")
        self._active = 0
        self._active_lock = threading.Lock()
        manager.requests_in_flight = lambda: self._active

    # -- lookups -------------------------------------------------------------------------------
    def deployment(self, name: str) -> ActiveDeployment:
        deployment = self.deployments.get(name)
        if deployment is None:
            raise NotFound(f"unknown model {name!r}: no deployment has that name", reason="MODEL_NOT_FOUND", metadata={"model": name})
        return deployment

    def _version_for_metadata(self, deployment: ActiveDeployment, version: str) -> LoadedModel:
        if version:
            model_version = deployment.version_name(version)
            if model_version not in deployment.versions:
                raise NotFound(f"model {deployment.id} has no version {version}", reason="MODEL_VERSION_NOT_FOUND")
        else:
            model_version = deployment.default_version
        model = self.manager.get(model_version)
        if model is None:
            raise Unavailable(f"{model_version} is not loaded on this replica", reason="MODEL_NOT_LOADED")
        return model

    def model_ready(self, name: str, version: str) -> bool:
        deployment = self.deployment(name)
        if version:
            model_version = deployment.version_name(version)
            if model_version not in deployment.versions:
                raise NotFound(f"model {name} has no version {version}", reason="MODEL_VERSION_NOT_FOUND")
            wanted = [model_version]
        else:
            wanted = [v for v in deployment.versions if v not in {r.model_version for r, _ in deployment.shadows}] or deployment.versions
        return all((m := self.manager.get(v)) is not None and m.state == pb.SERVED_MODEL_STATE_READY for v in wanted)

    def model_metadata(self, name: str, version: str) -> oip.ModelMetadataResponse:
        deployment = self.deployment(name)
        model = self._version_for_metadata(deployment, version)
        shadow_versions = {route.model_version for route, _ in deployment.shadows}
        answer = oip.ModelMetadataResponse(name=name, platform=PLATFORM)
        answer.versions.extend(v.rsplit("/", 1)[-1] for v in deployment.versions if v not in shadow_versions)
        inputs: list[TensorSpec] = list(model.inputs)
        if deployment.enrichment is not None and self.enricher is not None:
            target = Enricher.target_of(deployment.enrichment, model.inputs)
            inputs = [spec for spec in inputs if spec.name != target.name] + entity_specs(deployment.enrichment)
        for spec in inputs:
            answer.inputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
        for spec in model.outputs:
            answer.outputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
        return answer

    # -- inference -----------------------------------------------------------------------------
    def infer(self, request: oip.ModelInferRequest, metadata: Callable[[], Sequence[tuple[str, object]]]) -> oip.ModelInferResponse:
        with self._active_lock:
            self._active += 1
        try:
            return self._infer(request, metadata)
        finally:
            with self._active_lock:
                self._active -= 1

    def _infer(self, request: oip.ModelInferRequest, metadata: Callable[[], Sequence[tuple[str, object]]]) -> oip.ModelInferResponse:
        started = time.perf_counter()
        deployment = self.deployment(request.model_name)
        parameters = request.parameters

        def routing_key(name: str) -> str:
            if name and name in parameters:
                value = parameter_value(parameters[name])
                if value is not None and value != "":
                    return str(value)
            for key, value in metadata():
                if key == ROUTING_KEY_METADATA:
                    return str(value)
            return ""

        choice = deployment.choose(request.model_version, routing_key, self.assigner)
        route = choice.route
        try:
            answer = self._run(deployment, route, request)
        except FalajError as error:
            latency = time.perf_counter() - started
            failed = error.code in SERVER_FAULTS
            route.window.record(latency, failed)
            if failed:
                self.on_route_failure(deployment.id)
            self._log(deployment, route, request, None, latency, error.code.value[0], parameters)
            raise
        latency = time.perf_counter() - started
        route.window.record(latency, False)
        response = self._response(request, deployment, choice, answer)
        self._log(deployment, route, request, answer, latency, 0, parameters)
        if deployment.shadows:
            for shadow in deployment.mirrored():
                self._mirror(deployment, shadow, request, answer)
        if choice.assignment is not None and choice.assignment.in_experiment and self.exposures is not None:
            if deployment.split.ab_test.record_exposures:
                self.exposures.record(
                    ExposureEvent(
                        experiment=deployment.split.ab_test.experiment,
                        event_id=f"{deployment.id}:{request.id or current_request_id()}",
                        unit_id=choice.routing_key,
                        variant_id=choice.assignment.variant_id,
                        time=dt.datetime.now(dt.UTC),
                        source=f"deployments/{deployment.id}",
                    )
                )
        return response

    def _acquire(self, deployment: ActiveDeployment, version: str) -> LoadedModel:
        model = self.manager.get(version)
        if model is None or not model.acquire():
            # Unloaded between the route choice and now (a split change moved on): the
            # deployment's newest revision decides again, once.
            fresh = self.deployments.get(deployment.id)
            model = self.manager.get(version) if fresh is deployment else None
            if model is None or not model.acquire():
                raise Unavailable(
                    f"{version} is not loaded on this replica; retry", reason="MODEL_NOT_LOADED", metadata={"model_version": version}
                )
        return model

    def _run(self, deployment: ActiveDeployment, route: Route, request: oip.ModelInferRequest) -> _Answer:
        arrays = decode_inputs(request)
        model = self._acquire(deployment, route.model_version)
        try:
            features = None
            if deployment.enrichment is not None:
                if self.enricher is None:
                    raise Unavailable("feature enrichment is not available on this replica", reason="ENRICHMENT_UNAVAILABLE")
                enriched = self.enricher.enrich(deployment.enrichment, model.inputs, arrays)
                arrays, features = enriched.arrays, enriched.features
                check_against(arrays, {}, model.inputs)
            else:
                check_against(arrays, {t.name: t.datatype for t in request.inputs}, model.inputs)
            rows = _rows(arrays, model)
            outputs = model.infer(arrays, rows)
        finally:
            model.release()
        return _Answer(model, outputs, arrays, features)

    def _response(
        self, request: oip.ModelInferRequest, deployment: ActiveDeployment, choice: Choice, answer: _Answer
    ) -> oip.ModelInferResponse:
        model = answer.model
        response = oip.ModelInferResponse(model_name=request.model_name, model_version=model.version_id, id=request.id)
        response.parameters["falaj.model_version"].string_param = model.model_version
        response.parameters["falaj.route"].string_param = choice.route.role_name
        if choice.assignment is not None:
            response.parameters["falaj.variant"].string_param = choice.assignment.variant_id
        if request.outputs:
            index = {name: i for i, name in enumerate(model.output_names)}
            selected = []
            for wanted in request.outputs:
                position = index.get(wanted.name)
                if position is None:
                    raise InvalidArgument(
                        f"output {wanted.name!r} is not an output of the model; it has {model.output_names}",
                        reason="UNKNOWN_OUTPUT",
                        metadata={"output": wanted.name},
                    )
                selected.append((wanted.name, answer.outputs[position]))
            fill_response(response, selected)
        else:
            fill_response(response, list(zip(model.output_names, answer.outputs, strict=True)))
        return response

    # -- after the answer -------------------------------------------------------------------
    def _log(
        self,
        deployment: ActiveDeployment,
        route: Route,
        request: oip.ModelInferRequest,
        answer: _Answer | None,
        latency_s: float,
        status_code: int,
        parameters: Mapping[str, oip.InferParameter],
    ) -> None:
        policy = deployment.log_policy
        if not policy.enabled or (policy.sample_rate < 1.0 and random.random() >= policy.sample_rate):
            return
        subject = None
        if policy.subject_id_parameter and policy.subject_id_parameter in parameters:
            value = parameter_value(parameters[policy.subject_id_parameter])
            subject = None if value is None else str(value)
        rows = 0
        inputs = outputs = features = None
        names: dict[str, tuple[str, ...]] = {}
        if answer is not None:
            rows = _rows(answer.inputs, answer.model)
            if policy.log_inputs:
                inputs = answer.inputs
                names = {spec.name: tuple(r.split(":", 1)[-1] for r in spec.feature_references) for spec in answer.model.inputs}
            if policy.log_features and answer.features is not None:
                features = answer.features
            if policy.log_outputs:
                outputs = dict(zip(answer.model.output_names, answer.outputs, strict=True))
        self.logger.enqueue(
            PredictionRecord(
                deployment=deployment.id,
                request_id=request.id or current_request_id() or f"{time.time_ns()}",
                time=dt.datetime.now(dt.UTC),
                model_version=route.model_version,
                route=route.role_name,
                latency_ms=latency_s * 1000.0,
                status_code=status_code,
                rows=rows,
                subject_id=subject,
                inputs=inputs,
                features=features,
                outputs=outputs,
                input_names=names,
            )
        )

    def _mirror(self, deployment: ActiveDeployment, shadow: Route, request: oip.ModelInferRequest, answer: _Answer) -> None:
        with self._shadow_lock:
            if self._shadow_pending >= self.shadow_queue_size:
                self.shadows_dropped += 1
                return
            self._shadow_pending += 1
        request_id = request.id or current_request_id()
        try:
            self._shadow_pool.submit(self._run_shadow, deployment, shadow, request, answer.inputs, request_id)
        except RuntimeError:  # shutting down
            with self._shadow_lock:
                self._shadow_pending -= 1

    def _run_shadow(
        self, deployment: ActiveDeployment, shadow: Route, request: oip.ModelInferRequest, inputs: Mapping[str, np.ndarray], request_id: str
    ) -> None:
        started = time.perf_counter()
        try:
            model = self.manager.get(shadow.model_version)
            if model is None or not model.acquire():
                raise Unavailable(f"shadow {shadow.model_version} is not loaded", reason="MODEL_NOT_LOADED")
            try:
                check_against(inputs, {}, model.inputs)
                outputs = model.infer(inputs, _rows(inputs, model))
            finally:
                model.release()
            latency = time.perf_counter() - started
            shadow.window.record(latency, False)
            mirrored = _Answer(model, outputs, inputs, None)
            shadow_request = oip.ModelInferRequest(id=request_id)
            self._log(deployment, shadow, shadow_request, mirrored, latency, 0, request.parameters)
        except FalajError as error:
            latency = time.perf_counter() - started
            shadow.window.record(latency, error.code in SERVER_FAULTS)
            self._log(deployment, shadow, oip.ModelInferRequest(id=request_id), None, latency, error.code.value[0], request.parameters)
        except Exception:
            log.exception("shadow request failed", deployment=deployment.id, model_version=shadow.model_version)
        finally:
            with self._shadow_lock:
                self._shadow_pending -= 1

    def close(self) -> None:
        self._shadow_pool.shutdown(wait=True, cancel_futures=True)


def _rows(arrays: Mapping[str, np.ndarray], model: LoadedModel) -> int:
    """Rows along the batch dimension (1 for models that do not batch)."""
    if not model.batchable:
        return 1
    for array in arrays.values():
        return int(array.shape[0]) if array.ndim else 1
    return 1
