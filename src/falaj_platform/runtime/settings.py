"""Process settings: one frozen object per process, read from the environment at boot.

No other module reads `os.environ`; everything a service needs to know about its
surroundings is a field here.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from falaj_platform.runtime.errors import StartupError

SERVICES = ("ingest", "features", "training", "serving", "experiments", "monitoring")
"""The six platform services, in the order the stack starts them."""

GATEWAY = "gateway"
COMPONENTS = (*SERVICES, GATEWAY)

# Fixed loopback ports for the local stack; every one can be overridden by env.
DEFAULT_PORTS = {
    "ingest": 50061,
    "features": 50062,
    "training": 50063,
    "serving": 50064,
    "experiments": 50065,
    "monitoring": 50066,
    "gateway": 8443,
}
DEFAULT_METRICS_PORTS = {name: 9461 + i for i, name in enumerate(COMPONENTS)}

TRUST_DOMAIN = "falaj.local"

DEFAULT_DATABASE_PREFIX = "falaj_"
# A PostgreSQL name needs no quoting with these; the longest component name still fits its 63 bytes.
_DATABASE_PREFIX = re.compile(r"^[a-z][a-z0-9_]{0,39}$")


def _env_key(component: str, name: str) -> str:
    return f"FALAJ_{component.upper()}_{name}"


@dataclass(frozen=True)
class PkiPaths:
    """Where the PKI files of one identity live (see `falaj pki`)."""

    ca_cert: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class Settings:
    """Everything one process knows about its environment."""

    component: str
    home: Path
    listen_addr: str
    metrics_addr: str
    gateway_addr: str
    database_url: str
    region: str
    pki: PkiPaths
    log_level: str = "info"
    max_message_bytes: int = 64 * 1024 * 1024
    max_concurrent_rpcs: int = 256
    worker_threads: int = 32
    migrate: str = "auto"
    upstreams: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    audit_signing_key: Path = Path("audit/signing-key.pem")
    pki_dir: Path = Path("pki")
    reload_seconds: float = 2.0
    sqlite_synchronous: str = "full"
    # Set where `database_url` was derived from FALAJ_DATABASE_SERVER: the server's
    # maintenance database, through which a missing database is created at boot.
    database_admin_url: str | None = None
    database_prefix: str = DEFAULT_DATABASE_PREFIX

    @property
    def data_dir(self) -> Path:
        return self.home / self.component

    @property
    def spiffe_id(self) -> str:
        return f"spiffe://{TRUST_DOMAIN}/service/{self.component}"


def _int(env: Mapping[str, str], key: str, default: int) -> int:
    raw = env.get(key)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise StartupError(f"{key}={raw!r} is not an integer") from None


def _float(env: Mapping[str, str], key: str, default: float) -> float:
    raw = env.get(key)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise StartupError(f"{key}={raw!r} is not a number") from None


def component_addr(env: Mapping[str, str], component: str) -> str:
    """The listen address of a component in the local stack."""
    if component == GATEWAY and env.get("FALAJ_GATEWAY_ADDR"):
        return env["FALAJ_GATEWAY_ADDR"]
    return env.get(_env_key(component, "ADDR"), f"127.0.0.1:{DEFAULT_PORTS[component]}")


def home_from(env: Mapping[str, str]) -> Path:
    return Path(env.get("FALAJ_HOME", "./.falaj")).resolve()


def database_prefix_of(env: Mapping[str, str]) -> str:
    """FALAJ_DATABASE_PREFIX: names this stack on shared servers (its databases, its Feast project)."""
    prefix = env.get("FALAJ_DATABASE_PREFIX", "").strip() or DEFAULT_DATABASE_PREFIX
    if not _DATABASE_PREFIX.match(prefix):
        raise StartupError(
            f"FALAJ_DATABASE_PREFIX={prefix!r}: expected lower-case letters, digits and '_', starting with a letter (40 at most)"
        )
    return prefix


def _database_server(env: Mapping[str, str]) -> sa.engine.URL | None:
    raw = env.get("FALAJ_DATABASE_SERVER", "").strip()
    if not raw:
        return None
    try:
        url = sa.engine.make_url(raw)
    except sa.exc.ArgumentError:
        raise StartupError("FALAJ_DATABASE_SERVER is not a valid URL") from None
    if url.get_backend_name() != "postgresql":
        raise StartupError(f"FALAJ_DATABASE_SERVER must be a postgresql:// URL, not {url.drivername}://")
    return url


def database_url_of(component: str, env: Mapping[str, str]) -> str:
    """FALAJ_<COMPONENT>_DATABASE_URL; else the database `<prefix><component>` on
    FALAJ_DATABASE_SERVER; else the component's SQLite file under FALAJ_HOME."""
    explicit = env.get(_env_key(component, "DATABASE_URL"), "").strip()
    if explicit:
        return explicit
    server = _database_server(env)
    if server is None:
        return f"sqlite:///{home_from(env) / component / (component + '.db')}"
    return server.set(database=database_prefix_of(env) + component).render_as_string(hide_password=False)


