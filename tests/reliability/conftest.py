"""Fixtures for reliability tests: the in-process platform, and the real local stack as processes.

The in-process platform is the one tests/gateway uses, except that the gateway listens
on a port known before the services start, so services that call others (serving calls
training and the audit log) reach them through the gateway as in production.
The local stack is `falaj stack up` in a fresh FALAJ_HOME on free ports: real processes
that a test may SIGKILL and bring back with another `falaj stack up`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from falaj_platform.pki import PKI
from falaj_platform.runtime.clients import health_status, secure_channel
from falaj_platform.runtime.settings import COMPONENTS, PkiPaths
from tests.backends import backend_env
from tests.conftest import free_port, identity
from tests.gateway.conftest import Platform
from tests.serving.platform import start_serving_platform

FALAJ = [sys.executable, "-m", "falaj_platform.cli"]


# The platform in-process with the gateway on a port known up front (serving's cross-service
# tests start it the same way).
start_falaj = start_serving_platform


def stop_falaj(platform: Platform, timeout: float = 30.0) -> list[str]:
    """Stop what start_falaj started; returns the components whose server did not stop within `timeout`."""
    for channel in platform.channels:
        channel.close()
    stuck = []
    stoppers = [("gateway", lambda: platform.gateway.stop(0))]
    stoppers += [
        (name, lambda running=running, database=database: (running.stop(0), database.dispose()))
        for name, (running, database) in platform.services.items()
    ]
    for name, stop in stoppers:
        thread = threading.Thread(target=stop, name=f"stop-{name}", daemon=True)
        thread.start()
        thread.join(timeout)
        if thread.is_alive():
            stuck.append(name)
    return stuck


def service_health(platform: Platform) -> dict[str, str]:
    """Health of every in-process service (asked directly) and of the gateway."""
    as_gateway = identity(platform.pki, "service", "gateway")
    status = {name: health_status(f"127.0.0.1:{running.port}", as_gateway, timeout=5) for name, (running, _) in platform.services.items()}
    status["gateway"] = health_status(platform.gateway_addr, identity(platform.pki, "client", "root"), timeout=5)
    return status


@pytest.fixture(scope="module")
def falaj_platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    """One in-process platform per test module."""
    root = tmp_path_factory.mktemp("reliability")
    pki = PKI(root / "pki")
    pki.init()
    started = start_falaj(root / "home", pki)
    yield started
    assert not stop_falaj(started), "a server did not stop"


# -- the local stack as processes ----------------------------------------------------------------


@dataclass
class LocalStack:
    """`falaj stack up` in its own FALAJ_HOME on free ports."""

    env: dict[str, str]

    @property
    def home(self) -> Path:
        return Path(self.env["FALAJ_HOME"])

    @property
    def gateway_addr(self) -> str:
        return self.env["FALAJ_GATEWAY_ADDR"]

    def cli(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*FALAJ, *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def up(self) -> None:
        result = self.cli("stack", "up")
        assert result.returncode == 0, result.stdout + result.stderr

    def down(self) -> None:
        self.cli("stack", "down")

    def pid(self, component: str) -> int:
        return int((self.home / "run" / f"{component}.pid").read_text())

    def kill(self, component: str) -> None:
        """SIGKILL one component and wait until it is gone."""
        pid = self.pid(component)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][:1]
            except (FileNotFoundError, IndexError):
                break
            if state == "Z":
                break
            time.sleep(0.05)

    def health(self, component: str) -> str:
        addr = self.gateway_addr if component == "gateway" else self.env[f"FALAJ_{component.upper()}_ADDR"]
        return health_status(addr, self.identity("admin"), timeout=2)

    def identity(self, client: str) -> PkiPaths:
        pki = self.home / "pki"
        return PkiPaths(pki / "ca.pem", pki / "clients" / client / "cert.pem", pki / "clients" / client / "key.pem")

    def channel(self, client: str = "admin") -> grpc.Channel:
        return secure_channel(self.gateway_addr, self.identity(client))

    def logs(self) -> dict[str, str]:
        return {p.name: p.read_text(errors="replace") for p in sorted((self.home / "logs").glob("*")) if p.is_file()}


def stack_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FALAJ_")}
    env.update(backend_env(home))
    env["FALAJ_HOME"] = str(home)
    env["FALAJ_LOG_LEVEL"] = "info"
    env["FALAJ_RELOAD_SECONDS"] = "0.5"
    for name in COMPONENTS:
        key = "FALAJ_GATEWAY_ADDR" if name == "gateway" else f"FALAJ_{name.upper()}_ADDR"
        env[key] = f"127.0.0.1:{free_port()}"
        env[f"FALAJ_{name.upper()}_METRICS_ADDR"] = f"127.0.0.1:{free_port()}"
    env.update(extra)
    return env


@pytest.fixture
def local_stack(tmp_path: Path) -> Iterator[LocalStack]:
    """A running local stack of processes (INFO logs), stopped afterwards."""
    stack = LocalStack(stack_env(tmp_path / ".falaj"))
    stack.up()
    try:
        yield stack
    finally:
        stack.down()
