"""Serving settings: one frozen object built from the process settings at boot.

Defaults are the values a deployment gets when its own config leaves a field unset;
tests tune the pace of the background loops through `build_spec(configure=...)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from falaj_platform.runtime.settings import PkiPaths, Settings


@dataclass(frozen=True)
class BatchingDefaults:
    """Dynamic batching used when a deployment's runtime leaves it unset."""

    enabled: bool = True
    max_batch_size: int = 64
    max_queue_delay_s: float = 0.002
    max_queue_size: int = 2048


@dataclass(frozen=True)
class ServingConfig:
    """Everything the serving service needs to know besides its store."""

    region: str
    gateway_addr: str
    pki: PkiPaths
    replica_id: str
    # Regions whose models and deployments this replica may serve besides its own.
    allowed_foreign_regions: frozenset[str] = frozenset()
    intra_op_threads: int = 1
    inter_op_threads: int = 1
    batching: BatchingDefaults = field(default_factory=BatchingDefaults)
    warmup_request_count: int = 2
    request_timeout_s: float = 30.0
    drain_timeout_s: float = 30.0
    upstream_timeout_s: float = 10.0
    # How often a replica re-reads deployments and served models written by other replicas.
    sync_interval_s: float = 2.0
    # How often canaries are judged (a failing canary request also wakes the judge).
    canary_check_interval_s: float = 0.5
    assignment_config_refresh_s: float = 5.0
    shadow_queue_size: int = 256
    prediction_log_queue_capacity: int = 10_000
    prediction_log_max_batch_rows: int = 500
    prediction_log_flush_interval_s: float = 1.0
    prediction_log_send_attempts: int = 2
    exposure_flush_interval_s: float = 1.0
    route_window_s: float = 60.0
    # Batch prediction jobs: jobs run one at a time per replica, beside the online traffic.
    batch_job_workers: int = 1
    batch_job_poll_interval_s: float = 2.0
    # How often a running job writes its progress, renews its heartbeat and looks for a cancel.
    batch_job_progress_interval_s: float = 1.0
    # A RUNNING job whose heartbeat is older than this lost its replica and is failed.
    batch_job_stale_s: float = 60.0
    batch_job_default_batch_size: int = 1024
    # Deadline of one job's input read and output write streams.
    batch_job_stream_timeout_s: float = 6 * 3600.0

    @staticmethod
    def from_settings(settings: Settings) -> ServingConfig:
        return ServingConfig(region=settings.region, gateway_addr=settings.gateway_addr, pki=settings.pki, replica_id=settings.listen_addr)

    def tuned(self, **changes: object) -> ServingConfig:
        return replace(self, **changes)  # type: ignore[arg-type]
