"""A-B variant assignment from the experiments service, and exposures reported back.

Assignment is deterministic (bucket = hash(salt + unit id) mod 10000, buckets to
variants by the experiment's ranges), so the same routing key always gets the same
variant: routing is sticky without any session state here. Serving caches the
experiment's assignment config (GetAssignmentConfig, refreshed by revision) and
evaluates it locally when the experiment has no targeting rules; with targeting it asks
AssignVariant and caches each unit's answer for the config revision.

Exposures are queued and sent in batches (RecordExposures) by a background thread,
never on an answer's path.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import threading
import time
import uuid
from bisect import bisect_right
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import grpc

from falaj.experiments.v1 import message_pb2 as exp_pb
from falaj.experiments.v1 import request_response_pb2 as exp_rr
from falaj.experiments.v1 import service_pb2_grpc as exp_service
from falaj_platform.runtime.clients import secure_channel
from falaj_platform.runtime.errors import FailedPrecondition, NotFound, Unavailable
from falaj_platform.runtime.logs import get_logger
from falaj_platform.runtime.settings import PkiPaths

log = get_logger()
TOTAL_BUCKETS = 10_000
_FNV_OFFSET = 0x811C9DC5
_FNV_PRIME = 0x01000193


@dataclass(frozen=True)
class VariantAssignment:
    """The variant a routing key gets, and the model version bound to it in the experiment."""

    variant_id: str
    in_experiment: bool
    model_version: str = ""


class VariantAssigner(Protocol):
    def assign(self, experiment: str, unit_id: str, attributes: Mapping[str, str]) -> VariantAssignment: ...


def _fnv1a_32(text: str) -> int:
    value = _FNV_OFFSET
    for byte in text.encode():
        value = ((value ^ byte) * _FNV_PRIME) & 0xFFFFFFFF
    return value


def bucket_of(salt: str, unit_id: str, algorithm: int) -> int:
    """The unit's bucket as the experiments contract defines it (HashAlgorithm)."""
    if algorithm == exp_pb.HASH_ALGORITHM_FNV1A_32:
        return _fnv1a_32(str(_fnv1a_32(salt + unit_id))) % TOTAL_BUCKETS
    return int.from_bytes(hashlib.sha256((salt + unit_id).encode()).digest()[:8], "big") % TOTAL_BUCKETS


class _Evaluator:
    """Local evaluation of one assignment config without targeting."""

    def __init__(self, config: exp_pb.AssignmentConfig):
        self.config = config
        self.running = config.state == exp_pb.EXPERIMENT_STATE_RUNNING
        ranges = sorted(config.bucket_ranges, key=lambda r: r.start_bucket)
        self._starts = [r.start_bucket for r in ranges]
        self._ranges = ranges
        self._versions = {v.variant_id: v.model_version for v in config.variants}
        self.control = next((v.variant_id for v in config.variants if v.control), config.variants[0].variant_id if config.variants else "")
        self._salt = config.hashing.salt or config.experiment.rsplit("/", 1)[-1]

    def assign(self, unit_id: str) -> VariantAssignment:
        if not self.running:
            return VariantAssignment(self.control, False, self._versions.get(self.control, ""))
        bucket = bucket_of(self._salt, unit_id, self.config.hashing.algorithm)
        index = bisect_right(self._starts, bucket) - 1
        if index >= 0 and bucket < self._ranges[index].end_bucket:
            variant = self._ranges[index].variant_id
            return VariantAssignment(variant, True, self._versions.get(variant, ""))
        return VariantAssignment(self.control, False, self._versions.get(self.control, ""))


