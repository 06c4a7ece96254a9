"""The local stack: every service and the gateway as local processes under FALAJ_HOME.

`up` starts what is not running, then waits until each reports SERVING on
grpc.health.v1 over mTLS; logs go to $FALAJ_HOME/logs/<name>.log and pid files to
$FALAJ_HOME/run/<name>.pid.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from falaj_platform.pki import PKI
from falaj_platform.runtime.clients import health_status
from falaj_platform.runtime.errors import StartupError
from falaj_platform.runtime.settings import COMPONENTS, GATEWAY, PkiPaths, component_addr, home_from

MODULES = {name: f"falaj_platform.services.{name}" for name in COMPONENTS if name != GATEWAY} | {GATEWAY: "falaj_platform.gateway"}


@dataclass(frozen=True)
class ComponentStatus:
    name: str
    pid: int | None
    addr: str
    health: str


class Stack:
    """Start, inspect and stop the local processes of one FALAJ_HOME."""

    def __init__(self, env: Mapping[str, str] | None = None):
        self.env = dict(os.environ if env is None else env)
        self.home = home_from(self.env)
        self.env["FALAJ_HOME"] = str(self.home)
        self.pki = PKI(Path(self.env.get("FALAJ_PKI_DIR", str(self.home / "pki"))))
        self.admin = PkiPaths(self.pki.ca_cert_path, self.pki.client_dir("admin") / "cert.pem", self.pki.client_dir("admin") / "key.pem")

    def _pid_file(self, name: str) -> Path:
        return self.home / "run" / f"{name}.pid"

    def log_file(self, name: str) -> Path:
        return self.home / "logs" / f"{name}.log"

    def pid(self, name: str) -> int | None:
        """The pid of a running component started by this stack, or None."""
        try:
            pid = int(self._pid_file(name).read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (FileNotFoundError, ValueError, ProcessLookupError):
            return None
        return pid if MODULES[name].encode() in cmdline else None

    def addr(self, name: str) -> str:
        return component_addr(self.env, name)

    def status(self) -> list[ComponentStatus]:
        result = []
        for name in COMPONENTS:
            pid = self.pid(name)
            health = health_status(self.addr(name), self.admin, timeout=1.0) if pid else "STOPPED"
            result.append(ComponentStatus(name, pid, self.addr(name), health))
        return result

    def up(self, timeout: float = 60.0) -> list[ComponentStatus]:
        """Start every component that is not running and wait until all are SERVING."""
        self.pki.init()
        (self.home / "run").mkdir(parents=True, exist_ok=True)
        (self.home / "logs").mkdir(parents=True, exist_ok=True)
        started: dict[str, subprocess.Popen[bytes]] = {}
        for name in COMPONENTS:
            if self.pid(name):
                continue
            with open(self.log_file(name), "ab") as log:
                process = subprocess.Popen(
                    [sys.executable, "-m", MODULES[name]],
                    env=self.env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            self._pid_file(name).write_text(f"{process.pid}\n")
            started[name] = process
        deadline = time.monotonic() + timeout
        waiting = set(COMPONENTS)
        while waiting:
            for name in sorted(waiting):
                child = started.get(name)
                if child is not None and child.poll() is not None:
                    self._pid_file(name).unlink(missing_ok=True)
                    self.down()
                    raise StartupError(f"{name} exited with code {child.returncode}: {self._last_line(name)}")
                if health_status(self.addr(name), self.admin, timeout=1.0) == "SERVING":
                    waiting.discard(name)
            if waiting and time.monotonic() > deadline:
                self.down()
                raise StartupError(f"not SERVING after {timeout:.0f}s: {', '.join(sorted(waiting))} (see {self.home / 'logs'})")
            if waiting:
                time.sleep(0.2)
        return self.status()

    def down(self, timeout: float = 15.0) -> list[str]:
        """SIGTERM every component, SIGKILL what is still there after `timeout`; returns the names stopped."""
        pids = {name: pid for name in COMPONENTS if (pid := self.pid(name))}
        for pid in pids.values():
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for name, pid in pids.items():
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
            self._pid_file(name).unlink(missing_ok=True)
        return sorted(pids)

    def _last_line(self, name: str) -> str:
        try:
            lines = self.log_file(name).read_text(errors="replace").strip().splitlines()
        except FileNotFoundError:
            return "(no log)"
        return lines[-1] if lines else "(empty log)"


def _alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][:1]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"
