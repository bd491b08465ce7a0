"""training levers (issue 11): jobs get the lever columns, epochs the learning rate

Revision ID: 0005_training_levers
Revises: 0004_claim_counter
Create Date: 2026-11-27

Every lever is off by default, and existing rows get that default (server_default), so
jobs created before this migration read back exactly as they ran.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_training_levers"
down_revision: str | Sequence[str] | None = "0004_claim_counter"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LEVER_COLUMNS = (
    ("augment_crop", sa.Integer(), False, "0"),
    ("augment_flip", sa.Boolean(), False, sa.false()),
    ("cutout", sa.Integer(), False, "0"),
    ("label_smoothing", sa.Float(), False, "0"),
    ("weight_decay", sa.Float(), False, "0"),
    ("clipnorm", sa.Float(), True, None),
    ("lr_schedule", sa.String(length=16), False, "constant"),
    ("warmup_epochs", sa.Integer(), False, "0"),
    ("early_stopping_patience", sa.Integer(), True, None),
)


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        for name, type_, nullable, default in LEVER_COLUMNS:
            batch.add_column(sa.Column(name, type_, nullable=nullable, server_default=default))
    with op.batch_alter_table("epochs") as batch:
        batch.add_column(sa.Column("learning_rate", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("epochs") as batch:
        batch.drop_column("learning_rate")
    with op.batch_alter_table("jobs") as batch:
        for name, *_ in reversed(LEVER_COLUMNS):
            batch.drop_column(name)
