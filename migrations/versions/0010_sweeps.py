"""sweeps (issue 20): hyperparameter searches and ablations, each trial a job

Revision ID: 0010_sweeps
Revises: 0002_job_events
Create Date: 2026-12-06

Two tables of the service's own: `sweeps` (the validated request and its state) and
`sweep_trials` (one row per trial: its options, its job, Optuna's attributes and outcome).
Optuna's own storage is not used: the study is rebuilt in memory from these rows
(docs/sweeps.md says why), so nothing is created outside Alembic.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010_sweeps"
down_revision: str | Sequence[str] | None = "0002_job_events"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "sweeps",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("max_trials", sa.Integer(), nullable=False),
        sa.Column("parallelism", sa.Integer(), nullable=False),
        sa.Column("owner_id", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["owner_id"],
            ["api_keys.id"],
            name=op.f("fk_sweeps_owner_id_api_keys"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sweeps")),
    )
    op.create_index(op.f("ix_sweeps_created_at"), "sweeps", ["created_at"])
    op.create_index(op.f("ix_sweeps_owner_id"), "sweeps", ["owner_id"])
    op.create_index(op.f("ix_sweeps_status"), "sweeps", ["status"])
    op.create_table(
        "sweep_trials",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("sweep_id", sa.Uuid(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Uuid(), nullable=True),
        sa.Column("role", sa.String(length=64), nullable=True),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("distributions", sa.JSON(), nullable=False),
        sa.Column("system_attrs", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("value", sa.Float(), nullable=True),
        sa.Column("value_epoch", sa.Integer(), nullable=True),
        sa.Column("pruned_epoch", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_sweep_trials_job_id_jobs"), ondelete="SET NULL"
        ),
        sa.ForeignKeyConstraint(
            ["sweep_id"],
            ["sweeps.id"],
            name=op.f("fk_sweep_trials_sweep_id_sweeps"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sweep_trials")),
        sa.UniqueConstraint("job_id", name=op.f("uq_sweep_trials_job_id")),
        sa.UniqueConstraint("sweep_id", "number", name="uq_sweep_trials_sweep_id_number"),
    )


def downgrade() -> None:
    op.drop_table("sweep_trials")
    op.drop_index(op.f("ix_sweeps_status"), table_name="sweeps")
    op.drop_index(op.f("ix_sweeps_owner_id"), table_name="sweeps")
    op.drop_index(op.f("ix_sweeps_created_at"), table_name="sweeps")
    op.drop_table("sweeps")
