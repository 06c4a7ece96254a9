"""Where model artifacts come from: the training registry (production) or local files.

A source returns the plaintext ONNX bytes, in memory, with the SHA-256 its origin vouches
for; the loader checks that digest itself before anything is built from the bytes.

- `RegistryModelSource` streams `DownloadModelArtifact` from the training service
  through the gateway, with serving's own identity (training decrypts; serving never
  sees a key and never writes the plaintext to disk).
- `LocalModelSource` reads ONNX files: registered one by one (tests, tools) or laid out
  as a model repository `ROOT/{model}/{version}/model.onnx`.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import grpc

from falaj.training.v1 import message_pb2 as training_messages
from falaj.training.v1 import request_response_pb2 as training_requests
from falaj.training.v1 import service_pb2_grpc as training_service
from falaj_platform.runtime.clients import secure_channel
from falaj_platform.runtime.errors import FailedPrecondition, FalajError, InvalidArgument, NotFound, PermissionDenied, Unavailable
from falaj_platform.runtime.interceptors import REQUEST_ID_KEY, current_request_id
from falaj_platform.runtime.settings import PkiPaths

MODEL_VERSION_PATTERN = re.compile(r"^models/([a-z0-9][a-z0-9_-]{0,127})/versions/([A-Za-z0-9][A-Za-z0-9_-]{0,63})$")
NUMBERED_VERSION_PATTERN = re.compile(r"^models/([a-z0-9][a-z0-9_-]{0,127})/versions/([1-9][0-9]{0,17})$")


class ArtifactDigestMismatch(FalajError):
    """The bytes received do not hash to the digest their origin vouched for."""

    code = grpc.StatusCode.DATA_LOSS
    default_reason = "ARTIFACT_DIGEST_MISMATCH"


@dataclass(frozen=True)
class ModelArtifact:
    """A model version's plaintext ONNX bytes and what its origin says about them."""

    model_version: str  # resolved, `models/{model}/versions/{number}`
    data: bytes
    sha256: str  # hex digest the origin vouches for
    residency_region: str
    feature_references: dict[str, tuple[str, ...]] = field(default_factory=dict)  # by input name
    feature_service: str = ""


class ModelSource(Protocol):
    """Fetches a model version's artifact; raises NotFound, Unavailable, ArtifactDigestMismatch..."""

    def fetch(self, model_version: str) -> ModelArtifact: ...


def parse_model_version(name: str, field_name: str = "model_version") -> tuple[str, str]:
    """(`model`, `version`) of `models/{model}/versions/{version}`."""
    match = MODEL_VERSION_PATTERN.match(name)
    if match is None:
        raise InvalidArgument(
            f"{field_name} must look like models/{{model}}/versions/{{version}}, got {name!r}",
            reason="INVALID_MODEL_VERSION",
            metadata={"field": field_name},
        )
    return match.group(1), match.group(2)


def _references(signature: training_messages.ModelSignature) -> dict[str, tuple[str, ...]]:
    return {spec.name: tuple(spec.feature_references) for spec in signature.inputs if spec.feature_references}


class RegistryModelSource:
    """Production source: the training registry, through the gateway, as `service/serving`."""

    def __init__(self, gateway_addr: str, pki: PkiPaths, *, timeout: float = 60.0, chunk_size: int = 4 * 1024 * 1024):
        self.gateway_addr = gateway_addr
        self.pki = pki
        self.timeout = timeout
        self.chunk_size = chunk_size
        self._channel: grpc.Channel | None = None
        self._lock = threading.Lock()

    def _stub(self) -> training_service.TrainingServiceStub:
        with self._lock:
            if self._channel is None:
                self._channel = secure_channel(self.gateway_addr, self.pki)
            return training_service.TrainingServiceStub(self._channel)

    def fetch(self, model_version: str) -> ModelArtifact:
        parse_model_version(model_version)
        request = training_requests.DownloadModelArtifactRequest(name=model_version, chunk_size_bytes=self.chunk_size)
        metadata = [(REQUEST_ID_KEY, current_request_id())] if current_request_id() else []
        header: training_requests.ArtifactHeader | None = None
        parts: list[bytes] = []
        received = 0
        try:
            for message in self._stub().DownloadModelArtifact(request, timeout=self.timeout, metadata=metadata):
                which = message.WhichOneof("payload")
                if which == "header":
                    header = message.header
                    continue
                if header is None or which != "chunk":
                    raise Unavailable(f"the registry sent {which or 'nothing'} before the artifact header of {model_version}")
                if message.chunk.offset != received:
                    raise Unavailable(
                        f"the registry sent {model_version} out of order (offset {message.chunk.offset}, expected {received})"
                    )
                parts.append(message.chunk.data)
                received += len(message.chunk.data)
        except grpc.RpcError as error:
            raise _registry_error(error, model_version) from None
        if header is None:
            raise Unavailable(f"the registry sent no artifact header for {model_version}")
        if received != header.size_bytes:
            raise Unavailable(f"the registry sent {received} of the {header.size_bytes} bytes of {model_version}")
        return ModelArtifact(
            model_version=header.model_version or model_version,
            data=b"".join(parts),
            sha256=header.sha256.lower(),
            residency_region=header.residency.region,
            feature_references=_references(header.signature),
            feature_service=header.signature.feature_service,
        )

    def close(self) -> None:
        with self._lock:
            if self._channel is not None:
                self._channel.close()
                self._channel = None


