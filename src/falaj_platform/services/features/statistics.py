"""Per-feature statistics of a view's offline data over an event-time window, for monitoring."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from falaj.features.v1 import message_pb2 as messages
from falaj.features.v1 import request_response_pb2 as requests
from falaj_platform.runtime.errors import NotFound
from falaj_platform.services.features import names
from falaj_platform.services.features.materialization import OfflineData

QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
HISTOGRAM_BINS = 20
TOP_VALUES = 50
VT = messages.ValueType
NUMERIC = {VT.VALUE_TYPE_INT32, VT.VALUE_TYPE_INT64, VT.VALUE_TYPE_FLOAT, VT.VALUE_TYPE_DOUBLE}


def _summarize(feature: messages.Feature, column: pa.ChunkedArray) -> messages.FeatureStatistics:
    summary = messages.FeatureStatistics(feature=feature.name, value_type=feature.value_type)
    summary.null_count = column.null_count
    summary.count = len(column) - column.null_count
    present = column.drop_null()
    if feature.value_type in NUMERIC or feature.value_type in (VT.VALUE_TYPE_STRING, VT.VALUE_TYPE_BOOL):
        summary.distinct_count = pc.count_distinct(present).as_py() if len(present) else 0
    if not len(present):
        return summary
    if feature.value_type in NUMERIC:
        numbers = present.cast(pa.float64()).to_numpy()
        numbers = numbers[np.isfinite(numbers)]
        if numbers.size:
            numeric = summary.numeric
            numeric.min, numeric.max = float(numbers.min()), float(numbers.max())
            numeric.mean, numeric.std = float(numbers.mean()), float(numbers.std())
            for quantile, value in zip(QUANTILES, np.quantile(numbers, QUANTILES), strict=True):
                numeric.quantiles.add(quantile=quantile, value=float(value))
            counts, edges = np.histogram(numbers, bins=HISTOGRAM_BINS)
            for index, count in enumerate(counts):
                numeric.histogram.add(lower=float(edges[index]), upper=float(edges[index + 1]), count=int(count))
    elif feature.value_type == VT.VALUE_TYPE_STRING:
        counted = sorted(pc.value_counts(present).to_pylist(), key=lambda item: (-item["counts"], str(item["values"])))
        for item in counted[:TOP_VALUES]:
            summary.categorical.top_values.add(value=str(item["values"]), count=int(item["counts"]))
        summary.categorical.other_count = sum(int(item["counts"]) for item in counted[TOP_VALUES:])
    elif feature.value_type == VT.VALUE_TYPE_BOOL:
        trues = int(pc.sum(present.cast(pa.int64())).as_py() or 0)
        summary.boolean.true_count, summary.boolean.false_count = trues, len(present) - trues
    return summary


def view_statistics(offline: OfflineData, request: requests.GetFeatureViewStatisticsRequest) -> messages.FeatureViewStatistics:
    """Statistics of the view's features over the window of its current offline data."""
    view_id = names.parse(request.feature_view, names.FEATURE_VIEWS, "feature_view")
    view, version, snapshot = offline.ensure(view_id)
    wanted = list(request.features) or [f.name for f in view.features]
    by_name = {f.name: f for f in view.features}
    for name in wanted:
        if name not in by_name:
            reference = f"{view_id}:{name}"
            raise NotFound(f"feature {reference} does not exist", reason="FEATURE_NOT_FOUND", metadata={"feature": reference})
    mapping = dict(view.source.field_mapping)
    column_of = {f.name: f.column or next((c for c, t in mapping.items() if t == f.name), f.name) for f in view.features}
    dataset_column = {target: column for column, target in mapping.items()}
    key_columns = []
    with offline.store.transaction() as session:
        for entity_name in view.entities:
            entity = offline.store.get_entity(session, names.parse(entity_name, names.ENTITIES))
            key_columns += [dataset_column.get(k.name, k.name) for k in (entity.join_keys if entity else ())]
    timestamp = view.source.timestamp_column
    table = pq.read_table(snapshot.path, columns=sorted({timestamp, *key_columns, *(column_of[n] for n in wanted)}))
    times = table.column(timestamp)
    if request.HasField("window_start"):
        table = table.filter(pc.greater_equal(times, pa.scalar(request.window_start.ToDatetime(dt.UTC), times.type)))
        times = table.column(timestamp)
    if request.HasField("window_end"):
        table = table.filter(pc.less(times, pa.scalar(request.window_end.ToDatetime(dt.UTC), times.type)))
    statistics = messages.FeatureViewStatistics(
        feature_view=names.name(names.FEATURE_VIEWS, view_id), dataset_version=version.name, row_count=table.num_rows
    )
    if key_columns and table.num_rows:
        statistics.entity_count = table.select(key_columns).group_by(key_columns).aggregate([]).num_rows
    if request.HasField("window_start"):
        statistics.window_start.CopyFrom(request.window_start)
    if request.HasField("window_end"):
        statistics.window_end.CopyFrom(request.window_end)
    for name in wanted:
        statistics.features.append(_summarize(by_name[name], table.column(column_of[name])))
    statistics.compute_time.FromDatetime(dt.datetime.now(dt.UTC))
    return statistics
