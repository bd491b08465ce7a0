"""claim counter and infrastructure-fault count on jobs

Revision ID: 0004_claim_counter
Revises: 0001
Create Date: 2026-11-27

`claims` is the fencing token: it grows by one on every claim and never goes down, unlike
`attempts`, which a graceful hand-back (worker shutdown, infrastructure fault) gives back.
Existing jobs start with claims = attempts, so every token already handed out stays unique.
`infra_failures` counts hand-backs caused by the infrastructure (store, database, broker),
which have their own limit and do not use up attempts.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_claim_counter"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("claims", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(
            sa.Column("infra_failures", sa.Integer(), nullable=False, server_default="0")
        )
    op.execute("UPDATE jobs SET claims = attempts")


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("infra_failures")
        batch.drop_column("claims")