class ExperimentsAssigner:
    """Assignments from the experiments service through the gateway, cached by config revision."""

    def __init__(self, gateway_addr: str, pki: PkiPaths, *, refresh_s: float = 5.0, timeout: float = 5.0, unit_cache_size: int = 100_000):
        self.gateway_addr = gateway_addr
        self.pki = pki
        self.refresh_s = refresh_s
        self.timeout = timeout
        self.unit_cache_size = unit_cache_size
        self._channel: grpc.Channel | None = None
        self._configs: dict[str, tuple[float, exp_pb.AssignmentConfig, _Evaluator]] = {}
        self._units: dict[tuple[str, int, str], VariantAssignment] = {}
        self._lock = threading.Lock()

    def _stub(self) -> exp_service.ExperimentsServiceStub:
        with self._lock:
            if self._channel is None:
                self._channel = secure_channel(self.gateway_addr, self.pki)
            return exp_service.ExperimentsServiceStub(self._channel)

    def _config(self, experiment: str) -> tuple[exp_pb.AssignmentConfig, _Evaluator]:
        cached = self._configs.get(experiment)
        now = time.monotonic()
        if cached is not None and now - cached[0] < self.refresh_s:
            return cached[1], cached[2]
        known = cached[1].config_revision if cached is not None else 0
        try:
            reply = self._stub().GetAssignmentConfig(
                exp_rr.GetAssignmentConfigRequest(experiment=experiment, known_config_revision=known), timeout=self.timeout
            )
        except grpc.RpcError as error:
            if cached is not None:  # keep routing on the last config while the service is away
                log.warning("experiments unavailable; using the cached assignment config", experiment=experiment)
                return cached[1], cached[2]
            raise _experiments_error(error, experiment) from None
        if reply.not_modified and cached is not None:
            config, evaluator = cached[1], cached[2]
        else:
            config, evaluator = reply.config, _Evaluator(reply.config)
        with self._lock:
            self._configs[experiment] = (now, config, evaluator)
        return config, evaluator

    def variant_versions(self, experiment: str) -> dict[str, str]:
        """The model version each variant is bound to in the experiment (variants bound to one)."""
        config, _ = self._config(experiment)
        return {variant.variant_id: variant.model_version for variant in config.variants if variant.model_version}

    def assign(self, experiment: str, unit_id: str, attributes: Mapping[str, str]) -> VariantAssignment:
        config, evaluator = self._config(experiment)
        if not config.targeting.any_of:
            return evaluator.assign(unit_id)
        key = (experiment, config.config_revision, unit_id)
        hit = self._units.get(key)
        if hit is not None:
            return hit
        request = exp_rr.AssignVariantRequest(experiment=experiment, unit_id=unit_id)
        for name, value in attributes.items():
            request.attributes[name].string_value = value
        try:
            reply = self._stub().AssignVariant(request, timeout=self.timeout)
        except grpc.RpcError as error:
            raise _experiments_error(error, experiment) from None
        answer = VariantAssignment(reply.assignment.variant_id, reply.assignment.in_experiment, reply.assignment.model_version)
        with self._lock:
            if len(self._units) >= self.unit_cache_size:
                self._units.clear()
            self._units[key] = answer
        return answer

    def close(self) -> None:
        with self._lock:
            if self._channel is not None:
                self._channel.close()
                self._channel = None


def _experiments_error(error: grpc.RpcError, experiment: str) -> Exception:
    code = error.code() if isinstance(error, grpc.Call) else None
    details = (error.details() if isinstance(error, grpc.Call) else "") or ""
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(f"the experiments service has no {experiment}", reason="EXPERIMENT_NOT_FOUND")
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED):
        return FailedPrecondition(f"the experiments service refused {experiment}: {details}", reason="EXPERIMENT_REFUSED")
    return Unavailable(f"the experiments service is unavailable ({code.name if code else 'error'})", reason="EXPERIMENTS_UNAVAILABLE")


# -- exposures ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ExposureEvent:
    experiment: str
    event_id: str
    unit_id: str
    variant_id: str
    time: dt.datetime
    source: str


class ExposureSink(Protocol):
    def send(self, experiment: str, exposures: list[ExposureEvent]) -> None: ...


class ExperimentsExposureSink:
    """RecordExposures through the gateway."""

    def __init__(self, gateway_addr: str, pki: PkiPaths, timeout: float = 10.0):
        self.gateway_addr = gateway_addr
        self.pki = pki
        self.timeout = timeout
        self._channel: grpc.Channel | None = None

    def send(self, experiment: str, exposures: list[ExposureEvent]) -> None:
        if self._channel is None:
            self._channel = secure_channel(self.gateway_addr, self.pki)
        request = exp_rr.RecordExposuresRequest(experiment=experiment, request_id=uuid.uuid4().hex)
        for event in exposures:
            exposure = request.exposures.add(
                event_id=event.event_id, unit_id=event.unit_id, variant_id=event.variant_id, source=event.source
            )
            exposure.time.FromDatetime(event.time)
        exp_service.ExperimentsServiceStub(self._channel).RecordExposures(request, timeout=self.timeout)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None


class ExposureRecorder:
    """Bounded queue of exposures, flushed in batches by one background thread."""

    def __init__(self, sink: ExposureSink, *, flush_interval_s: float = 1.0, capacity: int = 50_000, max_batch: int = 5_000):
        self.sink = sink
        self.flush_interval_s = flush_interval_s
        self.capacity = capacity
        self.max_batch = max_batch
        self.sent = 0
        self.dropped = 0
        self._queue: list[ExposureEvent] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="exposures", daemon=True)
        self._thread.start()

    def record(self, event: ExposureEvent) -> None:
        with self._lock:
            if len(self._queue) >= self.capacity:
                self.dropped += 1
                return
            self._queue.append(event)
            if len(self._queue) >= self.max_batch:
                self._wake.set()

    def flush(self) -> None:
        with self._lock:
            pending, self._queue = self._queue, []
        by_experiment: dict[str, list[ExposureEvent]] = {}
        for event in pending:
            by_experiment.setdefault(event.experiment, []).append(event)
        for experiment, events in by_experiment.items():
            for start in range(0, len(events), self.max_batch):
                chunk = events[start : start + self.max_batch]
                try:
                    self.sink.send(experiment, chunk)
                    self.sent += len(chunk)
                except Exception as error:  # noqa: BLE001 - exposures are best effort, counted when lost
                    self.dropped += len(chunk)
                    log.warning("exposures not recorded", experiment=experiment, rows=len(chunk), error=str(error)[:200])

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            self.flush()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)
        self.flush()