def _registry_error(error: grpc.RpcError, model_version: str) -> FalajError:
    code = error.code() if isinstance(error, grpc.Call) else None
    details = (error.details() if isinstance(error, grpc.Call) else "") or ""
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(
            f"the registry has no {model_version}: {details}", reason="MODEL_VERSION_NOT_FOUND", metadata={"model_version": model_version}
        )
    if code == grpc.StatusCode.DATA_LOSS:
        return ArtifactDigestMismatch(f"the registry refused {model_version}: {details}", metadata={"model_version": model_version})
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return PermissionDenied(f"serving may not read {model_version}: {details}", reason="REGISTRY_ACCESS_DENIED")
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
        return FailedPrecondition(f"the registry refused {model_version}: {details}", reason="REGISTRY_REFUSED")
    return Unavailable(f"the model registry is unavailable ({code.name if code else 'error'}): {details}", reason="REGISTRY_UNAVAILABLE")


@dataclass(frozen=True)
class LocalModel:
    """One ONNX file standing in for a registry version."""

    path: Path
    residency_region: str
    sha256: str = ""  # empty: the file's own digest
    feature_references: dict[str, tuple[str, ...]] = field(default_factory=dict)
    feature_service: str = ""


class LocalModelSource:
    """ONNX files on disk: registered versions, or a repository `ROOT/{model}/{version}/model.onnx`.

    A repository model may carry `ROOT/{model}/model.json` with `residency_region`,
    `feature_service` and `feature_references` (input name -> list of `view:feature`).
    """

    def __init__(self, region: str, root: Path | None = None):
        self.region = region
        self.root = root
        self._models: dict[str, LocalModel] = {}
        self._lock = threading.Lock()

    def register(self, model_version: str, model: LocalModel | Path) -> None:
        parse_model_version(model_version)
        entry = model if isinstance(model, LocalModel) else LocalModel(Path(model), self.region)
        with self._lock:
            self._models[model_version] = entry

    def _lookup(self, model_version: str) -> LocalModel:
        with self._lock:
            entry = self._models.get(model_version)
        if entry is not None:
            return entry
        model, version = parse_model_version(model_version)
        if self.root is not None:
            path = self.root / model / version / "model.onnx"
            if path.is_file():
                meta_path = self.root / model / "model.json"
                meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
                return LocalModel(
                    path,
                    str(meta.get("residency_region", self.region)),
                    feature_references={k: tuple(v) for k, v in meta.get("feature_references", {}).items()},
                    feature_service=str(meta.get("feature_service", "")),
                )
        raise NotFound(
            f"no local model file for {model_version}", reason="MODEL_VERSION_NOT_FOUND", metadata={"model_version": model_version}
        )

    def fetch(self, model_version: str) -> ModelArtifact:
        entry = self._lookup(model_version)
        try:
            data = entry.path.read_bytes()
        except OSError as error:
            raise Unavailable(f"cannot read {entry.path}: {error.strerror}", reason="MODEL_FILE_UNREADABLE") from None
        return ModelArtifact(
            model_version=model_version,
            data=data,
            sha256=entry.sha256 or hashlib.sha256(data).hexdigest(),
            residency_region=entry.residency_region,
            feature_references=dict(entry.feature_references),
            feature_service=entry.feature_service,
        )
