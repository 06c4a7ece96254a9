"""The process entry point every service shares: settings, logs, schema, server, stop."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from falaj_platform.runtime.db import Database, create_database_if_missing
from falaj_platform.runtime.errors import StartupError
from falaj_platform.runtime.identity import GATEWAY_SPIFFE_ID
from falaj_platform.runtime.logs import configure_logging
from falaj_platform.runtime.metrics import ServerMetrics
from falaj_platform.runtime.server import RunningServer, create_server, run
from falaj_platform.runtime.settings import Settings, load_settings


@dataclass
class ServiceRuntime:
    """What a service's `setup` gets: its store, settings and metrics, and a place for stop work."""

    database: Database
    settings: Settings
    metrics: ServerMetrics
    stop_callbacks: list[Callable[[], None]] = field(default_factory=list)

    def on_stop(self, callback: Callable[[], None]) -> None:
        """Run `callback` after the server has stopped serving (stop background threads here)."""
        self.stop_callbacks.append(callback)


@dataclass(frozen=True)
class ServiceSpec:
    """How to build one service: its migrations and how its servicers are added.

    Simple services give `register(server, database, settings)`; services with
    background work or gauges of their own give `setup(server, runtime)` instead.
    """

    component: str
    migrations_dir: Path
    register: Callable[[grpc.Server, Database, Settings], Iterable[str]] | None = None
    setup: Callable[[grpc.Server, ServiceRuntime], Iterable[str]] | None = None


def open_database(spec: ServiceSpec, settings: Settings) -> Database:
    """The service's database (created first when it lives on FALAJ_DATABASE_SERVER), migrated
    (or checked) to the latest schema."""
    if settings.database_admin_url is not None:
        create_database_if_missing(settings.database_url, settings.database_admin_url)
    database = Database(
        settings.database_url,
        spec.migrations_dir,
        version_table=f"falaj_{spec.component}_schema_version",
        sqlite_synchronous=settings.sqlite_synchronous,
    )
    database.ensure_schema(settings.migrate)
    return database


def start_service(spec: ServiceSpec, settings: Settings, *, listen_addr: str | None = None) -> tuple[RunningServer, Database]:
    """Open the store and start the mTLS server; only the gateway may call it directly."""
    if spec.register is None and spec.setup is None:
        raise StartupError(f"{spec.component} has its own start function")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    database = open_database(spec, settings)
    runtime = ServiceRuntime(database, settings, ServerMetrics(settings.component))

    def add_servicers(server: grpc.Server) -> Iterable[str]:
        if spec.setup is not None:
            return spec.setup(server, runtime)
        assert spec.register is not None
        return spec.register(server, database, settings)

    try:
        running = create_server(
            settings, add_servicers, listen_addr=listen_addr, allowed_peers=frozenset({GATEWAY_SPIFFE_ID}), metrics=runtime.metrics
        )
    except BaseException:
        for callback in reversed(runtime.stop_callbacks):
            callback()
        database.dispose()
        raise
    running.stop_callbacks.extend(runtime.stop_callbacks)
    return running, database


def exit_on_startup_error(component: str, body: Callable[[], None]) -> None:
    """Run `body`; a StartupError ends the process with one clear line and exit code 2."""
    try:
        body()
    except StartupError as error:
        print(f"falaj-{component}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def main(spec: ServiceSpec) -> None:
    """`python -m falaj_platform.services.<name>`: serve until SIGTERM."""

    def body() -> None:
        settings = load_settings(spec.component)
        configure_logging(spec.component, settings.log_level)
        holder: dict[str, Database] = {}

        def start() -> RunningServer:
            running, holder["db"] = start_service(spec, settings)
            return running

        run(settings, start, on_stop=lambda: holder["db"].dispose() if "db" in holder else None)

    exit_on_startup_error(spec.component, body)
