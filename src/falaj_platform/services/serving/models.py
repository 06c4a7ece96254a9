"""Model versions loaded into ONNX Runtime: fetch, verify, build, warm up, serve, drain.

A version is served only after its artifact's SHA-256 matched, its residency was
allowed, its session was built in memory and its warm-up requests ran. Loading a
version never disturbs the others; unloading one stops new requests from reaching it
and waits for those in flight before the session is dropped.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import onnxruntime as ort

from falaj.serving.v1 import message_pb2 as pb
from falaj_platform.runtime.errors import FailedPrecondition, FalajError, Internal, InvalidArgument, Unavailable
from falaj_platform.runtime.logs import get_logger
from falaj_platform.services.serving.batching import BatchingPolicy, DynamicBatcher
from falaj_platform.services.serving.config import ServingConfig
from falaj_platform.services.serving.sources import ArtifactDigestMismatch, ModelArtifact, ModelSource
from falaj_platform.services.serving.tensors import DATATYPE_OF_ONNX, NUMPY_OF, TensorSpec

log = get_logger()

_OPTIMIZATION = {
    pb.GRAPH_OPTIMIZATION_LEVEL_DISABLED: ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    pb.GRAPH_OPTIMIZATION_LEVEL_BASIC: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    pb.GRAPH_OPTIMIZATION_LEVEL_EXTENDED: ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    pb.GRAPH_OPTIMIZATION_LEVEL_ALL: ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class SecurityReporter(Protocol):
    """Where refusals worth an audit record go (the gateway's audit log in production)."""

    def digest_mismatch(self, model_version: str, expected: str, actual: str) -> None: ...

    def cross_region(self, resource: str, region: str, detail: str) -> None: ...


def _dims(shape: Sequence[object]) -> tuple[int, ...]:
    return tuple(dim if isinstance(dim, int) and dim >= 0 else -1 for dim in shape)


def build_session(data: bytes, runtime: pb.ModelRuntimeConfig, config: ServingConfig) -> tuple[ort.InferenceSession, str]:
    """An ONNX Runtime session from in-memory bytes, tuned for serving; returns it and its provider."""
    options = ort.SessionOptions()
    session = runtime.session
    if runtime.HasField("session"):
        options.intra_op_num_threads = session.intra_op_num_threads
        options.inter_op_num_threads = session.inter_op_num_threads
    else:
        # One thread per operator by default: requests are parallel already, and on a small
        # box ONNX Runtime's own pool would fight the server threads for the cores.
        options.intra_op_num_threads = config.intra_op_threads
        options.inter_op_num_threads = config.inter_op_threads
    options.graph_optimization_level = _OPTIMIZATION.get(session.graph_optimization_level, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    options.execution_mode = (
        ort.ExecutionMode.ORT_PARALLEL if session.execution_mode == pb.EXECUTION_MODE_PARALLEL else ort.ExecutionMode.ORT_SEQUENTIAL
    )
    # Spinning threads burn a core waiting for work that a server hands out in bursts.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 4  # failures are reported (and logged) by serving itself
    available = ort.get_available_providers()
    wanted = session.execution_provider
    if wanted == pb.EXECUTION_PROVIDER_CUDA and CUDA not in available:
        raise FailedPrecondition(
            "the CUDA execution provider was requested but this replica has no CUDA provider", reason="CUDA_UNAVAILABLE"
        )
    use_cuda = CUDA in available and wanted in (pb.EXECUTION_PROVIDER_CUDA, pb.EXECUTION_PROVIDER_UNSPECIFIED)
    providers: list[object] = [(CUDA, {"device_id": session.device_id}), CPU] if use_cuda else [CPU]
    try:
        built = ort.InferenceSession(data, options, providers=providers)
    except Exception as error:  # noqa: BLE001 - ONNX Runtime raises its own exception types
        raise FailedPrecondition(f"ONNX Runtime cannot load the model: {str(error)[:300]}", reason="MODEL_INVALID") from None
    active = built.get_providers()
    return built, (CUDA if active and active[0] == CUDA else CPU)


def _specs(args: Sequence[ort.NodeArg], references: Mapping[str, tuple[str, ...]]) -> tuple[TensorSpec, ...]:
    specs = []
    for arg in args:
        datatype = DATATYPE_OF_ONNX.get(arg.type)
        if datatype is None:
            raise FailedPrecondition(
                f"tensor {arg.name!r} has type {arg.type}, which serving cannot carry", reason="UNSUPPORTED_TENSOR_TYPE"
            )
        specs.append(TensorSpec(arg.name, datatype, _dims(arg.shape or ()), references.get(arg.name, ())))
    return tuple(specs)


@dataclass
class LoadedModel:
    """One model version in ONNX Runtime, with its batcher and in-flight accounting."""

    model_version: str
    session: ort.InferenceSession
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    provider: str
    sha256: str
    residency_region: str
    feature_service: str
    request_timeout_s: float
    state: int = pb.SERVED_MODEL_STATE_WARMING_UP
    batcher: DynamicBatcher | None = None
    runs: int = 0  # ONNX Runtime calls, batched or not
    _in_flight: int = 0
    _closed: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _idle: threading.Condition = field(init=False)

    def __post_init__(self) -> None:
        self._idle = threading.Condition(self._lock)
        self.output_names = [spec.name for spec in self.outputs]
        self.string_inputs = {spec.name for spec in self.inputs if spec.datatype == "BYTES"}
        self.batchable = all(spec.shape and spec.shape[0] == -1 for spec in (*self.inputs, *self.outputs))

    @property
    def version_id(self) -> str:
        """The version number, the OIP `model_version` of answers."""
        return self.model_version.rsplit("/", 1)[-1]

    # -- in-flight accounting ---------------------------------------------------------------
    def acquire(self) -> bool:
        """Count a request in; False once the model is unloading (route it elsewhere)."""
        with self._lock:
            if self._closed:
                return False
            self._in_flight += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.notify_all()

    def in_flight(self) -> int:
        return self._in_flight

    # -- inference ---------------------------------------------------------------------------
    def run_session(self, inputs: Mapping[str, np.ndarray]) -> Sequence[np.ndarray]:
        self.runs += 1
        try:
            return self.session.run(self.output_names, dict(inputs))
        except FalajError:
            raise
        except Exception as error:  # noqa: BLE001 - ONNX Runtime's own exception types
            # The inputs passed the signature check, so a failure here is the version's
            # (as Triton reports it): INTERNAL, counted against a canary.
            text = str(error).splitlines()[0][:300] if str(error) else type(error).__name__
            log.warning("onnx runtime failed", model_version=self.model_version, error=text)
            raise Internal(f"{self.model_version} failed to run: {text}", reason="INFERENCE_FAILED") from None

    def infer(self, inputs: Mapping[str, np.ndarray], rows: int) -> Sequence[np.ndarray]:
        """All outputs, in model order; merged with concurrent requests when batching is on."""
        if self.string_inputs:
            inputs = {name: (as_strings(array, name) if name in self.string_inputs else array) for name, array in inputs.items()}
        if self.batcher is not None:
            return self.batcher.submit(inputs, rows, self.request_timeout_s)
        return self.run_session(inputs)

    # -- lifecycle ---------------------------------------------------------------------------
    def drain(self, timeout: float) -> bool:
        """Take no new requests; wait for the in-flight ones. True when none is left."""
        with self._lock:
            self._closed = True
            self.state = pb.SERVED_MODEL_STATE_DRAINING
            deadline = time.monotonic() + timeout
            while self._in_flight > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(remaining)
        return True

    def close(self) -> None:
        with self._lock:
            self._closed = True
        if self.batcher is not None:
            self.batcher.stop()
        self.state = pb.SERVED_MODEL_STATE_UNLOADED


def as_strings(array: np.ndarray, name: str) -> np.ndarray:
    """BYTES elements as the str objects ONNX Runtime takes for string tensors (UTF-8)."""
    try:
        return np.vectorize(lambda v: v.decode("utf-8") if isinstance(v, bytes) else str(v), otypes=[object])(array)
    except UnicodeDecodeError:
        raise InvalidArgument(f"input {name!r}: BYTES elements must be UTF-8 for an ONNX string tensor", reason="BYTES_NOT_UTF8") from None


def warmup_inputs(specs: Sequence[TensorSpec], rows: int) -> dict[str, np.ndarray]:
    """Synthetic inputs of `rows` rows: zeros (empty strings for BYTES), free dims of 1."""
    arrays = {}
    for spec in specs:
        shape = tuple((rows if index == 0 else 1) if dim < 0 else dim for index, dim in enumerate(spec.shape))
        if spec.datatype == "BYTES":
            array = np.empty(shape, dtype=object)
            array.fill("")
            arrays[spec.name] = array
        else:
            arrays[spec.name] = np.zeros(shape, dtype=NUMPY_OF[spec.datatype])
    return arrays


def _batching(runtime: pb.ModelRuntimeConfig, config: ServingConfig) -> BatchingPolicy | None:
    defaults = config.batching
    if runtime.HasField("batching"):
        batching = runtime.batching
        if not batching.enabled:
            return None
        delay = (
            batching.max_queue_delay.ToTimedelta().total_seconds() if batching.HasField("max_queue_delay") else defaults.max_queue_delay_s
        )
        return BatchingPolicy(
            max_batch_size=batching.max_batch_size or defaults.max_batch_size,
            max_queue_delay_s=delay,
            max_queue_size=batching.max_queue_size or defaults.max_queue_size,
            preferred_batch_sizes=tuple(batching.preferred_batch_sizes),
        )
    if not defaults.enabled:
        return None
    return BatchingPolicy(defaults.max_batch_size, defaults.max_queue_delay_s, defaults.max_queue_size)


StateListener = Callable[[str, int, str], None]
"""Called as a version moves through LOADING, WARMING_UP, READY or FAILED, with a reason."""


class ModelManager:
    """The versions this replica has loaded, by model version name."""

    def __init__(self, config: ServingConfig, source: ModelSource, security: SecurityReporter):
        self.config = config
        self.source = source
        self.security = security
        self._models: dict[str, LoadedModel] = {}
        # Requests inside the inference path, any model (the engine sets it): a batch waits
        # for company only while some is on its way.
        self.requests_in_flight: Callable[[], int] = lambda: 0
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def get(self, model_version: str) -> LoadedModel | None:
        return self._models.get(model_version)

    def loaded(self) -> dict[str, LoadedModel]:
        return dict(self._models)

    def _lock_of(self, model_version: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(model_version, threading.Lock())

    def region_allowed(self, region: str) -> bool:
        return region == self.config.region or region in self.config.allowed_foreign_regions

    def verify(self, artifact: ModelArtifact) -> str:
        """The artifact's digest, after checking it is the one its origin vouched for."""
        actual = hashlib.sha256(artifact.data).hexdigest()
        if actual != artifact.sha256.lower():
            self.security.digest_mismatch(artifact.model_version, artifact.sha256, actual)
            raise ArtifactDigestMismatch(
                f"{artifact.model_version}: the artifact hashes to {actual}, not the {artifact.sha256 or '(none)'} its origin vouches for; "
                "it was not loaded",
                metadata={"model_version": artifact.model_version},
            )
        return actual

    def load(self, model_version: str, runtime: pb.ModelRuntimeConfig, on_state: StateListener | None = None) -> LoadedModel:
        """Fetch, verify, build and warm up a version (once; a second caller gets the same model)."""
        notify = on_state or (lambda version, state, reason: None)
        with self._lock_of(model_version):
            current = self._models.get(model_version)
            if current is not None:
                return current
            notify(model_version, pb.SERVED_MODEL_STATE_LOADING, "")
            try:
                model = self._build(model_version, runtime, notify)
            except FalajError as error:
                notify(model_version, pb.SERVED_MODEL_STATE_FAILED, error.message)
                raise
            self._models[model_version] = model
            model.state = pb.SERVED_MODEL_STATE_READY
            notify(model_version, pb.SERVED_MODEL_STATE_READY, "")
            log.info("model version ready", model_version=model_version, provider=model.provider, batching=model.batcher is not None)
            return model

    def _build(self, model_version: str, runtime: pb.ModelRuntimeConfig, notify: StateListener) -> LoadedModel:
        artifact = self.source.fetch(model_version)
        if artifact.model_version != model_version:
            raise FailedPrecondition(
                f"{model_version} resolved to {artifact.model_version}; deploy numbered versions", reason="VERSION_RESOLVED"
            )
        if not self.region_allowed(artifact.residency_region):
            self.security.cross_region(model_version, artifact.residency_region, f"load refused in region {self.config.region}")
            raise FailedPrecondition(
                f"{model_version} must stay in region {artifact.residency_region}; this replica serves {self.config.region}",
                reason="RESIDENCY_VIOLATION",
                metadata={"model_version": model_version, "residency_region": artifact.residency_region},
            )
        digest = self.verify(artifact)
        session, provider = build_session(artifact.data, runtime, self.config)
        timeout = (
            runtime.request_timeout.ToTimedelta().total_seconds() if runtime.HasField("request_timeout") else self.config.request_timeout_s
        )
        model = LoadedModel(
            model_version=model_version,
            session=session,
            inputs=_specs(session.get_inputs(), artifact.feature_references),
            outputs=_specs(session.get_outputs(), {}),
            provider=provider,
            sha256=digest,
            residency_region=artifact.residency_region,
            feature_service=artifact.feature_service,
            request_timeout_s=timeout,
        )
        notify(model_version, pb.SERVED_MODEL_STATE_WARMING_UP, "")
        policy = _batching(runtime, self.config)
        self._warm_up(model, runtime, policy)
        if policy is not None and model.batchable:
            model.batcher = DynamicBatcher(
                model_version, model.run_session, policy, lambda: max(model.in_flight(), self.requests_in_flight())
            )
        return model

    def _warm_up(self, model: LoadedModel, runtime: pb.ModelRuntimeConfig, policy: BatchingPolicy | None) -> None:
        count = runtime.warmup.request_count if runtime.HasField("warmup") else self.config.warmup_request_count
        sizes = list(runtime.warmup.batch_sizes) or ([1, 2, policy.max_batch_size] if policy is not None else [1])
        if not model.batchable:
            sizes = [1]
        try:
            for rows in sorted(set(sizes)):
                inputs = warmup_inputs(model.inputs, rows)
                for _ in range(max(count, 1 if policy is not None and model.batchable else 0)):
                    outputs = model.run_session(inputs)
                    if rows > 1 and any(output.shape[:1] != (rows,) for output in outputs):
                        model.batchable = False  # outputs do not follow the batch: run requests one by one
        except FalajError as error:
            raise FailedPrecondition(f"{model.model_version} failed its warm-up: {error.message}", reason="WARMUP_FAILED") from None
        model.runs = 0

    def unload(self, model_version: str, drain_timeout: float) -> bool:
        """Stop routing to a version, wait for its in-flight requests, drop it. True when drained."""
        with self._lock_of(model_version):
            model = self._models.get(model_version)
            if model is None:
                return True
            drained = model.drain(drain_timeout)
            del self._models[model_version]
            model.close()
            return drained

    def close(self) -> None:
        for version in list(self._models):
            self.unload(version, 0)


def require_ready(model: LoadedModel | None, model_version: str) -> LoadedModel:
    if model is None or model.state != pb.SERVED_MODEL_STATE_READY:
        raise Unavailable(
            f"{model_version} is not loaded on this replica", reason="MODEL_NOT_LOADED", metadata={"model_version": model_version}
        )
    return model
