"""Every component's store migrates on SQLite and PostgreSQL, and refuses a stale schema."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa

from falaj_platform.runtime.db import Database
from falaj_platform.runtime.errors import StartupError
from falaj_platform.runtime.service import ServiceSpec, open_database
from falaj_platform.runtime.settings import COMPONENTS
from falaj_platform.stack import MODULES


def spec_of(component: str) -> ServiceSpec:
    spec: ServiceSpec = importlib.import_module(MODULES[component] + ".server").SPEC
    return spec


def store_metadata(component: str) -> sa.MetaData:
    metadata: sa.MetaData = importlib.import_module(MODULES[component] + ".store").metadata
    return metadata


@pytest.mark.parametrize("component", COMPONENTS)
def test_first_migration_builds_the_store_schema(component: str, database_url: str, settings_for: Callable[..., Any]) -> None:
    settings = settings_for(component, **{f"FALAJ_{component.upper()}_DATABASE_URL": database_url})
    database = open_database(spec_of(component), settings)
    try:
        assert database.current_revision() == database.head_revision() == f"{component}_0001"
        inspector = sa.inspect(database.engine)
        for table in store_metadata(component).sorted_tables:
            columns = {c["name"] for c in inspector.get_columns(table.name)}
            assert columns == {c.name for c in table.columns}, f"{component}.{table.name} differs from its migration"
        # Running the migrations again is a no-op (every boot does it).
        database.upgrade()
        assert database.current_revision() == f"{component}_0001"
    finally:
        database.dispose()


def test_check_mode_refuses_a_schema_behind_the_code(tmp_path: Any) -> None:
    spec = spec_of("ingest")
    database = Database(f"sqlite:///{tmp_path / 'ingest.db'}", spec.migrations_dir, "falaj_ingest_schema_version")
    try:
        with pytest.raises(StartupError, match="run `falaj db upgrade`"):
            database.ensure_schema("check")
        database.ensure_schema("auto")
        database.ensure_schema("check")
    finally:
        database.dispose()


def test_unreachable_database_is_one_clear_line(settings_for: Callable[..., Any]) -> None:
    settings = settings_for("training", FALAJ_TRAINING_DATABASE_URL="postgresql://postgres@127.0.0.1:1/nowhere")
    with pytest.raises(StartupError) as raised:
        open_database(spec_of("training"), settings)
    message = str(raised.value)
    assert message.startswith("cannot reach the database at postgresql+psycopg://postgres@127.0.0.1:1/nowhere")
    assert "\n" not in message


def test_invalid_database_url_is_refused(settings_for: Callable[..., Any]) -> None:
    settings = settings_for("ingest", FALAJ_INGEST_DATABASE_URL="not a url")
    with pytest.raises(StartupError, match="database URL is not valid"):
        open_database(spec_of("ingest"), settings)


def test_session_scope_translates_conflicts_and_rolls_back(database_url: str, settings_for: Callable[..., Any]) -> None:
    import datetime as dt

    from falaj_platform.runtime.errors import AlreadyExists

    settings = settings_for("ingest", FALAJ_INGEST_DATABASE_URL=database_url)
    database = open_database(spec_of("ingest"), settings)
    datasets = store_metadata("ingest").tables["datasets"]
    now = dt.datetime.now(dt.timezone.utc)
    row = {"name": "sales", "owner": "spiffe://falaj.local/client/admin", "residency_region": "ae-dxb", "created_at": now, "updated_at": now}
    try:
        with database.session_scope() as session:
            session.execute(datasets.insert().values(**row))
        with pytest.raises(AlreadyExists):
            with database.session_scope() as session:
                session.execute(datasets.insert().values(**{**row, "name": "other"}))
                session.execute(datasets.insert().values(**row))
        with database.session_scope() as session:
            names = session.execute(sa.select(datasets.c.name)).scalars().all()
        assert names == ["sales"]  # the failed transaction left nothing half-written
    finally:
        database.dispose()
