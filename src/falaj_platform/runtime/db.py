"""SQLAlchemy engine, the one session scope, and Alembic migrations per service.

Each service keeps its migrations in `<service>/migrations/` and its own version
table; the Alembic environment is shared here. SQLite under FALAJ_HOME is the embedded
default; a PostgreSQL URL selects the production backend.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event, exc
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from falaj_platform.runtime.errors import AlreadyExists, InvalidArgument, StartupError, Unavailable

ENV_DIR = Path(__file__).parent / "migrations"


SQLITE_SYNC_MODES = ("full", "normal")


def _sqlite_pragmas(synchronous: str) -> Callable[[object, object], None]:
    def apply(dbapi_connection: object, _record: object) -> None:
        cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=5000")
        cursor.execute(f"PRAGMA synchronous={synchronous.upper()}")
        cursor.close()

    return apply


def create_engine(url: str, *, sqlite_synchronous: str = "full") -> Engine:
    """An engine for `url`; SQLite gets its folder created, WAL and foreign keys on.

    `sqlite_synchronous`: 'full' syncs the WAL at every commit (survives power loss);
    'normal' leaves that to checkpoints (a committed transaction survives the process
    being killed, not the machine losing power) - SQLite's documented WAL trade-off.
    """
    if sqlite_synchronous not in SQLITE_SYNC_MODES:
        raise StartupError(f"SQLite synchronous mode must be one of {', '.join(SQLITE_SYNC_MODES)}")
    try:
        parsed = sa.engine.make_url(url)
    except exc.ArgumentError:
        raise StartupError(f"database URL is not valid: {url!r}") from None
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(parsed, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas(sqlite_synchronous))
        return engine
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return sa.create_engine(parsed, pool_pre_ping=True, pool_size=10, max_overflow=20)


def create_database_if_missing(url: str, admin_url: str) -> bool:
    """Create the PostgreSQL database `url` names, through `admin_url` (a maintenance database
    of the same server), unless it exists; returns whether it was created.

    Replicas booting at once may race: the loser's duplicate error is read as "exists".
    """
    name = sa.engine.make_url(url).database
    if not name:
        raise StartupError("the database URL names no database")
    admin = create_engine(admin_url).execution_options(isolation_level="AUTOCOMMIT")
    shown = admin.url.render_as_string(hide_password=True)
    exists = sa.text("SELECT 1 FROM pg_database WHERE datname = :name")
    try:
        with admin.connect() as connection:
            if connection.execute(exists, {"name": name}).first() is not None:
                return False
            try:
                connection.execute(sa.text(f"CREATE DATABASE {admin.dialect.identifier_preparer.quote(name)}"))
            except (exc.ProgrammingError, exc.IntegrityError) as error:
                # duplicate_database, or the unique index of pg_database when two creations race.
                if connection.execute(exists, {"name": name}).first() is None:
                    raise StartupError(f"cannot create database {name!r} on {shown}: {str(error.orig).strip().splitlines()[0]}") from None
                return False
            return True
    except exc.OperationalError as error:
        reason = str(error.orig).strip().splitlines()[0] if error.orig else str(error)
        raise StartupError(f"cannot reach the database server at {shown}: {reason}") from None
    finally:
        admin.dispose()


class Database:
    """One service's database: engine, session scope and migrations."""

    def __init__(self, url: str, migrations_dir: Path, version_table: str, *, sqlite_synchronous: str = "full"):
        self.url = url
        self.engine = create_engine(url, sqlite_synchronous=sqlite_synchronous)
        self.migrations_dir = migrations_dir
        self.version_table = version_table
        self._sessions = sessionmaker(bind=self.engine, expire_on_commit=False)

    # -- sessions ---------------------------------------------------------------------
    @contextmanager
    def session_scope(self) -> Iterator[Session]:
        """Commit on success, roll back on error, and translate driver errors to domain errors."""
        session = self._sessions()
        try:
            yield session
            session.commit()
        except exc.IntegrityError as error:
            session.rollback()
            raise AlreadyExists(f"conflicts with a stored record: {error.orig}", reason="CONSTRAINT_VIOLATION") from error
        except exc.OperationalError as error:
            session.rollback()
            raise Unavailable("the database is unavailable; retry later", reason="DATABASE_UNAVAILABLE") from error
        except exc.DataError as error:
            # A value the database cannot hold or compare: on PostgreSQL a NUL character in
            # text, a string longer than its column, a number out of range, a negative LIMIT
            # (SQLite takes all of these as they come). The value came with the request.
            session.rollback()
            reason = str(error.orig).strip().splitlines()[0] if error.orig else "invalid value"
            raise InvalidArgument(f"a value in the request cannot be stored or compared: {reason}", reason="INVALID_VALUE") from error
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    # -- migrations -------------------------------------------------------------------
    def _alembic_config(self) -> Config:
        config = Config()
        config.set_main_option("script_location", str(ENV_DIR))
        config.set_main_option("version_locations", str(self.migrations_dir))
        config.set_main_option("path_separator", "os")
        config.attributes["version_table"] = self.version_table
        return config

    def head_revision(self) -> str | None:
        return ScriptDirectory.from_config(self._alembic_config()).get_current_head()

    def current_revision(self) -> str | None:
        with self._connect() as connection:
            return MigrationContext.configure(connection, opts={"version_table": self.version_table}).get_current_revision()

    def upgrade(self) -> None:
        """Apply every pending migration in one transaction per step."""
        config = self._alembic_config()
        with self._connect() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
            connection.commit()

    def downgrade(self, revision: str) -> None:
        """Step the schema back to `revision` ('base' empties it); for operators and tests."""
        config = self._alembic_config()
        with self._connect() as connection:
            config.attributes["connection"] = connection
            command.downgrade(config, revision)
            connection.commit()

    def ensure_schema(self, mode: str) -> None:
        """'auto' upgrades to head; 'check' refuses to start unless already at head."""
        if mode == "auto":
            self.upgrade()
            return
        current, head = self.current_revision(), self.head_revision()
        if current != head:
            raise StartupError(f"database schema is at {current or 'nothing'} but the code needs {head}; run `falaj db upgrade`")

    def _connect(self) -> sa.Connection:
        try:
            return self.engine.connect()
        except exc.OperationalError as error:
            reason = str(error.orig).strip().splitlines()[0] if error.orig else str(error)
            raise StartupError(f"cannot reach the database at {self.engine.url.render_as_string(hide_password=True)}: {reason}") from None

    def dispose(self) -> None:
        self.engine.dispose()


def request_log_columns() -> list[sa.Column[object]]:
    """Columns of every service's `request_log`: the idempotency record of retried writes.

    A write carrying a request id stores the hash of its request and its response, so
    a retry with the same body gets the same answer and one with another body is refused.
    Shared by each service's table definition and its first migration.
    """
    return [
        sa.Column("request_id", sa.String(128), primary_key=True),
        sa.Column("method", sa.String(256), nullable=False),
        sa.Column("request_sha256", sa.String(64), nullable=False),
        sa.Column("response", sa.LargeBinary, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    ]
