"""The model registry through the real servicer: models, imported versions, aliases,
downloads, encryption at rest, tampering, and promotion with separation of duties."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from google.protobuf import field_mask_pb2
from onnx import TensorProto, helper, numpy_helper

from falaj.common.v1 import common_pb2
from falaj.training.v1 import message_pb2 as pb
from falaj.training.v1 import request_response_pb2 as rr
from falaj_platform.runtime.audit import SecurityEvent
from tests.conftest import caller
from tests.training.conftest import (
    ALICE,
    BOB,
    TrainingService,
    classification_table,
    error_reason,
    job_spec,
    rpc_error,
    train,
    write_dataset,
)

GRAPH_NAME = "falaj-external-churn-model"


@pytest.fixture(scope="module")
def training(training_on_each_backend: TrainingService) -> TrainingService:
    """The registry runs the same tests on SQLite and on PostgreSQL."""
    return training_on_each_backend


def external_onnx(weights: tuple[float, float, float] = (0.8, -0.5, 0.1), padding: int = 0) -> bytes:
    """A logistic model built outside Falaj: probability = sigmoid(x @ w + b)."""
    w = numpy_helper.from_array(np.array(weights, dtype=np.float32).reshape(3, 1), "w")
    b = numpy_helper.from_array(np.array([0.2], dtype=np.float32), "b")
    initializers = [w, b]
    if padding:  # an unused constant, to make a file of several chunks
        initializers.append(numpy_helper.from_array(np.arange(padding, dtype=np.float32), "padding"))
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["z0"]),
            helper.make_node("Add", ["z0", "b"], ["z"]),
            helper.make_node("Sigmoid", ["z"], ["p"]),
        ],
        GRAPH_NAME,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["batch", 1])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="sklearn-onnx-like")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def import_stream(header: rr.ImportModelVersionHeader, content: bytes, chunk: int = 4096) -> Iterator[rr.ImportModelVersionRequest]:
    yield rr.ImportModelVersionRequest(header=header)
    for start in range(0, len(content), chunk):
        yield rr.ImportModelVersionRequest(chunk=content[start : start + chunk])


def import_version(service: TrainingService, model: str, content: bytes, *, who: str = ALICE, **header: Any) -> pb.ModelVersion:
    fields: dict[str, object] = {
        "registered_model": f"models/{model}",
        "residency": common_pb2.Residency(region="ae-dxb"),
        "task": pb.TASK_TYPE_BINARY_CLASSIFICATION,
        "import_source": "git@example:churn.git@abc",
        **header,
    }
    request = rr.ImportModelVersionHeader(**fields)  # type: ignore[arg-type]
    return service.stub.ImportModelVersion(import_stream(request, content), metadata=caller(who), timeout=30).model_version


def download(service: TrainingService, name: str, **kwargs: int) -> tuple[rr.ArtifactHeader, list[rr.ArtifactChunk]]:
    messages = list(
        service.stub.DownloadModelArtifact(rr.DownloadModelArtifactRequest(name=name, **kwargs), metadata=caller(ALICE), timeout=10)
    )
    return messages[0].header, [m.chunk for m in messages[1:]]


def get_model(service: TrainingService, model: str) -> pb.RegisteredModel:
    return service.stub.GetRegisteredModel(
        rr.GetRegisteredModelRequest(name=f"models/{model}"), metadata=caller(ALICE), timeout=10
    ).registered_model


def test_an_external_onnx_model_is_imported_encrypted_at_rest_and_downloaded_intact(training: TrainingService) -> None:
    content = external_onnx(padding=300_000)  # about 1.2 MB: a download of several chunks
    declared = pb.ModelSignature(
        inputs=[pb.TensorSpec(name="x", feature_references=["customer:tenure", "customer:spend", "customer:visits"])]
    )
    version = import_version(
        training,
        "imported",
        content,
        signature=declared,
        metrics={"roc_auc": 0.91},
        expected_sha256=hashlib.sha256(content).hexdigest(),
        expected_size_bytes=len(content),
        request_id="import-1",
        tags={"team": "risk"},
    )
    assert version.name == "models/imported/versions/1"
    assert version.source == pb.MODEL_VERSION_SOURCE_IMPORTED
    assert version.trained_by == caller(ALICE)[0][1]
    assert version.lineage.import_source == "git@example:churn.git@abc"
    assert version.metrics["roc_auc"] == pytest.approx(0.91)
    (x,) = version.signature.inputs
    assert (x.name, x.dtype, list(x.shape)) == ("x", pb.TENSOR_DATA_TYPE_FLOAT32, [-1, 3])
    assert list(x.feature_references) == ["customer:tenure", "customer:spend", "customer:visits"]
    assert [o.name for o in version.signature.outputs] == ["p"]
    assert version.artifact.sha256 == hashlib.sha256(content).hexdigest()
    assert version.artifact.size_bytes == len(content)
    assert version.artifact.key_id.startswith("kek-")
    assert get_model(training, "imported").task == pb.TASK_TYPE_BINARY_CLASSIFICATION

    # A retried import with the same request id registers nothing new.
    again = import_version(training, "imported", content, signature=declared, metrics={"roc_auc": 0.91},
                           expected_sha256=hashlib.sha256(content).hexdigest(), expected_size_bytes=len(content),
                           request_id="import-1", tags={"team": "risk"})  # fmt: skip
    assert again.name == version.name and get_model(training, "imported").latest_version_number == 1

    # At rest: neither the ONNX bytes nor any recognizable part of them.
    (stored,) = (training.data_dir / "artifacts" / "imported").glob("*.enc")
    on_disk = stored.read_bytes()
    assert content not in on_disk and GRAPH_NAME.encode() not in on_disk and b"sklearn-onnx-like" not in on_disk
    assert content[1000:1064] not in on_disk

    header, chunks = download(training, "models/imported/versions/1", chunk_size_bytes=256 * 1024)
    assert header.sha256 == version.artifact.sha256 and header.size_bytes == len(content)
    assert header.model_version == "models/imported/versions/1" and header.residency.region == "ae-dxb"
    assert b"".join(c.data for c in chunks) == content and len(chunks) > 4
    assert [c.offset for c in chunks] == list(range(0, len(content), 256 * 1024))
    _, resumed = download(training, "models/imported/versions/1", start_offset=700_001)
    assert b"".join(c.data for c in resumed) == content[700_001:] and resumed[0].offset == 700_001
    session = ort.InferenceSession(b"".join(c.data for c in chunks), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": np.zeros((2, 3), dtype=np.float32)})[0].shape == (2, 1)


def test_a_tampered_artifact_is_refused_and_audited(training: TrainingService) -> None:
    version = import_version(training, "tampered", external_onnx())
    (stored,) = (training.data_dir / "artifacts" / "tampered").glob("*.enc")
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0x01
    stored.write_bytes(bytes(data))

    error = rpc_error(lambda: download(training, version.name))
    assert error.code() == grpc.StatusCode.DATA_LOSS
    assert "altered" in error.details()
    (event,) = [e for e in training.audit.of_type(SecurityEvent.ARTIFACT_DIGEST_MISMATCH) if e["resource"] == version.name]
    assert event["allowed"] is False and event["action"] == "download"
    # The record is still readable; only the artifact is refused.
    assert training.stub.GetModelVersion(
        rr.GetModelVersionRequest(name=version.name), metadata=caller(ALICE), timeout=10
    ).model_version.name


@pytest.mark.parametrize(
    ("content", "header", "code", "reason"),
    [
        (b"not an onnx file at all", {}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ONNX"),
        (external_onnx(), {"expected_sha256": "0" * 64}, grpc.StatusCode.DATA_LOSS, "IMPORT_DIGEST_MISMATCH"),
        (external_onnx(), {"expected_size_bytes": 5}, grpc.StatusCode.INVALID_ARGUMENT, "IMPORT_SIZE_MISMATCH"),
        (
            external_onnx(),
            {"signature": pb.ModelSignature(inputs=[pb.TensorSpec(name="features")])},
            grpc.StatusCode.INVALID_ARGUMENT,
            "SIGNATURE_MISMATCH",
        ),
        (external_onnx(), {"residency": common_pb2.Residency(region="ae-auh")}, grpc.StatusCode.PERMISSION_DENIED, "RESIDENCY_VIOLATION"),
        (external_onnx(), {"task": pb.TASK_TYPE_UNSPECIFIED}, grpc.StatusCode.INVALID_ARGUMENT, "MODEL_NOT_FOUND_NEEDS_DETAILS"),
    ],
)
def test_a_bad_import_is_refused_and_registers_nothing(
    training: TrainingService, content: bytes, header: dict[str, Any], code: grpc.StatusCode, reason: str
) -> None:
    error = rpc_error(lambda: import_version(training, "refused", content, **header))
    assert (error.code(), error_reason(error)) == (code, reason)
    assert rpc_error(lambda: get_model(training, "refused")).code() == grpc.StatusCode.NOT_FOUND
    assert not list((training.data_dir / "artifacts").glob("refused/*.enc"))


def test_an_import_must_start_with_its_header(training: TrainingService) -> None:
    error = rpc_error(
        lambda: training.stub.ImportModelVersion(iter([rr.ImportModelVersionRequest(chunk=b"abc")]), metadata=caller(ALICE), timeout=10)
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error_reason(error) == "IMPORT_HEADER_MISSING"


def test_registered_models_are_created_listed_updated_and_deleted(training: TrainingService) -> None:
    stub = training.stub
    for name in ("crud-a", "crud-b", "crud-c"):
        stub.CreateRegisteredModel(
            rr.CreateRegisteredModelRequest(
                registered_model_id=name,
                registered_model=pb.RegisteredModel(
                    residency=common_pb2.Residency(region="ae-dxb"), task=pb.TASK_TYPE_REGRESSION, tags={"suite": "crud"}
                ),
            ),
            metadata=caller(ALICE),
            timeout=10,
        )
    duplicate = rpc_error(
        lambda: stub.CreateRegisteredModel(
            rr.CreateRegisteredModelRequest(
                registered_model_id="crud-a",
                registered_model=pb.RegisteredModel(residency=common_pb2.Residency(region="ae-dxb"), task=pb.TASK_TYPE_REGRESSION),
            ),
            metadata=caller(ALICE),
            timeout=10,
        )
    )
    assert duplicate.code() == grpc.StatusCode.ALREADY_EXISTS
    elsewhere = rpc_error(
        lambda: stub.CreateRegisteredModel(
            rr.CreateRegisteredModelRequest(
                registered_model_id="crud-auh",
                registered_model=pb.RegisteredModel(residency=common_pb2.Residency(region="ae-auh"), task=pb.TASK_TYPE_REGRESSION),
            ),
            metadata=caller(ALICE),
            timeout=10,
        )
    )
    assert elsewhere.code() == grpc.StatusCode.PERMISSION_DENIED

    seen, token = [], ""
    while True:
        page = stub.ListRegisteredModels(
            rr.ListRegisteredModelsRequest(page_size=2, page_token=token, tags={"suite": "crud"}), metadata=caller(ALICE), timeout=10
        )
        seen += [m.name for m in page.registered_models]
        token = page.next_page_token
        if not token:
            break
    assert seen == ["models/crud-a", "models/crud-b", "models/crud-c"]
    bad_token = rpc_error(
        lambda: stub.ListRegisteredModels(rr.ListRegisteredModelsRequest(page_token="garbage"), metadata=caller(ALICE), timeout=10)
    )
    assert bad_token.code() == grpc.StatusCode.INVALID_ARGUMENT

    current = get_model(training, "crud-a")
    assert current.owner == caller(ALICE)[0][1]
    changed = stub.UpdateRegisteredModel(
        rr.UpdateRegisteredModelRequest(
            registered_model=pb.RegisteredModel(
                name="models/crud-a", description="lifetime value", tags={"suite": "crud", "tier": "1"}, etag=current.etag
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["description", "tags"]),
        ),
        metadata=caller(BOB),
        timeout=10,
    ).registered_model
    assert changed.description == "lifetime value" and changed.tags["tier"] == "1" and changed.etag != current.etag
    assert changed.update_stamp.actor == caller(BOB)[0][1]
    stale = rpc_error(
        lambda: stub.UpdateRegisteredModel(
            rr.UpdateRegisteredModelRequest(
                registered_model=pb.RegisteredModel(name="models/crud-a", description="x", etag=current.etag),
                update_mask=field_mask_pb2.FieldMask(paths=["description"]),
            ),
            metadata=caller(BOB),
            timeout=10,
        )
    )
    assert stale.code() == grpc.StatusCode.ABORTED
    immutable = rpc_error(
        lambda: stub.UpdateRegisteredModel(
            rr.UpdateRegisteredModelRequest(
                registered_model=pb.RegisteredModel(name="models/crud-a", residency=common_pb2.Residency(region="ae-auh")),
                update_mask=field_mask_pb2.FieldMask(paths=["residency"]),
            ),
            metadata=caller(BOB),
            timeout=10,
        )
    )
    assert immutable.code() == grpc.StatusCode.INVALID_ARGUMENT

    deleted = stub.DeleteRegisteredModel(rr.DeleteRegisteredModelRequest(name="models/crud-b"), metadata=caller(ALICE), timeout=10)
    assert deleted.versions_deleted == 0
    assert rpc_error(lambda: get_model(training, "crud-b")).code() == grpc.StatusCode.NOT_FOUND


def test_aliases_point_at_versions_and_guard_what_they_point_at(training: TrainingService) -> None:
    stub = training.stub
    first = import_version(training, "aliased", external_onnx())
    second = import_version(training, "aliased", external_onnx(weights=(0.1, 0.2, 0.3)), description="retrained")
    assert second.version_number == 2
    model = stub.SetModelAlias(
        rr.SetModelAliasRequest(registered_model="models/aliased", alias="staging", model_version=second.name),
        metadata=caller(ALICE),
        timeout=10,
    ).registered_model
    assert dict(model.aliases) == {"staging": second.name}
    stub.SetModelAlias(
        rr.SetModelAliasRequest(registered_model="models/aliased", alias="challenger", model_version=first.name),
        metadata=caller(ALICE),
        timeout=10,
    )
    by_alias = stub.GetModelVersion(rr.GetModelVersionRequest(name="models/aliased/versions/staging"), metadata=caller(ALICE), timeout=10)
    assert by_alias.model_version.name == second.name and list(by_alias.model_version.aliases) == ["staging"]
    missing = rpc_error(
        lambda: stub.GetModelVersion(rr.GetModelVersionRequest(name="models/aliased/versions/champion"), metadata=caller(ALICE), timeout=10)
    )
    assert missing.code() == grpc.StatusCode.NOT_FOUND

    protected = rpc_error(
        lambda: stub.SetModelAlias(
            rr.SetModelAliasRequest(registered_model="models/aliased", alias="production", model_version=second.name),
            metadata=caller(ALICE),
            timeout=10,
        )
    )
    assert protected.code() == grpc.StatusCode.FAILED_PRECONDITION and error_reason(protected) == "PROTECTED_ALIAS"
    bad_alias = rpc_error(
        lambda: stub.SetModelAlias(
            rr.SetModelAliasRequest(registered_model="models/aliased", alias="Bad Alias", model_version=second.name),
            metadata=caller(ALICE),
            timeout=10,
        )
    )
    assert bad_alias.code() == grpc.StatusCode.INVALID_ARGUMENT

    aliased_delete = rpc_error(
        lambda: stub.DeleteModelVersion(rr.DeleteModelVersionRequest(name=second.name), metadata=caller(ALICE), timeout=10)
    )
    assert aliased_delete.code() == grpc.StatusCode.FAILED_PRECONDITION
    archive = rr.UpdateModelVersionRequest(
        model_version=pb.ModelVersion(name=first.name, state=pb.MODEL_VERSION_STATE_ARCHIVED),
        update_mask=field_mask_pb2.FieldMask(paths=["state"]),
    )
    assert (
        rpc_error(lambda: stub.UpdateModelVersion(archive, metadata=caller(ALICE), timeout=10)).code()
        == grpc.StatusCode.FAILED_PRECONDITION
    )
    stub.DeleteModelAlias(
        rr.DeleteModelAliasRequest(registered_model="models/aliased", alias="challenger"), metadata=caller(ALICE), timeout=10
    )
    archived = stub.UpdateModelVersion(archive, metadata=caller(ALICE), timeout=10).model_version
    assert archived.state == pb.MODEL_VERSION_STATE_ARCHIVED
    ready = stub.ListModelVersions(
        rr.ListModelVersionsRequest(parent="models/aliased", state=pb.MODEL_VERSION_STATE_READY), metadata=caller(ALICE), timeout=10
    ).model_versions
    assert [v.name for v in ready] == [second.name]
    listed = stub.ListModelVersions(rr.ListModelVersionsRequest(parent="models/aliased", page_size=1), metadata=caller(ALICE), timeout=10)
    assert [v.name for v in listed.model_versions] == [second.name] and listed.next_page_token

    stub.DeleteModelVersion(rr.DeleteModelVersionRequest(name=first.name), metadata=caller(ALICE), timeout=10)
    assert len(list((training.data_dir / "artifacts" / "aliased").glob("*.enc"))) == 1
    with_versions = rpc_error(
        lambda: stub.DeleteRegisteredModel(rr.DeleteRegisteredModelRequest(name="models/aliased"), metadata=caller(ALICE), timeout=10)
    )
    assert with_versions.code() == grpc.StatusCode.FAILED_PRECONDITION and error_reason(with_versions) == "MODEL_HAS_VERSIONS"
    forced = stub.DeleteRegisteredModel(
        rr.DeleteRegisteredModelRequest(name="models/aliased", force=True), metadata=caller(ALICE), timeout=10
    )
    assert forced.versions_deleted == 1
    assert not list((training.data_dir / "artifacts" / "aliased").glob("*.enc"))


def request_promotion(service: TrainingService, version: str, who: str = ALICE) -> pb.PromotionRequest:
    model = "/".join(version.split("/")[:2])
    return service.stub.CreatePromotionRequest(
        rr.CreatePromotionRequestRequest(parent=model, model_version=version, alias="production", justification="better AUC"),
        metadata=caller(who),
        timeout=10,
    ).promotion_request


def test_promotion_to_production_needs_another_identity_and_is_audited(training: TrainingService) -> None:
    stub = training.stub
    version = import_version(training, "promoted", external_onnx())  # alice trained (imported) it
    pending = request_promotion(training, version.name)
    assert pending.state == pb.PROMOTION_REQUEST_STATE_PENDING and pending.trained_by == caller(ALICE)[0][1]

    refused = rpc_error(
        lambda: stub.ApprovePromotionRequest(rr.ApprovePromotionRequestRequest(name=pending.name), metadata=caller(ALICE), timeout=10)
    )
    assert refused.code() == grpc.StatusCode.PERMISSION_DENIED and error_reason(refused) == "SEPARATION_OF_DUTIES"
    (denial,) = [e for e in training.audit.of_type(SecurityEvent.MODEL_APPROVED) if e["resource"] == pending.name]
    assert denial["allowed"] is False and denial["caller"] == caller(ALICE)[0][1]
    assert "production" not in get_model(training, "promoted").aliases
    self_reject = rpc_error(
        lambda: stub.RejectPromotionRequest(
            rr.RejectPromotionRequestRequest(name=pending.name, comment="no"), metadata=caller(ALICE), timeout=10
        )
    )
    assert self_reject.code() == grpc.StatusCode.PERMISSION_DENIED

    # The audit log being down stops the approval: nothing moves unrecorded.
    training.audit.fail = True
    try:
        down = rpc_error(
            lambda: stub.ApprovePromotionRequest(rr.ApprovePromotionRequestRequest(name=pending.name), metadata=caller(BOB), timeout=10)
        )
    finally:
        training.audit.fail = False
    assert down.code() == grpc.StatusCode.UNAVAILABLE
    assert "production" not in get_model(training, "promoted").aliases

    approved = stub.ApprovePromotionRequest(
        rr.ApprovePromotionRequestRequest(name=pending.name, comment="reviewed", request_id="approve-1"), metadata=caller(BOB), timeout=10
    )
    assert approved.promotion_request.state == pb.PROMOTION_REQUEST_STATE_APPROVED
    assert approved.promotion_request.decision_stamp.actor == caller(BOB)[0][1]
    assert dict(approved.registered_model.aliases) == {"production": version.name}
    assert training.api.store.resolve_alias("promoted", "production") == 1
    events = [e for e in training.audit.events if e["allowed"] and e["caller"] == caller(BOB)[0][1]]
    assert [(e["type"], e["resource"]) for e in events[-2:]] == [
        (SecurityEvent.MODEL_APPROVED, pending.name),
        (SecurityEvent.MODEL_PROMOTED, version.name),
    ]
    again = stub.ApprovePromotionRequest(
        rr.ApprovePromotionRequestRequest(name=pending.name, comment="reviewed", request_id="approve-1"), metadata=caller(BOB), timeout=10
    )
    assert again == approved  # a retried approval answers the same, records nothing new
    decided = rpc_error(
        lambda: stub.ApprovePromotionRequest(rr.ApprovePromotionRequestRequest(name=pending.name), metadata=caller(BOB), timeout=10)
    )
    assert decided.code() == grpc.StatusCode.FAILED_PRECONDITION

    # The production version cannot be deleted, nor its model, even forced.
    assert (
        rpc_error(
            lambda: stub.DeleteRegisteredModel(
                rr.DeleteRegisteredModelRequest(name="models/promoted", force=True), metadata=caller(BOB), timeout=10
            )
        ).code()
        == grpc.StatusCode.FAILED_PRECONDITION
    )
    unprotected = rpc_error(
        lambda: stub.CreatePromotionRequest(
            rr.CreatePromotionRequestRequest(parent="models/promoted", model_version=version.name, alias="staging"),
            metadata=caller(ALICE),
            timeout=10,
        )
    )
    assert unprotected.code() == grpc.StatusCode.INVALID_ARGUMENT

    # A second version: rejection needs a comment; only the requester may withdraw.
    second = import_version(training, "promoted", external_onnx(weights=(0.3, 0.3, 0.3)), who=BOB)
    other = request_promotion(training, second.name, who=BOB)
    no_comment = rpc_error(
        lambda: stub.RejectPromotionRequest(rr.RejectPromotionRequestRequest(name=other.name), metadata=caller(ALICE), timeout=10)
    )
    assert no_comment.code() == grpc.StatusCode.INVALID_ARGUMENT
    not_requester = rpc_error(
        lambda: stub.CancelPromotionRequest(rr.CancelPromotionRequestRequest(name=other.name), metadata=caller(ALICE), timeout=10)
    )
    assert not_requester.code() == grpc.StatusCode.PERMISSION_DENIED
    rejected = stub.RejectPromotionRequest(
        rr.RejectPromotionRequestRequest(name=other.name, comment="needs a fairness review"), metadata=caller(ALICE), timeout=10
    ).promotion_request
    assert rejected.state == pb.PROMOTION_REQUEST_STATE_REJECTED and rejected.previous_model_version == version.name
    queue = stub.ListPromotionRequests(
        rr.ListPromotionRequestsRequest(parent="models/-", state=pb.PROMOTION_REQUEST_STATE_APPROVED), metadata=caller(BOB), timeout=10
    ).promotion_requests
    assert pending.name in [r.name for r in queue] and other.name not in [r.name for r in queue]


def test_a_trained_version_is_registered_and_promoted_on_this_backend(training: TrainingService) -> None:
    job = train(training, job_spec(write_dataset(training, "backend", classification_table()), "backend", epochs=3))
    assert job.state == pb.TRAINING_JOB_STATE_SUCCEEDED, job.failure
    pending = request_promotion(training, job.model_version)
    approved = training.stub.ApprovePromotionRequest(rr.ApprovePromotionRequestRequest(name=pending.name), metadata=caller(BOB), timeout=10)
    assert dict(approved.registered_model.aliases) == {"production": job.model_version}
    header, chunks = download(training, "models/backend/versions/production")
    assert hashlib.sha256(b"".join(c.data for c in chunks)).hexdigest() == header.sha256 == job.export_result.onnx_sha256
