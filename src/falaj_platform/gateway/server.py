"""Wiring of the gateway: its store, its admin API, and the proxy to every service."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from falaj.gateway.v1 import service_pb2, service_pb2_grpc
from falaj_platform.gateway.api import GatewayAdminApi
from falaj_platform.gateway.proxy import ProxyHandler, UpstreamChannels
from falaj_platform.gateway.store import GatewayStore
from falaj_platform.runtime import tls
from falaj_platform.runtime.db import Database
from falaj_platform.runtime.logs import configure_logging
from falaj_platform.runtime.server import RunningServer, create_server, run
from falaj_platform.runtime.service import ServiceSpec, exit_on_startup_error, open_database
from falaj_platform.runtime.settings import GATEWAY, Settings, load_settings


def register_admin(server: grpc.Server, database: Database, settings: Settings) -> Iterable[str]:
    # RPCs the servicer does not define yet answer UNIMPLEMENTED (the generated base does that).
    api = GatewayAdminApi(GatewayStore(database), settings)  # type: ignore[abstract]
    service_pb2_grpc.add_GatewayAdminServiceServicer_to_server(api, server)
    return [service_pb2.DESCRIPTOR.services_by_name["GatewayAdminService"].full_name]


SPEC = ServiceSpec(GATEWAY, Path(__file__).parent / "migrations", register_admin)


@dataclass
class Gateway:
    """A running gateway and the resources it must release on stop."""

    running: RunningServer
    database: Database
    channels: UpstreamChannels
    closed: list[bool] = field(default_factory=list)

    def stop(self, grace: float = 5.0) -> None:
        self.running.stop(grace)
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed.append(True)
            self.channels.close()
            self.database.dispose()


def start_gateway(settings: Settings, *, listen_addr: str | None = None) -> Gateway:
    """Open the gateway's store, connect upstream with its own identity, and listen."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    database = open_database(SPEC, settings)
    channels = UpstreamChannels(settings.upstreams, tls.channel_credentials(settings.pki), settings.max_message_bytes)
    try:
        running = create_server(
            settings,
            lambda server: SPEC.register(server, database, settings),
            listen_addr=listen_addr,
            allowed_peers=None,
            handlers=[ProxyHandler(channels)],
        )
    except BaseException:
        channels.close()
        database.dispose()
        raise
    return Gateway(running, database, channels)


def main() -> None:
    def body() -> None:
        settings = load_settings(GATEWAY)
        configure_logging(GATEWAY, settings.log_level)
        holder: list[Gateway] = []

        def start() -> RunningServer:
            holder.append(start_gateway(settings))
            return holder[0].running

        run(settings, start, on_stop=lambda: holder[0].close() if holder else None)

    exit_on_startup_error(GATEWAY, body)
