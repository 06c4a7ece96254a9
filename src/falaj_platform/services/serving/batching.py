"""Dynamic batching: concurrent requests to one model merged into one ONNX Runtime call.

As Triton's dynamic batcher: requests wait in a bounded queue, a batch is cut when it
reaches `max_batch_size` rows or its first request has waited `max_queue_delay`, the
inputs are concatenated along the first dimension, run once, and the outputs sliced
back per request. Two refinements keep latency low:

- a request that finds the model idle, nothing queued and no other request on its way
  runs at once in its own thread (no hand-off, no waiting for company that is not coming);
- the batch thread only waits out the queue delay while more requests are on their way
  (the model's in-flight count is larger than what is queued), so a lone request is
  never held back for nothing. Under load, requests that arrive while a batch runs
  form the next batch by themselves.

With `preferred_batch_sizes` the batcher behaves as Triton's does: every request waits
(up to the queue delay) for a batch of a preferred size to form.

A full queue refuses at once with RESOURCE_EXHAUSTED instead of growing.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from falaj.sdk.errors import DeadlineExceeded
from falaj_platform.runtime.errors import FalajError, Internal, ResourceExhausted, Unavailable

RunBatch = Callable[[Mapping[str, np.ndarray]], Sequence[np.ndarray]]
"""Runs the model on merged inputs; returns every output, in the model's output order."""


@dataclass(frozen=True)
class BatchingPolicy:
    """How one model's requests are merged."""

    max_batch_size: int = 64
    max_queue_delay_s: float = 0.002
    max_queue_size: int = 2048
    preferred_batch_sizes: tuple[int, ...] = ()


class _Pending:
    __slots__ = ("done", "error", "inputs", "key", "outputs", "rows")

    def __init__(self, inputs: Mapping[str, np.ndarray], rows: int, key: tuple[object, ...]):
        self.inputs = inputs
        self.rows = rows
        self.key = key
        # A held lock is the cheapest one-shot signal: released once the answer is in.
        self.done = threading.Lock()
        self.done.acquire()
        self.outputs: Sequence[np.ndarray] = ()
        self.error: BaseException | None = None


def merge_key(inputs: Mapping[str, np.ndarray]) -> tuple[object, ...]:
    """Requests merge only when their inputs agree on everything but the first dimension."""
    return tuple((name, array.dtype.str, array.shape[1:]) for name, array in sorted(inputs.items()))


class DynamicBatcher:
    """The queue and batch thread of one loaded model version."""

    def __init__(self, name: str, run: RunBatch, policy: BatchingPolicy, in_flight: Callable[[], int]):
        self.name = name
        self._run = run
        self.policy = policy
        self._in_flight = in_flight
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queue: deque[_Pending] = deque()
        self._busy = False
        self._stopped = False
        self.runs = 0  # ONNX Runtime calls made
        self.requests = 0  # requests answered through those calls
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    # -- the caller's side -------------------------------------------------------------------
    def submit(self, inputs: Mapping[str, np.ndarray], rows: int, timeout: float) -> Sequence[np.ndarray]:
        pending = _Pending(inputs, rows, merge_key(inputs))
        with self._lock:
            if self._stopped:
                raise Unavailable(f"{self.name} is unloading; retry", reason="MODEL_UNLOADING")
            # Alone with the model: run now. With company on its way, queue and let the
            # batch thread gather it (for at most the queue delay).
            inline = (
                not self._busy
                and not self._queue
                and not self.policy.preferred_batch_sizes
                and (self._in_flight() <= 1 or self.policy.max_queue_delay_s <= 0)
            )
            if inline:
                self._busy = True
            else:
                if len(self._queue) >= self.policy.max_queue_size:
                    raise ResourceExhausted(
                        f"{self.name} has {len(self._queue)} requests waiting, its limit; retry with backoff", reason="QUEUE_FULL"
                    )
                self._queue.append(pending)
                self._wake.notify()
        if inline:
            try:
                self._execute([pending])
            finally:
                with self._lock:
                    self._busy = False
                    if self._queue:
                        self._wake.notify()
        elif not pending.done.acquire(timeout=timeout):
            with self._lock:
                try:
                    self._queue.remove(pending)
                except ValueError:
                    pass  # already running; its answer is dropped
            raise DeadlineExceeded(f"{self.name} did not answer within {timeout:.3f}s", reason="INFERENCE_TIMEOUT")
        if pending.error is not None:
            raise pending.error
        return pending.outputs

    # -- the batch thread --------------------------------------------------------------------
    def _take_batch(self) -> list[_Pending]:
        """Cut the next batch from the queue; called with the lock held and the queue not empty."""
        first = self._queue[0]
        deadline = time.monotonic() + self.policy.max_queue_delay_s
        limit = self.policy.max_batch_size
        preferred = set(self.policy.preferred_batch_sizes)
        while True:
            rows = sum(p.rows for p in self._queue if p.key == first.key)
            # Adaptive by default: wait only while more requests are on their way. With
            # preferred sizes, as Triton: wait (up to the delay) for a preferred size.
            arriving = self._in_flight() - len(self._queue) if not preferred else 1
            if rows >= limit or rows in preferred or arriving <= 0 or self._stopped:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._wake.wait(remaining)
        batch: list[_Pending] = []
        kept: deque[_Pending] = deque()
        rows = 0
        while self._queue:
            pending = self._queue.popleft()
            if pending.key == first.key and (not batch or rows + pending.rows <= limit):
                batch.append(pending)
                rows += pending.rows
            else:
                kept.append(pending)
        self._queue = kept
        return batch

    def _loop(self) -> None:
        while True:
            with self._lock:
                while (self._busy or not self._queue) and not self._stopped:
                    self._wake.wait()
                if self._stopped and not self._queue:
                    return
                self._busy = True
                batch = self._take_batch()
            try:
                self._execute(batch)
            finally:
                with self._lock:
                    self._busy = False

    def _execute(self, batch: list[_Pending]) -> None:
        try:
            if len(batch) == 1:
                outputs = self._run(batch[0].inputs)
                batch[0].outputs = outputs
            else:
                merged = {name: np.concatenate([p.inputs[name] for p in batch]) for name in batch[0].inputs}
                outputs = self._run(merged)
                total = sum(p.rows for p in batch)
                if any(not output.shape or output.shape[0] != total for output in outputs):
                    raise Internal(f"{self.name} returned outputs that do not follow the batch dimension; disable batching for it")
                offset = 0
                for pending in batch:
                    end = offset + pending.rows
                    pending.outputs = [output[offset:end] for output in outputs]
                    offset = end
            self.runs += 1
            self.requests += len(batch)
        except FalajError as error:
            for pending in batch:
                pending.error = error
        except Exception as error:  # noqa: BLE001 - handed to every waiting request
            failure = Internal(f"{self.name} failed to run: {type(error).__name__}: {str(error)[:300]}", reason="INFERENCE_FAILED")
            for pending in batch:
                pending.error = failure
        for pending in batch:
            if pending.done.locked():
                pending.done.release()

    # -- lifecycle ---------------------------------------------------------------------------
    def queued(self) -> int:
        with self._lock:
            return len(self._queue)

    def stop(self) -> None:
        """Finish what is queued, then end the batch thread."""
        with self._lock:
            self._stopped = True
            self._wake.notify_all()
        self._thread.join(timeout=10)
