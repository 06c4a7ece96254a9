"""Monitoring's settings, derived once at boot from the process settings (no environment
reads here: the runtime's `Settings` is the one place that reads it).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from falaj_platform.runtime.settings import PkiPaths, Settings


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class MonitoringConfig:
    """Where monitoring keeps files, whom it calls, and how often its worker looks for work."""

    data_dir: Path
    region: str
    gateway_addr: str
    pki: PkiPaths
    # Worker wake-up when idle; work queued by a request wakes it at once.
    worker_interval_seconds: float = 1.0
    # Every rule is re-evaluated this often (for_duration and spans ending "now").
    rule_interval_seconds: float = 10.0
    retention_interval_seconds: float = 300.0
    # Most rows read for one window or span; a larger window is evaluated on its first rows.
    max_window_rows: int = 500_000
    # Attempts to start a retraining job while training is unreachable.
    retraining_attempts: int = 5
    # First wait before retrying an unreachable training service; doubles each time.
    retraining_backoff_seconds: float = 2.0
    upstream_timeout_seconds: float = 15.0
    clock: Callable[[], dt.datetime] = field(default=utc_now)

    @property
    def reference_dir(self) -> Path:
        return self.data_dir / "references"

    @classmethod
    def from_settings(cls, settings: Settings) -> MonitoringConfig:
        return cls(data_dir=settings.data_dir, region=settings.region, gateway_addr=settings.gateway_addr, pki=settings.pki)
