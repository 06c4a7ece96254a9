"""What every monitoring use case shares: the store, settings, clients to other services,
gauges, the reference cache, per-monitor locks and the worker's wake-up call.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections import OrderedDict, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from falaj_platform.runtime.audit import AuditReporter
from falaj_platform.services.monitoring import profiles
from falaj_platform.services.monitoring.config import MonitoringConfig
from falaj_platform.services.monitoring.drift import Array
from falaj_platform.services.monitoring.metrics import MonitoringMetrics
from falaj_platform.services.monitoring.profiles import ColumnSpec
from falaj_platform.services.monitoring.store import MonitoringStore
from falaj_platform.services.monitoring.upstream import GatewayClients


class ReferenceCache:
    """Reference samples as drift-test arrays, kept for the most recently used profiles."""

    def __init__(self, capacity: int = 8):
        self.capacity = capacity
        self._entries: OrderedDict[tuple[str, str], dict[str, Array]] = OrderedDict()
        self._lock = threading.Lock()

    def arrays(self, sample_path: str, specs: Sequence[ColumnSpec]) -> dict[str, Array]:
        key = (sample_path, ",".join(f"{s.name}:{s.kind.value if s.kind else ''}" for s in specs))
        with self._lock:
            cached = self._entries.get(key)
            if cached is not None:
                self._entries.move_to_end(key)
                return cached
        table = profiles.read_sample(Path(sample_path))
        arrays = {
            spec.name: profiles.column_values(table.column(spec.name), spec.kind)
            for spec in specs
            if spec.kind is not None and spec.name in table.column_names
        }
        with self._lock:
            self._entries[key] = arrays
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return arrays

    def forget(self, sample_path: str) -> None:
        with self._lock:
            for key in [k for k in self._entries if k[0] == sample_path]:
                del self._entries[key]


@dataclass
class Context:
    store: MonitoringStore
    config: MonitoringConfig
    clients: GatewayClients
    metrics: MonitoringMetrics
    audit: AuditReporter
    references: ReferenceCache = field(default_factory=ReferenceCache)
    wake: threading.Event = field(default_factory=threading.Event)
    _locks: defaultdict[str, threading.Lock] = field(default_factory=lambda: defaultdict(threading.Lock))
    _locks_guard: threading.Lock = field(default_factory=threading.Lock)

    def now(self) -> dt.datetime:
        return self.config.clock()

    def monitor_lock(self, monitor_id: str) -> threading.Lock:
        """Serializes window evaluation of one monitor within this process (reports are also
        unique per window in the database, for replicas)."""
        with self._locks_guard:
            return self._locks[monitor_id]
