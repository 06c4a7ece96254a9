"""Which stores the platforms the tests start use: FALAJ_TEST_BACKEND=sqlite (default) or postgres.

With `postgres` every platform a test starts (in-process or as processes) runs each component
on a PostgreSQL database of its own and features' online store on Redis, through the
production settings: FALAJ_DATABASE_SERVER (FALAJ_TEST_POSTGRES_URL), FALAJ_DATABASE_PREFIX
and FALAJ_FEATURES_ONLINE_STORE (FALAJ_TEST_REDIS_URL). `backend_env(home)` gives those for
one FALAJ_HOME: its prefix is derived from the home folder, so a platform restarted on the
same home finds its data as it would in SQLite files, and two homes never share a database
or (the Feast project derives from the prefix) a Redis key.

Clean-up: the services create their databases at boot. A home first named while a module-
or session-scoped fixture is being set up is dropped after that fixture's teardown; any other
(a function-scoped fixture, a test body) after the test's teardown. Drops run on a background
thread (DROP DATABASE waits for a checkpoint); at session end the thread is drained and
anything left with this run's prefix is dropped. At session start databases and Redis keys
of earlier runs that died without cleaning up are removed: their names carry the pid and
start minute of the pytest process that made them.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa

BACKEND = os.environ.get("FALAJ_TEST_BACKEND", "").strip() or "sqlite"
BACKENDS = ("sqlite", "postgres")
POSTGRES_URL = os.environ.get("FALAJ_TEST_POSTGRES_URL", "")
REDIS_URL = os.environ.get("FALAJ_TEST_REDIS_URL", "")

TEST_PREFIX = "falajt"
"""Every database and Feast project this suite names starts with it; production's default
prefix is `falaj_`, so no test name is ever a production one."""

RUN = f"{TEST_PREFIX}{os.getpid()}x{int(time.time()) // 60:x}"
_RUN_NAME = re.compile(rf"^{TEST_PREFIX}(\d+)x([0-9a-f]+)_")
# A run whose pytest process is gone from this host, or that started this long ago, is over.
_STALE_MINUTES = 12 * 60
_LOCAL_HOSTS = frozenset({None, "", "localhost", "127.0.0.1", "::1"})


def on_postgres() -> bool:
    return BACKEND == "postgres"


def _admin_engine() -> sa.Engine:
    url = sa.engine.make_url(POSTGRES_URL)
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    return sa.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)


def _redis() -> object:
    import redis

    return redis.Redis.from_url(REDIS_URL)


class _Backend:
    """The databases and key spaces of this run, and their clean-up."""

    def __init__(self) -> None:
        self._prefixes: dict[Path, str] = {}
        self._lock = threading.Lock()
        self._fixtures: list[pytest.FixtureRequest] = []
        self._item_prefixes: list[str] = []
        self._drops: ThreadPoolExecutor | None = None
        self._pending: list[Future[None]] = []

    # -- session ------------------------------------------------------------------------------------
    def start(self) -> None:
        """Check the servers are there and remove what dead runs left behind."""
        if not POSTGRES_URL or not REDIS_URL:
            raise pytest.UsageError("FALAJ_TEST_BACKEND=postgres needs FALAJ_TEST_POSTGRES_URL and FALAJ_TEST_REDIS_URL")
        engine = _admin_engine()
        try:
            with engine.connect() as connection:
                names = connection.execute(sa.text("SELECT datname FROM pg_database WHERE datname LIKE :p"), {"p": f"{TEST_PREFIX}%"})
                stale = sorted(name for (name,) in names if self._is_stale(name))
        except sa.exc.OperationalError as error:
            raise pytest.UsageError(f"FALAJ_TEST_BACKEND=postgres: PostgreSQL at {POSTGRES_URL} is not reachable: {error.orig}") from None
        finally:
            engine.dispose()
        try:
            client = _redis()
            client.ping()  # type: ignore[attr-defined]
        except Exception as error:  # noqa: BLE001 - any failure to reach Redis ends the run the same way
            raise pytest.UsageError(f"FALAJ_TEST_BACKEND=postgres: Redis at {REDIS_URL} is not reachable: {error}") from None
        for key in client.scan_iter(match=f"*{TEST_PREFIX}*".encode(), count=1000):  # type: ignore[attr-defined]
            run = re.search(rf"{TEST_PREFIX}\d+x[0-9a-f]+_".encode(), key)
            if run and self._is_stale(run.group(0).decode()):
                client.delete(key)  # type: ignore[attr-defined]
        client.close()  # type: ignore[attr-defined]
        self._drop_databases(stale)
        # In-process features services read their online store from the process environment.
        os.environ["FALAJ_FEATURES_ONLINE_STORE"] = REDIS_URL
        self._drops = ThreadPoolExecutor(max_workers=1, thread_name_prefix="drop-test-databases")

    def finish(self) -> None:
        """Wait for the pending drops, then drop whatever is left of this run."""
        if self._drops is None:
            return
        self._drops.shutdown(wait=True)
        self._drops = None
        failures = [str(f.exception()) for f in self._pending if f.exception() is not None]
        if failures:
            print(f"\nfailed to drop test databases ({len(failures)}): {failures[0]}")
        engine = _admin_engine()
        try:
            with engine.connect() as connection:
                names = connection.execute(sa.text("SELECT datname FROM pg_database WHERE datname LIKE :p"), {"p": f"{RUN}\\_%"})
                left = [name for (name,) in names]
        finally:
            engine.dispose()
        self._drop_databases(left)
        self._delete_keys(f"*{RUN}_*")

    @staticmethod
    def _is_stale(name: str) -> bool:
        match = _RUN_NAME.match(name)
        if match is None:
            return False
        pid, minute = int(match.group(1)), int(match.group(2), 16)
        if name.startswith(RUN + "_"):
            return False
        if pid == os.getpid():
            return True  # an earlier process that had this pid
        if time.time() / 60 - minute > _STALE_MINUTES:
            return True
        if sa.engine.make_url(POSTGRES_URL).host not in _LOCAL_HOSTS:
            return False  # another host's run: only its age tells
        try:
            return b"pytest" not in Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return True

    # -- one home -----------------------------------------------------------------------------------
    def env(self, home: Path) -> dict[str, str]:
        if not on_postgres():
            return {}
        home = Path(home).resolve()
        with self._lock:
            prefix = self._prefixes.get(home)
            if prefix is None:
                prefix = f"{RUN}_{hashlib.sha256(str(home).encode()).hexdigest()[:8]}_"
                self._prefixes[home] = prefix
                self._own(home, prefix)
        return {"FALAJ_DATABASE_SERVER": POSTGRES_URL, "FALAJ_DATABASE_PREFIX": prefix, "FALAJ_FEATURES_ONLINE_STORE": REDIS_URL}

    def _own(self, home: Path, prefix: str) -> None:
        owner = self._fixtures[-1] if self._fixtures else None
        if owner is not None and owner.scope != "function":
            owner.addfinalizer(lambda: self._release(home, prefix))
        else:
            self._item_prefixes.append(prefix)

    def _release(self, home: Path, prefix: str) -> None:
        with self._lock:
            self._prefixes.pop(home, None)
        if self._drops is not None:
            self._pending.append(self._drops.submit(self._drop_prefix, prefix))

    def release_item(self) -> None:
        """After a test's teardown: drop what it (or its function-scoped fixtures) named."""
        prefixes, self._item_prefixes = self._item_prefixes, []
        with self._lock:
            for home in [h for h, p in self._prefixes.items() if p in prefixes]:
                del self._prefixes[home]
        for prefix in prefixes:
            if self._drops is not None:
                self._pending.append(self._drops.submit(self._drop_prefix, prefix))

    @contextmanager
    def fixture_setup(self, request: pytest.FixtureRequest) -> Iterator[None]:
        self._fixtures.append(request)
        try:
            yield
        finally:
            self._fixtures.pop()

    # -- dropping -----------------------------------------------------------------------------------
    def _drop_prefix(self, prefix: str) -> None:
        engine = _admin_engine()
        try:
            with engine.connect() as connection:
                names = connection.execute(
                    sa.text("SELECT datname FROM pg_database WHERE datname LIKE :p"), {"p": prefix.replace("_", "\\_") + "%"}
                )
                found = [name for (name,) in names]
        finally:
            engine.dispose()
        self._drop_databases(found)
        self._delete_keys(f"*{prefix.rstrip('_')}")

    @staticmethod
    def _drop_databases(names: list[str]) -> None:
        if not names:
            return
        engine = _admin_engine()
        try:
            with engine.connect() as connection:
                for name in names:
                    connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        finally:
            engine.dispose()

    @staticmethod
    def _delete_keys(pattern: str) -> None:
        """Feast's Redis keys end with the project's name: one home's, or any of this run's."""
        client = _redis()
        try:
            for key in client.scan_iter(match=pattern.encode(), count=1000):  # type: ignore[attr-defined]
                client.delete(key)  # type: ignore[attr-defined]
        finally:
            client.close()  # type: ignore[attr-defined]


STATE = _Backend()


def drop_databases(names: list[str]) -> None:
    """Drop these databases of FALAJ_TEST_POSTGRES_URL's server (connections to them are ended)."""
    STATE._drop_databases(names)


def drop_prefix(prefix: str) -> None:
    """Drop every database named `prefix...` and delete the Redis keys of the Feast project
    `prefix` without its trailing `_` (for tests that name a stack of their own)."""
    STATE._drop_prefix(prefix)


def backend_env(home: Path | str) -> dict[str, str]:
    """The environment that puts the stores of the platform at FALAJ_HOME `home` on the test backend
    ({} on SQLite): merge it into the env of every platform, stack or service a test starts."""
    return STATE.env(Path(home))
