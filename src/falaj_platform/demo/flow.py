"""`falaj demo`: the whole platform end to end on the embedded default, with progress.

PKI -> stack -> ingest (with quarantine) -> features (materialized) -> two training jobs
-> approval by a second identity -> deployment -> canary and promotion -> traffic from a
stock tritonclient -> an A-B experiment -> drift and its alert -> erasure of a data
subject -> audit-chain verification -> summary. Every call goes through the gateway over
mTLS with the SDK (`falaj.sdk.connect`), as an enterprise application would make it.

Every resource is named after a per-run id, so running the demo again builds a fresh
set beside the last one; request ids make every write of a run idempotent.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pyarrow as pa
from cryptography import x509
from google.protobuf import duration_pb2, field_mask_pb2, timestamp_pb2

from falaj.common.v1 import common_pb2
from falaj.experiments.v1 import message_pb2 as em
from falaj.experiments.v1 import request_response_pb2 as er
from falaj.features.v1 import message_pb2 as fm
from falaj.features.v1 import request_response_pb2 as fr
from falaj.gateway.v1 import message_pb2 as gm
from falaj.gateway.v1 import request_response_pb2 as gr
from falaj.ingest.v1 import message_pb2 as im
from falaj.ingest.v1 import request_response_pb2 as ir
from falaj.monitoring.v1 import message_pb2 as mm
from falaj.monitoring.v1 import request_response_pb2 as mr
from falaj.sdk import Falaj, FalajError, PermissionDenied, ServiceClient, Unimplemented, connect
from falaj.serving.v1 import message_pb2 as sm
from falaj.serving.v1 import request_response_pb2 as sr
from falaj.training.v1 import message_pb2 as tm
from falaj.training.v1 import request_response_pb2 as tr
from falaj_platform.demo import data as demo_data
from falaj_platform.demo.progress import Progress, ServiceMissing, StepFailed
from falaj_platform.runtime.identity import client_id
from falaj_platform.runtime.settings import COMPONENTS, GATEWAY
from falaj_platform.stack import Stack

if TYPE_CHECKING:
    from falaj.experiments.v1.service_pb2_grpc import ExperimentsServiceStub
    from falaj.features.v1.service_pb2_grpc import FeaturesServiceStub
    from falaj.gateway.v1.service_pb2_grpc import GatewayAdminServiceStub
    from falaj.ingest.v1.service_pb2_grpc import IngestServiceStub
    from falaj.monitoring.v1.service_pb2_grpc import MonitoringServiceStub
    from falaj.serving.v1.service_pb2_grpc import ServingServiceStub
    from falaj.training.v1.service_pb2_grpc import TrainingServiceStub

APPROVER = "approver"
APPROVER_ROLE = "ml-engineer"
TRITON_SCRIPT = Path(__file__).with_name("triton_client.py")
WINDOW_ROWS = 100
CONSENT_WITHDRAWN = 4
CALL_TIMEOUT = 60.0


# -- clients that say which service answered UNIMPLEMENTED -----------------------------------------


class _Tagged:
    """A service client whose UNIMPLEMENTED answers name the service and method."""

    def __init__(self, service: str, client: ServiceClient):
        self._service = service
        self._client = client

    def __getattr__(self, method: str) -> Callable[..., Any]:
        call = getattr(self._client, method)
        service = self._service

        def tagged(*args: Any, **kwargs: Any) -> Any:
            try:
                result = call(*args, **kwargs)
            except Unimplemented as error:
                raise ServiceMissing(service, method, error) from None
            if isinstance(result, Iterator):
                return _tagged_stream(service, method, result)
            return result

        return tagged


def _tagged_stream(service: str, method: str, responses: Iterator[Any]) -> Iterator[Any]:
    try:
        yield from responses
    except Unimplemented as error:
        raise ServiceMissing(service, method, error) from None


class Platform:
    """The SDK connection of one identity, with typed clients per service."""

    def __init__(self, falaj: Falaj):
        self.falaj = falaj

    def _client(self, service: str) -> Any:
        return _Tagged(service, self.falaj.client(service))

    @property
    def ingest(self) -> IngestServiceStub:
        return cast("IngestServiceStub", self._client("ingest"))

    @property
    def features(self) -> FeaturesServiceStub:
        return cast("FeaturesServiceStub", self._client("features"))

    @property
    def training(self) -> TrainingServiceStub:
        return cast("TrainingServiceStub", self._client("training"))

    @property
    def serving(self) -> ServingServiceStub:
        return cast("ServingServiceStub", self._client("serving"))

    @property
    def experiments(self) -> ExperimentsServiceStub:
        return cast("ExperimentsServiceStub", self._client("experiments"))

    @property
    def monitoring(self) -> MonitoringServiceStub:
        return cast("MonitoringServiceStub", self._client("monitoring"))

    @property
    def gateway(self) -> GatewayAdminServiceStub:
        return cast("GatewayAdminServiceStub", self._client("gateway"))

    def close(self) -> None:
        self.falaj.close()


# -- small helpers ---------------------------------------------------------------------------------


def _run_id() -> str:
    """7 base-36 digits of the time in tenths of a second: unique per run, sortable by eye."""
    number, digits = int(time.time() * 10), ""
    while number:
        number, rest = divmod(number, 36)
        digits = "0123456789abcdefghijklmnopqrstuvwxyz"[rest] + digits
    return digits[-7:]


def _timestamp(moment: dt.datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def _seconds(value: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(value * 1e9))
    return duration


def _enum(message_enum: Any, value: int, prefix: str) -> str:
    return str(message_enum.Name(value)).removeprefix(prefix)


def _wait(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.25) -> Any:
    """Poll `check` until it returns something truthy; StepFailed after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise StepFailed(f"{what} did not happen within {timeout:.0f}s")
        time.sleep(interval)


def _version_number(model_version: str) -> str:
    return model_version.rsplit("/", 1)[-1]


@dataclass
class TrainedModel:
    label: str
    job: tm.TrainingJob
    version: tm.ModelVersion

    @property
    def name(self) -> str:
        return self.version.name

    @property
    def metrics(self) -> tm.ClassificationMetrics:
        return self.job.evaluation.classification


@dataclass
class DemoState:
    """What the steps made, for the steps after them and the summary."""

    run: str
    region: str
    data: demo_data.DemoData
    dataset: str = ""
    dataset_version: str = ""
    quarantined: int = 0
    feature_view: str = ""
    feature_service: str = ""
    model: str = ""
    first: TrainedModel | None = None
    second: TrainedModel | None = None
    deployment: str = ""
    monitored_answers: int = 0  # answers of the monitored version, which serving logs to monitoring
    monitor: str = ""
    experiment: str = ""
    report_path: Path | None = None
    facts: dict[str, str] = field(default_factory=dict)


# -- the flow ---------------------------------------------------------------------------------------


