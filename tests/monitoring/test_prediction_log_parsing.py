"""Bad prediction log and label rows are counted by reason and skipped; good rows survive."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa

from falaj_platform.services.monitoring.drift import ColumnKind
from falaj_platform.services.monitoring.prediction_logs import Reason, parse_label_batch, parse_log_batch
from falaj_platform.services.monitoring.profiles import ColumnRole, ColumnSpec, category_key

T0 = dt.datetime(2025, 3, 1, tzinfo=dt.UTC)
SPECS = [ColumnSpec("age", ColumnKind.NUMERICAL, ColumnRole.FEATURE), ColumnSpec("plan", ColumnKind.CATEGORICAL, ColumnRole.FEATURE)]


def test_bad_rows_are_counted_by_reason_and_good_rows_kept() -> None:
    table = pa.table(
        {
            "request_id": ["r1", None, "r3", "r4", "r5", "r6", "r1", "r8"],
            "timestamp": [T0, T0, None, T0, T0, T0, T0, T0],
            "model_version": ["m/1", "m/1", "m/1", "m/9", "m/1", "m/1", "m/1", None],
            "latency_ms": [5.0, 1.0, 1.0, 1.0, -3.0, 2.0, 1.0, 4.0],
            "age": ["41", "1", "1", "1", "1", "forty", "1", "33.5"],
            "plan": ["gold", "x", "x", "x", "x", "x", "x", None],
        }
    )
    parsed = parse_log_batch(table, "m/1", {"m/1": SPECS})
    kept = parsed.rows_by_version["m/1"]
    assert [r.request_id for r in kept] == ["r1", "r8"]
    assert kept[0].values == {"age": 41.0, "plan": "gold"} and kept[1].values == {"age": 33.5, "plan": None}
    assert parsed.rejections.counts == {
        Reason.MISSING_REQUEST_ID: 1,
        Reason.MISSING_TIMESTAMP: 1,
        Reason.UNKNOWN_MODEL_VERSION: 1,
        Reason.INVALID_LATENCY: 1,
        Reason.TYPE_MISMATCH: 1,
        Reason.DUPLICATE_REQUEST_ID: 1,
    }
    assert parsed.rejections.examples[Reason.TYPE_MISMATCH] == "age='forty'"
    assert parsed.unknown_model_version_rows == 1 and parsed.rejected_rows == 5


def test_a_batch_without_required_columns_rejects_every_row() -> None:
    parsed = parse_log_batch(pa.table({"request_id": ["a", "b"]}), "m/1", {"m/1": SPECS})
    assert parsed.rejections.counts == {Reason.MISSING_REQUIRED_COLUMN: 2}
    assert not parsed.rows_by_version


def test_labels_need_a_request_id_and_a_value() -> None:
    labels, rejections = parse_label_batch(pa.table({"request_id": ["a", "b", None, "a"], "label": [1, None, 0, 1]}))
    assert [(label.request_id, label.label) for label in labels] == [("a", 1.0)]
    assert rejections.counts == {Reason.MISSING_LABEL: 1, Reason.MISSING_REQUEST_ID: 1, Reason.DUPLICATE_REQUEST_ID: 1}


def test_category_keys_make_equal_values_equal() -> None:
    assert category_key(1) == category_key(1.0) == category_key("1") == "1"
    assert category_key(True) == "true" and category_key(float("nan")) is None and category_key(2.5) == "2.5"
