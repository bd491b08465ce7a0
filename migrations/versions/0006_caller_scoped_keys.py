"""Idempotency keys are scoped to the caller: unique on (owner_id, idempotency_key)

Revision ID: 0006_caller_scoped_keys
Revises: 0002_job_events
Create Date: 2026-12-06

Before, one Idempotency-Key namespace served every API key: another key's earlier use of
`my-first-net1` turned your submit into a 409, and the 409 told you someone had used it.
Now each owner has its own namespace. Keyless jobs (AUTH=off) have owner NULL, which a
unique constraint does not compare; their submissions are serialised instead
(app/jobs/service.py).

On SQLite the jobs table is rebuilt (batch mode), which drops the triggers on it: the two
that write job_events (migration 0002_job_events) are created again, unchanged.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0006_caller_scoped_keys"
down_revision: str | Sequence[str] | None = "0007_shared_limits"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD = "uq_jobs_idempotency_key"
NEW = "uq_jobs_owner_id_idempotency_key"

# The jobs triggers of 0002_job_events as they were written there (SQLite only; PostgreSQL
# alters the table in place and keeps them).
STATUS_COLUMNS = "job_id, kind, status, previous_status, epoch, error, created_at"
SQLITE_NOW = "strftime('%Y-%m-%d %H:%M:%f', 'now')"
SQLITE_JOBS_TRIGGERS = [
    f"""
    CREATE TRIGGER trg_jobs_insert_event AFTER INSERT ON jobs
    BEGIN
        INSERT INTO job_events ({STATUS_COLUMNS})
        VALUES (NEW.id, 'status', NEW.status, NULL, NEW.current_epoch, NEW.error, {SQLITE_NOW});
    END
    """,
    f"""
    CREATE TRIGGER trg_jobs_status_event AFTER UPDATE OF status ON jobs
    WHEN NEW.status IS NOT OLD.status
    BEGIN
        INSERT INTO job_events ({STATUS_COLUMNS})
        VALUES (NEW.id, 'status', NEW.status, OLD.status, NEW.current_epoch, NEW.error,
                {SQLITE_NOW});
    END
    """,
]


def _rebuild_triggers() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP TRIGGER IF EXISTS trg_jobs_insert_event")
        op.execute("DROP TRIGGER IF EXISTS trg_jobs_status_event")
        for statement in SQLITE_JOBS_TRIGGERS:
            op.execute(statement)


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint(OLD, type_="unique")
        batch.create_unique_constraint(NEW, ["owner_id", "idempotency_key"])
    _rebuild_triggers()


def downgrade() -> None:
    # Two owners may now hold the same key: the oldest job keeps it, the others lose it
    # (they can no longer be replayed, which is all a key is for).
    op.execute(
        "UPDATE jobs SET idempotency_key = NULL WHERE idempotency_key IS NOT NULL AND EXISTS "
        "(SELECT 1 FROM jobs AS older WHERE older.idempotency_key = jobs.idempotency_key "
        "AND (older.created_at < jobs.created_at "
        "OR (older.created_at = jobs.created_at AND older.id < jobs.id)))"
    )
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint(NEW, type_="unique")
        batch.create_unique_constraint(OLD, ["idempotency_key"])
    _rebuild_triggers()
