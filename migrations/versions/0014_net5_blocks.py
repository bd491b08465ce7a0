"""NET V's building blocks (issue 21): the recipe's job options, TTA in the evaluation

Revision ID: 0014_net5_blocks
Revises: 0012_job_gpus
Create Date: 2026-12-06

Every new job option is off by default and existing rows get that default (server_default),
so jobs created before this migration read back exactly as they ran. evaluations gains the
test-time augmentation's views and accuracy, null for jobs evaluated without TTA.

Plain ADD/DROP COLUMN, not batch mode (see 0011_report_records).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014_net5_blocks"
down_revision: str | Sequence[str] | None = "0012_job_gpus"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JOB_COLUMNS = (
    ("momentum", sa.Float(), "0"),
    ("nesterov", sa.Boolean(), sa.false()),
    ("bias_lr_scale", sa.Float(), "1"),
    ("lookahead_steps", sa.Integer(), "0"),
    ("whiten", sa.Boolean(), sa.false()),
    ("whiten_bias_epochs", sa.Integer(), "0"),
    ("augment_translate", sa.Integer(), "0"),
    ("augment_flip_mode", sa.String(length=16), "random"),
    ("tta", sa.String(length=16), "none"),
)


def upgrade() -> None:
    for name, type_, default in JOB_COLUMNS:
        op.add_column("jobs", sa.Column(name, type_, nullable=False, server_default=default))
    op.add_column("evaluations", sa.Column("tta_views", sa.JSON(), nullable=True))
    op.add_column("evaluations", sa.Column("tta_accuracy", sa.Float(), nullable=True))


def downgrade() -> None:
    op.drop_column("evaluations", "tta_accuracy")
    op.drop_column("evaluations", "tta_views")
    for name, *_ in reversed(JOB_COLUMNS):
        op.drop_column("jobs", name)
