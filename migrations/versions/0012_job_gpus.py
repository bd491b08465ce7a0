"""job gpus (issue 19): the devices a job asks for, which choose its queue

Revision ID: 0012_job_gpus
Revises: 0013_workers
Create Date: 2026-12-06

Jobs created before this migration asked for no particular device: the server default 0
(any device) gives them exactly that.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012_job_gpus"
down_revision: str | Sequence[str] | None = "0013_workers"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("gpus", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("gpus")
