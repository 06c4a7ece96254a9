"""Wiring of the gateway: store, policy, revocations, audit log, admin API and the proxy."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from falaj.gateway.v1 import service_pb2, service_pb2_grpc
from falaj_platform.gateway.api import GatewayAdminApi, load_signing_key
from falaj_platform.gateway.auditlog import AuditLog
from falaj_platform.gateway.hooks import GatewayHooks, Reloader, RevocationList
from falaj_platform.gateway.policy import BUILT_IN_ROLES, Authorizer, default_policy
from falaj_platform.gateway.proxy import ProxyHandler, UpstreamChannels
from falaj_platform.gateway.store import GatewayStore
from falaj_platform.runtime import tls
from falaj_platform.runtime.db import Database
from falaj_platform.runtime.identity import client_id
from falaj_platform.runtime.logs import configure_logging
from falaj_platform.runtime.server import RunningServer, create_server, run
from falaj_platform.runtime.service import ServiceSpec, exit_on_startup_error, open_database
from falaj_platform.runtime.settings import GATEWAY, Settings, load_settings

SPEC = ServiceSpec(GATEWAY, Path(__file__).parent / "migrations")


@dataclass
class Gateway:
    """A running gateway and the resources it must release on stop."""

    running: RunningServer
    database: Database
    store: GatewayStore
    channels: UpstreamChannels
    audit: AuditLog
    reloader: Reloader
    authorizer: Authorizer
    closed: list[bool] = field(default_factory=list)

    def stop(self, grace: float = 5.0) -> None:
        self.running.stop(grace)
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed.append(True)
            self.reloader.stop()
            self.audit.close()
            self.channels.close()
            self.database.dispose()


def start_gateway(settings: Settings, *, listen_addr: str | None = None) -> Gateway:
    """Open the store, load policy and keys, connect upstream with the gateway's identity, listen."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    database = open_database(SPEC, settings)
    store = GatewayStore(database)
    signing_key = load_signing_key(settings.audit_signing_key)
    store.seed(default_policy([client_id("admin")]), BUILT_IN_ROLES)
    authorizer = Authorizer()
    revocations = RevocationList(store)
    reloader = Reloader(store, authorizer, revocations, settings.reload_seconds, settings.pki_dir)
    reloader.reload_now()
    audit = AuditLog(store, signing_key, settings.data_dir / "audit-anchor.json")
    channels = UpstreamChannels(settings.upstreams, tls.channel_credentials(settings.pki), settings.max_message_bytes)
    api = GatewayAdminApi(store, settings, authorizer, reloader, audit, signing_key)

    def register(server: object) -> list[str]:
        service_pb2_grpc.add_GatewayAdminServiceServicer_to_server(api, server)
        return [service_pb2.DESCRIPTOR.services_by_name["GatewayAdminService"].full_name]

    try:
        running = create_server(
            settings,
            register,
            listen_addr=listen_addr,
            allowed_peers=None,
            handlers=[ProxyHandler(channels)],
            hooks=GatewayHooks(authorizer, revocations, audit, settings.region),
            credentials=tls.rotating_server_credentials(settings.pki),
        )
    except BaseException:
        audit.close()
        channels.close()
        database.dispose()
        raise
    reloader.start()
    return Gateway(running, database, store, channels, audit, reloader, authorizer)


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
