"""shared limits (issue 18): /predict counters for every API process, registry and key notices

Revision ID: 0007_shared_limits
Revises: 0002_job_events
Create Date: 2026-12-06

`rate_buckets` holds the /predict limits' counters where no Redis is configured
(app/quotas.py), so that every API process of one database enforces one budget.

On PostgreSQL, triggers tell every API process at once (NOTIFY, delivered at commit) that a
name's versions or aliases changed (channel `cnn_registry`, payload the name) or that a key
was revoked (`cnn_keys`, payload its id), whichever process or tool made the change. SQLite
has no notifications: API processes of one SQLite file poll (REGISTRY_POLL_S, AUTH_CACHE_S).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007_shared_limits"
down_revision: str | Sequence[str] | None = "0011_report_records"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

POSTGRES = [
    """
    CREATE FUNCTION cnn_notify_registry() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'DELETE' THEN
            PERFORM pg_notify('cnn_registry', OLD.name);
        ELSE
            PERFORM pg_notify('cnn_registry', NEW.name);
        END IF;
        RETURN NULL;
    END $$
    """,
    """
    CREATE TRIGGER trg_model_aliases_notify AFTER INSERT OR UPDATE OR DELETE ON model_aliases
    FOR EACH ROW EXECUTE FUNCTION cnn_notify_registry()
    """,
    """
    CREATE TRIGGER trg_model_versions_notify AFTER INSERT OR UPDATE OR DELETE ON model_versions
    FOR EACH ROW EXECUTE FUNCTION cnn_notify_registry()
    """,
    """
    CREATE FUNCTION cnn_notify_key_revoked() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('cnn_keys', NEW.id::text);
        RETURN NULL;
    END $$
    """,
    """
    CREATE TRIGGER trg_api_keys_revoked_notify AFTER UPDATE OF revoked_at ON api_keys
    FOR EACH ROW WHEN (NEW.revoked_at IS NOT NULL AND OLD.revoked_at IS NULL)
    EXECUTE FUNCTION cnn_notify_key_revoked()
    """,
]


def upgrade() -> None:
    op.create_table(
        "rate_buckets",
        sa.Column("caller", sa.String(length=160), nullable=False),
        sa.Column("hard", sa.Float(), nullable=False),
        sa.Column("hard_at", sa.Float(), nullable=False),
        sa.Column("fair", sa.Float(), nullable=False),
        sa.Column("fair_at", sa.Float(), nullable=False),
        sa.Column("seen_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("caller", name=op.f("pk_rate_buckets")),
    )
    op.create_index("ix_rate_buckets_seen_at", "rate_buckets", ["seen_at"], unique=False)
    if op.get_bind().dialect.name == "postgresql":
        for statement in POSTGRES:
            op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS trg_api_keys_revoked_notify ON api_keys")
        op.execute("DROP TRIGGER IF EXISTS trg_model_versions_notify ON model_versions")
        op.execute("DROP TRIGGER IF EXISTS trg_model_aliases_notify ON model_aliases")
        op.execute("DROP FUNCTION IF EXISTS cnn_notify_key_revoked()")
        op.execute("DROP FUNCTION IF EXISTS cnn_notify_registry()")
    op.drop_index("ix_rate_buckets_seen_at", table_name="rate_buckets")
    op.drop_table("rate_buckets")
