"""API keys, job owners and model-name owners

Revision ID: 0003_api_keys
Revises: 0004_claim_counter
Create Date: 2026-11-27

Names that already have versions or jobs are given to the administrators (owner_id NULL),
so no key can take over a model that existed before keys did.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_api_keys"
down_revision: str | Sequence[str] | None = "0004_claim_counter"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JOBS_OWNER_FK = "fk_jobs_owner_id_api_keys"


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("scopes", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_api_keys_key_hash")),
        sa.UniqueConstraint("name", name=op.f("uq_api_keys_name")),
    )
    op.create_table(
        "model_owners",
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("owner_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["owner_id"],
            ["api_keys.id"],
            name=op.f("fk_model_owners_owner_id_api_keys"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_model_owners")),
    )
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("owner_id", sa.Integer(), nullable=True))
        batch.create_index(batch.f("ix_jobs_owner_id"), ["owner_id"], unique=False)
        batch.create_foreign_key(
            JOBS_OWNER_FK, "api_keys", ["owner_id"], ["id"], ondelete="SET NULL"
        )
    op.execute(
        "INSERT INTO model_owners (name, owner_id, created_at) "
        "SELECT name, NULL, CURRENT_TIMESTAMP FROM "
        "(SELECT name FROM model_versions UNION SELECT model_name FROM jobs) AS taken"
    )


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint(JOBS_OWNER_FK, type_="foreignkey")
        batch.drop_index(batch.f("ix_jobs_owner_id"))
        batch.drop_column("owner_id")
    op.drop_table("model_owners")
    op.drop_table("api_keys")
