"""Wiring of the experiments service: store + servicer on the shared runtime.

`SPEC` is the production wiring (the real AuditReporter to the gateway's audit log).
`build_spec(...)` wires the same service with another audit sink or background
runner, which tests use to watch what the service reports.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable
from pathlib import Path

import grpc

from falaj.experiments.v1 import service_pb2, service_pb2_grpc
from falaj_platform.runtime.db import Database
from falaj_platform.runtime.service import ServiceSpec
from falaj_platform.runtime.settings import Settings
from falaj_platform.services.experiments.api import AuditSink, BackgroundRunner, ExperimentsApi
from falaj_platform.services.experiments.model import DEFAULT_GUARDRAIL_CHECK_INTERVAL
from falaj_platform.services.experiments.store import ExperimentsStore

MIGRATIONS = Path(__file__).parent / "migrations"


def build_register(
    audit: Callable[[Settings], AuditSink] | None = None,
    run_in_background: BackgroundRunner | None = None,
    guardrail_check_interval: dt.timedelta = DEFAULT_GUARDRAIL_CHECK_INTERVAL,
    on_api: Callable[[ExperimentsApi], None] | None = None,
    clock: Callable[[], dt.datetime] | None = None,
) -> Callable[[grpc.Server, Database, Settings], Iterable[str]]:
    """A register function; `audit` builds the audit sink from the settings (None: the gateway's audit log)."""

    def register(server: grpc.Server, database: Database, settings: Settings) -> Iterable[str]:
        api = ExperimentsApi(
            ExperimentsStore(database),
            settings,
            audit=audit(settings) if audit is not None else None,
            run_in_background=run_in_background,
            guardrail_check_interval=guardrail_check_interval,
            **({"clock": clock} if clock is not None else {}),
        )
        if on_api is not None:
            on_api(api)
        service_pb2_grpc.add_ExperimentsServiceServicer_to_server(api, server)
        return [service_pb2.DESCRIPTOR.services_by_name["ExperimentsService"].full_name]

    return register


def build_spec(**wiring: object) -> ServiceSpec:
    """The experiments ServiceSpec with the given `build_register` wiring."""
    return ServiceSpec("experiments", MIGRATIONS, build_register(**wiring))  # type: ignore[arg-type]


register = build_register()

SPEC = ServiceSpec("experiments", MIGRATIONS, register)
