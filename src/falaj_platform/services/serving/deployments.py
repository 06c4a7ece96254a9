"""Deployments, rollouts and served models: the management side of serving.

The store holds the desired state (deployments, their split revisions, the versions to
serve); each replica holds the loaded sessions and the active splits in memory, and
converges on the store: the replica that takes a change applies it at once, the others
within a sync interval. A split change loads and warms its new versions before it is
written, so traffic only ever moves to versions that can answer.

Canaries are judged by a background loop on their sliding windows: a crossed threshold
rolls the split back to the stable version on its own (ROLLOUT_TRIGGER_AUTO_ROLLBACK,
audited); a progressive canary moves step by step and can promote itself.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import threading
import uuid
from collections.abc import Callable, Iterable
from typing import Any, Protocol, cast

from google.protobuf import json_format
from sqlalchemy.orm import Session

from falaj.serving.v1 import message_pb2 as pb
from falaj.serving.v1 import request_response_pb2 as rr
from falaj_platform.runtime.errors import Aborted, AlreadyExists, FailedPrecondition, FalajError, InvalidArgument, NotFound, Unavailable
from falaj_platform.runtime.idempotency import remember, replayed_response
from falaj_platform.runtime.interceptors import current_caller
from falaj_platform.runtime.logs import get_logger
from falaj_platform.services.serving import convert
from falaj_platform.services.serving.config import ServingConfig
from falaj_platform.services.serving.engine import InferenceEngine
from falaj_platform.services.serving.models import ModelManager
from falaj_platform.services.serving.prediction_log import LogPolicy, PredictionLogger
from falaj_platform.services.serving.routing import ActiveDeployment, Route, split_versions
from falaj_platform.services.serving.sources import NUMBERED_VERSION_PATTERN, parse_model_version
from falaj_platform.services.serving.store import DeploymentRow, RolloutRow, ServingStore, request_log

log = get_logger()
SERVICE = "/falaj.serving.v1.ServingService/"
DEPLOYMENT_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
MODEL_NAME = re.compile(r"^models/[a-z0-9][a-z0-9_-]{0,127}$")
EXPERIMENT_NAME = re.compile(r"^experiments/[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
SERVING_IDENTITY = "spiffe://falaj.local/service/serving"
MUTABLE_PATHS = {"display_name", "description", "labels", "traffic_split", "runtime", "feature_enrichment", "prediction_log"}


class Auditor(Protocol):
    """Security and release events for the audit log (best effort from here: failures are logged)."""

    def report(
        self, event: str, *, resource: str, action: str, allowed: bool = True, detail: str = "", attributes: dict[str, str] | None = None
    ) -> None: ...


def served_model_id(model_version: str) -> str:
    model, version = parse_model_version(model_version)
    return f"{model}-v{version}"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _actor() -> str:
    return current_caller() or SERVING_IDENTITY


def _deployment_id(name: str, field: str = "name") -> str:
    deployment_id = name.removeprefix("deployments/")
    if not name.startswith("deployments/") or not DEPLOYMENT_ID.match(deployment_id):
        raise InvalidArgument(
            f"{field} must be deployments/{{deployment_id}}, got {name!r}", reason="INVALID_NAME", metadata={"field": field}
        )
    return deployment_id


# -- validation -------------------------------------------------------------------------------


def _check_version(version: str, model: str, field: str) -> None:
    if not NUMBERED_VERSION_PATTERN.match(version):
        raise InvalidArgument(
            f"{field} must be a numbered version models/{{model}}/versions/{{n}}, got {version!r}",
            reason="INVALID_MODEL_VERSION",
            metadata={"field": field},
        )
    if not version.startswith(model + "/versions/"):
        raise InvalidArgument(f"{field} {version} is not a version of {model}", reason="VERSION_OF_OTHER_MODEL", metadata={"field": field})


def _percent(value: float, field: str, *, upper_inclusive: bool) -> None:
    if not (0.0 < value < 100.0 or (upper_inclusive and value == 100.0)):
        bound = "<= 100" if upper_inclusive else "< 100"
        raise InvalidArgument(f"{field} must be > 0 and {bound}, got {value}", reason="INVALID_PERCENT", metadata={"field": field})


def validate_split(split: pb.TrafficSplit, model: str) -> None:
    which = split.WhichOneof("strategy")
    field = "traffic_split"
    answering: set[str] = set()
    if which is None:
        raise InvalidArgument(
            "traffic_split needs one strategy: single, canary or ab_test", reason="NO_STRATEGY", metadata={"field": field}
        )
    if which == "single":
        _check_version(split.single.model_version, model, f"{field}.single.model_version")
        answering.add(split.single.model_version)
    elif which == "canary":
        canary = split.canary
        _check_version(canary.stable_model_version, model, f"{field}.canary.stable_model_version")
        _check_version(canary.canary_model_version, model, f"{field}.canary.canary_model_version")
        if canary.stable_model_version == canary.canary_model_version:
            raise InvalidArgument("the canary and the stable version must differ", reason="CANARY_IS_STABLE", metadata={"field": field})
        if canary.steps:
            for index, step in enumerate(canary.steps):
                _percent(step.canary_percent, f"{field}.canary.steps[{index}].canary_percent", upper_inclusive=True)
        else:
            _percent(canary.canary_percent, f"{field}.canary.canary_percent", upper_inclusive=False)
        thresholds = canary.rollback_thresholds
        for name in ("max_error_rate", "max_error_rate_increase"):
            value = getattr(thresholds, name)
            if not 0.0 <= value <= 1.0:
                raise InvalidArgument(f"rollback_thresholds.{name} must be within 0..1", reason="INVALID_THRESHOLD")
        if thresholds.max_latency_p99_ratio < 0 or thresholds.min_request_count < 0:
            raise InvalidArgument("rollback thresholds must not be negative", reason="INVALID_THRESHOLD")
        answering |= {canary.stable_model_version, canary.canary_model_version}
    else:
        ab = split.ab_test
        if not EXPERIMENT_NAME.match(ab.experiment):
            raise InvalidArgument(
                "ab_test.experiment must be experiments/{experiment}", reason="INVALID_EXPERIMENT", metadata={"field": field}
            )
        if not ab.routing_key:
            raise InvalidArgument(
                "ab_test.routing_key names the key that keeps a caller in its variant (user_id ...)", reason="ROUTING_KEY_REQUIRED"
            )
        _check_version(ab.default_model_version, model, f"{field}.ab_test.default_model_version")
        seen: set[str] = set()
        for index, route in enumerate(ab.variant_routes):
            if not route.variant_id or route.variant_id in seen:
                raise InvalidArgument(f"ab_test.variant_routes[{index}] needs a variant_id of its own", reason="INVALID_VARIANT_ROUTE")
            seen.add(route.variant_id)
            _check_version(route.model_version, model, f"{field}.ab_test.variant_routes[{index}].model_version")
            answering.add(route.model_version)
        answering.add(ab.default_model_version)
    for index, shadow in enumerate(split.shadows):
        _check_version(shadow.model_version, model, f"{field}.shadows[{index}].model_version")
        _percent(shadow.mirror_percent, f"{field}.shadows[{index}].mirror_percent", upper_inclusive=True)
        if shadow.model_version in answering:
            raise InvalidArgument(f"{shadow.model_version} answers already; a shadow must be another version", reason="SHADOW_ANSWERS")


def validate_settings(deployment: pb.Deployment) -> None:
    batching = deployment.runtime.batching
    if batching.max_batch_size < 0 or batching.max_queue_size < 0 or any(size <= 0 for size in batching.preferred_batch_sizes):
        raise InvalidArgument("runtime.batching sizes must be positive", reason="INVALID_BATCHING")
    if deployment.HasField("feature_enrichment"):
        enrichment = deployment.feature_enrichment
        if not enrichment.feature_service or not enrichment.entity_keys:
            raise InvalidArgument("feature_enrichment needs a feature_service and entity_keys", reason="INVALID_ENRICHMENT")
        for index, binding in enumerate(enrichment.entity_keys):
            if not binding.join_key or not binding.input_tensor:
                raise InvalidArgument(
                    f"feature_enrichment.entity_keys[{index}] needs join_key and input_tensor", reason="INVALID_ENRICHMENT"
                )
    log_config = deployment.prediction_log
    if not 0.0 <= log_config.sample_rate <= 1.0 or log_config.queue_capacity < 0 or log_config.max_batch_rows < 0:
        raise InvalidArgument("prediction_log.sample_rate must be within 0..1 and sizes not negative", reason="INVALID_PREDICTION_LOG")


# -- the service ------------------------------------------------------------------------------


class DeploymentService:
    """Deployment, rollout and served-model operations, and the loops that keep replicas in step."""

    def __init__(
        self,
        store: ServingStore,
        config: ServingConfig,
        manager: ModelManager,
        engine: InferenceEngine,
        logger: PredictionLogger,
        auditor: Auditor,
        variant_versions: Callable[[str], dict[str, str]] | None = None,
    ):
        self.store = store
        self.config = config
        self.manager = manager
        self.engine = engine
        self.logger = logger
        self.auditor = auditor
        self.variant_versions = variant_versions
        self.log_defaults = LogPolicy(
            queue_capacity=config.prediction_log_queue_capacity,
            max_batch_rows=config.prediction_log_max_batch_rows,
            flush_interval_s=config.prediction_log_flush_interval_s,
        )
        self._activation_lock = threading.Lock()
        self._judge_wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- background loops -----------------------------------------------------------------------
    def start(self) -> None:
        for name, target in (("serving-sync", self._sync_loop), ("canary-judge", self._judge_loop)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        self._judge_wake.set()
        for thread in self._threads:
            thread.join(timeout=10)

    def nudge_judge(self, deployment_id: str) -> None:
        """A canary request failed: judge now rather than at the next tick."""
        self._judge_wake.set()

    def _sync_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync()
            except Exception:
                log.exception("serving sync failed")
            self._stop.wait(self.config.sync_interval_s)

    def _judge_loop(self) -> None:
        while not self._stop.is_set():
            self._judge_wake.wait(self.config.canary_check_interval_s)
            self._judge_wake.clear()
            if self._stop.is_set():
                return
            try:
                self.judge_canaries()
            except Exception:
                log.exception("canary judgement failed")

    # -- activation -----------------------------------------------------------------------------
    def _versions_of(self, split: pb.TrafficSplit) -> tuple[list[str], dict[str, str]]:
        versions = split_versions(split)
        bindings: dict[str, str] = {}
        if split.WhichOneof("strategy") == "ab_test" and not split.ab_test.variant_routes and self.variant_versions is not None:
            bindings = self.variant_versions(split.ab_test.experiment)
            model = split.ab_test.default_model_version.rsplit("/versions/", 1)[0]
            bindings = {variant: version for variant, version in bindings.items() if version.startswith(model + "/versions/")}
            versions = list(dict.fromkeys([*versions, *bindings.values()]))
        return versions, bindings

    def _ensure_loaded(self, versions: Iterable[str], runtime: pb.ModelRuntimeConfig) -> None:
        for version in versions:
            if self.manager.get(version) is None:
                self._load(version, runtime)

    def _activate(self, row: DeploymentRow, rollout: RolloutRow) -> None:
        split = convert.from_json(rollout.traffic_split_json, pb.TrafficSplit)
        runtime = convert.from_json(row.runtime_json, pb.ModelRuntimeConfig)
        _, bindings = self._versions_of(split)
        enrichment = convert.from_json(row.feature_enrichment_json, pb.FeatureEnrichmentConfig) if row.feature_enrichment_json else None
        policy = convert.log_policy(convert.from_json(row.prediction_log_json, pb.PredictionLogConfig), self.log_defaults)
        with self._activation_lock:
            previous = self.engine.deployments.get(row.id)
            if previous is not None and previous.revision > row.current_revision:
                return  # a newer revision is already active
            active = ActiveDeployment(
                id=row.id,
                model=row.model,
                region=row.residency_region,
                revision=row.current_revision,
                split=split,
                runtime=runtime,
                enrichment=enrichment,
                log_policy=policy,
                canary_step=rollout.canary_step,
                variant_versions=bindings,
            )
            active.etag = row.etag  # type: ignore[attr-defined]
            active.rollout_created_at = rollout.created_at  # type: ignore[attr-defined]
            if previous is not None and previous.revision == row.current_revision:
                for key, route in previous.routes.items():
                    if key in active.routes:
                        active.routes[key].window = route.window
            self.logger.configure(row.id, policy)
            self.engine.deployments[row.id] = active

    def _deactivate(self, deployment_id: str) -> None:
        with self._activation_lock:
            self.engine.deployments.pop(deployment_id, None)
        self.logger.forget(deployment_id)

    def sync(self) -> None:
        """Converge this replica on the store: active splits and loaded versions."""
        with self.store.transaction() as session:
            revisions = self.store.deployment_revisions(session)
        for deployment_id in set(self.engine.deployments) - set(revisions):
            self._deactivate(deployment_id)
        for deployment_id, (revision, etag) in revisions.items():
            active = self.engine.deployments.get(deployment_id)
            if active is not None and active.revision == revision and getattr(active, "etag", "") == etag:
                continue
            with self.store.transaction() as session:
                row = self.store.get_deployment(session, deployment_id)
                rollout = self.store.get_rollout(session, deployment_id, revision) if row is not None else None
            if row is None or rollout is None:
                continue
            try:
                versions, _ = self._versions_of(convert.from_json(rollout.traffic_split_json, pb.TrafficSplit))
                self._ensure_loaded(versions, convert.from_json(row.runtime_json, pb.ModelRuntimeConfig))
                self._activate(row, rollout)
            except FalajError as error:
                log.warning("deployment not activated on this replica", deployment=deployment_id, error=error.message)
        with self.store.transaction() as session:
            wanted = self.store.list_served_models(session, limit=10_000, state="READY")
        for served in wanted:
            if self.manager.get(served.model_version) is None:
                try:
                    self._load(served.model_version, convert.from_json(served.runtime_json, pb.ModelRuntimeConfig))
                except FalajError as error:
                    log.warning("served model not loaded on this replica", model_version=served.model_version, error=error.message)

    # -- served models ----------------------------------------------------------------------------
    def _record_state(self, model_version: str, state: int, reason: str, runtime: pb.ModelRuntimeConfig) -> None:
        now = _now()
        served_id = served_model_id(model_version)
        values: dict[str, Any] = {"state": convert.served_state_name(state), "state_reason": reason[:2000]}
        if state == pb.SERVED_MODEL_STATE_LOADING:
            values["load_start_time"] = now
            values["ready_time"] = None
        if state == pb.SERVED_MODEL_STATE_READY:
            values["ready_time"] = now
            model = self.manager.get(model_version)
            if model is not None:
                values["artifact_sha256"] = model.sha256
                values["residency_region"] = model.residency_region
        with self.store.transaction() as session:
            if self.store.get_served_model(session, served_id) is None:
                self.store.insert_served_model(
                    session,
                    {
                        "id": served_id,
                        "model_version": model_version,
                        "runtime_json": convert.to_json(runtime),
                        "residency_region": self.config.region,
                        "created_by": _actor(),
                        "created_at": now,
                        **values,
                    },
                )
            else:
                self.store.update_served_model(session, served_id, values)

    def _load(self, model_version: str, runtime: pb.ModelRuntimeConfig) -> None:
        def on_state(version: str, state: int, reason: str) -> None:
            if state == pb.SERVED_MODEL_STATE_READY:
                return  # recorded below, once the model is in the manager
            self._record_state(version, state, reason, runtime)

        self.manager.load(model_version, runtime, on_state)
        self._record_state(model_version, pb.SERVED_MODEL_STATE_READY, "", runtime)

    def _routing_deployments(self, model_version: str) -> list[str]:
        with self.store.transaction() as session:
            splits = self.store.current_splits(session)
        routed = []
        for deployment_id, text in splits.items():
            if model_version in split_versions(convert.from_json(text, pb.TrafficSplit)):
                routed.append(f"deployments/{deployment_id}")
        return sorted(routed)

    def served_model_proto(self, served_id: str) -> pb.ServedModel:
        with self.store.transaction() as session:
            row = self.store.get_served_model(session, served_id)
        if row is None:
            raise NotFound(f"servedModels/{served_id} does not exist", reason="SERVED_MODEL_NOT_FOUND")
        return self._served_proto(row)

    def _served_proto(self, row: Any) -> pb.ServedModel:
        served = convert.served_model_to_proto(row)
        model = self.manager.get(row.model_version)
        local_state = model.state if model is not None else pb.SERVED_MODEL_STATE_UNLOADED
        if model is not None:
            served.active_execution_provider = (
                pb.EXECUTION_PROVIDER_CUDA if model.provider == "CUDAExecutionProvider" else pb.EXECUTION_PROVIDER_CPU
            )
        served.deployments.extend(self._routing_deployments(row.model_version))
        served.replicas.add(replica_id=self.config.replica_id, state=local_state)
        return served

    def load_model(self, request: rr.LoadModelRequest) -> rr.LoadModelResponse:
        parse_model_version(request.model_version)
        if not NUMBERED_VERSION_PATTERN.match(request.model_version):
            raise InvalidArgument("model_version must be a numbered version", reason="INVALID_MODEL_VERSION")
        method = SERVICE + "LoadModel"
        with self.store.transaction() as session:
            replayed = replayed_response(session, request_log, method, request, rr.LoadModelResponse)
        if replayed is not None:
            return replayed
        runtime = request.runtime
        served_id = served_model_id(request.model_version)
        if request.wait_until_ready:
            self._load(request.model_version, runtime)
        else:
            self._record_state(request.model_version, pb.SERVED_MODEL_STATE_LOADING, "", runtime)

            def load_in_background() -> None:
                try:
                    self._load(request.model_version, runtime)
                except FalajError as error:
                    log.warning("model load failed", model_version=request.model_version, error=error.message)

            threading.Thread(target=load_in_background, name=f"load-{served_id}", daemon=True).start()
        response = rr.LoadModelResponse(served_model=self.served_model_proto(served_id))
        with self.store.transaction() as session:
            remember(session, request_log, method, request, response)
        return response

    def unload_model(self, request: rr.UnloadModelRequest) -> rr.UnloadModelResponse:
        served_id = request.name.removeprefix("servedModels/")
        if not request.name.startswith("servedModels/") or not served_id:
            raise InvalidArgument("name must be servedModels/{served_model_id}", reason="INVALID_NAME")
        method = SERVICE + "UnloadModel"
        with self.store.transaction() as session:
            replayed = replayed_response(session, request_log, method, request, rr.UnloadModelResponse)
            row = self.store.get_served_model(session, served_id)
        if replayed is not None:
            return replayed
        if row is None:
            raise NotFound(f"{request.name} does not exist", reason="SERVED_MODEL_NOT_FOUND")
        routed = self._routing_deployments(row.model_version)
        if routed and not request.force:
            raise FailedPrecondition(
                f"{row.model_version} takes traffic from {', '.join(routed)}; change their splits first or unload with force",
                reason="MODEL_IN_USE",
                metadata={"deployments": ",".join(routed)},
            )
        timeout = request.drain_timeout.ToTimedelta().total_seconds() if request.HasField("drain_timeout") else self.config.drain_timeout_s
        self._record_state(row.model_version, pb.SERVED_MODEL_STATE_DRAINING, "", pb.ModelRuntimeConfig())
        drained = self.manager.unload(row.model_version, timeout)
        reason = "" if drained else f"in-flight requests were still running after {timeout:.1f}s"
        self._record_state(row.model_version, pb.SERVED_MODEL_STATE_UNLOADED, reason, pb.ModelRuntimeConfig())
        response = rr.UnloadModelResponse(served_model=self.served_model_proto(served_id))
        with self.store.transaction() as session:
            remember(session, request_log, method, request, response)
        return response

    def list_served_models(self, request: rr.ListServedModelsRequest) -> rr.ListServedModelsResponse:
        size = convert.page_size(request.page_size)
        after = convert.decode_token(request.page_token, "served") or ""
        state = convert.served_state_name(request.state) if request.state else ""
        with self.store.transaction() as session:
            rows = self.store.list_served_models(session, after=after, limit=size + 1, model_version=request.model_version, state=state)
        response = rr.ListServedModelsResponse(served_models=[self._served_proto(row) for row in rows[:size]])
        if len(rows) > size:
            response.next_page_token = convert.encode_token("served", rows[size - 1].id)
        return response

    # -- deployments ----------------------------------------------------------------------------
    def _check_region(self, region: str, resource: str) -> None:
        if region == self.config.region or region in self.config.allowed_foreign_regions:
            return
        self.auditor.report(
            "CROSS_REGION_ACCESS",
            resource=resource,
            action="deploy",
            allowed=False,
            detail=f"deployment in region {region} refused by a replica of region {self.config.region}",
            attributes={"residency_region": region, "serving_region": self.config.region},
        )
        raise FailedPrecondition(
            f"{resource} must run in region {region}; this service runs in {self.config.region} and no policy allows {region} here",
            reason="RESIDENCY_VIOLATION",
            metadata={"residency_region": region},
        )

    def _check_models_region(self, versions: Iterable[str], region: str) -> None:
        for version in versions:
            model = self.manager.get(version)
            if model is not None and model.residency_region and model.residency_region != region:
                raise FailedPrecondition(
                    f"{version} lives in region {model.residency_region}, not the deployment's {region}",
                    reason="RESIDENCY_MISMATCH",
                    metadata={"model_version": version},
                )

    def deployment_proto(self, row: DeploymentRow) -> pb.Deployment:
        deployment = convert.deployment_to_proto(row)
        with self.store.transaction() as session:
            rollout = self.store.get_rollout(session, row.id, row.current_revision)
        if rollout is not None:
            deployment.traffic_split.CopyFrom(convert.from_json(rollout.traffic_split_json, pb.TrafficSplit))
        deployment.route_statuses.extend(self.route_statuses(row.id))
        stats = self.logger.stats(row.id)
        deployment.prediction_log_stats.rows_sent = stats.rows_sent
        deployment.prediction_log_stats.rows_dropped = stats.rows_dropped
        deployment.prediction_log_stats.rows_queued = stats.rows_queued
        if stats.last_delivery_time is not None:
            deployment.prediction_log_stats.last_delivery_time.FromDatetime(stats.last_delivery_time)
        return deployment

    def route_statuses(self, deployment_id: str) -> list[pb.RouteStatus]:
        active = self.engine.deployments.get(deployment_id)
        if active is None:
            return []
        window = self.config.route_window_s
        statuses = []
        for route in active.routes.values():
            if route.role == pb.ROUTE_ROLE_PINNED:
                continue
            statuses.append(self._route_status(route, window))
        return statuses

    def _route_status(self, route: Route, window: float) -> pb.RouteStatus:
        stats = route.window.stats(window)
        model = self.manager.get(route.model_version)
        status = pb.RouteStatus(
            model_version=route.model_version,
            role=cast(Any, route.role),
            variant_id=route.variant_id,
            traffic_percent=route.percent,
            served_model=f"servedModels/{served_model_id(route.model_version)}",
            served_model_state=cast(Any, model.state if model is not None else pb.SERVED_MODEL_STATE_UNLOADED),
        )
        metrics = status.metrics
        metrics.window.FromTimedelta(dt.timedelta(seconds=window))
        metrics.request_count = stats.request_count
        metrics.error_count = stats.error_count
        metrics.error_rate = stats.error_rate
        metrics.latency_p50.FromTimedelta(dt.timedelta(seconds=stats.latency_p50_s))
        metrics.latency_p99.FromTimedelta(dt.timedelta(seconds=stats.latency_p99_s))
        return status

    def _route_statuses_json(self, deployment_id: str) -> str:
        return json.dumps([json_format.MessageToDict(s, preserving_proto_field_name=True) for s in self.route_statuses(deployment_id)])

    def get_deployment(self, name: str) -> pb.Deployment:
        deployment_id = _deployment_id(name)
        with self.store.transaction() as session:
            row = self.store.get_deployment(session, deployment_id)
        if row is None:
            raise NotFound(f"{name} does not exist", reason="DEPLOYMENT_NOT_FOUND")
        return self.deployment_proto(row)

    def list_deployments(self, request: rr.ListDeploymentsRequest) -> rr.ListDeploymentsResponse:
        size = convert.page_size(request.page_size)
        after = convert.decode_token(request.page_token, "deployments") or ""
        state = convert.deployment_state_name(request.state) if request.state else ""
        with self.store.transaction() as session:
            rows = self.store.list_deployments(
                session, after=after, limit=size + 1, model=request.model, state=state, region=request.residency_region
            )
        response = rr.ListDeploymentsResponse(deployments=[self.deployment_proto(row) for row in rows[:size]])
        if len(rows) > size:
            response.next_page_token = convert.encode_token("deployments", rows[size - 1].id)
        return response

    def _rollout_values(
        self, deployment_id: str, revision: int, split: pb.TrafficSplit, previous: int, trigger: int, reason: str, canary_step: int = 0
    ) -> dict[str, Any]:
        in_progress = split.WhichOneof("strategy") == "canary"
        return {
            "deployment": deployment_id,
            "revision": revision,
            "traffic_split_json": convert.to_json(split),
            "previous_revision": previous,
            "state": "IN_PROGRESS" if in_progress else "SUCCEEDED",
            "trigger": convert.trigger_name(trigger),
            "reason": reason[:4000],
            "canary_step": canary_step,
            "created_by": _actor(),
            "created_at": _now(),
        }

    @staticmethod
    def _state_for(split: pb.TrafficSplit) -> str:
        return "UPDATING" if split.WhichOneof("strategy") == "canary" else "READY"

    def create_deployment(self, request: rr.CreateDeploymentRequest) -> rr.CreateDeploymentResponse:
        method = SERVICE + "CreateDeployment"
        deployment_id = request.deployment_id
        if not DEPLOYMENT_ID.match(deployment_id):
            raise InvalidArgument(
                "deployment_id must be 1-63 lowercase letters, digits and '-', starting with a letter or digit",
                reason="INVALID_DEPLOYMENT_ID",
                metadata={"field": "deployment_id"},
            )
        spec = request.deployment
        if not MODEL_NAME.match(spec.model):
            raise InvalidArgument("deployment.model must be models/{model}", reason="INVALID_MODEL", metadata={"field": "deployment.model"})
        validate_split(spec.traffic_split, spec.model)
        validate_settings(spec)
        region = spec.residency.region or self.config.region
        with self.store.transaction() as session:
            replayed = replayed_response(session, request_log, method, request, rr.CreateDeploymentResponse)
            existing = self.store.get_deployment(session, deployment_id)
        if replayed is not None:
            return replayed
        if existing is not None:
            raise AlreadyExists(f"deployments/{deployment_id} already exists", reason="DEPLOYMENT_EXISTS")
        self._check_region(region, f"deployments/{deployment_id}")
        if request.validate_only:
            return rr.CreateDeploymentResponse(deployment=spec)
        versions, _ = self._versions_of(spec.traffic_split)
        self._ensure_loaded(versions, spec.runtime)
        self._check_models_region(versions, region)
        now, actor = _now(), _actor()
        values = {
            "id": deployment_id,
            "display_name": spec.display_name,
            "description": spec.description,
            "model": spec.model,
            "residency_region": region,
            "current_revision": 1,
            "runtime_json": convert.to_json(spec.runtime),
            "feature_enrichment_json": convert.to_json(spec.feature_enrichment) if spec.HasField("feature_enrichment") else None,
            "prediction_log_json": convert.to_json(spec.prediction_log),
            "state": self._state_for(spec.traffic_split),
            "state_reason": "",
            "labels_json": json.dumps(dict(spec.labels), sort_keys=True),
            "etag": uuid.uuid4().hex,
            "created_by": actor,
            "created_at": now,
            "updated_by": actor,
            "updated_at": now,
        }
        rollout_values = self._rollout_values(deployment_id, 1, spec.traffic_split, 0, pb.ROLLOUT_TRIGGER_USER_UPDATE, "created")
        with self.store.transaction() as session:
            self.store.insert_deployment(session, values)
            self.store.insert_rollout(session, rollout_values)
            row = self.store.get_deployment(session, deployment_id)
            rollout = self.store.get_rollout(session, deployment_id, 1)
            assert row is not None and rollout is not None
            self._activate(row, rollout)
            response = rr.CreateDeploymentResponse(deployment=self.deployment_proto(row))
            remember(session, request_log, method, request, response)
        return response

    def update_deployment(self, request: rr.UpdateDeploymentRequest) -> rr.UpdateDeploymentResponse:
        method = SERVICE + "UpdateDeployment"
        deployment_id = _deployment_id(request.deployment.name, "deployment.name")
        paths = set(request.update_mask.paths)
        if not paths:
            raise InvalidArgument("update_mask names no field to change", reason="EMPTY_UPDATE_MASK")
        tops = {path.split(".", 1)[0] for path in paths}
        immutable = tops & {"model", "residency", "name"}
        if immutable:
            raise InvalidArgument(
                f"{sorted(immutable)[0]} cannot change", reason="IMMUTABLE_FIELD", metadata={"field": sorted(immutable)[0]}
            )
        unknown = tops - MUTABLE_PATHS
        if unknown:
            raise InvalidArgument(f"{sorted(unknown)[0]} is not a field that can be updated", reason="INVALID_UPDATE_MASK")
        with self.store.transaction() as session:
            replayed = replayed_response(session, request_log, method, request, rr.UpdateDeploymentResponse)
            row = self.store.get_deployment(session, deployment_id)
        if replayed is not None:
            return replayed
        if row is None:
            raise NotFound(f"deployments/{deployment_id} does not exist", reason="DEPLOYMENT_NOT_FOUND")
        if request.deployment.etag and request.deployment.etag != row.etag:
            raise Aborted(f"deployments/{deployment_id} changed since it was read; read it again", reason="ETAG_MISMATCH")
        merged = convert.deployment_to_proto(row)
        for path in paths:
            _copy_path(request.deployment, merged, path)
        new_split = request.deployment.traffic_split if "traffic_split" in tops else None
        if new_split is not None:
            validate_split(new_split, row.model)
        validate_settings(merged)
        if request.validate_only:
            return rr.UpdateDeploymentResponse(deployment=self.deployment_proto(row))
        if new_split is not None:
            versions, _ = self._versions_of(new_split)
            self._ensure_loaded(versions, merged.runtime)
            self._check_models_region(versions, row.residency_region)
        now, actor = _now(), _actor()
        values: dict[str, Any] = {
            "display_name": merged.display_name,
            "description": merged.description,
            "labels_json": json.dumps(dict(merged.labels), sort_keys=True),
            "runtime_json": convert.to_json(merged.runtime),
            "feature_enrichment_json": convert.to_json(merged.feature_enrichment) if merged.HasField("feature_enrichment") else None,
            "prediction_log_json": convert.to_json(merged.prediction_log),
            "etag": uuid.uuid4().hex,
            "updated_by": actor,
            "updated_at": now,
        }
        rollout_proto = None
        with self.store.transaction() as session:
            current = self.store.get_deployment(session, deployment_id, for_update=True)
            if current is None or current.etag != row.etag:
                raise Aborted(f"deployments/{deployment_id} changed during the update; retry", reason="CONCURRENT_UPDATE")
            if new_split is not None:
                revision = current.current_revision + 1
                self._close_rollout(session, deployment_id, current.current_revision, "SUPERSEDED")
                self.store.insert_rollout(
                    session,
                    self._rollout_values(
                        deployment_id, revision, new_split, current.current_revision, pb.ROLLOUT_TRIGGER_USER_UPDATE, request.reason
                    ),
                )
                values.update(current_revision=revision, state=self._state_for(new_split), state_reason="")
            self.store.update_deployment(session, deployment_id, values)
            fresh = self.store.get_deployment(session, deployment_id)
            assert fresh is not None
            rollout = self.store.get_rollout(session, deployment_id, fresh.current_revision)
            assert rollout is not None
            self._activate(fresh, rollout)
            if new_split is not None:
                rollout_proto = convert.rollout_to_proto(rollout)
            response = rr.UpdateDeploymentResponse(deployment=self.deployment_proto(fresh))
            if rollout_proto is not None:
                response.rollout.CopyFrom(rollout_proto)
            remember(session, request_log, method, request, response)
        self._apply_batching(fresh)
        return response

    def _apply_batching(self, row: DeploymentRow) -> None:
        """Batching settings apply to loaded versions at once; session options at their next load."""
        runtime = convert.from_json(row.runtime_json, pb.ModelRuntimeConfig)
        if not runtime.HasField("batching"):
            return
        active = self.engine.deployments.get(row.id)
        for version in active.versions if active is not None else []:
            model = self.manager.get(version)
            if model is not None and model.batcher is not None and runtime.batching.enabled:
                policy = model.batcher.policy
                model.batcher.policy = type(policy)(
                    max_batch_size=runtime.batching.max_batch_size or policy.max_batch_size,
                    max_queue_delay_s=runtime.batching.max_queue_delay.ToTimedelta().total_seconds()
                    if runtime.batching.HasField("max_queue_delay")
                    else policy.max_queue_delay_s,
                    max_queue_size=runtime.batching.max_queue_size or policy.max_queue_size,
                    preferred_batch_sizes=tuple(runtime.batching.preferred_batch_sizes),
                )

    def _close_rollout(self, session: Session, deployment_id: str, revision: int, state_if_open: str, *, force_state: str = "") -> None:
        rollout = self.store.get_rollout(session, deployment_id, revision)
        if rollout is None:
            return
        values: dict[str, Any] = {"route_statuses_json": self._route_statuses_json(deployment_id)}
        if force_state:
            values["state"] = force_state
        elif rollout.state == "IN_PROGRESS":
            values["state"] = state_if_open
        if rollout.end_time is None:
            values["end_time"] = _now()
        self.store.update_rollout(session, deployment_id, revision, values)

    def delete_deployment(self, request: rr.DeleteDeploymentRequest) -> rr.DeleteDeploymentResponse:
        method = SERVICE + "DeleteDeployment"
        deployment_id = _deployment_id(request.name)
        with self.store.transaction() as session:
            replayed = replayed_response(session, request_log, method, request, rr.DeleteDeploymentResponse)
            row = self.store.get_deployment(session, deployment_id)
        if replayed is not None:
            return replayed
        if row is None:
            raise NotFound(f"{request.name} does not exist", reason="DEPLOYMENT_NOT_FOUND")
        if request.etag and request.etag != row.etag:
            raise Aborted(f"{request.name} changed since it was read; read it again", reason="ETAG_MISMATCH")
        active = self.engine.deployments.get(deployment_id)
        versions = list(active.versions) if active is not None else []
        self._deactivate(deployment_id)
        response = rr.DeleteDeploymentResponse(name=request.name)
        with self.store.transaction() as session:
            self.store.delete_deployment(session, deployment_id)
            remember(session, request_log, method, request, response)
        if request.unload_models:
            for version in versions:
                if not self._routing_deployments(version):
                    self.manager.unload(version, self.config.drain_timeout_s)
                    self._record_state(version, pb.SERVED_MODEL_STATE_UNLOADED, f"unloaded with {request.name}", pb.ModelRuntimeConfig())
        return response

    def _open_revision(
        self,
        deployment_id: str,
        split: pb.TrafficSplit,
        trigger: int,
        reason: str,
        *,
        close_state: str,
        state: str,
        state_reason: str = "",
        expected_revision: int | None = None,
        canary_step: int = 0,
    ) -> tuple[DeploymentRow, RolloutRow] | None:
        """Write a new revision with `split`; None when the deployment moved past expected_revision."""
        with self.store.transaction() as session:
            current = self.store.get_deployment(session, deployment_id, for_update=True)
            if current is None:
                raise NotFound(f"deployments/{deployment_id} does not exist", reason="DEPLOYMENT_NOT_FOUND")
            if expected_revision is not None and current.current_revision != expected_revision:
                return None
            revision = current.current_revision + 1
            self._close_rollout(session, deployment_id, current.current_revision, close_state, force_state=close_state)
            self.store.insert_rollout(
                session, self._rollout_values(deployment_id, revision, split, current.current_revision, trigger, reason, canary_step)
            )
            self.store.update_deployment(
                session,
                deployment_id,
                {
                    "current_revision": revision,
                    "state": state,
                    "state_reason": state_reason,
                    "etag": uuid.uuid4().hex,
                    "updated_by": _actor(),
                    "updated_at": _now(),
                },
            )
            row = self.store.get_deployment(session, deployment_id)
            rollout = self.store.get_rollout(session, deployment_id, revision)
            assert row is not None and rollout is not None
            self._activate(row, rollout)
        return row, rollout

    def _current(self, deployment_id: str) -> tuple[DeploymentRow, pb.TrafficSplit, RolloutRow]:
        with self.store.transaction() as session:
            row = self.store.get_deployment(session, deployment_id)
            rollout = self.store.get_rollout(session, deployment_id, row.current_revision) if row is not None else None
        if row is None or rollout is None:
            raise NotFound(f"deployments/{deployment_id} does not exist", reason="DEPLOYMENT_NOT_FOUND")
        return row, convert.from_json(rollout.traffic_split_json, pb.TrafficSplit), rollout

    def promote_deployment(self, request: rr.PromoteDeploymentRequest) -> rr.PromoteDeploymentResponse:
        method = SERVICE + "PromoteDeployment"
        deployment_id = _deployment_id(request.name)
        with self.store.transaction() as session:
            replayed = replayed_response(session, request_log, method, request, rr.PromoteDeploymentResponse)
        if replayed is not None:
            return replayed
        row, split, _ = self._current(deployment_id)
        which = split.WhichOneof("strategy")
        if which == "canary":
            winner = split.canary.canary_model_version
        elif which == "ab_test":
            if not request.variant_id:
                raise InvalidArgument("variant_id names the variant to promote in an A-B split", reason="VARIANT_REQUIRED")
            active = self.engine.deployments.get(deployment_id)
            bindings = {r.variant_id: r.model_version for r in split.ab_test.variant_routes} or (active.variant_versions if active else {})
            winner = bindings.get(request.variant_id, "")
            if not winner:
                raise NotFound(f"the A-B split has no variant {request.variant_id!r}", reason="VARIANT_NOT_FOUND")
        else:
            raise FailedPrecondition(f"{request.name} has a single-version split; there is nothing to promote", reason="NOTHING_TO_PROMOTE")
        promoted = pb.TrafficSplit(single=pb.SingleVersionRouting(model_version=winner))
        promoted.shadows.extend(split.shadows)
        opened = self._open_revision(
            deployment_id,
            promoted,
            pb.ROLLOUT_TRIGGER_USER_PROMOTE,
            request.reason or f"promoted {winner}",
            close_state="SUCCEEDED",
            state="READY",
        )
        assert opened is not None
        fresh, rollout = opened
        self._audit("MODEL_PROMOTED", deployment_id, "promote", f"{winner} takes all traffic", {"model_version": winner})
        response = rr.PromoteDeploymentResponse(deployment=self.deployment_proto(fresh), rollout=convert.rollout_to_proto(rollout))
        with self.store.transaction() as session:
            remember(session, request_log, method, request, response)
        return response

    def rollback_deployment(self, request: rr.RollbackDeploymentRequest) -> rr.RollbackDeploymentResponse:
        method = SERVICE + "RollbackDeployment"
        deployment_id = _deployment_id(request.name)
        with self.store.transaction() as session:
            replayed = replayed_response(session, request_log, method, request, rr.RollbackDeploymentResponse)
        if replayed is not None:
            return replayed
        row, split, rollout = self._current(deployment_id)
        if request.to_revision < 0 or request.to_revision >= row.current_revision:
            raise InvalidArgument(f"to_revision must be an earlier revision than {row.current_revision}", reason="INVALID_REVISION")
        if request.to_revision == 0 and split.WhichOneof("strategy") == "canary":
            target = pb.TrafficSplit(single=pb.SingleVersionRouting(model_version=split.canary.stable_model_version))
            target.shadows.extend(split.shadows)
        else:
            revision = request.to_revision or rollout.previous_revision
            if revision <= 0:
                raise FailedPrecondition(f"{request.name} has no earlier revision to return to", reason="NO_EARLIER_REVISION")
            with self.store.transaction() as session:
                earlier = self.store.get_rollout(session, deployment_id, revision)
            if earlier is None:
                raise NotFound(f"{request.name} has no revision {revision}", reason="ROLLOUT_NOT_FOUND")
            target = convert.from_json(earlier.traffic_split_json, pb.TrafficSplit)
        versions, _ = self._versions_of(target)
        self._ensure_loaded(versions, convert.from_json(row.runtime_json, pb.ModelRuntimeConfig))
        reason = request.reason or "rolled back by a user"
        opened = self._open_revision(
            deployment_id, target, pb.ROLLOUT_TRIGGER_USER_ROLLBACK, reason, close_state="ROLLED_BACK", state=self._state_for(target)
        )
        assert opened is not None
        fresh, new_rollout = opened
        self._audit("DEPLOYMENT_ROLLED_BACK", deployment_id, "rollback", reason, {"revision": str(new_rollout.revision)})
        response = rr.RollbackDeploymentResponse(deployment=self.deployment_proto(fresh), rollout=convert.rollout_to_proto(new_rollout))
        with self.store.transaction() as session:
            remember(session, request_log, method, request, response)
        return response

    def get_rollout(self, name: str) -> pb.Rollout:
        match = re.match(r"^deployments/([a-z0-9][a-z0-9-]{0,62})/rollouts/([0-9]{1,18})$", name)
        if match is None:
            raise InvalidArgument("name must be deployments/{deployment_id}/rollouts/{revision}", reason="INVALID_NAME")
        with self.store.transaction() as session:
            rollout = self.store.get_rollout(session, match.group(1), int(match.group(2)))
        if rollout is None:
            raise NotFound(f"{name} does not exist", reason="ROLLOUT_NOT_FOUND")
        return convert.rollout_to_proto(rollout)

    def list_rollouts(self, request: rr.ListRolloutsRequest) -> rr.ListRolloutsResponse:
        deployment_id = _deployment_id(request.parent, "parent")
        size = convert.page_size(request.page_size)
        before = convert.decode_token(request.page_token, "rollouts")
        with self.store.transaction() as session:
            if self.store.get_deployment(session, deployment_id) is None:
                raise NotFound(f"{request.parent} does not exist", reason="DEPLOYMENT_NOT_FOUND")
            rows = self.store.list_rollouts(session, deployment_id, before=before, limit=size + 1)
        response = rr.ListRolloutsResponse(rollouts=[convert.rollout_to_proto(r) for r in rows[:size]])
        if len(rows) > size:
            response.next_page_token = convert.encode_token("rollouts", rows[size - 1].revision)
        return response

    def _audit(self, event: str, deployment_id: str, action: str, detail: str, attributes: dict[str, str]) -> None:
        try:
            self.auditor.report(event, resource=f"deployments/{deployment_id}", action=action, detail=detail, attributes=attributes)
        except FalajError as error:
            log.error("release event not audited", deployment=deployment_id, event_type=event, error=error.message)

    # -- canary judgement --------------------------------------------------------------------------
    def judge_canaries(self) -> None:
        for active in list(self.engine.deployments.values()):
            if active.strategy == "canary":
                try:
                    self._judge(active)
                except Unavailable as error:
                    log.warning("canary not judged", deployment=active.id, error=error.message)

    def _judge(self, active: ActiveDeployment) -> None:
        canary, stable = active.canary_route, active.stable_route
        assert canary is not None and stable is not None
        thresholds = active.split.canary.rollback_thresholds
        window = (
            thresholds.evaluation_window.ToTimedelta().total_seconds()
            if thresholds.HasField("evaluation_window")
            else self.config.route_window_s
        )
        seen = canary.window.stats(window)
        base = stable.window.stats(window)
        crossed = ""
        if seen.request_count >= max(thresholds.min_request_count, 1):
            if thresholds.max_error_rate and seen.error_rate > thresholds.max_error_rate:
                crossed = f"canary error rate {seen.error_rate:.3f} is above the limit {thresholds.max_error_rate:.3f}"
            elif thresholds.max_error_rate_increase and seen.error_rate - base.error_rate > thresholds.max_error_rate_increase:
                crossed = f"canary error rate {seen.error_rate:.3f} exceeds stable {base.error_rate:.3f} by more than {thresholds.max_error_rate_increase:.3f}"
            elif thresholds.HasField("max_latency_p99") and seen.latency_p99_s > thresholds.max_latency_p99.ToTimedelta().total_seconds():
                limit_ms = thresholds.max_latency_p99.ToTimedelta().total_seconds() * 1000
                crossed = f"canary p99 latency {seen.latency_p99_s * 1000:.1f} ms is above the limit {limit_ms:.1f} ms"
            elif thresholds.max_latency_p99_ratio and base.request_count and base.latency_p99_s > 0:
                ratio = seen.latency_p99_s / base.latency_p99_s
                if ratio > thresholds.max_latency_p99_ratio:
                    crossed = f"canary p99 latency is {ratio:.2f}x the stable's, above the limit {thresholds.max_latency_p99_ratio:.2f}x"
        if crossed:
            self._auto_rollback(active, crossed)
            return
        steps = active.split.canary.steps
        if not steps:
            return
        step = steps[min(active.canary_step, len(steps) - 1)]
        created = getattr(active, "rollout_created_at", None)
        if created is None or _now() - created < step.hold.ToTimedelta():
            return
        if active.canary_step + 1 < len(steps):
            self._open_revision(
                active.id,
                active.split,
                pb.ROLLOUT_TRIGGER_CANARY_STEP,
                f"step {active.canary_step} held; canary at {steps[active.canary_step + 1].canary_percent}%",
                close_state="SUCCEEDED",
                state="UPDATING",
                expected_revision=active.revision,
                canary_step=active.canary_step + 1,
            )
        elif active.split.canary.auto_promote:
            winner = active.split.canary.canary_model_version
            promoted = pb.TrafficSplit(single=pb.SingleVersionRouting(model_version=winner))
            promoted.shadows.extend(active.split.shadows)
            if self._open_revision(
                active.id,
                promoted,
                pb.ROLLOUT_TRIGGER_AUTO_PROMOTE,
                "every canary step held",
                close_state="SUCCEEDED",
                state="READY",
                expected_revision=active.revision,
            ):
                self._audit("MODEL_PROMOTED", active.id, "auto-promote", f"{winner} passed every canary step", {"model_version": winner})

    def _auto_rollback(self, active: ActiveDeployment, reason: str) -> None:
        target = pb.TrafficSplit(single=pb.SingleVersionRouting(model_version=active.split.canary.stable_model_version))
        target.shadows.extend(active.split.shadows)
        opened = self._open_revision(
            active.id,
            target,
            pb.ROLLOUT_TRIGGER_AUTO_ROLLBACK,
            reason,
            close_state="ROLLED_BACK",
            state="DEGRADED",
            state_reason=f"canary {active.split.canary.canary_model_version} rolled back: {reason}",
            expected_revision=active.revision,
        )
        if opened is None:
            return  # another replica (or a user) changed the split first
        log.warning("canary rolled back", deployment=active.id, canary=active.split.canary.canary_model_version, reason=reason)
        self._audit(
            "DEPLOYMENT_ROLLED_BACK",
            active.id,
            "auto-rollback",
            reason,
            {"canary": active.split.canary.canary_model_version, "revision": str(opened[1].revision)},
        )


def _copy_path(source: pb.Deployment, target: pb.Deployment, path: str) -> None:
    """Copy one field-mask path from source to target (messages replaced whole at their depth)."""
    parts = path.split(".")
    src: Any = source
    dst: Any = target
    for part in parts[:-1]:
        src = getattr(src, part)
        dst = getattr(dst, part)
    last = parts[-1]
    descriptor = dst.DESCRIPTOR.fields_by_name.get(last)
    if descriptor is None:
        raise InvalidArgument(f"{path} is not a field of a deployment", reason="INVALID_UPDATE_MASK")
    if descriptor.message_type is not None and not descriptor.is_repeated:
        if src.HasField(last):
            getattr(dst, last).CopyFrom(getattr(src, last))
        else:
            dst.ClearField(last)
    elif descriptor.is_repeated:
        dst.ClearField(last)
        value = getattr(src, last)
        if hasattr(value, "items"):
            getattr(dst, last).update(dict(value.items()))
        else:
            getattr(dst, last).extend(value)
    else:
        setattr(dst, last, getattr(src, last))
