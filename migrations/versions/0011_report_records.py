"""report records (issue 20): the plain cross-entropy losses and the data each job used

Revision ID: 0011_report_records
Revises: 0002_job_events
Create Date: 2026-11-28

epochs.val_ce_loss is the plain cross-entropy on the validation images, recorded whatever
the training loss (label smoothing, L2), so that validation losses compare across jobs.
evaluations.test_ce_loss is the same on the test set, and evaluations.data says which data
the job used (archive, its sha256, how the first test image is defined). Existing rows get
NULL: the report shows "n/a" for them, never a loss that does not compare.

Plain ADD/DROP COLUMN, not batch mode: rebuilding `epochs` on SQLite would drop its event
trigger (0002_job_events).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011_report_records"
down_revision: str | Sequence[str] | None = "0010_sweeps"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("epochs", sa.Column("val_ce_loss", sa.Float(), nullable=True))
    op.add_column("evaluations", sa.Column("test_ce_loss", sa.Float(), nullable=True))
    op.add_column("evaluations", sa.Column("data", sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column("evaluations", "data")
    op.drop_column("evaluations", "test_ce_loss")
    op.drop_column("epochs", "val_ce_loss")
