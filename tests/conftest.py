"""Shared fixtures: a real PKI, settings pointing at it, and real databases."""

from __future__ import annotations

import importlib
import os
import random
import socket
import uuid
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa

from falaj_platform.pki import PKI
from falaj_platform.runtime.clients import secure_channel
from falaj_platform.runtime.db import Database
from falaj_platform.runtime.identity import CALLER_METADATA_KEY, client_id
from falaj_platform.runtime.server import RunningServer
from falaj_platform.runtime.service import start_service
from falaj_platform.runtime.settings import PkiPaths, Settings, load_settings
from falaj_platform.stack import MODULES
from tests import backends
from tests.backends import backend_env

REQUIRE_SERVICES = os.environ.get("FALAJ_REQUIRE_SERVICES") == "1"
POSTGRES_URL = os.environ.get("FALAJ_TEST_POSTGRES_URL", "")


def pytest_configure(config: pytest.Config) -> None:
    if backends.BACKEND not in backends.BACKENDS:
        raise pytest.UsageError(f"FALAJ_TEST_BACKEND={backends.BACKEND!r}; expected one of {', '.join(backends.BACKENDS)}")


# Fixtures that run their tests on each backend in turn; on the PostgreSQL pass only their
# `postgresql` case runs (the SQLite pass runs both), and no test marked `sqlite_only`.
BACKEND_PARAMETRIZED = ("database_url", "training_on_each_backend")


def _runs_on_sqlite_only(item: pytest.Item) -> bool:
    spec = getattr(item, "callspec", None)
    parametrized = spec is not None and "sqlite" in (spec.params.get(f) for f in BACKEND_PARAMETRIZED)
    return parametrized or item.get_closest_marker("sqlite_only") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not backends.on_postgres():
        return
    sqlite = {id(item) for item in items if _runs_on_sqlite_only(item)}
    if sqlite:
        config.hook.pytest_deselected(items=[item for item in items if id(item) in sqlite])
        items[:] = [item for item in items if id(item) not in sqlite]


def pytest_sessionstart(session: pytest.Session) -> None:
    if backends.on_postgres():
        backends.STATE.start()


def pytest_sessionfinish(session: pytest.Session) -> None:
    backends.STATE.finish()


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef[object], request: pytest.FixtureRequest) -> Generator[None, object, object]:
    """Tells `backend_env` which fixture (and so which scope) names a home: its stores live as long."""
    with backends.STATE.fixture_setup(request):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, None, None]:
    try:
        return (yield)
    finally:
        backends.STATE.release_item()


def missing_service(reason: str) -> None:
    """Skip, or fail under FALAJ_REQUIRE_SERVICES=1 (CI), when a named server is not there."""
    if REQUIRE_SERVICES:
        pytest.fail(f"required service missing: {reason}")
    pytest.skip(reason)


_PORTS = iter(random.Random(os.getpid()).sample(range(20000, 32000), 12000))


def free_port() -> int:
    """A port free now, below the kernel's ephemeral range (32768-60999 by default).

    Ports the kernel hands out with bind(0) come from the same range as the source ports
    of outgoing connections, so one picked that way can be taken by a client socket
    before the server that was meant to listen on it starts. This range is not.
    """
    for port in _PORTS:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """A real CA with every service identity and the admin client, shared by the session."""
    root = tmp_path_factory.mktemp("pki")
    authority = PKI(root)
    authority.init()
    return authority


def identity(pki: PKI, kind: str, name: str) -> PkiPaths:
    folder = pki.service_dir(name) if kind == "service" else pki.client_dir(name)
    return PkiPaths(pki.ca_cert_path, folder / "cert.pem", folder / "key.pem")


@pytest.fixture
def settings_for(pki: PKI, tmp_path: Path) -> Iterator[Callable[..., Settings]]:
    """Build Settings for a component with its data under tmp_path and the shared PKI (its stores
    on the test backend: SQLite files there, or PostgreSQL databases and Redis, see tests/backends.py)."""

    def build(component: str, **env: str) -> Settings:
        home = tmp_path / "home"
        base = {**backend_env(home), "FALAJ_HOME": str(home), "FALAJ_PKI_DIR": str(pki.root), "FALAJ_LOG_LEVEL": "warning"}
        return load_settings(component, env={**base, **env})

    yield build


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database: SQLite always; a fresh PostgreSQL database when FALAJ_TEST_POSTGRES_URL is set."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'test.db'}"
        return
    if not POSTGRES_URL:
        missing_service("FALAJ_TEST_POSTGRES_URL is not set")
    admin_url = sa.engine.make_url(POSTGRES_URL).set(drivername="postgresql+psycopg")
    name = f"{backends.RUN}_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as error:
        admin.dispose()
        missing_service(f"PostgreSQL at {POSTGRES_URL} is not reachable: {error.orig}")
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@dataclass
class ServiceUnderTest:
    """A service running in-process on a free port, reached the way the gateway reaches it."""

    running: RunningServer
    database: Database
    channel: grpc.Channel  # mTLS with the gateway's identity, as in production

    @property
    def port(self) -> int:
        return self.running.port


def caller(name: str = "admin") -> list[tuple[str, str]]:
    """Metadata the gateway sets for an authenticated client `name`."""
    return [(CALLER_METADATA_KEY, client_id(name))]


@pytest.fixture
def start_service_under_test(settings_for: Callable[..., Settings], pki: PKI) -> Iterator[Callable[..., ServiceUnderTest]]:
    """Start a service with its real store (SQLite under tmp_path unless a URL is given) and mTLS."""
    started: list[ServiceUnderTest] = []

    def start(component: str, **env: str) -> ServiceUnderTest:
        spec = importlib.import_module(MODULES[component] + ".server").SPEC
        running, database = start_service(spec, settings_for(component, **env), listen_addr="127.0.0.1:0")
        channel = secure_channel(f"127.0.0.1:{running.port}", identity(pki, "service", "gateway"))
        service = ServiceUnderTest(running, database, channel)
        started.append(service)
        return service

    yield start
    for service in started:
        service.channel.close()
        service.running.stop(0)
        service.database.dispose()