class Demo:
    """The steps of `falaj demo`, each returning its result lines."""

    def __init__(self, stack: Stack):
        self.stack = stack
        now = dt.datetime.now(dt.UTC)
        self.state = DemoState(run=_run_id(), region=stack.env.get("FALAJ_REGION", "ae-dxb"), data=demo_data.load(now))
        self.started = now
        self._admin: Platform | None = None
        self._approver: Platform | None = None

    # connections ------------------------------------------------------------------------------
    @property
    def admin(self) -> Platform:
        if self._admin is None:
            paths = self.stack.admin
            self._admin = Platform(connect(self.stack.addr(GATEWAY), paths.cert, paths.key, paths.ca_cert))
        return self._admin

    @property
    def approver(self) -> Platform:
        if self._approver is None:
            folder = self.stack.pki.client_dir(APPROVER)
            self._approver = Platform(
                connect(self.stack.addr(GATEWAY), folder / "cert.pem", folder / "key.pem", self.stack.pki.ca_cert_path)
            )
        return self._approver

    def close(self) -> None:
        for platform in (self._admin, self._approver):
            if platform is not None:
                platform.close()

    def rid(self, what: str) -> str:
        return f"demo-{self.state.run}-{what}"

    # 1. PKI -----------------------------------------------------------------------------------------
    def pki(self) -> list[str]:
        issued = self.stack.pki.init()
        lines = [f"issued {', '.join(issued)}" if issued else "existing certificates are still valid"]
        folder = self.stack.pki.client_dir(APPROVER)
        if self._approver_valid(folder):
            lines.append(f"second identity {client_id(APPROVER)} (role {APPROVER_ROLE}) is still valid")
        else:
            identity = self.stack.pki.issue_client(APPROVER, role=APPROVER_ROLE)
            lines.append(f"issued a second identity {identity.spiffe_id} (role {APPROVER_ROLE}) to approve models")
        return lines

    def _approver_valid(self, folder: Path) -> bool:
        try:
            info = json.loads((folder / "identity.json").read_text())
            cert = x509.load_pem_x509_certificate((folder / "cert.pem").read_bytes())
            ca = x509.load_pem_x509_certificate(self.stack.pki.ca_cert_path.read_bytes())
        except (FileNotFoundError, ValueError):
            return False
        fresh = cert.not_valid_after_utc - dt.datetime.now(dt.UTC) > dt.timedelta(days=1)
        return bool(info.get("role") == APPROVER_ROLE and cert.issuer == ca.subject and fresh and (folder / "key.pem").exists())

    # 2. stack -------------------------------------------------------------------------------------------
    def start_stack(self) -> list[str]:
        rows = self.stack.up()
        serving = [r.name for r in rows if r.health == "SERVING"]
        if len(serving) != len(rows):
            raise StepFailed(", ".join(f"{r.name}={r.health}" for r in rows))
        return [f"{len(serving)} components SERVING over mTLS; gateway at {self.stack.addr(GATEWAY)}; run id {self.state.run}"]

    # 3. ingest -------------------------------------------------------------------------------------------
    def ingest(self) -> list[str]:
        state, data = self.state, self.state.data
        dataset = im.Dataset(
            display_name="Breast cancer (Wisconsin diagnostic)",
            description="scikit-learn's bundled breast-cancer data as patient scans: 30 measurements and the diagnosis",
            owner=client_id("admin"),
            residency=common_pb2.Residency(region=state.region),
            schema=demo_data.schema(data.features),
            cleansing=im.CleansingPolicy(coerce_types=True, trim_strings=True, null_tokens=["", "NA"]),
            labels={"falaj-demo": state.run},
        )
        created = self.admin.ingest.CreateDataset(
            ir.CreateDatasetRequest(dataset=dataset, dataset_id=f"breast-cancer-{state.run}", request_id=self.rid("dataset")),
            timeout=CALL_TIMEOUT,
        ).dataset
        state.dataset = created.name
        header = ir.IngestStreamHeader(
            dataset=created.name,
            request_id=self.rid("ingest"),
            expected_schema_version=created.schema_version,
            source_description="falaj demo: sklearn breast-cancer data",
        )
        messages = [ir.IngestBatchesRequest(header=header)]
        messages += [ir.IngestBatchesRequest(batch=demo_data.arrow_batch(t, self.rid(f"batch-{i}"))) for i, t in enumerate(data.stream)]
        ingestion = self.admin.ingest.IngestBatches(iter(messages), timeout=CALL_TIMEOUT).ingestion
        if ingestion.state != im.INGESTION_STATE_SUCCEEDED:
            raise StepFailed(f"ingestion {ingestion.name} ended {im.IngestionState.Name(ingestion.state)}: {ingestion.error_message}")
        state.dataset_version = ingestion.dataset_version
        report = ingestion.report
        state.quarantined = int(report.rows_quarantined)
        reasons = ", ".join(
            f"{_enum(im.ValidationRule, v.rule, 'VALIDATION_RULE_')}{'(' + v.column + ')' if v.column else ''} {v.row_count}"
            for v in report.quarantined_by_reason
        )
        granted, withdrawn = self._consent()
        state.facts["dataset"] = f"{ingestion.dataset_version} ({report.rows_accepted} rows; {report.rows_quarantined} in quarantine)"
        return [
            f"{ingestion.dataset_version}: {report.rows_in} rows in, {report.rows_accepted} accepted, "
            f"{report.rows_quarantined} quarantined, {report.batches_received} Arrow batches over one gRPC stream",
            f"quarantined by reason: {reasons or 'none'}",
            "cleansing: "
            + (
                ", ".join(
                    f"{_enum(im.CleansingAction, c.action, 'CLEANSING_ACTION_')}({c.column}) {c.value_count}"
                    for c in report.cleansing_actions
                )
                or "nothing to do"
            ),
            f"planted: {'; '.join(data.bad_reasons)}",
            f"consent to training recorded for {granted} patients; {len(withdrawn)} withdrew it ({', '.join(withdrawn)})",
        ]

    def _consent(self) -> tuple[int, list[str]]:
        """Training needs each data subject's consent (checked by features at retrieval):
        grant it for every ingested patient, then have a few withdraw."""
        data = self.state.data
        patients = [int(p) for p in data.ingested.column(demo_data.ENTITY_KEY).to_pylist()]
        ingest = self.admin.ingest

        def grant(patient: int) -> None:
            ingest.RecordConsent(
                ir.RecordConsentRequest(
                    subject_id=demo_data.subject_of(patient),
                    purpose=im.CONSENT_PURPOSE_TRAINING,
                    evidence=f"intake form {patient}",
                    request_id=self.rid(f"consent-{patient}"),
                ),
                timeout=CALL_TIMEOUT,
            )

        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(grant, patients))
        withdrawn = [demo_data.subject_of(p) for p in patients[-CONSENT_WITHDRAWN:]]
        for subject in withdrawn:
            ingest.WithdrawConsent(
                ir.WithdrawConsentRequest(
                    subject_id=subject,
                    purpose=im.CONSENT_PURPOSE_TRAINING,
                    evidence="withdrawal letter",
                    request_id=self.rid(f"withdraw-{subject}"),
                ),
                timeout=CALL_TIMEOUT,
            )
        return len(patients), withdrawn

    # 4. features -------------------------------------------------------------------------------------------
    def features(self) -> list[str]:
        state, data = self.state, self.state.data
        name = f"breast_cancer_{state.run}"
        entity = fm.Entity(
            name="entities/patient",
            join_keys=[fm.JoinKey(name=demo_data.ENTITY_KEY, value_type=fm.VALUE_TYPE_INT64)],
            description="A patient whose breast mass was scanned",
        )
        view = fm.FeatureView(
            name=f"featureViews/{name}",
            entities=[entity.name],
            source=fm.DatasetSource(dataset=state.dataset),
            features=[fm.Feature(name=f, value_type=fm.VALUE_TYPE_DOUBLE) for f in data.features],
            online=True,
            residency=common_pb2.Residency(region=state.region),
            description="The 30 scan measurements per patient",
            tags={"falaj-demo": state.run},
        )
        service = fm.FeatureService(
            name=f"featureServices/{name}",
            projections=[fm.FeatureViewProjection(feature_view=view.name)],
            description="Inputs of the breast-cancer diagnosis models",
            tags={"falaj-demo": state.run},
        )
        applied = self.admin.features.ApplyFeatureDefinitions(
            fr.ApplyFeatureDefinitionsRequest(
                definitions=fm.FeatureDefinitions(entities=[entity], feature_views=[view], feature_services=[service]),
                request_id=self.rid("features"),
            ),
            timeout=CALL_TIMEOUT,
        )
        changes = ", ".join(f"{c.name} {_enum(fm.ApplyAction, c.action, 'APPLY_ACTION_').lower()}" for c in applied.changes)
        state.feature_view, state.feature_service = view.name, service.name
        run = self.admin.features.Materialize(
            fr.MaterializeRequest(feature_views=[view.name], mode=fm.MATERIALIZATION_MODE_FULL, request_id=self.rid("materialize")),
            timeout=120,
        ).materialization
        if run.state != fm.MATERIALIZATION_STATE_SUCCEEDED:
            raise StepFailed(f"{run.name} ended {fm.MaterializationState.Name(run.state)}: {run.error_message}")
        patient = int(data.ingested.column(demo_data.ENTITY_KEY)[1].as_py())
        online = self.admin.features.GetOnlineFeatures(
            fr.GetOnlineFeaturesRequest(
                features=fm.FeatureSelection(features=fm.FeatureReferences(references=[f"{name}:mean_radius", f"{name}:worst_area"])),
                entities={demo_data.ENTITY_KEY: fm.ValueColumn(values=[fm.Value(int64_value=patient)])},
            ),
            timeout=CALL_TIMEOUT,
        )
        values = ", ".join(
            f"{n}={c.values[0].double_value:.2f}"
            if c.statuses[0] == fm.FIELD_STATUS_PRESENT
            else f"{n} {fm.FieldStatus.Name(c.statuses[0])}"
            for n, c in zip(online.feature_names, online.columns, strict=True)
        )
        state.facts["features"] = f"{service.name} over {view.name} (30 features, online)"
        return [
            f"applied: {changes}",
            f"{run.name}: {run.rows_written} rows written to the online store",
            f"online read of patient {patient}: {values}",
        ]

    # 5. training ----------------------------------------------------------------------------------------------
    def _spec(self, family: int, *, epochs: int, learning_rate: float, optimizer: int, alias: str, gate: bool) -> tm.TrainingJobSpec:
        state = self.state
        spec = tm.TrainingJobSpec(
            data=tm.TrainingDataSpec(
                feature_service=state.feature_service,
                entities=tm.EntityFrame(dataset_version=state.dataset_version),
                label_column=demo_data.LABEL,
                split=tm.SplitSpec(strategy=tm.SPLIT_STRATEGY_STRATIFIED, validation_fraction=0.15, holdout_fraction=0.2),
                preprocessing=tm.Preprocessing(standardize_numeric=True),
            ),
            task=tm.TASK_TYPE_BINARY_CLASSIFICATION,
            model=tm.ModelSpec(family=family),  # type: ignore[arg-type]
            hyperparameters=tm.Hyperparameters(
                optimizer=optimizer,  # type: ignore[arg-type]
                learning_rate=learning_rate,
                epochs=epochs,
                batch_size=64,
            ),
            seed=7,  # the same seed: the same split, so both are evaluated on the same held-out rows
            resources=tm.ResourceSpec(device=tm.DEVICE_TYPE_CPU, cpu_threads_per_process=1),
            registration=tm.RegistrationSpec(
                registered_model=state.model, description=f"falaj demo {state.run}", aliases=[alias], tags={"falaj-demo": state.run}
            ),
            code_version=f"falaj demo {state.run}",
            timeout=_seconds(300),
        )
        if family == tm.MODEL_FAMILY_MLP:
            spec.model.mlp.CopyFrom(tm.MlpConfig(hidden_sizes=[32, 16], activation=tm.ACTIVATION_RELU))
        if gate:
            spec.evaluation.gate.CopyFrom(
                tm.PromotionGate(
                    baseline_alias="baseline", metric="log_loss", direction=tm.METRIC_DIRECTION_LOWER_IS_BETTER, min_improvement=0.0
                )
            )
        return spec

    def _train(self, label: str, job_id: str, spec: tm.TrainingJobSpec) -> TrainedModel:
        training = self.admin.training
        job = training.CreateTrainingJob(
            tr.CreateTrainingJobRequest(
                training_job=tm.TrainingJob(display_name=label, spec=spec, labels={"falaj-demo": self.state.run}),
                training_job_id=job_id,
                request_id=self.rid(job_id),
            ),
            timeout=CALL_TIMEOUT,
        ).training_job
        final = {tm.TRAINING_JOB_STATE_SUCCEEDED, tm.TRAINING_JOB_STATE_FAILED, tm.TRAINING_JOB_STATE_CANCELLED}

        def finished() -> tm.TrainingJob | None:
            current = training.GetTrainingJob(tr.GetTrainingJobRequest(name=job.name), timeout=CALL_TIMEOUT).training_job
            return current if current.state in final else None

        done: tm.TrainingJob = _wait(f"{job.name} finishing", finished, timeout=240, interval=0.5)
        if done.state != tm.TRAINING_JOB_STATE_SUCCEEDED:
            failure = done.failure
            raise StepFailed(
                f"{label} ({done.name}) {tm.TrainingJobState.Name(done.state)}: "
                f"{_enum(tm.FailureReason, failure.reason, 'FAILURE_REASON_')} {failure.message}"
            )
        if not done.model_version:
            raise StepFailed(f"{label} ({done.name}) registered no model version: {done.gate_result.reason}")
        version = training.GetModelVersion(tr.GetModelVersionRequest(name=done.model_version), timeout=CALL_TIMEOUT).model_version
        return TrainedModel(label, done, version)

    def train(self) -> list[str]:
        state = self.state
        state.model = f"models/breast-cancer-{state.run}"
        state.first = self._train(
            "logistic regression",
            f"lr-{state.run}",
            self._spec(
                tm.MODEL_FAMILY_LOGISTIC_REGRESSION, epochs=3, learning_rate=0.01, optimizer=tm.OPTIMIZER_SGD, alias="baseline", gate=False
            ),
        )
        state.second = self._train(
            "MLP [32, 16]",
            f"mlp-{state.run}",
            self._spec(tm.MODEL_FAMILY_MLP, epochs=40, learning_rate=0.003, optimizer=tm.OPTIMIZER_ADAM, alias="challenger", gate=True),
        )
        lines = []
        for trained in (state.first, state.second):
            metrics, summary, job = trained.metrics, trained.job.data_summary, trained.job
            took = job.end_time.ToDatetime() - job.start_time.ToDatetime() if job.end_time.seconds and job.start_time.seconds else None
            lines.append(
                f"{trained.label}: {trained.name} roc_auc {metrics.roc_auc:.3f}, log_loss {metrics.log_loss:.3f}, "
                f"accuracy {metrics.accuracy:.3f} on {job.evaluation.rows} held-out rows "
                f"({summary.train_rows} train / {summary.validation_rows} validation"
                + (f", {took.total_seconds():.1f}s" if took else "")
                + f"); ONNX parity {'passed' if job.export_result.parity.passed else 'FAILED'}"
            )
        gate = state.second.job.gate_result
        lines.append(f"promotion gate of the MLP against the baseline: {'passed' if gate.passed else 'NOT passed'} - {gate.reason}")
        better = state.second.metrics.log_loss < state.first.metrics.log_loss
        lines.append(
            "the MLP is the better model (lower held-out log loss)" if better else "the MLP is NOT better than the baseline on this run"
        )
        excluded = state.second.job.data_summary.rows_excluded_without_consent
        lines.append(
            f"training set: point-in-time join from {state.feature_service}; {excluded} rows left out for lack of consent; "
            f"trained by {state.second.version.trained_by}"
        )
        state.facts["models"] = (
            f"{state.first.name} (logistic regression), {state.second.name} (MLP); trained by {state.second.version.trained_by}"
        )
        return lines

    # 6. approval and deployment ------------------------------------------------------------------------------
    def _wait_bound(self) -> None:
        """The gateway binds a newly issued identity to its role at its next reload (~2 s)."""
        request = gr.CheckAccessRequest(
            subject=client_id(APPROVER),
            domain=self.state.region,
            object="/falaj.training.v1.TrainingService/ApprovePromotionRequest",
            action="write",
        )
        _wait(
            f"the gateway binding {client_id(APPROVER)} to {APPROVER_ROLE}",
            lambda: self.admin.gateway.CheckAccess(request, timeout=CALL_TIMEOUT).decision == gm.DECISION_ALLOW,
            timeout=15,
            interval=0.5,
        )

    def _promote(self, version: str, justification: str) -> tuple[tm.PromotionRequest, str]:
        """Ask (as admin, the trainer) to move `production`; the approver approves. Returns the
        approved request and what happened when the trainer tried to approve it."""
        model = self.state.model
        request = self.admin.training.CreatePromotionRequest(
            tr.CreatePromotionRequestRequest(
                parent=model,
                model_version=version,
                alias="production",
                justification=justification,
                request_id=self.rid(f"promote-{_version_number(version)}"),
            ),
            timeout=CALL_TIMEOUT,
        ).promotion_request
        try:
            self.admin.training.ApprovePromotionRequest(tr.ApprovePromotionRequestRequest(name=request.name), timeout=CALL_TIMEOUT)
            self_approval = "the trainer's own approval was ACCEPTED (separation of duties not enforced)"
        except PermissionDenied as error:
            self_approval = f"the trainer's own approval was refused ({error.reason})"
        approved = self.approver.training.ApprovePromotionRequest(
            tr.ApprovePromotionRequestRequest(
                name=request.name, comment="reviewed the held-out metrics", request_id=self.rid(f"approve-{_version_number(version)}")
            ),
            timeout=CALL_TIMEOUT,
        )
        if approved.registered_model.aliases.get("production") != version:
            raise StepFailed(f"production points at {approved.registered_model.aliases.get('production')!r}, not {version}")
        return approved.promotion_request, self_approval

    def _deployment_ready(self, name: str) -> sm.Deployment:
        def ready() -> sm.Deployment | None:
            deployment = self.admin.serving.GetDeployment(sr.GetDeploymentRequest(name=name), timeout=CALL_TIMEOUT).deployment
            if deployment.state == sm.DEPLOYMENT_STATE_FAILED:
                raise StepFailed(f"{name} FAILED: {deployment.state_reason}")
            routes_ready = bool(deployment.route_statuses) and all(
                r.served_model_state == sm.SERVED_MODEL_STATE_READY for r in deployment.route_statuses
            )
            # a canary in progress keeps the deployment UPDATING while both routes serve
            serving = deployment.state in (sm.DEPLOYMENT_STATE_READY, sm.DEPLOYMENT_STATE_UPDATING)
            return deployment if serving and routes_ready else None

        found: sm.Deployment = _wait(f"{name} becoming READY", ready, timeout=120, interval=0.5)
        return found

    def _retire_earlier_runs(self) -> int:
        """Delete the deployments earlier demo runs left behind, so that serving does not keep
        their models loaded run after run. Nothing else of theirs is touched."""
        serving, token, retired = self.admin.serving, "", 0
        while True:
            page = serving.ListDeployments(sr.ListDeploymentsRequest(page_size=200, page_token=token), timeout=CALL_TIMEOUT)
            for deployment in page.deployments:
                run = deployment.labels.get("falaj-demo")
                if run and run != self.state.run:
                    serving.DeleteDeployment(
                        sr.DeleteDeploymentRequest(
                            name=deployment.name, unload_models=True, request_id=self.rid(f"retire-{deployment.name}")
                        ),
                        timeout=120,
                    )
                    retired += 1
            token = page.next_page_token
            if not token:
                return retired

    def approve_and_deploy(self) -> list[str]:
        state = self.state
        assert state.first is not None
        retired = self._retire_earlier_runs()
        self._wait_bound()
        approved, self_approval = self._promote(state.first.name, "baseline model for the breast-cancer service")
        deployment_id = f"cancer-{state.run}"
        deployment = sm.Deployment(
            display_name="Breast-cancer diagnosis",
            description=f"falaj demo {state.run}",
            model=state.model,
            residency=common_pb2.Residency(region=state.region),
            traffic_split=sm.TrafficSplit(single=sm.SingleVersionRouting(model_version=state.first.name)),
            runtime=sm.ModelRuntimeConfig(
                batching=sm.DynamicBatchingConfig(enabled=True, max_batch_size=32, max_queue_delay=_seconds(0.002)),
                warmup=sm.WarmupConfig(request_count=2),
            ),
            prediction_log=sm.PredictionLogConfig(
                enabled=True,
                log_inputs=True,
                log_outputs=True,
                subject_id_parameter=demo_data.SUBJECT,
                flush_interval=_seconds(0.5),
                max_batch_rows=100,
            ),
            labels={"falaj-demo": state.run},
        )
        created = self.admin.serving.CreateDeployment(
            sr.CreateDeploymentRequest(deployment_id=deployment_id, deployment=deployment, request_id=self.rid("deployment")),
            timeout=120,
        ).deployment
        state.deployment = created.name
        ready = self._deployment_ready(created.name)
        served = self.admin.serving.GetServedModel(
            sr.GetServedModelRequest(name=ready.route_statuses[0].served_model), timeout=CALL_TIMEOUT
        ).served_model
        state.facts["deployment"] = f"{created.name} (OIP model name {deployment_id!r})"
        return [
            f"{approved.name} approved by {approved.decision_stamp.actor} ({APPROVER_ROLE}); {self_approval}",
            f"production -> {state.first.name}" + (f"; retired {retired} deployment(s) of earlier demo runs" if retired else ""),
            f"{ready.name} READY: all traffic to v{_version_number(state.first.name)} "
            f"({served.name}, artifact sha256 {served.artifact_sha256[:12]}... verified and decrypted in memory, "
            f"{_enum(sm.ExecutionProvider, served.active_execution_provider, 'EXECUTION_PROVIDER_')})",
        ]

    # 7. canary and promotion ------------------------------------------------------------------------------------
    def _signature(self, version: str) -> tuple[str, str]:
        found = self.admin.training.GetModelVersion(tr.GetModelVersionRequest(name=version), timeout=CALL_TIMEOUT).model_version
        return found.signature.inputs[0].name, found.signature.outputs[0].name

    def _triton(self, model: str, rows: np.ndarray, parameters: dict[str, list[str]], prefix: str) -> list[dict[str, Any]]:
        """Send `rows` one request each with tritonclient, in a process of its own."""
        assert self.state.first is not None
        input_name, output_name = self._signature(self.state.first.name)
        paths = self.stack.admin
        job = {
            "url": self.stack.addr(GATEWAY),
            "ca": str(paths.ca_cert),
            "key": str(paths.key),
            "cert": str(paths.cert),
            "model": model,
            "input": input_name,
            "output": output_name,
            "rows": rows.tolist(),
            "parameters": parameters,
            "request_prefix": self.rid(prefix),
        }
        with tempfile.TemporaryDirectory(prefix="falaj-demo-") as folder:
            path = Path(folder) / "job.json"
            path.write_text(json.dumps(job))
            done = subprocess.run(
                [sys.executable, str(TRITON_SCRIPT), str(path)], capture_output=True, text=True, timeout=180, env=self.stack.env
            )
        lines = done.stdout.strip().splitlines()
        try:
            answer = json.loads(lines[-1]) if lines else {}
        except json.JSONDecodeError:
            answer = {}
        if done.returncode != 0 or "error" in answer:
            raise StepFailed(f"tritonclient: {answer.get('error') or done.stderr.strip()[-500:]}")
        return list(answer["answers"])

    def _subjects(self, ids: list[int]) -> list[str]:
        return [demo_data.subject_of(i) for i in ids]

    def canary(self) -> list[str]:
        state = self.state
        assert state.first is not None and state.second is not None
        model_id = state.deployment.split("/", 1)[1]
        try:
            watched = f"{self._ensure_monitor()} watches v{_version_number(state.second.name)} from its first request"
        except (FalajError, ServiceMissing) as error:  # the canary does not need monitoring; the drift step reports it
            watched = f"monitoring not set up ({error})"
        split = sm.TrafficSplit(
            canary=sm.CanaryRouting(
                stable_model_version=state.first.name,
                canary_model_version=state.second.name,
                canary_percent=30.0,
                rollback_thresholds=sm.RollbackThresholds(
                    max_error_rate=0.05, evaluation_window=_seconds(60), min_request_count=20, max_latency_p99=_seconds(1.0)
                ),
            )
        )
        updated = self.admin.serving.UpdateDeployment(
            sr.UpdateDeploymentRequest(
                deployment=sm.Deployment(name=state.deployment, traffic_split=split),
                update_mask=field_mask_pb2.FieldMask(paths=["traffic_split"]),
                reason="canary: the MLP takes 30% of the traffic",
                request_id=self.rid("canary"),
            ),
            timeout=120,
        )
        self._deployment_ready(state.deployment)
        count = 40
        rows, ids = state.data.new_x[:count], state.data.new_ids[:count]
        answers = self._triton(model_id, rows, {demo_data.SUBJECT: self._subjects(ids)}, "canary")
        routes = Counter(f"{a['route'] or '?'} v{a['version']}" for a in answers)
        if state.monitor:
            state.monitored_answers += sum(a["version"] == _version_number(state.second.name) for a in answers)
        promoted = self.admin.serving.PromoteDeployment(
            sr.PromoteDeploymentRequest(
                name=state.deployment, reason="canary healthy; the MLP has the lower log loss", request_id=self.rid("promote")
            ),
            timeout=120,
        )
        self._deployment_ready(state.deployment)
        approved, _ = self._promote(state.second.name, "the MLP beat the baseline on held-out data and survived the canary")
        single = promoted.deployment.traffic_split.single.model_version
        return [
            f"rollout {updated.rollout.revision}: canary 30% to v{_version_number(state.second.name)}, "
            f"stable v{_version_number(state.first.name)}; automatic rollback above 5% errors or 1 s p99; {watched}",
            f"{count} requests with tritonclient during the canary: " + ", ".join(f"{k} {v}" for k, v in sorted(routes.items())),
            f"promoted (rollout {promoted.rollout.revision}): all traffic to v{_version_number(single)}; "
            f"production -> {state.second.name} ({approved.name} approved by {approved.decision_stamp.actor})",
        ]

    # 8. traffic ------------------------------------------------------------------------------------------------------
    def _ensure_monitor(self) -> str:
        """Watch the production model before traffic, so serving's prediction logs land in a monitor."""
        state = self.state
        if state.monitor:
            return state.monitor
        assert state.second is not None
        monitoring = self.admin.monitoring
        profile = monitoring.CreateReferenceProfile(
            mr.CreateReferenceProfileRequest(
                profile_id=f"cancer-{state.run}",
                profile=mm.ReferenceProfile(
                    model_version=state.second.name,
                    dataset_version=state.dataset_version,
                    columns=[
                        mm.ColumnSpec(name=f, type=mm.COLUMN_TYPE_NUMERICAL, role=mm.COLUMN_ROLE_FEATURE) for f in state.data.features
                    ],
                ),
                request_id=self.rid("profile"),
            ),
            timeout=120,
        ).profile
        monitor = monitoring.CreateModelMonitor(
            mr.CreateModelMonitorRequest(
                monitor_id=f"cancer-{state.run}",
                monitor=mm.ModelMonitor(
                    display_name="Breast-cancer MLP in production",
                    model_version=state.second.name,
                    deployment=state.deployment,
                    reference_profile=profile.name,
                    window=mm.WindowConfig(kind=mm.WINDOW_KIND_COUNT, row_count=WINDOW_ROWS, min_row_count=WINDOW_ROWS // 2),
                    drift=mm.DriftConfig(drift_share_threshold=0.5),
                    labels={"falaj-demo": state.run},
                ),
                request_id=self.rid("monitor"),
            ),
            timeout=CALL_TIMEOUT,
        ).monitor
        monitoring.CreateAlertRule(
            mr.CreateAlertRuleRequest(
                rule_id=f"cancer-drift-{state.run}",
                rule=mm.AlertRule(
                    display_name="Breast-cancer model inputs drifted",
                    description="Half or more of the scan measurements moved away from the training data; "
                    "check the scanners upstream before trusting the predictions.",
                    monitor=monitor.name,
                    metric=mm.ALERT_METRIC_DRIFT_SHARE,
                    comparator=mm.COMPARATOR_GREATER_OR_EQUAL,
                    threshold=0.5,
                    severity=mm.ALERT_SEVERITY_CRITICAL,
                    enabled=True,
                    labels={"falaj-demo": state.run},
                ),
                request_id=self.rid("alert-rule"),
            ),
            timeout=CALL_TIMEOUT,
        )
        state.monitor = monitor.name
        return monitor.name

    def traffic(self) -> list[str]:
        state, data = self.state, self.state.data
        monitor = self._ensure_monitor()
        model_id = state.deployment.split("/", 1)[1]
        answers = self._triton(model_id, data.new_x, {demo_data.SUBJECT: self._subjects(data.new_ids)}, "traffic")
        assert state.second is not None
        state.monitored_answers += sum(a["version"] == _version_number(state.second.name) for a in answers)
        predicted = np.array([a["output"] >= 0.5 for a in answers], dtype=np.int64)
        accuracy = float((predicted == data.new_y).mean())
        latencies = np.array([a["latency_ms"] for a in answers])
        versions = Counter(f"v{a['version']} ({a['route'] or '?'})" for a in answers)
        state.facts["traffic"] = f"{len(answers)} new patients, accuracy {accuracy:.2f}"
        return [
            f"{len(answers)} new patients (never ingested), one OIP ModelInfer each, through the gateway over mTLS: "
            + ", ".join(f"{k} {v}" for k, v in versions.items()),
            f"accuracy {accuracy:.3f} against their diagnoses; client latency p50 {np.percentile(latencies, 50):.1f} ms, "
            f"p99 {np.percentile(latencies, 99):.1f} ms",
            f"serving logs every prediction (inputs, outputs, subject id) to monitoring ({monitor})",
        ]

    # 9. A-B experiment ------------------------------------------------------------------------------------------------
    def ab_test(self) -> list[str]:
        state, data = self.state, self.state.data
        assert state.first is not None and state.second is not None
        experiments = self.admin.experiments
        experiment_id = f"cancer-ab-{state.run}"
        experiment = em.Experiment(
            display_name="MLP vs logistic regression on new patients",
            hypothesis="The MLP diagnoses more new patients correctly than the logistic regression",
            variants=[
                em.Variant(variant_id="control", display_name="logistic regression", control=True, model_version=state.first.name),
                em.Variant(variant_id="treatment", display_name="MLP", model_version=state.second.name),
            ],
            allocation=em.Allocation(
                coverage_bps=10_000,
                weights=[
                    em.VariantWeight(variant_id="control", weight_bps=5000),
                    em.VariantWeight(variant_id="treatment", weight_bps=5000),
                ],
            ),
            hashing=em.HashingConfig(unit_attribute=demo_data.ENTITY_KEY),
            metrics=[
                em.MetricDefinition(
                    metric_id="correct",
                    display_name="diagnosis correct",
                    type=em.METRIC_TYPE_BINARY,
                    role=em.METRIC_ROLE_PRIMARY,
                    direction=em.IMPROVEMENT_DIRECTION_INCREASE,
                )
            ],
            residency=common_pb2.Residency(region=state.region),
            labels={"falaj-demo": state.run},
        )
        created = experiments.CreateExperiment(
            er.CreateExperimentRequest(experiment_id=experiment_id, experiment=experiment, request_id=self.rid("experiment")),
            timeout=CALL_TIMEOUT,
        ).experiment
        state.experiment = created.name
        experiments.StartExperiment(
            er.StartExperimentRequest(name=created.name, reason="demo", request_id=self.rid("start")), timeout=CALL_TIMEOUT
        )
        units = [str(i) for i in data.new_ids]
        assigned = experiments.BatchAssignVariants(
            er.BatchAssignVariantsRequest(experiment=created.name, units=[er.AssignmentUnit(unit_id=u) for u in units]),
            timeout=CALL_TIMEOUT,
        ).assignments
        assignment = {a.unit_id: a.variant_id for a in assigned}

        # A deployment of its own routes each patient to its variant's model, as assigned.
        ab_id = f"cancer-ab-{state.run}"
        split = sm.TrafficSplit(
            ab_test=sm.AbTestRouting(
                experiment=created.name,
                routing_key=demo_data.ENTITY_KEY,
                default_model_version=state.second.name,
                missing_routing_key_action=sm.MISSING_ROUTING_KEY_ACTION_REJECT,
            )
        )
        ab = self.admin.serving.CreateDeployment(
            sr.CreateDeploymentRequest(
                deployment_id=ab_id,
                deployment=sm.Deployment(
                    display_name="Breast-cancer A-B",
                    model=state.model,
                    residency=common_pb2.Residency(region=state.region),
                    traffic_split=split,
                    labels={"falaj-demo": state.run},
                ),
                request_id=self.rid("ab-deployment"),
            ),
            timeout=120,
        ).deployment
        try:
            self._deployment_ready(ab.name)
            answers = self._triton(ab_id, data.new_x, {demo_data.ENTITY_KEY: units}, "ab")
        finally:
            self.admin.serving.DeleteDeployment(sr.DeleteDeploymentRequest(name=ab.name, request_id=self.rid("ab-delete")), timeout=120)
        routed_as_assigned = sum(a["variant"] == assignment[u] for u, a in zip(units, answers, strict=True))
        now = dt.datetime.now(dt.UTC)
        exposures = [
            em.Exposure(event_id=f"{self.rid('exposure')}-{u}", unit_id=u, variant_id=a["variant"], time=_timestamp(now), source=ab.name)
            for u, a in zip(units, answers, strict=True)
        ]
        correct = [int(a["output"] >= 0.5) == int(y) for a, y in zip(answers, data.new_y, strict=True)]
        outcomes = [
            em.Outcome(event_id=f"{self.rid('outcome')}-{u}", unit_id=u, metric_id="correct", value=1.0, time=_timestamp(now))
            for u, ok in zip(units, correct, strict=True)
            if ok
        ]
        recorded = experiments.RecordExposures(
            er.RecordExposuresRequest(experiment=created.name, request_id=self.rid("exposures"), exposures=exposures), timeout=CALL_TIMEOUT
        )
        experiments.RecordOutcomes(
            er.RecordOutcomesRequest(experiment=created.name, request_id=self.rid("outcomes"), outcomes=outcomes), timeout=CALL_TIMEOUT
        )
        analysis = experiments.AnalyzeExperiment(
            er.AnalyzeExperimentRequest(experiment=created.name, request_id=self.rid("analysis")), timeout=CALL_TIMEOUT
        ).analysis
        experiments.StopExperiment(
            er.StopExperimentRequest(name=created.name, reason="enough patients", request_id=self.rid("stop")), timeout=CALL_TIMEOUT
        )
        result = analysis.metric_results[0]
        means = {v.variant_id: v for v in result.variants}
        comparison = result.comparisons[0]
        lift = comparison.absolute_lift
        winner = "treatment" if comparison.significant and lift.value > 0 else ""
        summary = (
            f"MLP {'wins' if winner else 'shows no significant difference'}: "
            f"{lift.value:+.3f} correct per patient (p={comparison.test.p_value:.3f})"
        )
        experiments.ConcludeExperiment(
            er.ConcludeExperimentRequest(
                name=created.name,
                conclusion=em.Conclusion(winning_variant_id=winner, summary=summary, analysis=analysis.name),
                request_id=self.rid("conclude"),
            ),
            timeout=CALL_TIMEOUT,
        )
        srm = analysis.sample_ratio_mismatch
        split_counts = Counter(assignment.values())
        state.facts["experiment"] = f"{created.name}: {summary}"
        return [
            f"{created.name}: {len(units)} patients assigned ({', '.join(f'{k} {v}' for k, v in sorted(split_counts.items()))}); "
            f"serving routed {routed_as_assigned}/{len(units)} as assigned ({ab.name}, removed afterwards)",
            f"{recorded.accepted_count} exposures, {len(outcomes)} outcomes (diagnosis correct) recorded",
            "correct rate: "
            + ", ".join(f"{k} {means[k].mean:.3f} ({means[k].units} units)" for k in ("control", "treatment") if k in means)
            + f"; lift {lift.value:+.3f} [{lift.ci_lower:+.3f}, {lift.ci_upper:+.3f}] at {lift.confidence_level:.0%}, "
            f"p={comparison.test.p_value:.3f}, SRM p={srm.p_value:.2f}",
            f"stopped and concluded: {summary}",
        ]

    # 10. drift -----------------------------------------------------------------------------------------------------
    def drift(self) -> list[str]:
        state, data = self.state, self.state.data
        assert state.second is not None
        monitoring = self.admin.monitoring
        monitor = self._ensure_monitor()
        lines = []
        if state.monitored_answers:
            # serving sends its prediction logs asynchronously; give them a moment to land
            def logged() -> int:
                stats = monitoring.GetModelMonitor(mr.GetModelMonitorRequest(name=monitor), timeout=CALL_TIMEOUT).monitor.ingestion_stats
                return int(stats.accepted_rows) if stats.accepted_rows >= state.monitored_answers else 0

            try:
                rows = _wait("serving prediction logs", logged, timeout=10, interval=0.5)
                lines.append(f"{rows} rows of real traffic (canary and production) logged by serving to {monitor}")
            except StepFailed:
                lines.append("serving's prediction logs had not all arrived; the drifted rows are judged on their own")
        shifted = demo_data.drifted(data, copies=2)
        subjects = self._subjects(data.new_ids) * 2
        now = dt.datetime.now(dt.UTC)
        columns: dict[str, Any] = {
            "request_id": [f"{self.rid('drift')}-{i}" for i in range(len(shifted))],
            "timestamp": pa.array([now + dt.timedelta(milliseconds=i) for i in range(len(shifted))], pa.timestamp("us", tz="UTC")),
            "status_code": pa.array([0] * len(shifted), pa.int32()),
            "subject_id": subjects,
        }
        for j, name in enumerate(data.features):
            columns[name] = pa.array(shifted[:, j].astype(np.float64))
        table = pa.table(columns)
        header = mr.PredictionLogHeader(model_version=state.second.name, deployment=state.deployment, request_id=self.rid("drift-logs"))
        messages = [mr.IngestPredictionLogsRequest(header=header)]
        messages += [
            mr.IngestPredictionLogsRequest(batch=demo_data.arrow_batch(table.slice(o, WINDOW_ROWS), self.rid(f"drift-{o}")))
            for o in range(0, table.num_rows, WINDOW_ROWS)
        ]
        ingested = monitoring.IngestPredictionLogs(iter(messages), timeout=CALL_TIMEOUT)
        lines.append(
            f"injected {ingested.stats.accepted_rows} prediction-log rows whose 30 measurements are shifted by ~1 std "
            "(a recalibrated scanner upstream)"
        )

        def firing() -> list[mm.Alert]:
            alerts = monitoring.ListAlerts(mr.ListAlertsRequest(monitor=monitor, state=mm.ALERT_STATE_FIRING), timeout=CALL_TIMEOUT).alerts
            return list(alerts)

        alert = _wait("the drift alert firing", firing, timeout=30, interval=0.5)[0]
        reports = list(monitoring.ListDriftReports(mr.ListDriftReportsRequest(parent=monitor), timeout=CALL_TIMEOUT).reports)
        for report in sorted(reports, key=lambda r: r.window.start_time.ToNanoseconds()):
            lines.append(
                f"window of {report.window.row_count} rows: {report.drifted_feature_count}/{report.tested_feature_count} "
                f"features drifted (share {report.drift_share:.2f}) -> {'DATASET DRIFT' if report.dataset_drift else 'no drift'}"
            )
        lines.append(
            f"{alert.name} {_enum(mm.AlertState, alert.state, 'ALERT_STATE_')} {_enum(mm.AlertSeverity, alert.severity, 'ALERT_SEVERITY_')}: {alert.summary}"
        )
        drifted = [r for r in reports if r.dataset_drift]
        if drifted:
            newest = max(drifted, key=lambda r: r.create_time.ToNanoseconds())
            chunks = monitoring.RenderDriftReport(mr.RenderDriftReportRequest(name=newest.name), timeout=CALL_TIMEOUT)
            path = self.stack.home / "reports" / "drift.html"
            path.parent.mkdir(parents=True, exist_ok=True)
            content = b"".join(chunk.data for chunk in chunks)
            path.write_bytes(content)
            state.report_path = path
            lines.append(f"HTML report of {newest.name} ({len(content) // 1024} KiB): {path}")
        state.facts["drift"] = f"{alert.name} FIRING on {monitor}"
        return lines

    # 11. erasure -----------------------------------------------------------------------------------------------------
    def erase(self) -> list[str]:
        state = self.state
        subject = demo_data.subject_of(state.data.erase_patient)
        receipt = self.admin.ingest.EraseSubject(
            ir.EraseSubjectRequest(
                subject_id=subject,
                legal_basis="PDPL erasure request (demo)",
                datasets=[state.dataset],
                request_id=self.rid("erase"),
            ),
            timeout=120,
        ).receipt
        if receipt.state != im.ERASURE_STATE_COMPLETED:
            raise StepFailed(f"{receipt.name} {im.ErasureState.Name(receipt.state)}: {receipt.error_message}")
        versions = [v for d in receipt.datasets for v in d.versions]
        quarantined = sum(d.quarantined_rows_erased for d in receipt.datasets)
        lines = [
            f"{receipt.name} for {subject}: {receipt.rows_erased} rows erased "
            f"({', '.join(f'{v.rows_removed} from {v.dataset_version}' for v in versions) or 'no dataset rows'}; "
            f"{quarantined} from quarantine)",
            f"receipt digest {receipt.receipt_digest[:16]}..., audit event {receipt.audit_event_id or '-'}",
        ]
        downstream = []
        if self.state.feature_view:
            applied = self.admin.features.ApplyErasureReceipt(
                fr.ApplyErasureReceiptRequest(erasure_receipt=receipt.name, request_id=self.rid("erase-features")), timeout=120
            ).erasure_application
            downstream.append(f"features removed {applied.offline_rows_removed} offline rows and {applied.online_keys_removed} online keys")
        if self.state.monitor:
            erased = self.admin.monitoring.EraseSubjectData(
                mr.EraseSubjectDataRequest(erasure_receipt=receipt.name, subject_ids=[subject], request_id=self.rid("erase-monitoring")),
                timeout=CALL_TIMEOUT,
            )
            downstream.append(
                f"monitoring removed {erased.prediction_log_rows_erased} prediction-log rows (the patient was never scored)"
                if not erased.prediction_log_rows_erased
                else f"monitoring removed {erased.prediction_log_rows_erased} prediction-log rows"
            )
        if downstream:
            lines.append("; ".join(downstream))
        state.facts["erasure"] = f"{receipt.name} ({subject}, {receipt.rows_erased} rows)"
        return lines

    # 12. audit -----------------------------------------------------------------------------------------------------
    def audit(self) -> list[str]:
        gateway = self.admin.gateway
        verdict = gateway.VerifyAuditChain(gr.VerifyAuditChainRequest(), timeout=120)
        if not verdict.intact:
            raise StepFailed(f"audit chain BROKEN at record {verdict.first_break.sequence}: {verdict.first_break.detail}")
        since = self.started - dt.timedelta(seconds=5)
        refused = gateway.QueryAuditRecords(
            gr.QueryAuditRecordsRequest(
                filter=gm.AuditRecordFilter(
                    kind=gm.AUDIT_RECORD_KIND_SECURITY_EVENT, decision=gm.DECISION_DENY, start_time=_timestamp(since)
                ),
                page_size=1000,
            ),
            timeout=CALL_TIMEOUT,
        ).records
        approver = gateway.QueryAuditRecords(
            gr.QueryAuditRecordsRequest(
                filter=gm.AuditRecordFilter(caller=client_id(APPROVER), start_time=_timestamp(since)), page_size=1000
            ),
            timeout=CALL_TIMEOUT,
        ).records
        self.state.facts["audit"] = f"intact, {verdict.records_checked} records"
        return [
            f"intact: {verdict.records_checked} hash-chained records and {verdict.checkpoints_checked} signed checkpoints verified, "
            f"head #{verdict.head_sequence} ({verdict.head_hash.hex()[:16]}...)",
            f"this run: {len(approver)} records of {client_id(APPROVER)}; {len(refused)} refused security event(s)"
            + (f" ({', '.join(f'#{r.sequence}' for r in refused)}: {refused[0].decision_detail.split(';')[0]})" if refused else ""),
        ]


def _summary(demo: Demo, progress: Progress, keep_running: bool) -> None:
    state, stack = demo.state, demo.stack
    print("\nSummary")
    ran = sum(o.status == "ok" for o in progress.outcomes.values())
    print(f"  steps:       {ran}/{len(progress.outcomes)} ran; run id {state.run}")
    for key in ("dataset", "features", "models", "deployment", "traffic", "experiment", "drift", "erasure", "audit"):
        if key in state.facts:
            print(f"  {key + ':':<12} {state.facts[key]}")
    for outcome in progress.outcomes.values():
        if outcome.status != "ok" and not outcome.blocked:
            print(f"  {outcome.status + ':':<12} step {outcome.number} ({outcome.key}): {outcome.lines[0] if outcome.lines else ''}")
    blocked = [f"{o.number} ({o.key})" for o in progress.outcomes.values() if o.blocked]
    if blocked:
        print(f"  {'not run:':<12} steps {', '.join(blocked)}: they need a step that did not run")
    print("\nWhere to look next")
    print(f"  logs:        {stack.home / 'logs'}/<component>.log (one JSON line per request)")
    if state.report_path is not None:
        print(f"  drift:       {state.report_path} (open it in a browser)")
    if keep_running:
        print("  audit:       falaj audit query --decision deny --since 30   (falaj audit verify; falaj stack status; falaj stack down)")
    else:
        print("  audit:       falaj stack up, then falaj audit query --decision deny --since 30 (and falaj audit verify)")
    print("  docs:        README.md (CLI tour, Python SDK, identities and policies, production)")


def run_demo(*, keep_running: bool = False) -> int:
    """Run the demo; 0 when every step ran, 1 when any was skipped or failed."""
    stack = Stack()
    demo = Demo(stack)
    progress = Progress(total=13)
    progress.step("pki", f"PKI under {stack.pki.root}", demo.pki)
    if not progress.step("stack", f"starting the stack ({len(COMPONENTS) - 1} services + gateway), health-gated", demo.start_stack):
        _summary(demo, progress, keep_running)
        return 1
    try:
        progress.step(
            "ingest", "ingesting the breast-cancer data through IngestBatches (planted bad rows; consent)", demo.ingest, needs=["stack"]
        )
        progress.step("features", "registering entity, feature view and feature service; materializing", demo.features, needs=["ingest"])
        progress.step("train", "training a logistic regression, then an MLP, from the feature service", demo.train, needs=["features"])
        progress.step(
            "deploy", f"approving the first model as {client_id(APPROVER)} and deploying it", demo.approve_and_deploy, needs=["train"]
        )
        progress.step("canary", "canary of the MLP, then promotion", demo.canary, needs=["deploy"])
        progress.step("traffic", "production traffic through the gateway with tritonclient", demo.traffic, needs=["canary"])
        progress.step("ab", "A-B experiment: logistic regression vs MLP", demo.ab_test, needs=["canary"])
        progress.step("drift", "injecting drift: alert and HTML report", demo.drift, needs=["train"])
        progress.step("erase", "erasing one data subject", demo.erase, needs=["ingest"])
        progress.step("audit", "verifying the audit chain", demo.audit, needs=["stack"])
    finally:
        demo.close()
        if keep_running:
            progress.step("down", "leaving the stack up (--keep-running)", lambda: ["`falaj stack status`, `falaj stack down`"])
        else:
            progress.step("down", "stopping the stack", lambda: [f"stopped {', '.join(stack.down()) or 'nothing'}"])
    _summary(demo, progress, keep_running)
    return 0 if progress.all_ok else 1
