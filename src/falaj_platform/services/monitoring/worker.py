"""The monitoring worker: one background thread per server that delivers notifications,
starts retraining jobs, closes time windows, re-checks rules and applies retention.

The runtime stops it after the server has stopped serving, so a stopped service
leaves no thread behind.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from falaj_platform.runtime.logs import get_logger
from falaj_platform.services.monitoring import delivery
from falaj_platform.services.monitoring.context import Context

log = get_logger()


class Worker(threading.Thread):
    def __init__(self, ctx: Context):
        super().__init__(name="monitoring-worker", daemon=True)
        self.ctx = ctx
        self._stopping = threading.Event()
        self._last_rules = 0.0
        self._last_retention = 0.0

    def _serving(self) -> bool:
        return not self._stopping.is_set()

    def stop(self) -> None:
        """Finish the current step and end the thread."""
        self._stopping.set()
        self.ctx.wake.set()
        if self.is_alive():
            self.join(timeout=30)

    def _run_step(self, name: str, step: Callable[[Context], object]) -> None:
        try:
            step(self.ctx)
        except Exception:
            log.exception("monitoring worker step failed", step=name)

    def run(self) -> None:
        config = self.ctx.config
        while self._serving():
            self.ctx.wake.wait(timeout=config.worker_interval_seconds)
            self.ctx.wake.clear()
            if not self._serving():
                break
            self._run_step("notifications", delivery.deliver_due_notifications)
            self._run_step("retraining", delivery.start_due_retraining)
            self._run_step("time windows", delivery.close_time_windows)
            now = time.monotonic()
            if now - self._last_rules >= config.rule_interval_seconds:
                self._last_rules = now
                self._run_step("rules", delivery.evaluate_all_rules)
            if now - self._last_retention >= config.retention_interval_seconds:
                self._last_retention = now
                self._run_step("retention", delivery.apply_retention)
