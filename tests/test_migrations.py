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


def _columns(table: sa.Table) -> dict[str, bool]:
    return {column.name: bool(column.nullable) for column in table.columns}


def _foreign_keys(table: sa.Table) -> set[tuple[tuple[str, ...], str, tuple[str, ...], str | None]]:
    return {
        (
            tuple(element.parent.name for element in constraint.elements),
            constraint.referred_table.name,
            tuple(element.column.name for element in constraint.elements),
            constraint.ondelete,
        )
        for constraint in table.foreign_key_constraints
    }


def _indexes(table: sa.Table) -> set[tuple[str | None, tuple[str, ...], bool]]:
    return {(index.name, tuple(column.name for column in index.columns), bool(index.unique)) for index in table.indexes}


@pytest.mark.parametrize("component", COMPONENTS)
def test_migrations_build_exactly_the_store_schema(component: str, database_url: str, settings_for: Callable[..., Any]) -> None:
    """store.py and the migrations cannot drift apart: same tables, columns, keys and indexes."""
    settings = settings_for(component, **{f"FALAJ_{component.upper()}_DATABASE_URL": database_url})
    database = open_database(spec_of(component), settings)
    metadata = store_metadata(component)
    try:
        assert database.current_revision() == database.head_revision()
        assert str(database.head_revision()).startswith(f"{component}_")
        inspector = sa.inspect(database.engine)
        assert set(inspector.get_table_names()) - {f"falaj_{component}_schema_version"} == set(metadata.tables)
        assert "request_log" in metadata.tables
        for name, table in metadata.tables.items():
            columns = {c["name"]: bool(c["nullable"]) for c in inspector.get_columns(name)}
            assert columns == _columns(table), f"columns of {name}"
            primary_key = inspector.get_pk_constraint(name)["constrained_columns"]
            assert primary_key == [c.name for c in table.primary_key.columns], f"primary key of {name}"
            reflected_fks = {
                (
                    tuple(fk["constrained_columns"]),
                    fk["referred_table"],
                    tuple(fk["referred_columns"]),
                    fk.get("options", {}).get("ondelete"),
                )
                for fk in inspector.get_foreign_keys(name)
            }
            assert reflected_fks == _foreign_keys(table), f"foreign keys of {name}"
            # PostgreSQL also reports each unique constraint as an index; those are compared below.
            reflected_indexes = {
                (i["name"], tuple(str(c) for c in i["column_names"]), bool(i["unique"]))
                for i in inspector.get_indexes(name)
                if not i.get("duplicates_constraint")
            }
            assert reflected_indexes == _indexes(table), f"indexes of {name}"
            reflected_uniques = {tuple(u["column_names"]) for u in inspector.get_unique_constraints(name)}
            declared_uniques = {tuple(c.name for c in u.columns) for u in table.constraints if isinstance(u, sa.UniqueConstraint)}
            declared_uniques |= {(c.name,) for c in table.columns if c.unique}
            assert reflected_uniques == declared_uniques, f"unique constraints of {name}"
        # Every boot migrates; doing it again changes nothing, and check mode accepts it.
        database.upgrade()
        database.ensure_schema("check")
        # The first migration also goes back down cleanly.
        database.downgrade("base")
        assert set(sa.inspect(database.engine).get_table_names()) <= {f"falaj_{component}_schema_version"}
    finally:
        database.dispose()


RESIDENCY_CARRYING = {
    "ingest": {"datasets"},
    "features": {"feature_views", "feature_services"},
    "training": {"training_jobs", "registered_models", "model_versions"},
    "serving": {"deployments", "served_models"},
    "experiments": {"experiments"},
    "monitoring": {"reference_profiles", "model_monitors"},
    "gateway": set(),
}


@pytest.mark.parametrize("component", COMPONENTS)
def test_resources_carry_residency_and_timestamps_are_timezone_aware(component: str) -> None:
    tables = store_metadata(component).tables
    for name in RESIDENCY_CARRYING[component]:
        assert "residency_region" in tables[name].columns, name
    for table in tables.values():
        for column in table.columns:
            if isinstance(column.type, sa.DateTime):
                assert column.type.timezone, f"{table.name}.{column.name} must be timezone-aware"


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
    now = dt.datetime.now(dt.UTC)
    row = {
        "name": "sales",
        "owner": "spiffe://falaj.local/client/admin",
        "residency_region": "ae-dxb",
        "created_at": now,
        "updated_at": now,
    }
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


def test_a_value_the_database_cannot_hold_is_invalid_argument_not_internal(database_url: str, settings_for: Callable[..., Any]) -> None:
    """PostgreSQL refuses a NUL character in text and a negative LIMIT (SQLite takes both): the
    caller sent the value, so the answer is INVALID_ARGUMENT, and nothing is half-written."""
    from falaj_platform.runtime.errors import InvalidArgument

    database = open_database(spec_of("ingest"), settings_for("ingest", FALAJ_INGEST_DATABASE_URL=database_url))
    datasets = store_metadata("ingest").tables["datasets"]
    try:
        lookup = sa.select(datasets.c.name).where(datasets.c.name == "sales\x00; drop")
        limited = sa.select(datasets.c.name).limit(-1)
        if database.engine.dialect.name == "postgresql":
            for query in (lookup, limited):
                with pytest.raises(InvalidArgument) as raised:
                    with database.session_scope() as session:
                        session.execute(query).all()
                assert raised.value.reason == "INVALID_VALUE"
        else:
            with database.session_scope() as session:
                assert session.execute(lookup).all() == []
        with database.session_scope() as session:  # the session was rolled back and the pool is healthy
            assert session.execute(sa.select(sa.func.count()).select_from(datasets)).scalar_one() == 0
    finally:
        database.dispose()
