"""Training: job progress reports (replayed by streams) and job leases (worker heartbeats).

Revision ID: training_0002
Revises: training_0001

Only new tables: adding columns to `training_jobs` would make SQLite rebuild a table
that model versions reference.
"""

import sqlalchemy as sa
from alembic import op

revision = "training_0002"
down_revision = "training_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "training_job_progress",
        sa.Column("job_id", sa.String(64), sa.ForeignKey("training_jobs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("sequence", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("progress_json", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "training_job_leases",
        sa.Column("job_id", sa.String(64), sa.ForeignKey("training_jobs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("runner_id", sa.String(64), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_training_job_leases_heartbeat_at", "training_job_leases", ["heartbeat_at"])


def downgrade() -> None:
    op.drop_index("ix_training_job_leases_heartbeat_at", "training_job_leases")
    op.drop_table("training_job_leases")
    op.drop_table("training_job_progress")
