"""Alert rules as a state machine: when a condition starts an alert, fires it, resolves
it; and how notifications are built, signed and retried.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass


class Comparator(enum.Enum):
    GREATER_THAN = "GREATER_THAN"
    GREATER_OR_EQUAL = "GREATER_OR_EQUAL"
    LESS_THAN = "LESS_THAN"
    LESS_OR_EQUAL = "LESS_OR_EQUAL"

    @property
    def symbol(self) -> str:
        return {"GREATER_THAN": ">", "GREATER_OR_EQUAL": ">=", "LESS_THAN": "<", "LESS_OR_EQUAL": "<="}[self.value]


class AlertState(enum.Enum):
    PENDING = "PENDING"
    FIRING = "FIRING"
    RESOLVED = "RESOLVED"


def condition_holds(value: float | None, comparator: Comparator, threshold: float) -> bool:
    """Whether a metric value crosses the threshold; no value never does."""
    if value is None:
        return False
    if comparator is Comparator.GREATER_THAN:
        return value > threshold
    if comparator is Comparator.GREATER_OR_EQUAL:
        return value >= threshold
    if comparator is Comparator.LESS_THAN:
        return value < threshold
    return value <= threshold


@dataclass(frozen=True)
class OpenAlert:
    """The alert a rule has open now (pending or firing)."""

    state: AlertState
    start_time: dt.datetime


class Step(enum.Enum):
    """What an evaluation does to a rule's alert."""

    NOTHING = "NOTHING"  # no alert and none needed
    START_PENDING = "START_PENDING"  # condition began; waiting for for_duration
    START_FIRING = "START_FIRING"  # condition began and for_duration is zero
    KEEP = "KEEP"  # same state; only the observed value is updated
    FIRE = "FIRE"  # pending long enough
    DROP_PENDING = "DROP_PENDING"  # cleared before it fired: never announced, forgotten
    RESOLVE = "RESOLVE"  # firing and cleared


def next_step(open_alert: OpenAlert | None, holds: bool, now: dt.datetime, for_duration: dt.timedelta) -> Step:
    """The Prometheus alerting model: pending until the condition held `for_duration`."""
    if open_alert is None:
        if not holds:
            return Step.NOTHING
        return Step.START_FIRING if for_duration <= dt.timedelta(0) else Step.START_PENDING
    if open_alert.state is AlertState.PENDING:
        if not holds:
            return Step.DROP_PENDING
        return Step.FIRE if now - open_alert.start_time >= for_duration else Step.KEEP
    return Step.KEEP if holds else Step.RESOLVE


# -- notifications ------------------------------------------------------------------------

SIGNATURE_HEADER = "X-Falaj-Signature"


@dataclass(frozen=True)
class RetrySchedule:
    """Exponential backoff: `initial`, doubling, capped at `maximum`, `max_attempts` in all."""

    max_attempts: int = 5
    initial: dt.timedelta = dt.timedelta(seconds=1)
    maximum: dt.timedelta = dt.timedelta(minutes=5)

    def delay_after(self, attempt: int) -> dt.timedelta:
        """Wait after failed attempt number `attempt` (1-based)."""
        return min(self.maximum, self.initial * (2 ** max(0, attempt - 1)))

    def gives_up_after(self, attempt: int) -> bool:
        return attempt >= self.max_attempts


def signature(secret: str, body: bytes) -> str:
    """HMAC-SHA256 of the body, as sent in `X-Falaj-Signature: sha256=<hex>`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def notification_body(payload: Mapping[str, object]) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()


def is_delivered(http_status: int) -> bool:
    return 200 <= http_status < 300


def is_retryable(http_status: int) -> bool:
    """No answer, rate limits and server errors are retried; other refusals are final."""
    return http_status == 0 or http_status in (408, 425, 429) or http_status >= 500
