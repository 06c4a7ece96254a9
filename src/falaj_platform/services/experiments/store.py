"""SQLAlchemy store of the experiments service: experiments, their variants and bucket
ranges, the exposure and outcome events analyses read, and the kept analyses.

Events are keyed by the client's event id within their experiment, so a retried batch
is counted once; an exposure must name a variant of its experiment.

Analyses never load events whole: `stream_unit_values` reduces events to one row per
exposed unit in SQL (the unit's variant, its metric value, its pre-period covariate)
and hands them over in chunks that the caller folds into sufficient statistics.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import numpy as np
import sqlalchemy as sa
from google.protobuf.message import Message
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from falaj_platform.runtime import idempotency
from falaj_platform.runtime.db import Database, request_log_columns
from falaj_platform.runtime.errors import NotFound
from falaj_platform.services.experiments.model import (
    BucketRange,
    Conclusion,
    Experiment,
    ExperimentState,
    HashAlgorithm,
    Hashing,
    StopCause,
    StopReason,
    UnitAggregation,
    Variant,
    design_from_dict,
    design_to_dict,
    history_from_list,
    history_to_list,
)

ResponseT = TypeVar("ResponseT", bound=Message)

metadata = sa.MetaData()

experiments = sa.Table(
    "experiments",
    metadata,
    sa.Column("id", sa.String(128), primary_key=True),
    sa.Column("display_name", sa.String(256), nullable=False, server_default=""),
    sa.Column("description", sa.Text, nullable=False, server_default=""),
    sa.Column("hypothesis", sa.Text, nullable=False, server_default=""),
    sa.Column("state", sa.String(32), nullable=False, index=True),
    sa.Column("residency_region", sa.String(32), nullable=False, index=True),
    # Assignment: hashing of units and coverage; variant weights live on the variants,
    # the bucket ranges derived from them in bucket_ranges.
    sa.Column("unit_attribute", sa.String(128), nullable=False),
    sa.Column("hash_salt", sa.String(256), nullable=False),
    sa.Column("hash_algorithm", sa.String(32), nullable=False),
    sa.Column("coverage_bps", sa.Integer, nullable=False),
    sa.Column("config_revision", sa.BigInteger, nullable=False, server_default="1"),
    # Targeting, metric definitions, guardrails and analysis defaults.
    sa.Column("design_json", sa.Text, nullable=False, server_default="{}"),
    sa.Column("start_time", sa.DateTime(timezone=True), nullable=True),
    sa.Column("stop_time", sa.DateTime(timezone=True), nullable=True),
    sa.Column("stop_reason_json", sa.Text, nullable=True),
    sa.Column("conclusion_json", sa.Text, nullable=True),
    sa.Column("state_history_json", sa.Text, nullable=False, server_default="[]"),
    sa.Column("labels_json", sa.Text, nullable=False, server_default="{}"),
    sa.Column("etag", sa.String(64), nullable=False),
    sa.Column("created_by", sa.String(256), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("updated_by", sa.String(256), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

variants = sa.Table(
    "variants",
    metadata,
    sa.Column("experiment", sa.String(128), sa.ForeignKey("experiments.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("variant_id", sa.String(128), primary_key=True),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Column("display_name", sa.String(256), nullable=False, server_default=""),
    sa.Column("description", sa.Text, nullable=False, server_default=""),
    sa.Column("is_control", sa.Boolean, nullable=False),
    sa.Column("weight_bps", sa.Integer, nullable=False),
    # What serves the variant: exactly one of the two.
    sa.Column("model_version", sa.String(256), nullable=True),
    sa.Column("deployment", sa.String(256), nullable=True, index=True),
)

exposures = sa.Table(
    "exposures",
    metadata,
    sa.Column("experiment", sa.String(128), sa.ForeignKey("experiments.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("event_id", sa.String(128), primary_key=True),
    sa.Column("unit_id", sa.String(256), nullable=False),
    sa.Column("variant_id", sa.String(128), nullable=False),
    sa.Column("time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("source", sa.String(256), nullable=False, server_default=""),
    sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(
        ["experiment", "variant_id"],
        ["variants.experiment", "variants.variant_id"],
        name="fk_exposures_variant",
        ondelete="CASCADE",
    ),
    sa.Index("ix_exposures_experiment_variant_id_unit_id", "experiment", "variant_id", "unit_id"),
    sa.Index("ix_exposures_experiment_unit_id", "experiment", "unit_id"),
)

outcomes = sa.Table(
    "outcomes",
    metadata,
    sa.Column("experiment", sa.String(128), sa.ForeignKey("experiments.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("event_id", sa.String(128), primary_key=True),
    sa.Column("unit_id", sa.String(256), nullable=False),
    sa.Column("metric_id", sa.String(128), nullable=False),
    sa.Column("value", sa.Float, nullable=False),
    sa.Column("time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
    # Covers the analysis's per-unit lookups: SQLite reads time and value from the index itself.
    sa.Index("ix_outcomes_experiment_metric_id_unit_id_time_value", "experiment", "metric_id", "unit_id", "time", "value"),
)

# Half-open hash bucket ranges [start_bucket, end_bucket) per variant; kept across
# allocation changes so that few units move.
bucket_ranges = sa.Table(
    "bucket_ranges",
    metadata,
    sa.Column("experiment", sa.String(128), sa.ForeignKey("experiments.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("start_bucket", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("end_bucket", sa.Integer, nullable=False),
    sa.Column("variant_id", sa.String(128), nullable=False),
    sa.ForeignKeyConstraint(
        ["experiment", "variant_id"],
        ["variants.experiment", "variants.variant_id"],
        name="fk_bucket_ranges_variant",
        ondelete="CASCADE",
    ),
)

# When the guardrails of a running experiment were last evaluated (one claim per interval).
guardrail_checks = sa.Table(
    "guardrail_checks",
    metadata,
    sa.Column("experiment", sa.String(128), sa.ForeignKey("experiments.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("last_checked_at", sa.DateTime(timezone=True), nullable=False),
)

# Kept analyses; `result` is the serialized falaj.experiments.v1.ExperimentAnalysis.
analyses = sa.Table(
    "analyses",
    metadata,
    sa.Column("experiment", sa.String(128), sa.ForeignKey("experiments.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("analysis_id", sa.String(64), primary_key=True),
    sa.Column("as_of_time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("config_revision", sa.BigInteger, nullable=False),
    sa.Column("events_analysed", sa.BigInteger, nullable=False),
    sa.Column("result", sa.LargeBinary, nullable=False),
    sa.Column("created_by", sa.String(256), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_analyses_experiment_created_at", "experiment", "created_at"),
)

# Arrow batches of ImportEvents already committed, so a retried stream skips them.
import_batches = sa.Table(
    "import_batches",
    metadata,
    sa.Column("experiment", sa.String(128), sa.ForeignKey("experiments.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("batch_id", sa.String(128), primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("row_count", sa.BigInteger, nullable=False),
    sa.Column("committed_at", sa.DateTime(timezone=True), nullable=False),
)

request_log = sa.Table("request_log", metadata, *request_log_columns())


def utc(value: dt.datetime) -> dt.datetime:
    """Aware UTC; SQLite hands back naive datetimes that were stored as UTC."""
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def _utc_or_none(value: dt.datetime | None) -> dt.datetime | None:
    return None if value is None else utc(value)


# -- rows <-> domain -------------------------------------------------------------------


def _experiment_row(experiment: Experiment) -> dict[str, Any]:
    stop_reason = experiment.stop_reason
    conclusion = experiment.conclusion
    assert experiment.created_at is not None and experiment.updated_at is not None
    return {
        "id": experiment.experiment_id,
        "display_name": experiment.display_name,
        "description": experiment.description,
        "hypothesis": experiment.hypothesis,
        "state": str(experiment.state),
        "residency_region": experiment.residency_region,
        "unit_attribute": experiment.hashing.unit_attribute,
        "hash_salt": experiment.hashing.salt,
        "hash_algorithm": str(experiment.hashing.algorithm),
        "coverage_bps": experiment.coverage_bps,
        "config_revision": experiment.config_revision,
        "design_json": json.dumps(design_to_dict(experiment), sort_keys=True),
        "start_time": _utc_or_none(experiment.start_time),
        "stop_time": _utc_or_none(experiment.stop_time),
        "stop_reason_json": json.dumps(
            {
                "cause": str(stop_reason.cause),
                "message": stop_reason.message,
                "guardrail_metric_id": stop_reason.guardrail_metric_id,
                "guardrail_variant_id": stop_reason.guardrail_variant_id,
            }
        )
        if stop_reason
        else None,
        "conclusion_json": json.dumps(
            {"winning_variant_id": conclusion.winning_variant_id, "summary": conclusion.summary, "analysis": conclusion.analysis}
        )
        if conclusion
        else None,
        "state_history_json": json.dumps(history_to_list(experiment.state_history)),
        "labels_json": json.dumps(dict(experiment.labels), sort_keys=True),
        "etag": experiment.etag,
        "created_by": experiment.created_by,
        "created_at": utc(experiment.created_at),
        "updated_by": experiment.updated_by,
        "updated_at": utc(experiment.updated_at),
    }


def _variant_rows(experiment: Experiment) -> list[dict[str, Any]]:
    return [
        {
            "experiment": experiment.experiment_id,
            "variant_id": v.variant_id,
            "position": position,
            "display_name": v.display_name,
            "description": v.description,
            "is_control": v.control,
            "weight_bps": v.weight_bps,
            "model_version": v.model_version,
            "deployment": v.deployment,
        }
        for position, v in enumerate(experiment.variants)
    ]


def _experiment_from_rows(row: sa.Row[Any], variant_rows: Iterable[sa.Row[Any]], range_rows: Iterable[sa.Row[Any]]) -> Experiment:
    design = design_from_dict(json.loads(row.design_json or "{}"))
    stop = json.loads(row.stop_reason_json) if row.stop_reason_json else None
    conclusion = json.loads(row.conclusion_json) if row.conclusion_json else None
    return Experiment(
        experiment_id=row.id,
        display_name=row.display_name,
        description=row.description,
        hypothesis=row.hypothesis,
        state=ExperimentState(row.state),
        variants=tuple(
            Variant(
                variant_id=v.variant_id,
                display_name=v.display_name,
                description=v.description,
                control=bool(v.is_control),
                weight_bps=int(v.weight_bps),
                model_version=v.model_version,
                deployment=v.deployment,
            )
            for v in sorted(variant_rows, key=lambda v: v.position)
        ),
        coverage_bps=int(row.coverage_bps),
        bucket_ranges=tuple(
            BucketRange(r.variant_id, int(r.start_bucket), int(r.end_bucket)) for r in sorted(range_rows, key=lambda r: r.start_bucket)
        ),
        hashing=Hashing(row.unit_attribute, row.hash_salt, HashAlgorithm(row.hash_algorithm)),
        targeting=design.targeting,
        metrics=design.metrics,
        guardrails=design.guardrails,
        analysis=design.analysis,
        residency_region=row.residency_region,
        config_revision=int(row.config_revision),
        start_time=_utc_or_none(row.start_time),
        stop_time=_utc_or_none(row.stop_time),
        stop_reason=StopReason(
            StopCause(stop["cause"]), stop.get("message", ""), stop.get("guardrail_metric_id", ""), stop.get("guardrail_variant_id", "")
        )
        if stop
        else None,
        conclusion=Conclusion(conclusion.get("winning_variant_id", ""), conclusion.get("summary", ""), conclusion.get("analysis", ""))
        if conclusion
        else None,
        state_history=history_from_list(json.loads(row.state_history_json or "[]")),
        labels=json.loads(row.labels_json or "{}"),
        created_by=row.created_by,
        created_at=utc(row.created_at),
        updated_by=row.updated_by,
        updated_at=utc(row.updated_at),
        etag=row.etag,
    )


def _not_found(experiment_id: str) -> NotFound:
    return NotFound(
        f"experiment 'experiments/{experiment_id}' does not exist", reason="EXPERIMENT_NOT_FOUND", metadata={"experiment": experiment_id}
    )


def _load_experiments(session: Session, rows: Sequence[sa.Row[Any]]) -> list[Experiment]:
    ids = [row.id for row in rows]
    if not ids:
        return []
    variant_rows: dict[str, list[sa.Row[Any]]] = {i: [] for i in ids}
    for v in session.execute(sa.select(variants).where(variants.c.experiment.in_(ids))):
        variant_rows[v.experiment].append(v)
    range_rows: dict[str, list[sa.Row[Any]]] = {i: [] for i in ids}
    for r in session.execute(sa.select(bucket_ranges).where(bucket_ranges.c.experiment.in_(ids))):
        range_rows[r.experiment].append(r)
    return [_experiment_from_rows(row, variant_rows[row.id], range_rows[row.id]) for row in rows]


# -- events ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ExposureRow:
    event_id: str
    unit_id: str
    variant_id: str
    time: dt.datetime
    source: str = ""


@dataclass(frozen=True)
class OutcomeRow:
    event_id: str
    unit_id: str
    metric_id: str
    value: float
    time: dt.datetime


@dataclass(frozen=True)
class UnitValueQuery:
    """What `stream_unit_values` reduces: one metric's value per exposed unit, and its covariate."""

    metric_id: str
    aggregation: UnitAggregation
    conversion_window: dt.timedelta | None = None
    covariate_metric_id: str | None = None
    covariate_aggregation: UnitAggregation | None = None
    pre_period_start: dt.datetime | None = None
    pre_period_end: dt.datetime | None = None


