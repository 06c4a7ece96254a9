"""SQLAlchemy store of the experiments service: experiments, their variants, and the
exposure and outcome events analyses read.

Events are keyed by the client's event id within their experiment, so a retried batch
is counted once; an exposure must name a variant of its experiment.
"""

from __future__ import annotations

import sqlalchemy as sa

from falaj_platform.runtime.db import Database, request_log_columns

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
    # Assignment: hashing of units and coverage; variant weights live on the variants.
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
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
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
    sa.Column("deployment", sa.String(256), nullable=True),
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
    sa.Index("ix_outcomes_experiment_metric_id_unit_id", "experiment", "metric_id", "unit_id"),
)

request_log = sa.Table("request_log", metadata, *request_log_columns())


class ExperimentsStore:
    """Every read and write of experiments and their events goes through here."""

    def __init__(self, database: Database):
        self.database = database

    def count_exposed_units(self, experiment_id: str) -> dict[str, int]:
        """Distinct exposed units per variant of an experiment (the input of the SRM check)."""
        query = (
            sa.select(exposures.c.variant_id, sa.func.count(sa.distinct(exposures.c.unit_id)))
            .where(exposures.c.experiment == experiment_id)
            .group_by(exposures.c.variant_id)
        )
        with self.database.session_scope() as session:
            return {variant_id: int(units) for variant_id, units in session.execute(query)}
