"""Sliding-window request counts and latencies per route, for canary judgement and status.

Requests fall into one-second buckets; a bucket keeps its count, its errors and up to
`SAMPLES_PER_BUCKET` latencies (a uniform reservoir beyond that), so recording costs a
few list operations and percentiles over a window stay exact at low rates and unbiased
at high ones.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from dataclasses import dataclass

SAMPLES_PER_BUCKET = 512


@dataclass
class _Bucket:
    second: int
    count: int = 0
    errors: int = 0
    latencies: list[float] | None = None


@dataclass(frozen=True)
class WindowStats:
    window_s: float
    request_count: int
    error_count: int
    latency_p50_s: float
    latency_p99_s: float

    @property
    def error_rate(self) -> float:
        return self.error_count / self.request_count if self.request_count else 0.0


def percentile(ordered: list[float], fraction: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


class RouteWindow:
    """Counts and latencies of one route over the last `horizon_s` seconds."""

    def __init__(self, horizon_s: float = 600.0):
        self.horizon = int(horizon_s) + 1
        self._buckets: deque[_Bucket] = deque()
        self._lock = threading.Lock()
        self._random = random.Random(7)

    def record(self, latency_s: float, failed: bool, now: float | None = None) -> None:
        second = int(now if now is not None else time.monotonic())
        with self._lock:
            if not self._buckets or self._buckets[-1].second != second:
                self._buckets.append(_Bucket(second, latencies=[]))
                while self._buckets and self._buckets[0].second <= second - self.horizon:
                    self._buckets.popleft()
            bucket = self._buckets[-1]
            bucket.count += 1
            if failed:
                bucket.errors += 1
            samples = bucket.latencies
            assert samples is not None
            if len(samples) < SAMPLES_PER_BUCKET:
                samples.append(latency_s)
            else:
                slot = self._random.randrange(bucket.count)
                if slot < SAMPLES_PER_BUCKET:
                    samples[slot] = latency_s

    def stats(self, window_s: float, now: float | None = None) -> WindowStats:
        now_s = now if now is not None else time.monotonic()
        first = now_s - window_s
        count = errors = 0
        latencies: list[float] = []
        with self._lock:
            for bucket in self._buckets:
                if bucket.second + 1 <= first:
                    continue
                count += bucket.count
                errors += bucket.errors
                latencies.extend(bucket.latencies or ())
        latencies.sort()
        return WindowStats(window_s, count, errors, percentile(latencies, 0.5), percentile(latencies, 0.99))

    def reset(self) -> None:
        with self._lock:
            self._buckets.clear()
