"""Ingest-specific settings: one frozen object read from the environment at boot.

The shared `Settings` carries what every service needs (home, region, database, PKI);
this adds what only ingest needs: the NATS server, the regions whose data it may serve
under policy, and the named connection, storage and credentials profiles that keep
secrets out of requests and out of the catalog.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from falaj_platform.runtime.errors import StartupError
from falaj_platform.runtime.settings import COMPONENTS, database_url_of
from falaj_platform.services.ingest import access


@dataclass(frozen=True)
class IngestConfig:
    """What the ingest service needs beyond the shared settings."""

    # NATS server used by sources that do not name one.
    nats_url: str = "nats://127.0.0.1:4222"
    # Residency regions other than the service's own whose datasets policy lets this
    # service hold and serve; every such access is still audited.
    allowed_foreign_regions: frozenset[str] = frozenset()
    # Named SQLAlchemy URLs for stored SQL sources (credentials never enter the catalog).
    connection_profiles: Mapping[str, str] = field(default_factory=dict)
    # Named fsspec storage options (credentials) for file imports.
    storage_profiles: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # Named NATS connect options (user/password, token, creds file) for NATS sources.
    nats_credentials_profiles: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # Bytes of Arrow data one IngestBatches stream may carry before RESOURCE_EXHAUSTED.
    max_stream_bytes: int = 8 * 1024**3
    # Rows per Parquet row group in version files.
    row_group_rows: int = 128 * 1024
    # How often the background worker looks for due schedules and changed sources.
    worker_poll_seconds: float = 1.0
    # Default NATS commit thresholds when a source sets none.
    nats_commit_max_rows: int = 10_000
    nats_commit_max_interval_seconds: float = 5.0
    # Threads running queued (return_immediately) imports.
    import_workers: int = 2
    # Local folders file imports may never read: the platform's own data, keys and PKI.
    protected_roots: tuple[str, ...] = ()
    # URL prefixes (https://host/path/, s3://bucket/, ...) file imports may fetch; empty: local paths only.
    allowed_url_prefixes: tuple[str, ...] = ()
    # Hosts (host or host:port) SQL imports may connect to; empty: any but the platform's own databases.
    sql_allowed_hosts: tuple[str, ...] = ()
    # The platform's own database URLs (component -> FALAJ_<COMPONENT>_DATABASE_URL): never an import source.
    platform_databases: Mapping[str, str] = field(default_factory=dict)


def _json_mapping(env: Mapping[str, str], key: str) -> dict[str, Any]:
    raw = env.get(key, "").strip()
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as error:
        raise StartupError(f"{key} is not valid JSON: {error.msg}") from None
    if not isinstance(value, dict):
        raise StartupError(f"{key} must be a JSON object from profile name to settings")
    return value


def _number(env: Mapping[str, str], key: str, default: float) -> float:
    raw = env.get(key, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise StartupError(f"{key}={raw!r} is not a number") from None


def _list(env: Mapping[str, str], key: str, check: Callable[[str], object]) -> tuple[str, ...]:
    entries = tuple(dict.fromkeys(e.strip() for e in env.get(key, "").split(",") if e.strip()))
    for entry in entries:
        try:
            check(entry)
        except ValueError as error:
            raise StartupError(f"{key}: {error}") from None
    return entries


def load_ingest_config(env: Mapping[str, str] | None = None) -> IngestConfig:
    """Build the ingest config from the environment (os.environ by default)."""
    env = os.environ if env is None else env
    connection_profiles = _json_mapping(env, "FALAJ_INGEST_CONNECTION_PROFILES")
    for name, url in connection_profiles.items():
        if not isinstance(url, str):
            raise StartupError(f"FALAJ_INGEST_CONNECTION_PROFILES[{name!r}] must be a SQLAlchemy URL string")
    regions = frozenset(r.strip() for r in env.get("FALAJ_INGEST_ALLOWED_FOREIGN_REGIONS", "").split(",") if r.strip())
    return IngestConfig(
        nats_url=env.get("FALAJ_INGEST_NATS_URL", "nats://127.0.0.1:4222"),
        allowed_foreign_regions=regions,
        connection_profiles=connection_profiles,
        storage_profiles=_json_mapping(env, "FALAJ_INGEST_STORAGE_PROFILES"),
        nats_credentials_profiles=_json_mapping(env, "FALAJ_INGEST_NATS_CREDENTIALS_PROFILES"),
        max_stream_bytes=int(_number(env, "FALAJ_INGEST_MAX_STREAM_BYTES", 8 * 1024**3)),
        worker_poll_seconds=_number(env, "FALAJ_INGEST_WORKER_POLL_SECONDS", 1.0),
        nats_commit_max_rows=int(_number(env, "FALAJ_INGEST_NATS_COMMIT_MAX_ROWS", 10_000)),
        nats_commit_max_interval_seconds=_number(env, "FALAJ_INGEST_NATS_COMMIT_MAX_INTERVAL_SECONDS", 5.0),
        allowed_url_prefixes=_list(env, access.URL_PREFIXES_SETTING, access.check_url_prefix),
        sql_allowed_hosts=_list(env, access.SQL_HOSTS_SETTING, access.parse_host_entry),
        platform_databases={component: database_url_of(component, env) for component in COMPONENTS},
    )
