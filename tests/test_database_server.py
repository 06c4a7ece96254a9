"""FALAJ_DATABASE_SERVER and FALAJ_DATABASE_PREFIX: one PostgreSQL server, a database per
component (created at boot if missing), and a key space of its own in a shared Redis."""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from falaj.features.v1 import message_pb2 as messages
from falaj.features.v1 import request_response_pb2 as requests
from falaj_platform.pki import PKI
from falaj_platform.runtime.db import create_database_if_missing
from falaj_platform.runtime.errors import StartupError
from falaj_platform.runtime.service import open_database
from falaj_platform.runtime.settings import COMPONENTS, database_url_of, load_settings
from falaj_platform.services.features.config import load_features_config
from tests import backends
from tests.conftest import POSTGRES_URL, missing_service
from tests.test_migrations import spec_of

SERVER = "postgresql://falaj:secret@db.example:5433/postgres?sslmode=require"


def _settings(component: str, tmp_path: Path, **env: str) -> Any:
    return load_settings(component, env={"FALAJ_HOME": str(tmp_path), **env})


def test_each_component_gets_a_database_of_its_own_on_the_server(tmp_path: Path) -> None:
    for component in COMPONENTS:
        settings = _settings(component, tmp_path, FALAJ_DATABASE_SERVER=SERVER)
        url = sa.engine.make_url(settings.database_url)
        assert (url.host, url.port, url.username, url.password) == ("db.example", 5433, "falaj", "secret")
        assert url.database == f"falaj_{component}"
        assert url.query == {"sslmode": "require"}
        admin = sa.engine.make_url(settings.database_admin_url)
        assert admin.database == "postgres" and admin.password == "secret"
    staging = _settings("features", tmp_path, FALAJ_DATABASE_SERVER="postgresql://pg", FALAJ_DATABASE_PREFIX="staging_")
    assert sa.engine.make_url(staging.database_url).database == "staging_features"
    assert sa.engine.make_url(staging.database_admin_url).database == "postgres"  # the URL named none


def test_an_explicit_url_wins_and_is_never_created(tmp_path: Path) -> None:
    settings = _settings("training", tmp_path, FALAJ_DATABASE_SERVER=SERVER, FALAJ_TRAINING_DATABASE_URL="postgresql://other/mine")
    assert settings.database_url == "postgresql://other/mine"
    assert settings.database_admin_url is None
    env = {"FALAJ_HOME": str(tmp_path), "FALAJ_DATABASE_SERVER": SERVER, "FALAJ_TRAINING_DATABASE_URL": "postgresql://other/mine"}
    # Ingest refuses imports from every platform database: it sees the same URLs.
    assert database_url_of("training", env) == "postgresql://other/mine"
    assert sa.engine.make_url(database_url_of("serving", env)).database == "falaj_serving"


def test_without_a_server_each_component_keeps_its_sqlite_file(tmp_path: Path) -> None:
    settings = _settings("serving", tmp_path)
    assert settings.database_url == f"sqlite:///{tmp_path.resolve() / 'serving' / 'serving.db'}"
    assert settings.database_admin_url is None and settings.database_prefix == "falaj_"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"FALAJ_DATABASE_SERVER": "mysql://db/x"}, "must be a postgresql:// URL"),
        ({"FALAJ_DATABASE_SERVER": "not a url"}, "FALAJ_DATABASE_SERVER is not a valid URL"),
        ({"FALAJ_DATABASE_PREFIX": "Staging-"}, "FALAJ_DATABASE_PREFIX='Staging-'"),
        ({"FALAJ_DATABASE_PREFIX": "x" * 41}, "40 at most"),
    ],
)
def test_a_bad_server_or_prefix_is_one_clear_line(tmp_path: Path, env: dict[str, str], message: str) -> None:
    with pytest.raises(StartupError, match=message):
        _settings("ingest", tmp_path, **env)


def test_the_feast_project_and_so_the_redis_key_space_follow_the_prefix(tmp_path: Path) -> None:
    def project(**env: str) -> str:
        return load_features_config(_settings("features", tmp_path, **env), env=env).feast_project

    assert project() == "falaj"  # unchanged for existing stacks
    assert project(FALAJ_DATABASE_PREFIX="staging_") == "staging"
    assert project(FALAJ_DATABASE_PREFIX="staging_", FALAJ_FEATURES_FEAST_PROJECT="shared") == "shared"


# -- on the real PostgreSQL server -------------------------------------------------------------


@pytest.fixture
def server_prefix() -> Iterator[str]:
    """A prefix of this test's own on FALAJ_TEST_POSTGRES_URL's server, dropped afterwards."""
    if not POSTGRES_URL:
        missing_service("FALAJ_TEST_POSTGRES_URL is not set")
    prefix = f"{backends.RUN}_{uuid.uuid4().hex[:8]}_"
    try:
        yield prefix
    finally:
        backends.drop_databases(_databases(prefix))


