"""A real platform for gateway tests: the six services and the gateway, in-process, over mTLS.

Every process boundary the tests cross is a real TLS connection with certificates from
a real CA; only the processes are shared, to keep the suite fast.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from falaj_platform.gateway.server import Gateway, start_gateway
from falaj_platform.pki import PKI
from falaj_platform.runtime import tls
from falaj_platform.runtime.db import Database
from falaj_platform.runtime.server import RunningServer
from falaj_platform.runtime.service import start_service
from falaj_platform.runtime.settings import SERVICES, Settings, load_settings
from falaj_platform.stack import MODULES
from tests.backends import backend_env
from tests.conftest import identity

# Client identities and the role each was issued with (`falaj pki issue NAME --role ROLE`).
CLIENTS = {
    "root": "admin",
    "dora": "data-engineer",
    "sam": "data-scientist",
    "mia": "ml-engineer",
    "vic": "viewer",
    "nobody": "no-such-role",
}


@dataclass
class Platform:
    home: Path
    pki: PKI
    gateway: Gateway
    services: dict[str, tuple[RunningServer, Database]]
    env: dict[str, str]
    channels: list[grpc.Channel] = field(default_factory=list)

    @property
    def gateway_addr(self) -> str:
        return f"127.0.0.1:{self.gateway.running.port}"

    def channel(self, client: str) -> grpc.Channel:
        """An mTLS channel to the gateway as client identity `client`."""
        creds = tls.channel_credentials(identity(self.pki, "client", client))
        channel = grpc.secure_channel(self.gateway_addr, creds, options=[("grpc.ssl_target_name_override", "localhost")])
        self.channels.append(channel)
        return channel

    def settings(self, component: str, **env: str) -> Settings:
        return load_settings(component, env={**self.env, **env})


def start_platform(home: Path, pki: PKI, **gateway_env: str) -> Platform:
    for name, role in CLIENTS.items():
        if not (pki.client_dir(name) / "cert.pem").exists():
            pki.issue_client(name, role=role)
    env = {
        **backend_env(home),
        "FALAJ_HOME": str(home),
        "FALAJ_PKI_DIR": str(pki.root),
        "FALAJ_LOG_LEVEL": "warning",
        "FALAJ_RELOAD_SECONDS": "0.2",
    }
    services = {}
    for name in SERVICES:
        spec = importlib.import_module(MODULES[name] + ".server").SPEC
        services[name] = start_service(spec, load_settings(name, env=env), listen_addr="127.0.0.1:0")
        env[f"FALAJ_{name.upper()}_ADDR"] = f"127.0.0.1:{services[name][0].port}"
    gateway = start_gateway(load_settings("gateway", env={**env, **gateway_env}), listen_addr="127.0.0.1:0")
    return Platform(home, pki, gateway, services, env)


def stop_platform(platform: Platform) -> None:
    for channel in platform.channels:
        channel.close()
    platform.gateway.stop(0)
    for running, database in platform.services.values():
        running.stop(0)
        database.dispose()


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    """One platform per test module, with its own CA, stores and audit log."""
    root = tmp_path_factory.mktemp("platform")
    pki = PKI(root / "pki")
    pki.init()
    started = start_platform(root / "home", pki)
    yield started
    stop_platform(started)


@pytest.fixture
def fresh_platform(tmp_path: Path) -> Iterator[Callable[..., Platform]]:
    """Start a platform of one's own (for tests that tamper with stores or certificates)."""
    started: list[Platform] = []

    def start(**gateway_env: str) -> Platform:
        pki = PKI(tmp_path / "pki")
        pki.init()
        platform = start_platform(tmp_path / "home", pki, **gateway_env)
        started.append(platform)
        return platform

    yield start
    for platform in started:
        stop_platform(platform)


def call(channel: grpc.Channel, method: str, request: bytes = b"", **kwargs: object) -> grpc.StatusCode:
    """The status code of a unary call with raw bytes (an empty message is valid for any request type)."""
    try:
        channel.unary_unary(method)(request, timeout=10, **kwargs)
    except grpc.RpcError as error:
        return error.code()  # type: ignore[no-any-return, unused-ignore]
    return grpc.StatusCode.OK
