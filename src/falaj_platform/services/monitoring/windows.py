"""Windows of prediction logs: fixed time windows by prediction time, or count windows by
arrival order, and when each one is closed and ready to evaluate.
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
DEFAULT_TIME_WINDOW = dt.timedelta(hours=1)
DEFAULT_COUNT_WINDOW_ROWS = 1000
# A time window is evaluated this long after it ends, so that logs sent a little late
# (serving sends them asynchronously) still land in it; at most this share of the window.
MAX_LATENESS = dt.timedelta(seconds=30)
LATENESS_SHARE = 0.1


class WindowKind(enum.Enum):
    TIME = "TIME"
    COUNT = "COUNT"


@dataclass(frozen=True)
class WindowPlan:
    """How a monitor cuts its logs."""

    kind: WindowKind
    duration: dt.timedelta = DEFAULT_TIME_WINDOW
    row_count: int = DEFAULT_COUNT_WINDOW_ROWS
    min_row_count: int = 0

    @property
    def lateness(self) -> dt.timedelta:
        return min(MAX_LATENESS, self.duration * LATENESS_SHARE)


@dataclass(frozen=True)
class TimeWindow:
    start: dt.datetime
    end: dt.datetime

    @property
    def key(self) -> str:
        return f"time:{int((self.start - EPOCH).total_seconds() * 1000)}:{int((self.end - self.start).total_seconds() * 1000)}"


@dataclass(frozen=True)
class CountWindow:
    """Rows whose arrival sequence is in [first_sequence, first_sequence + row_count)."""

    index: int
    first_sequence: int
    row_count: int

    @property
    def key(self) -> str:
        return f"count:{self.first_sequence}:{self.row_count}"

    @property
    def end_sequence(self) -> int:
        return self.first_sequence + self.row_count


def time_window_of(moment: dt.datetime, duration: dt.timedelta) -> TimeWindow:
    """The epoch-aligned window of `duration` holding `moment`."""
    step = duration.total_seconds()
    if step <= 0:
        raise ValueError("a time window needs a positive duration")
    offset = (moment - EPOCH).total_seconds()
    start = EPOCH + dt.timedelta(seconds=(offset // step) * step)
    return TimeWindow(start, start + duration)


def is_time_window_closed(window: TimeWindow, now: dt.datetime, plan: WindowPlan) -> bool:
    return now >= window.end + plan.lateness


def count_windows_filled(base_sequence: int, next_sequence: int, row_count: int) -> int:
    """How many count windows, counted from `base_sequence`, are full."""
    return max(0, (next_sequence - base_sequence) // row_count)


def count_window(base_sequence: int, index: int, row_count: int) -> CountWindow:
    return CountWindow(index, base_sequence + index * row_count, row_count)
