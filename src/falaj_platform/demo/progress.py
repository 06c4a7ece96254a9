"""Numbered progress lines for the demo: each step prints its title, then its timing and
result. A step that cannot run says why (a service answering UNIMPLEMENTED, an earlier
step it needs that did not run) and the demo goes on with the steps that do not need it.
"""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from falaj.sdk import FalajError, Unimplemented
from falaj_platform.runtime.errors import StartupError

OK, SKIPPED, FAILED = "ok", "SKIPPED", "FAILED"


class StepFailed(Exception):
    """A step ran and its result is wrong (a job failed, a deployment did not become ready)."""


class ServiceMissing(Exception):
    """A service answered UNIMPLEMENTED: it is not built yet, so the step cannot run."""

    def __init__(self, service: str, method: str, error: Unimplemented):
        super().__init__(f"the {service} service answers UNIMPLEMENTED to {method} ({error.message}): it is not built yet")
        self.service = service


@dataclass
class Outcome:
    number: int
    key: str
    title: str
    status: str
    seconds: float
    lines: list[str] = field(default_factory=list)
    blocked: bool = False  # skipped only because a step it needs did not run


def describe(error: FalajError) -> str:
    """A typed error as one line: code, message, reason, request id."""
    text = f"{error.code.name}: {error.message}"
    if error.reason and error.reason != error.code.name:
        text += f" [{error.reason}]"
    if error.request_id:
        text += f" (request id {error.request_id})"
    return text


class Progress:
    """Runs steps in order and remembers how each ended."""

    def __init__(self, total: int):
        self.total = total
        self.outcomes: dict[str, Outcome] = {}
        self._number = 0

    def ok(self, key: str) -> bool:
        outcome = self.outcomes.get(key)
        return outcome is not None and outcome.status == OK

    @property
    def all_ok(self) -> bool:
        return all(o.status == OK for o in self.outcomes.values())

    def step(self, key: str, title: str, action: Callable[[], list[str]], *, needs: Sequence[str] = ()) -> bool:
        """Run `action` as the next numbered step unless a step it needs did not run."""
        self._number += 1
        print(f"[{self._number}/{self.total}] {title} ...", flush=True)
        started = time.perf_counter()
        missing = [k for k in needs if not self.ok(k)]
        lines: list[str]
        if missing:
            status = SKIPPED
            named = ", ".join(f"step {self.outcomes[k].number} ({k})" if k in self.outcomes else k for k in missing)
            lines = [f"needs {named}, which did not run"]
        else:
            try:
                lines, status = action(), OK
            except ServiceMissing as error:
                lines, status = [str(error)], SKIPPED
            except FalajError as error:
                lines, status = [describe(error)], FAILED
            except (StepFailed, StartupError) as error:
                lines, status = [str(error)], FAILED
            except Exception as error:  # noqa: BLE001 - one broken step must not hide the rest of the flow
                traceback.print_exc(file=sys.stderr)
                lines, status = [f"{type(error).__name__}: {error}"], FAILED
        seconds = time.perf_counter() - started
        self.outcomes[key] = Outcome(self._number, key, title, status, seconds, lines, blocked=bool(missing))
        first = f" - {lines[0]}" if lines else ""
        print(f"      {status} ({seconds:.1f}s){first}", flush=True)
        for line in lines[1:]:
            print(f"        {line}", flush=True)
        return status == OK