@dataclass(frozen=True)
class AnalysisRecord:
    analysis_id: str
    result: bytes
    created_at: dt.datetime


class StoreTransaction:
    """Reads and writes inside one transaction: the servicer composes them into one atomic change."""

    def __init__(self, session: Session):
        self.session = session

    @property
    def _dialect(self) -> str:
        return self.session.get_bind().dialect.name

    # -- idempotency -------------------------------------------------------------------
    def replayed(self, method: str, request: Message, response_type: type[ResponseT]) -> ResponseT | None:
        return idempotency.replayed_response(self.session, request_log, method, request, response_type)

    def remember(self, method: str, request: Message, response: Message) -> None:
        idempotency.remember(self.session, request_log, method, request, response)

    def replayed_digest(self, request_id: str, method: str) -> tuple[str, bytes] | None:
        """(request digest, stored response) of an earlier call with this request id, for streamed requests."""
        row = self.session.execute(
            sa.select(request_log.c.method, request_log.c.request_sha256, request_log.c.response).where(
                request_log.c.request_id == request_id
            )
        ).first()
        if row is None:
            return None
        return (row.request_sha256 if row.method == method else ""), row.response or b""

    def remember_digest(self, request_id: str, method: str, digest: str, response: bytes) -> None:
        self.session.execute(
            request_log.insert().values(
                request_id=request_id, method=method, request_sha256=digest, response=response, created_at=dt.datetime.now(dt.UTC)
            )
        )

    # -- experiments -------------------------------------------------------------------
    def get_experiment(self, experiment_id: str, *, lock: bool = False) -> Experiment:
        query = sa.select(experiments).where(experiments.c.id == experiment_id)
        if lock:
            query = query.with_for_update()
        row = self.session.execute(query).first()
        if row is None:
            raise _not_found(experiment_id)
        return _load_experiments(self.session, [row])[0]

    def experiment_exists(self, experiment_id: str) -> bool:
        return self.session.execute(sa.select(experiments.c.id).where(experiments.c.id == experiment_id)).first() is not None

    def insert_experiment(self, experiment: Experiment) -> None:
        self.session.execute(experiments.insert().values(**_experiment_row(experiment)))
        self.session.execute(variants.insert(), _variant_rows(experiment))
        self._write_ranges(experiment)

    def save_experiment(self, experiment: Experiment) -> None:
        """Replace the stored experiment with `experiment` (same id)."""
        row = _experiment_row(experiment)
        self.session.execute(experiments.update().where(experiments.c.id == experiment.experiment_id).values(**row))
        stored = {
            r.variant_id
            for r in self.session.execute(sa.select(variants.c.variant_id).where(variants.c.experiment == experiment.experiment_id))
        }
        wanted = {v.variant_id for v in experiment.variants}
        self.session.execute(bucket_ranges.delete().where(bucket_ranges.c.experiment == experiment.experiment_id))
        if stored - wanted:
            self.session.execute(
                variants.delete().where(variants.c.experiment == experiment.experiment_id, variants.c.variant_id.in_(stored - wanted))
            )
        for variant_row in _variant_rows(experiment):
            if variant_row["variant_id"] in stored:
                self.session.execute(
                    variants.update()
                    .where(variants.c.experiment == experiment.experiment_id, variants.c.variant_id == variant_row["variant_id"])
                    .values(**variant_row)
                )
            else:
                self.session.execute(variants.insert().values(**variant_row))
        self._write_ranges(experiment)

    def _write_ranges(self, experiment: Experiment) -> None:
        if experiment.bucket_ranges:
            self.session.execute(
                bucket_ranges.insert(),
                [
                    {"experiment": experiment.experiment_id, "start_bucket": r.start, "end_bucket": r.end, "variant_id": r.variant_id}
                    for r in experiment.bucket_ranges
                ],
            )

    def delete_experiment(self, experiment_id: str) -> None:
        self.session.execute(experiments.delete().where(experiments.c.id == experiment_id))

    # -- events ------------------------------------------------------------------------
    def _insert_ignoring_duplicates(self, table: sa.Table, rows: list[dict[str, Any]]) -> set[str]:
        """Insert rows whose (experiment, event_id) is new; the event ids actually inserted."""
        if not rows:
            return set()
        insert = postgresql.insert(table) if self._dialect == "postgresql" else sqlite.insert(table)
        statement = insert.on_conflict_do_nothing(index_elements=["experiment", "event_id"]).returning(table.c.event_id)
        inserted: set[str] = set()
        for start in range(0, len(rows), 5000):
            inserted.update(self.session.execute(statement, rows[start : start + 5000]).scalars())
        return inserted

    def insert_exposures(self, experiment_id: str, rows: Sequence[ExposureRow], recorded_at: dt.datetime) -> set[str]:
        return self._insert_ignoring_duplicates(
            exposures,
            [
                {
                    "experiment": experiment_id,
                    "event_id": r.event_id,
                    "unit_id": r.unit_id,
                    "variant_id": r.variant_id,
                    "time": utc(r.time),
                    "source": r.source,
                    "recorded_at": recorded_at,
                }
                for r in rows
            ],
        )

    def insert_outcomes(self, experiment_id: str, rows: Sequence[OutcomeRow], recorded_at: dt.datetime) -> set[str]:
        return self._insert_ignoring_duplicates(
            outcomes,
            [
                {
                    "experiment": experiment_id,
                    "event_id": r.event_id,
                    "unit_id": r.unit_id,
                    "metric_id": r.metric_id,
                    "value": r.value,
                    "time": utc(r.time),
                    "recorded_at": recorded_at,
                }
                for r in rows
            ],
        )

    def committed_batches(self, experiment_id: str, batch_ids: Iterable[str]) -> set[str]:
        ids = list(batch_ids)
        if not ids:
            return set()
        query = sa.select(import_batches.c.batch_id).where(import_batches.c.experiment == experiment_id, import_batches.c.batch_id.in_(ids))
        return set(self.session.execute(query).scalars())

    def record_batch(self, experiment_id: str, batch_id: str, kind: str, row_count: int, now: dt.datetime) -> None:
        self.session.execute(
            import_batches.insert().values(experiment=experiment_id, batch_id=batch_id, kind=kind, row_count=row_count, committed_at=now)
        )

    # -- analyses ----------------------------------------------------------------------
    def insert_analysis(
        self,
        experiment_id: str,
        analysis_id: str,
        *,
        as_of_time: dt.datetime,
        config_revision: int,
        events_analysed: int,
        result: bytes,
        created_by: str,
        created_at: dt.datetime,
    ) -> None:
        self.session.execute(
            analyses.insert().values(
                experiment=experiment_id,
                analysis_id=analysis_id,
                as_of_time=utc(as_of_time),
                config_revision=config_revision,
                events_analysed=events_analysed,
                result=result,
                created_by=created_by,
                created_at=utc(created_at),
            )
        )


