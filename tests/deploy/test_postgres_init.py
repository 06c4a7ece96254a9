"""deploy/postgres/init-databases.sh against a real PostgreSQL: one database and role per component.

Runs the script the postgres container runs at first start, with role names made unique
for this run, then migrates every component's schema as that component's own role (so
the privileges the script grants are enough) and checks that a role cannot open another
component's database.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from falaj_platform.runtime.db import Database
from falaj_platform.runtime.settings import COMPONENTS
from falaj_platform.stack import MODULES
from tests.conftest import POSTGRES_URL, missing_service
from tests.deploy.project import ROOT

SCRIPT = ROOT / "deploy" / "postgres" / "init-databases.sh"
PASSWORD = "falaj-test-only"

pytestmark = pytest.mark.postgres


@pytest.fixture
def admin_url() -> sa.URL:
    if not POSTGRES_URL:
        missing_service("FALAJ_TEST_POSTGRES_URL is not set")
    if shutil.which("psql") is None:
        missing_service("psql is not installed")
    return sa.engine.make_url(POSTGRES_URL).set(drivername="postgresql+psycopg")


@pytest.fixture
def created(admin_url: sa.URL) -> Iterator[dict[str, str]]:
    """component -> the database (and role) the script made for it; dropped afterwards."""
    run = uuid.uuid4().hex[:8]
    names = {component: f"t{run}_{component}" for component in COMPONENTS}
    env = {
        **os.environ,
        "FALAJ_DB_PASSWORD": PASSWORD,
        "FALAJ_COMPONENTS": " ".join(names.values()),
        "POSTGRES_USER": admin_url.username or "postgres",
        "POSTGRES_DB": admin_url.database or "postgres",
        "PGHOST": admin_url.host or "127.0.0.1",
        "PGPORT": str(admin_url.port or 5432),
        "PGPASSWORD": admin_url.password or "",
    }
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        result = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        yield {component: f"falaj_{name}" for component, name in names.items()}
    finally:
        with admin.connect() as connection:
            for name in names.values():
                connection.execute(sa.text(f'DROP DATABASE IF EXISTS "falaj_{name}" WITH (FORCE)'))
                connection.execute(sa.text(f'DROP ROLE IF EXISTS "falaj_{name}"'))
        admin.dispose()


def _url(admin_url: sa.URL, role_and_database: str, database: str | None = None) -> sa.URL:
    return admin_url.set(username=role_and_database, password=PASSWORD, database=database or role_and_database)


def test_each_component_migrates_its_own_database_as_its_own_role(admin_url: sa.URL, created: dict[str, str]) -> None:
    for component, name in created.items():
        spec = importlib.import_module(f"{MODULES[component]}.server").SPEC
        database = Database(
            _url(admin_url, name).render_as_string(hide_password=False), spec.migrations_dir, f"falaj_{component}_schema_version"
        )
        try:
            database.upgrade()
            assert database.current_revision() is not None
        finally:
            database.dispose()


def test_a_role_cannot_open_another_components_database(admin_url: sa.URL, created: dict[str, str]) -> None:
    engine = sa.create_engine(_url(admin_url, created["serving"], database=created["ingest"]))
    try:
        with pytest.raises(sa.exc.OperationalError, match="permission denied"):
            with engine.connect():
                pass
    finally:
        engine.dispose()


def test_the_script_refuses_to_run_without_a_password() -> None:
    env = {key: value for key, value in os.environ.items() if key != "FALAJ_DB_PASSWORD"}
    result = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and "FALAJ_DB_PASSWORD" in result.stderr
