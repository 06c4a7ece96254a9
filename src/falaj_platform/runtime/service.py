"""The process entry point every service shares: settings, logs, schema, server, stop."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc

from falaj_platform.runtime.db import Database
from falaj_platform.runtime.errors import StartupError
from falaj_platform.runtime.identity import GATEWAY_SPIFFE_ID
from falaj_platform.runtime.logs import configure_logging
from falaj_platform.runtime.server import RunningServer, create_server, run
from falaj_platform.runtime.settings import Settings, load_settings


@dataclass(frozen=True)
class ServiceSpec:
    """How to build one service: its migrations and a function that registers its servicers."""

    component: str
    migrations_dir: Path
    register: Callable[[grpc.Server, Database, Settings], Iterable[str]] | None = None


def open_database(spec: ServiceSpec, settings: Settings) -> Database:
    """The service's database, migrated (or checked) to the latest schema."""
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
    register = spec.register
    if register is None:
        raise StartupError(f"{spec.component} has its own start function")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    database = open_database(spec, settings)
    try:
        running = create_server(
            settings,
            lambda server: register(server, database, settings),
            listen_addr=listen_addr,
            allowed_peers=frozenset({GATEWAY_SPIFFE_ID}),
        )
    except BaseException:
        database.dispose()
        raise
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
