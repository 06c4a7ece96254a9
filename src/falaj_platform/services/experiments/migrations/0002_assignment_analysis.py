"""Experiments: stable bucket ranges, kept analyses, committed import batches, guardrail checks.

Revision ID: experiments_0002
Revises: experiments_0001

Only new tables and indexes (one index on outcomes widened to cover analyses): adding columns to `experiments` would make SQLite rebuild
the table, and dropping a table that others reference with ON DELETE CASCADE would
empty them.
"""

import sqlalchemy as sa
from alembic import op

revision = "experiments_0002"
down_revision = "experiments_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_experiments_created_at", "experiments", ["created_at"])
    op.create_index("ix_variants_deployment", "variants", ["deployment"])
    # Analyses look outcomes up per unit; carrying time and value in the index spares a
    # table read per event. It extends the old index, which it replaces.
    op.create_index(
        "ix_outcomes_experiment_metric_id_unit_id_time_value", "outcomes", ["experiment", "metric_id", "unit_id", "time", "value"]
    )
    op.drop_index("ix_outcomes_experiment_metric_id_unit_id", "outcomes")
    op.create_table(
        "bucket_ranges",
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
    op.create_table(
        "guardrail_checks",
        sa.Column("experiment", sa.String(128), sa.ForeignKey("experiments.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("last_checked_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "analyses",
        sa.Column("experiment", sa.String(128), sa.ForeignKey("experiments.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("analysis_id", sa.String(64), primary_key=True),
        sa.Column("as_of_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("config_revision", sa.BigInteger, nullable=False),
        sa.Column("events_analysed", sa.BigInteger, nullable=False),
        sa.Column("result", sa.LargeBinary, nullable=False),
        sa.Column("created_by", sa.String(256), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_analyses_experiment_created_at", "analyses", ["experiment", "created_at"])
    op.create_table(
        "import_batches",
        sa.Column("experiment", sa.String(128), sa.ForeignKey("experiments.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("batch_id", sa.String(128), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("row_count", sa.BigInteger, nullable=False),
        sa.Column("committed_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("import_batches")
    op.drop_index("ix_analyses_experiment_created_at", "analyses")
    op.drop_table("analyses")
    op.drop_table("guardrail_checks")
    op.drop_table("bucket_ranges")
    op.create_index("ix_outcomes_experiment_metric_id_unit_id", "outcomes", ["experiment", "metric_id", "unit_id"])
    op.drop_index("ix_outcomes_experiment_metric_id_unit_id_time_value", "outcomes")
    op.drop_index("ix_variants_deployment", "variants")
    op.drop_index("ix_experiments_created_at", "experiments")