def database_admin_url_of(component: str, env: Mapping[str, str]) -> str | None:
    """Where the component's database is created if missing: the maintenance database of
    FALAJ_DATABASE_SERVER (its path, `postgres` by default), only when the component's URL
    comes from that server. An explicit URL names a database that must already exist."""
    server = _database_server(env)
    if server is None or env.get(_env_key(component, "DATABASE_URL"), "").strip():
        return None
    return server.set(database=server.database or "postgres").render_as_string(hide_password=False)


def load_settings(component: str, env: Mapping[str, str] | None = None) -> Settings:
    """Build the settings of `component` from the environment (os.environ by default)."""
    if component not in COMPONENTS:
        raise StartupError(f"unknown component {component!r}; expected one of {', '.join(COMPONENTS)}")
    env = os.environ if env is None else env
    home = home_from(env)
    pki_dir = Path(env.get("FALAJ_PKI_DIR", str(home / "pki")))
    identity_dir = pki_dir / "services" / component
    migrate = env.get("FALAJ_DB_MIGRATE", "auto")
    if migrate not in ("auto", "check"):
        raise StartupError(f"FALAJ_DB_MIGRATE={migrate!r}; expected 'auto' or 'check'")
    upstreams = {name: tuple(a.strip() for a in component_addr(env, name).split(",") if a.strip()) for name in SERVICES}
    return Settings(
        component=component,
        home=home,
        listen_addr=component_addr(env, component),
        metrics_addr=env.get(_env_key(component, "METRICS_ADDR"), f"127.0.0.1:{DEFAULT_METRICS_PORTS[component]}"),
        gateway_addr=component_addr(env, GATEWAY),
        database_url=database_url_of(component, env),
        region=env.get("FALAJ_REGION", "ae-dxb"),
        pki=PkiPaths(
            ca_cert=Path(env.get("FALAJ_CA_CERT", str(pki_dir / "ca.pem"))),
            cert=Path(env.get(_env_key(component, "CERT"), str(identity_dir / "cert.pem"))),
            key=Path(env.get(_env_key(component, "KEY"), str(identity_dir / "key.pem"))),
        ),
        log_level=env.get("FALAJ_LOG_LEVEL", "info").lower(),
        max_message_bytes=_int(env, "FALAJ_MAX_MESSAGE_BYTES", 64 * 1024 * 1024),
        max_concurrent_rpcs=_int(env, "FALAJ_MAX_CONCURRENT_RPCS", 256),
        # Serving's calls are short and CPU-bound: more threads than cores only fight over
        # the GIL (measured: 32 threads gave 1,290 inferences/s at 32 clients, 4 gave 1,931).
        worker_threads=_int(
            env, _env_key(component, "WORKER_THREADS"), _int(env, "FALAJ_WORKER_THREADS", 4 if component == "serving" else 32)
        ),
        migrate=migrate,
        upstreams=upstreams,
        audit_signing_key=Path(env.get("FALAJ_AUDIT_SIGNING_KEY", str(pki_dir / "audit" / "signing-key.pem"))),
        pki_dir=pki_dir,
        reload_seconds=_float(env, "FALAJ_RELOAD_SECONDS", 2.0),
        # The gateway's audit log commits on every call's path: by default it survives a
        # killed process (SQLite WAL 'normal'); set 'full' to also survive power loss.
        sqlite_synchronous=env.get(_env_key(component, "SQLITE_SYNC"), "normal" if component == GATEWAY else "full").lower(),
        database_admin_url=database_admin_url_of(component, env),
        database_prefix=database_prefix_of(env),
    )