class ExperimentsStore:
    """Every read and write of experiments and their events goes through here."""

    def __init__(self, database: Database):
        self.database = database

    @contextmanager
    def transaction(self) -> Iterator[StoreTransaction]:
        """One transaction: committed when the block ends, rolled back when it raises."""
        with self.database.session_scope() as session:
            yield StoreTransaction(session)

    # -- reads -------------------------------------------------------------------------
    def get_experiment(self, experiment_id: str) -> Experiment:
        with self.transaction() as tx:
            return tx.get_experiment(experiment_id)

    def list_experiments(
        self, *, state: ExperimentState | None, deployment: str, after: tuple[dt.datetime, str] | None, limit: int
    ) -> list[Experiment]:
        """Experiments newest first (created_at, then id, descending), after a page cursor."""
        query = sa.select(experiments).order_by(experiments.c.created_at.desc(), experiments.c.id.desc()).limit(limit)
        if state is not None:
            query = query.where(experiments.c.state == str(state))
        if deployment:
            query = query.where(experiments.c.id.in_(sa.select(variants.c.experiment).where(variants.c.deployment == deployment)))
        if after is not None:
            created_at, experiment_id = utc(after[0]), after[1]
            query = query.where(
                sa.or_(
                    experiments.c.created_at < created_at,
                    sa.and_(experiments.c.created_at == created_at, experiments.c.id < experiment_id),
                )
            )
        with self.database.session_scope() as session:
            return _load_experiments(session, session.execute(query).all())

    def count_exposed_units(self, experiment_id: str) -> dict[str, int]:
        """Distinct exposed units per variant of an experiment (the input of the SRM check)."""
        query = (
            sa.select(exposures.c.variant_id, sa.func.count(sa.distinct(exposures.c.unit_id)))
            .where(exposures.c.experiment == experiment_id)
            .group_by(exposures.c.variant_id)
        )
        with self.database.session_scope() as session:
            return {variant_id: int(units) for variant_id, units in session.execute(query)}

    def get_analysis(self, experiment_id: str, analysis_id: str) -> bytes:
        query = sa.select(analyses.c.result).where(analyses.c.experiment == experiment_id, analyses.c.analysis_id == analysis_id)
        with self.database.session_scope() as session:
            result = session.execute(query).scalar_one_or_none()
            if result is None:
                if session.execute(sa.select(experiments.c.id).where(experiments.c.id == experiment_id)).first() is None:
                    raise _not_found(experiment_id)
                raise NotFound(
                    f"analysis 'experiments/{experiment_id}/analyses/{analysis_id}' does not exist",
                    reason="ANALYSIS_NOT_FOUND",
                    metadata={"experiment": experiment_id, "analysis": analysis_id},
                )
            return bytes(result)

    def list_analyses(self, experiment_id: str, *, after: tuple[dt.datetime, str] | None, limit: int) -> list[AnalysisRecord]:
        query = (
            sa.select(analyses.c.analysis_id, analyses.c.result, analyses.c.created_at)
            .where(analyses.c.experiment == experiment_id)
            .order_by(analyses.c.created_at.desc(), analyses.c.analysis_id.desc())
            .limit(limit)
        )
        if after is not None:
            created_at, analysis_id = utc(after[0]), after[1]
            query = query.where(
                sa.or_(
                    analyses.c.created_at < created_at, sa.and_(analyses.c.created_at == created_at, analyses.c.analysis_id < analysis_id)
                )
            )
        with self.database.session_scope() as session:
            if session.execute(sa.select(experiments.c.id).where(experiments.c.id == experiment_id)).first() is None:
                raise _not_found(experiment_id)
            return [AnalysisRecord(r.analysis_id, bytes(r.result), utc(r.created_at)) for r in session.execute(query)]

    # -- guardrail scheduling ----------------------------------------------------------
    def claim_guardrail_check(self, experiment_id: str, now: dt.datetime, interval: dt.timedelta) -> bool:
        """True for exactly one caller per interval: that caller evaluates the guardrails now."""
        now = utc(now)
        with self.database.session_scope() as session:
            claimed = cast(
                sa.CursorResult[Any],
                session.execute(
                    guardrail_checks.update()
                    .where(guardrail_checks.c.experiment == experiment_id, guardrail_checks.c.last_checked_at <= now - interval)
                    .values(last_checked_at=now)
                ),
            ).rowcount
            if claimed:
                return True
            if session.execute(sa.select(guardrail_checks.c.experiment).where(guardrail_checks.c.experiment == experiment_id)).first():
                return False
            insert = (
                postgresql.insert(guardrail_checks) if session.get_bind().dialect.name == "postgresql" else sqlite.insert(guardrail_checks)
            )
            inserted = cast(
                sa.CursorResult[Any],
                session.execute(
                    insert.values(experiment=experiment_id, last_checked_at=now).on_conflict_do_nothing(index_elements=["experiment"])
                ),
            ).rowcount
            return bool(inserted)

    # -- analysis reads ----------------------------------------------------------------
    def _exposed_units(self, experiment_id: str, as_of: dt.datetime) -> sa.Subquery:
        """One row per unit exposed up to as_of: its variant and first exposure.

        A unit exposed to two variants (possible only after an allocation change) is left
        out: its outcomes cannot be attributed to either.
        """
        return (
            sa.select(
                exposures.c.unit_id,
                sa.func.min(exposures.c.variant_id).label("variant_id"),
                sa.func.min(exposures.c.time).label("first_exposure"),
            )
            .where(exposures.c.experiment == experiment_id, exposures.c.time <= utc(as_of))
            .group_by(exposures.c.unit_id)
            .having(sa.func.min(exposures.c.variant_id) == sa.func.max(exposures.c.variant_id))
            .subquery("exposed")
        )

    def exposed_units_by_variant(self, experiment_id: str, as_of: dt.datetime) -> dict[str, int]:
        """Units analysed per variant (exposed to exactly one variant up to as_of)."""
        exposed = self._exposed_units(experiment_id, as_of)
        query = sa.select(exposed.c.variant_id, sa.func.count()).group_by(exposed.c.variant_id)
        with self.database.session_scope() as session:
            return {variant_id: int(units) for variant_id, units in session.execute(query)}

    def count_events(self, experiment_id: str, as_of: dt.datetime, metric_ids: Iterable[str]) -> int:
        """Exposures and outcomes of the analysed metrics recorded with a time up to as_of."""
        as_of = utc(as_of)
        ids = list(metric_ids)
        with self.database.session_scope() as session:
            exposed = session.execute(
                sa.select(sa.func.count()).select_from(exposures).where(exposures.c.experiment == experiment_id, exposures.c.time <= as_of)
            ).scalar_one()
            observed = session.execute(
                sa.select(sa.func.count())
                .select_from(outcomes)
                .where(outcomes.c.experiment == experiment_id, outcomes.c.metric_id.in_(ids), outcomes.c.time <= as_of)
            ).scalar_one()
        return int(exposed) + int(observed)

    @staticmethod
    def _unit_value(aggregation: UnitAggregation, exposed: sa.Subquery, *conditions: sa.ColumnElement[bool]) -> sa.ColumnElement[Any]:
        """One unit's value from its outcomes that meet `conditions`: a correlated lookup per unit.

        Per-unit lookups on the covering index read each event once and need no sort or
        hash of all events (SQLite has neither a hash join nor a hash aggregate).
        """
        value = outcomes.c.value
        function = {
            UnitAggregation.SUM: sa.func.sum(value),
            UnitAggregation.MEAN: sa.func.avg(value),
            UnitAggregation.MAX: sa.func.max(value),
        }.get(aggregation, sa.func.count())
        lookup = sa.select(function).where(outcomes.c.unit_id == exposed.c.unit_id, *conditions).correlate(exposed).scalar_subquery()
        if aggregation is UnitAggregation.ANY:
            return sa.case((lookup > 0, 1.0), else_=0.0)
        return sa.func.coalesce(lookup, 0.0)  # a unit without outcomes counts as 0

    def _plus(self, dialect: str, moment: sa.ColumnElement[Any], delta: dt.timedelta) -> sa.ColumnElement[Any]:
        if dialect == "postgresql":
            return moment + sa.literal(delta, sa.Interval())
        # SQLite keeps DateTime as 'YYYY-MM-DD HH:MM:SS.ffffff'; shift the seconds and keep the fraction.
        seconds = int(delta.total_seconds())
        shifted = sa.func.strftime("%Y-%m-%d %H:%M:%S", moment, f"+{seconds} seconds", type_=sa.String)
        return shifted.concat(sa.func.substr(moment, 20, type_=sa.String))

    def stream_unit_values(
        self,
        experiment_id: str,
        variant_codes: Mapping[str, int],
        as_of: dt.datetime,
        query: UnitValueQuery,
        chunk_rows: int = 65536,
    ) -> Iterator[np.ndarray]:
        """Chunks of rows (variant code, metric value, covariate) with one row per exposed unit.

        The metric value aggregates the unit's outcomes from its first exposure to as_of
        (and within the conversion window); units without outcomes count as 0. The
        covariate aggregates its outcomes in the CUPED pre-period (0 when there are none).
        The reduction runs in SQL; Python only sees one chunk at a time.
        """
        statement = self.unit_values_statement(experiment_id, variant_codes, as_of, query)
        with self.database.engine.connect() as connection:
            result = connection.execution_options(yield_per=chunk_rows).execute(statement)
            for partition in result.partitions(chunk_rows):
                # Plain tuples: numpy probing Row objects for array protocols costs more than the query.
                yield np.array([tuple(row) for row in partition], dtype=np.float64)

    def unit_values_statement(
        self, experiment_id: str, variant_codes: Mapping[str, int], as_of: dt.datetime, query: UnitValueQuery
    ) -> sa.Select[Any]:
        """The SELECT behind `stream_unit_values` (one row per exposed unit)."""
        as_of = utc(as_of)
        exposed = self._exposed_units(experiment_id, as_of)
        dialect = self.database.engine.dialect.name
        window = (
            []
            if query.conversion_window is None
            else [outcomes.c.time <= self._plus(dialect, exposed.c.first_exposure, query.conversion_window)]
        )
        columns: list[sa.ColumnElement[Any]] = [
            sa.case(dict(variant_codes), value=exposed.c.variant_id, else_=-1),
            self._unit_value(
                query.aggregation,
                exposed,
                outcomes.c.experiment == experiment_id,
                outcomes.c.metric_id == query.metric_id,
                outcomes.c.time >= exposed.c.first_exposure,
                outcomes.c.time <= as_of,
                *window,
            ),
        ]
        if query.covariate_metric_id and query.pre_period_start is not None and query.pre_period_end is not None:
            columns.append(
                self._unit_value(
                    query.covariate_aggregation or query.aggregation,
                    exposed,
                    outcomes.c.experiment == experiment_id,
                    outcomes.c.metric_id == query.covariate_metric_id,
                    outcomes.c.time >= utc(query.pre_period_start),
                    outcomes.c.time < utc(query.pre_period_end),
                )
            )
        return sa.select(*columns).select_from(exposed)
