"""Features-specific settings: one frozen object built once at boot.

The shared `Settings` carries what every service needs (home, region, database, PKI,
gateway); this adds what only the features service needs: where its Feast repo lives,
which online store backs it (SQLite by default, Redis in production), the Feast
project name, the regions whose data policy lets it hold, and retrieval sizes.

Environment variables (read here and nowhere else):
- FALAJ_FEATURES_ONLINE_STORE: `sqlite` (default) or a Redis URL (`redis://host:port/db`,
  `rediss://` for TLS, password in the URL).
- FALAJ_FEATURES_FEAST_PROJECT: Feast project name; replicas sharing one registry and
  online store use the same name. Feast's Redis keys carry it, so two stacks sharing one
  Redis need different names: by default it is FALAJ_DATABASE_PREFIX without its
  trailing `_` (`falaj` for the default prefix `falaj_`).
- FALAJ_FEATURES_ALLOWED_FOREIGN_REGIONS: comma-separated regions other than the
  service's own whose datasets policy allows (each use is still audited).
- FALAJ_FEATURES_REGISTRY_CACHE_SECONDS: how long a replica may serve a cached Feast
  registry before re-reading it (default 30; its own writes refresh it at once).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import unquote, urlparse

import sqlalchemy as sa

from falaj_platform.runtime.errors import StartupError
from falaj_platform.runtime.settings import PkiPaths, Settings

REGISTRY_SCHEMA = "feast_registry"
"""PostgreSQL schema that holds Feast's registry tables, beside the service's own catalog."""

_PROJECT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_]{0,62}$")


@dataclass(frozen=True)
class FeaturesConfig:
    """What the features service needs beyond the shared settings."""

    data_dir: Path
    region: str
    database_url: str
    gateway_addr: str
    pki: PkiPaths
    feast_project: str = "falaj"
    # `sqlite` or a Redis URL.
    online_store: str = "sqlite"
    allowed_foreign_regions: frozenset[str] = frozenset()
    registry_cache_seconds: int = 30
    # Entity rows joined per Feast call in a historical retrieval: bounds memory.
    historical_chunk_rows: int = 50_000
    default_batch_rows: int = 65_536
    ingest_timeout_seconds: float = 60.0

    @property
    def feast_dir(self) -> Path:
        return self.data_dir / "feast"

    @property
    def offline_dir(self) -> Path:
        return self.feast_dir / "offline"

    @property
    def uses_redis(self) -> bool:
        return self.online_store != "sqlite"

    def with_overrides(self, **changes: object) -> FeaturesConfig:
        return replace(self, **changes)  # type: ignore[arg-type]

    def registry_url(self) -> tuple[str, dict[str, object]]:
        """SQLAlchemy URL of Feast's SQL registry and its engine arguments.

        Feast's registry tables (`entities`, `feature_views`, ...) share names with the
        service's catalog, so they cannot live in the same namespace: on PostgreSQL they
        go to the `feast_registry` schema of the service's database; on SQLite (no
        schemas) to `registry.db` next to the service's database file.
        """
        url = sa.engine.make_url(self.database_url)
        if url.get_backend_name() == "postgresql":
            url = url.set(drivername="postgresql+psycopg")
            return url.render_as_string(hide_password=False), {
                "connect_args": {"options": f"-csearch_path={REGISTRY_SCHEMA}"},
                "pool_pre_ping": True,
            }
        return f"sqlite:///{self.feast_dir / 'registry.db'}", {"connect_args": {"check_same_thread": False}}

    def redis_connection_string(self) -> str:
        """The online store URL in Feast's `host:port,key=value` form."""
        parsed = urlparse(self.online_store)
        parts = [f"{parsed.hostname or '127.0.0.1'}:{parsed.port or 6379}"]
        database = (parsed.path or "/0").strip("/") or "0"
        parts.append(f"db={database}")
        if parsed.password:
            parts.append(f"password={unquote(parsed.password)}")
        if parsed.username and parsed.username != "default":
            parts.append(f"username={unquote(parsed.username)}")
        if parsed.scheme == "rediss":
            parts.append("ssl=true")
        return ",".join(parts)


def _number(env: Mapping[str, str], key: str, default: float) -> float:
    raw = env.get(key, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise StartupError(f"{key}={raw!r} is not a number") from None


def load_features_config(settings: Settings, env: Mapping[str, str] | None = None) -> FeaturesConfig:
    """Build the features config from the settings and the environment (os.environ by default)."""
    env = os.environ if env is None else env
    online_store = env.get("FALAJ_FEATURES_ONLINE_STORE", "").strip() or "sqlite"
    if online_store != "sqlite" and urlparse(online_store).scheme not in ("redis", "rediss"):
        raise StartupError(f"FALAJ_FEATURES_ONLINE_STORE={online_store!r}; expected 'sqlite' or a redis:// URL")
    project = env.get("FALAJ_FEATURES_FEAST_PROJECT", "").strip() or settings.database_prefix.rstrip("_") or "falaj"
    if not _PROJECT.match(project):
        raise StartupError(f"FALAJ_FEATURES_FEAST_PROJECT={project!r} must be letters, digits and '_', starting with a letter or digit")
    regions = frozenset(r.strip() for r in env.get("FALAJ_FEATURES_ALLOWED_FOREIGN_REGIONS", "").split(",") if r.strip())
    return FeaturesConfig(
        data_dir=settings.data_dir,
        region=settings.region,
        database_url=settings.database_url,
        gateway_addr=settings.gateway_addr,
        pki=settings.pki,
        feast_project=project,
        online_store=online_store,
        allowed_foreign_regions=regions,
        registry_cache_seconds=int(_number(env, "FALAJ_FEATURES_REGISTRY_CACHE_SECONDS", 30)),
    )
