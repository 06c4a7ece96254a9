"""The demo's data: scikit-learn's bundled breast-cancer dataset (no downloads), shaped
as a patient table with an entity id, an event time and a data subject, plus a few
deliberately bad rows and the drifted copies used to trip the drift alert.

569 patients, 30 numeric measurements of a breast mass each, and whether the tumour
was malignant. 100 patients are held back from ingestion: they are the "new patients"
the deployed models are asked about, so that accuracy on them is an honest one.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from falaj.common.v1 import common_pb2
from falaj.ingest.v1 import message_pb2 as ingest

ENTITY_KEY = "patient_id"
SUBJECT = "subject_id"
EVENT_TIME = "event_time"
LABEL = "malignant"
NEW_PATIENTS = 100
SUBJECT_PATTERN = r"^subject-[0-9]{4}$"


def _column_name(feature: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", feature.lower()).strip("_")


def subject_of(patient_id: int) -> str:
    return f"subject-{patient_id:04d}"


@dataclass(frozen=True)
class DemoData:
    """The patients, split into the ingested ones and the held-back new ones."""

    features: list[str]  # column names, in the dataset's (and the models') order
    ingested: pa.Table  # the good rows, as typed values
    stream: list[pa.Table]  # the Arrow batches streamed to ingest: good rows, then the bad ones
    bad_reasons: list[str]  # what each bad row is meant to trip, for people
    new_x: np.ndarray  # [NEW_PATIENTS, 30] float32 measurements of patients never ingested
    new_y: np.ndarray  # their labels (1 = malignant)
    new_ids: list[int]  # their patient ids
    std: np.ndarray  # per-feature standard deviation of the ingested rows
    erase_patient: int  # the patient whose data subject the demo erases


def load(now: dt.datetime) -> DemoData:
    """The breast-cancer data as the demo ingests and serves it; deterministic apart from `now`."""
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    x = np.asarray(bunch.data, dtype=np.float64)
    malignant = (np.asarray(bunch.target) == 0).astype(np.int64)  # sklearn: 0 = malignant
    features = [_column_name(str(name)) for name in bunch.feature_names]
    rows = len(x)
    ids = np.arange(1, rows + 1, dtype=np.int64)
    order = np.random.default_rng(42).permutation(rows)
    held, kept = np.sort(order[:NEW_PATIENTS]), np.sort(order[NEW_PATIENTS:])

    anchor = now.replace(microsecond=0) - dt.timedelta(hours=1)
    times = [anchor - dt.timedelta(hours=int(rows - i)) for i in kept]
    columns: dict[str, pa.Array] = {
        ENTITY_KEY: pa.array(ids[kept], pa.int64()),
        SUBJECT: pa.array([subject_of(int(i)) for i in ids[kept]], pa.string()),
        EVENT_TIME: pa.array(times, pa.timestamp("us", tz="UTC")),
    }
    for j, name in enumerate(features):
        columns[name] = pa.array(x[kept, j], pa.float64())
    columns[LABEL] = pa.array(malignant[kept], pa.int64())
    good = pa.table(columns)

    erase_patient = int(ids[kept][0])
    template = good.slice(1, 1).to_pylist()[0]

    def bad(patient: int, **changes: object) -> dict[str, object]:
        row = dict(template)
        row.update({ENTITY_KEY: patient, SUBJECT: subject_of(patient)})
        row.update(changes)
        return row

    duplicate = dict(good.slice(0, 1).to_pylist()[0])  # the erased patient again: a unique-key clash
    duplicate["mean_radius"] = float(duplicate["mean_radius"]) + 1.0
    typed_rows = [
        bad(9001, mean_radius=-3.2),
        bad(9002, **{LABEL: 2}),
        bad(9003, mean_texture=None),
        bad(9004, **{SUBJECT: "patient #9004"}),
        duplicate,
    ]
    # The scanner export delivers mean_smoothness as text: cleansing coerces it to FLOAT
    # where the text is an exact number, and quarantines the one with a typo.
    text_row = bad(9005)
    text_row["mean_smoothness"] = "0.O97"
    as_text = good.schema.get_field_index("mean_smoothness")
    text_schema = good.schema.set(as_text, pa.field("mean_smoothness", pa.string()))

    def textual(table: pa.Table) -> pa.Table:
        values = [None if v is None else repr(float(v)) for v in table.column("mean_smoothness").to_pylist()]
        return table.set_column(as_text, text_schema.field(as_text), pa.array(values, pa.string()))

    bad_rows = textual(pa.Table.from_pylist(typed_rows, schema=good.schema))
    bad_rows = pa.concat_tables([bad_rows, pa.Table.from_pylist([text_row], schema=text_schema)])
    reasons = [
        "negative mean_radius",
        "label 2",
        "missing mean_texture",
        "malformed subject id",
        f"duplicate patient {erase_patient}",
        "mean_smoothness '0.O97'",
    ]
    return DemoData(
        features=features,
        ingested=good,
        stream=[textual(good.slice(0, len(kept) // 2)), textual(good.slice(len(kept) // 2)), bad_rows],
        bad_reasons=reasons,
        new_x=x[held].astype(np.float32),
        new_y=malignant[held],
        new_ids=[int(i) for i in ids[held]],
        std=x[kept].std(axis=0),
        erase_patient=erase_patient,
    )


def drifted(data: DemoData, copies: int, seed: int = 7) -> np.ndarray:
    """New-patient rows moved by about one standard deviation per feature, with noise:
    what a recalibrated scanner upstream would do to the inputs."""
    rng = np.random.default_rng(seed)
    parts = []
    for _ in range(copies):
        noise = rng.normal(0.0, 0.1, data.new_x.shape) * data.std
        parts.append(data.new_x + 1.0 * data.std + noise)
    return np.clip(np.concatenate(parts), 0.0, None).astype(np.float32)


def schema(features: list[str]) -> ingest.Schema:
    """The declared schema: entity key, data subject, event time, 30 measurements, label."""
    non_negative = ingest.ColumnConstraints(range=ingest.RangeConstraint(min=0.0))
    columns = [
        ingest.Column(name=ENTITY_KEY, type=ingest.COLUMN_TYPE_INT, description="Patient number"),
        ingest.Column(
            name=SUBJECT,
            type=ingest.COLUMN_TYPE_STRING,
            description="Data subject (the patient), for consent and erasure",
            constraints=ingest.ColumnConstraints(regex=SUBJECT_PATTERN),
            pii_categories=[ingest.PII_CATEGORY_DIRECT_IDENTIFIER],
        ),
        ingest.Column(name=EVENT_TIME, type=ingest.COLUMN_TYPE_TIMESTAMP, description="When the scan was read"),
    ]
    columns += [
        ingest.Column(
            name=name,
            type=ingest.COLUMN_TYPE_FLOAT,
            description="Measurement of the cell nuclei in a fine-needle aspirate image",
            constraints=non_negative,
            pii_categories=[ingest.PII_CATEGORY_HEALTH],
        )
        for name in features
    ]
    columns.append(
        ingest.Column(
            name=LABEL,
            type=ingest.COLUMN_TYPE_INT,
            description="1 when the tumour was malignant",
            constraints=ingest.ColumnConstraints(range=ingest.RangeConstraint(min=0.0, max=1.0)),
            pii_categories=[ingest.PII_CATEGORY_HEALTH],
        )
    )
    return ingest.Schema(
        columns=columns,
        entity_key_columns=[ENTITY_KEY],
        event_time_column=EVENT_TIME,
        data_subject_column=SUBJECT,
        unique_key_columns=[ENTITY_KEY],
    )


def arrow_batch(table: pa.Table, batch_id: str) -> common_pb2.ArrowBatch:
    """One Arrow IPC stream in a protobuf message, as every Falaj bulk transfer is."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return common_pb2.ArrowBatch(arrow_ipc=sink.getvalue().to_pybytes(), batch_id=batch_id, row_count=table.num_rows)
