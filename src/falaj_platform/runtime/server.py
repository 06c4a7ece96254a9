"""Build and run a Falaj gRPC server: mTLS, health, reflection, metrics, graceful stop.

`create_server(...)` returns `(server, port)` and binds port 0 in tests;
`run(...)` is the process main loop that stops cleanly on SIGTERM.
"""

from __future__ import annotations

import signal
import socket
import threading
from collections.abc import Callable, Iterable
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from falaj_platform.runtime import tls
from falaj_platform.runtime.errors import StartupError
from falaj_platform.runtime.interceptors import CallerPolicy, CallHooks, RuntimeInterceptor
from falaj_platform.runtime.logs import get_logger
from falaj_platform.runtime.memory import bound_large_allocations
from falaj_platform.runtime.metrics import ServerMetrics
from falaj_platform.runtime.settings import Settings

Registrar = Callable[[grpc.Server], Iterable[str]]
"""Adds servicers to a server and returns the full names of the services it added."""

STOP_SLACK_S = 5.0
"""How long RunningServer.stop() waits past its grace for grpc to finish shutting down."""


@dataclass
class RunningServer:
    """A started server and what a caller needs to reach and stop it."""

    server: grpc.Server
    port: int
    health: health.HealthServicer
    metrics: ServerMetrics
    service_names: tuple[str, ...]
    stop_callbacks: list[Callable[[], None]] = field(default_factory=list)

    def stop(self, grace: float = 5.0) -> None:
        """Report NOT_SERVING, let in-flight calls finish within `grace` seconds, then stop background work.

        Returns within about `grace` + STOP_SLACK_S seconds even when a call never finishes
        (a handler that ignores cancellation): it logs that and stops the background work anyway.
        """
        self.health.enter_graceful_shutdown()
        if not self.server.stop(grace).wait(grace + STOP_SLACK_S):
            get_logger().warning("server did not stop in time; calls still running were abandoned", grace_s=grace, slack_s=STOP_SLACK_S)
        while self.stop_callbacks:
            self.stop_callbacks.pop()()


def server_options(settings: Settings) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]


def _refuse_if_in_use(addr: str) -> None:
    """Fail with one clear line before grpc core logs its own bind error."""
    host, _, port = addr.rpartition(":")
    if not port.isdigit() or int(port) == 0:
        return
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host.strip("[]") or "0.0.0.0", int(port)))
        except OSError as error:
            raise StartupError(f"cannot listen on {addr}: {error.strerror.lower() if error.strerror else error}") from None


def create_server(
    settings: Settings,
    register: Registrar,
    *,
    listen_addr: str | None = None,
    allowed_peers: frozenset[str] | None = None,
    extra_interceptors: Iterable[grpc.ServerInterceptor] = (),
    handlers: Iterable[grpc.GenericRpcHandler] = (),
    hooks: CallHooks | None = None,
    credentials: grpc.ServerCredentials | None = None,
    metrics: ServerMetrics | None = None,
) -> RunningServer:
    """Start an mTLS server for `settings.component`; `listen_addr` overrides (use port 0 in tests).

    `allowed_peers` is the set of SPIFFE IDs that may call non-health methods directly
    (for services: the gateway); None lets any platform identity call.
    """
    metrics = metrics or ServerMetrics(settings.component)
    interceptor = RuntimeInterceptor(settings.component, metrics, CallerPolicy(allowed_peers), hooks)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.worker_threads, thread_name_prefix=settings.component),
        interceptors=[interceptor, *extra_interceptors],
        handlers=list(handlers) or None,
        options=server_options(settings),
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
    )
    names = tuple(register(server))
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    addr = listen_addr or settings.listen_addr
    credentials = credentials or tls.server_credentials(settings.pki)
    _refuse_if_in_use(addr)
    try:
        port = server.add_secure_port(addr, credentials)
    except RuntimeError:
        port = 0
    if port == 0:
        raise StartupError(f"cannot listen on {addr}: the address is in use or not local")
    server.start()
    for name in ("", *names):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(server, port, health_servicer, metrics, names)


def run(settings: Settings, start: Callable[[], RunningServer], on_stop: Callable[[], None] = lambda: None) -> None:
    """Start the server, expose metrics, block until SIGTERM/SIGINT, then stop gracefully."""
    log = get_logger()
    bound_large_allocations()
    running = start()
    metrics_port = running.metrics.serve_http(settings.metrics_addr)
    log.info("serving", addr=settings.listen_addr, port=running.port, metrics_port=metrics_port, region=settings.region)
    stopping = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        log.info("stopping", signal=signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    stopping.wait()
    running.stop()
    on_stop()
    log.info("stopped")