def _databases(prefix: str) -> list[str]:
    engine = sa.create_engine(sa.engine.make_url(POSTGRES_URL).set(drivername="postgresql+psycopg"), poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as connection:
            rows = connection.execute(sa.text("SELECT datname FROM pg_database WHERE starts_with(datname, :p)"), {"p": prefix})
            return sorted(name for (name,) in rows)
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_a_missing_database_is_created_and_migrated_at_boot(server_prefix: str, tmp_path: Path) -> None:
    env = {"FALAJ_DATABASE_SERVER": POSTGRES_URL, "FALAJ_DATABASE_PREFIX": server_prefix}
    first = open_database(spec_of("experiments"), _settings("experiments", tmp_path, **env))
    first.dispose()
    assert _databases(server_prefix) == [f"{server_prefix}experiments"]
    again = open_database(spec_of("experiments"), _settings("experiments", tmp_path, **env))  # exists: opened as it is
    try:
        assert again.current_revision() == again.head_revision()
    finally:
        again.dispose()


@pytest.mark.postgres
def test_replicas_booting_at_once_create_the_database_once(server_prefix: str, tmp_path: Path) -> None:
    settings = _settings("monitoring", tmp_path, FALAJ_DATABASE_SERVER=POSTGRES_URL, FALAJ_DATABASE_PREFIX=server_prefix)
    assert settings.database_admin_url is not None
    barrier = threading.Barrier(4)
    outcomes: list[object] = []

    def boot() -> None:
        barrier.wait()
        try:
            outcomes.append(create_database_if_missing(settings.database_url, settings.database_admin_url))
        except Exception as error:  # noqa: BLE001 - the assertion names it
            outcomes.append(error)

    threads = [threading.Thread(target=boot) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(map(repr, outcomes)) == ["False", "False", "False", "True"]
    assert _databases(server_prefix) == [f"{server_prefix}monitoring"]


@pytest.mark.postgres
def test_a_server_that_cannot_be_reached_is_one_clear_line(tmp_path: Path) -> None:
    settings = _settings("ingest", tmp_path, FALAJ_DATABASE_SERVER="postgresql://postgres:hunter2@127.0.0.1:1/postgres")
    with pytest.raises(StartupError) as raised:
        open_database(spec_of("ingest"), settings)
    assert str(raised.value).startswith("cannot reach the database server at postgresql+psycopg://postgres:***@127.0.0.1:1/postgres")
    assert "hunter2" not in str(raised.value)


# -- two stacks on one Redis -------------------------------------------------------------------


@pytest.mark.postgres
def test_two_stacks_sharing_one_redis_never_read_each_others_features(pki: PKI, tmp_path: Path, server_prefix: str) -> None:
    from tests.features.conftest import ALICE, NOW, REDIS_URL, add_transactions, define_customer_view, int_keys, materialize, start_features

    if not REDIS_URL:
        missing_service("FALAJ_TEST_REDIS_URL is not set")
    stacks = []
    try:
        for name, amount in (("a", 1.0), ("b", 2.0)):
            env = {"FALAJ_DATABASE_SERVER": POSTGRES_URL, "FALAJ_DATABASE_PREFIX": f"{server_prefix}{name}_"}
            configure: Callable[[Any], Any] = lambda c: c.with_overrides(online_store=REDIS_URL)  # noqa: E731
            features = start_features(pki, tmp_path / name, configure=configure, **env)
            stacks.append(features)
            assert features.service.config.feast_project == f"{server_prefix}{name}"
            dataset = add_transactions(features.source, [(7, amount, "a", False, NOW - dt.timedelta(hours=1))])
            features.stub.CreateEntity(
                requests.CreateEntityRequest(
                    entity_id="customer",
                    entity=messages.Entity(join_keys=[messages.JoinKey(name="customer_id", value_type=messages.VALUE_TYPE_INT64)]),
                ),
                metadata=ALICE,
                timeout=30,
            )
            define_customer_view(features, dataset, entity="customer", view_id="spend")  # the same names in both stacks
            assert materialize(features, "spend").rows_written == 1
        for features, amount in zip(stacks, (1.0, 2.0), strict=True):
            reply = features.stub.GetOnlineFeatures(
                requests.GetOnlineFeaturesRequest(
                    features=messages.FeatureSelection(features=messages.FeatureReferences(references=["spend:amount"])),
                    entities=int_keys(7),
                ),
                metadata=ALICE,
                timeout=10,
            )
            assert reply.columns[0].values[0].double_value == amount
    finally:
        for features in stacks:
            features.stop()
        for name in ("a", "b"):
            backends.drop_prefix(f"{server_prefix}{name}_")
