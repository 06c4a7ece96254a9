"""Calls monitoring makes to other services, always through the gateway with its own identity.

- training: resubmit a template job's spec as a retraining job; read a model version's
  lineage and training metrics for its reference profile;
- ingest: read a dataset version's rows for a reference profile, and resolve a dataset's
  latest version.

The gateway address comes from settings (`FALAJ_GATEWAY_ADDR`), so tests point it at a
real in-process server.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import grpc
from google.protobuf import descriptor as pb_descriptor
from google.protobuf import message as pb_message

from falaj.ingest.v1 import request_response_pb2 as ingest_requests
from falaj.ingest.v1 import service_pb2_grpc as ingest_service
from falaj.training.v1 import message_pb2 as training_messages
from falaj.training.v1 import request_response_pb2 as training_requests
from falaj.training.v1 import service_pb2_grpc as training_service
from falaj_platform.runtime.clients import secure_channel
from falaj_platform.runtime.errors import FailedPrecondition, FalajError, InvalidArgument, NotFound, Unavailable
from falaj_platform.runtime.interceptors import REQUEST_ID_KEY
from falaj_platform.runtime.settings import PkiPaths

_FD = pb_descriptor.FieldDescriptor


class OverrideError(ValueError):
    """A parameter override that names no settable field of a training job spec."""


def _set_scalar(message: pb_message.Message, field: pb_descriptor.FieldDescriptor, raw: str) -> None:
    if field.is_repeated:
        raise OverrideError(f"{field.full_name} is a list and cannot be overridden")
    try:
        if field.cpp_type in (_FD.CPPTYPE_DOUBLE, _FD.CPPTYPE_FLOAT):
            value: object = float(raw)
        elif field.cpp_type in (_FD.CPPTYPE_INT32, _FD.CPPTYPE_INT64, _FD.CPPTYPE_UINT32, _FD.CPPTYPE_UINT64):
            value = int(raw)
        elif field.cpp_type == _FD.CPPTYPE_BOOL:
            if raw.lower() not in ("true", "false"):
                raise ValueError(raw)
            value = raw.lower() == "true"
        elif field.cpp_type == _FD.CPPTYPE_ENUM:
            enum_value = field.enum_type.values_by_name.get(raw)
            if enum_value is None:
                raise ValueError(raw)
            value = enum_value.number
        elif field.cpp_type == _FD.CPPTYPE_STRING:
            value = raw
        else:
            raise OverrideError(f"{field.full_name} is a message; override one of its fields")
    except ValueError:
        raise OverrideError(f"{raw!r} is not a valid value for {field.full_name}") from None
    setattr(message, field.name, value)


def apply_overrides(spec: training_messages.TrainingJobSpec, overrides: Mapping[str, str]) -> None:
    """Set dotted spec paths (`hyperparameters.learning_rate` = `0.01`) on `spec`."""
    for path, raw in sorted(overrides.items()):
        message: pb_message.Message = spec
        parts = path.split(".")
        for depth, part in enumerate(parts):
            field = message.DESCRIPTOR.fields_by_name.get(part)
            if field is None:
                raise OverrideError(f"training job spec has no field {'.'.join(parts[: depth + 1])!r}")
            if depth == len(parts) - 1:
                _set_scalar(message, field, raw)
            elif field.cpp_type == _FD.CPPTYPE_MESSAGE and not field.is_repeated:
                message = getattr(message, part)
            else:
                raise OverrideError(f"{'.'.join(parts[: depth + 1])!r} is not a message field of the training job spec")


def check_overrides(overrides: Mapping[str, str]) -> None:
    """Refuse overrides that could never apply, before a rule is stored."""
    apply_overrides(training_messages.TrainingJobSpec(), overrides)


def _translate(error: grpc.RpcError, what: str) -> FalajError:
    code = error.code() if isinstance(error, grpc.Call) else None
    details = error.details() if isinstance(error, grpc.Call) else str(error)
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(f"{what}: {details}", reason="UPSTREAM_NOT_FOUND")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(f"{what}: {details}", reason="UPSTREAM_INVALID_ARGUMENT")
    if code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED):
        return FailedPrecondition(f"{what}: {details}", reason=f"UPSTREAM_{code.name}")
    return Unavailable(f"{what}: {code.name if code else 'error'} {details}".strip(), reason="UPSTREAM_UNAVAILABLE")


@dataclass(frozen=True)
class ModelVersionFacts:
    """What a reference profile takes from the training registry."""

    training_dataset_version: str
    metrics: dict[str, float]
    residency_region: str


class GatewayClients:
    """gRPC stubs to the other services, on one mTLS channel to the gateway."""

    def __init__(self, gateway_addr: str, pki: PkiPaths, *, timeout: float = 15.0):
        self.gateway_addr = gateway_addr
        self.pki = pki
        self.timeout = timeout
        self._channel: grpc.Channel | None = None

    def _open(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = secure_channel(self.gateway_addr, self.pki)
        return self._channel

    @staticmethod
    def _metadata(request_id: str) -> tuple[tuple[str, str], ...]:
        return ((REQUEST_ID_KEY, request_id),) if request_id else ()

    # -- training -----------------------------------------------------------------------
    def start_retraining(
        self,
        template_training_job: str,
        *,
        overrides: Mapping[str, str],
        use_latest_dataset_version: bool,
        request_id: str,
        display_name: str,
        labels: Mapping[str, str],
    ) -> str:
        """Resubmit the template job's spec (with overrides); returns the new job's name.

        `request_id` makes the create idempotent in training, so a retry after a lost
        reply does not start a second job.
        """
        stub = training_service.TrainingServiceStub(self._open())
        metadata = self._metadata(request_id)
        try:
            template = stub.GetTrainingJob(
                training_requests.GetTrainingJobRequest(name=template_training_job), timeout=self.timeout, metadata=metadata
            ).training_job
        except grpc.RpcError as error:
            raise _translate(error, f"cannot read template training job {template_training_job}") from None
        spec = training_messages.TrainingJobSpec()
        spec.CopyFrom(template.spec)
        try:
            apply_overrides(spec, overrides)
        except OverrideError as error:
            raise InvalidArgument(str(error), reason="INVALID_PARAMETER_OVERRIDE") from None
        if use_latest_dataset_version and spec.data.entities.dataset_version:
            spec.data.entities.dataset_version = self.latest_dataset_version(spec.data.entities.dataset_version, request_id)
        job = training_messages.TrainingJob(display_name=display_name, spec=spec, labels=dict(labels))
        try:
            created = stub.CreateTrainingJob(
                training_requests.CreateTrainingJobRequest(training_job=job, request_id=request_id),
                timeout=self.timeout,
                metadata=metadata,
            )
        except grpc.RpcError as error:
            raise _translate(error, "training refused the retraining job") from None
        return str(created.training_job.name)

    def model_version_facts(self, model_version: str, request_id: str = "") -> ModelVersionFacts:
        stub = training_service.TrainingServiceStub(self._open())
        try:
            version = stub.GetModelVersion(
                training_requests.GetModelVersionRequest(name=model_version), timeout=self.timeout, metadata=self._metadata(request_id)
            ).model_version
        except grpc.RpcError as error:
            raise _translate(error, f"cannot read model version {model_version}") from None
        datasets = list(version.lineage.dataset_versions)
        return ModelVersionFacts(datasets[0] if datasets else "", dict(version.metrics), version.residency.region)

    # -- ingest -------------------------------------------------------------------------
    def latest_dataset_version(self, dataset_version: str, request_id: str = "") -> str:
        """`datasets/{d}/versions/{v}` -> the dataset's newest version name."""
        dataset = dataset_version.split("/versions/")[0]
        stub = ingest_service.IngestServiceStub(self._open())
        try:
            found = stub.GetDataset(
                ingest_requests.GetDatasetRequest(name=dataset), timeout=self.timeout, metadata=self._metadata(request_id)
            ).dataset
        except grpc.RpcError as error:
            raise _translate(error, f"cannot read dataset {dataset}") from None
        return str(found.latest_version or dataset_version)

    def read_dataset_version(self, dataset_version: str, columns: list[str], request_id: str = "") -> Iterator[bytes]:
        """Arrow IPC payloads of a dataset version's rows, in order."""
        stub = ingest_service.IngestServiceStub(self._open())
        request = ingest_requests.ReadDatasetVersionRequest(name=dataset_version, columns=columns)
        try:
            for response in stub.ReadDatasetVersion(request, timeout=self.timeout * 20, metadata=self._metadata(request_id)):
                yield bytes(response.batch.arrow_ipc)
        except grpc.RpcError as error:
            raise _translate(error, f"cannot read dataset version {dataset_version}") from None

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
