"""The same service on both catalog backends: SQLite (embedded) and PostgreSQL (production).

On PostgreSQL Feast's SQL registry lives in the `feast_registry` schema of the service's
own database, so the catalog's schema holds exactly the migrated tables.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import sqlalchemy as sa

from falaj.features.v1 import message_pb2 as messages
from falaj.features.v1 import request_response_pb2 as requests
from falaj_platform.pki import PKI
from falaj_platform.services.features import store
from falaj_platform.services.features.config import REGISTRY_SCHEMA
from tests.features.conftest import ALICE, NOW, add_transactions, define_customer_view, int_keys, materialize, start_features


def test_service_runs_on_each_catalog_backend(database_url: str, pki: PKI, tmp_path: Path) -> None:
    features = start_features(pki, tmp_path, FALAJ_FEATURES_DATABASE_URL=database_url)
    try:
        dataset = add_transactions(features.source, [(7, 3.5, "a", False, NOW - dt.timedelta(hours=1))])
        _, view = define_customer_view(features, dataset)
        assert materialize(features, view).rows_written == 1
        reply = features.stub.GetOnlineFeatures(
            requests.GetOnlineFeaturesRequest(
                features=messages.FeatureSelection(features=messages.FeatureReferences(references=[f"{view}:amount"])), entities=int_keys(7)
            ),
            metadata=ALICE,
            timeout=10,
        )
        assert reply.columns[0].values[0].double_value == 3.5
        inspector = sa.inspect(features.database.engine)
        assert set(inspector.get_table_names()) == {*store.metadata.tables, "falaj_features_schema_version"}
        if features.database.engine.dialect.name == "postgresql":
            feast_tables = set(inspector.get_table_names(schema=REGISTRY_SCHEMA))
            assert {"feature_views", "entities", "projects"} <= feast_tables
    finally:
        features.stop()
