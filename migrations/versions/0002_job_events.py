"""job events: a log of every status change and stored epoch, written by triggers

Revision ID: 0002_job_events
Revises: 0005_training_levers
Create Date: 2026-11-27

`GET /jobs/{id}/events` streams this table. Triggers write it, so every status change
(claim, finish, cancel, sweep, requeue), whichever process or module makes it, and every
stored epoch lands here in the same transaction, with an id that only grows. On
PostgreSQL the epoch trigger first locks the job's row, as every status change does (an
UPDATE holds the row lock until commit): for one job, ids are therefore taken in commit
order, and a reader that remembers the last id it saw never skips a late commit.
SQLite serialises all writers, so the same holds there.

Existing jobs get their history back-filled (epochs, then the current status).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_job_events"
down_revision: str | Sequence[str] | None = "0005_training_levers"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STATUS_COLUMNS = "job_id, kind, status, previous_status, epoch, error, created_at"
EPOCH_COLUMNS = "job_id, kind, epoch, epoch_id, created_at"

POSTGRES = [
    """
    CREATE FUNCTION cnn_job_status_event() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'INSERT' THEN
            INSERT INTO job_events (job_id, kind, status, previous_status, epoch, error, created_at)
            VALUES (NEW.id, 'status', NEW.status, NULL, NEW.current_epoch, NEW.error,
                    clock_timestamp());
        ELSIF NEW.status IS DISTINCT FROM OLD.status THEN
            INSERT INTO job_events (job_id, kind, status, previous_status, epoch, error, created_at)
            VALUES (NEW.id, 'status', NEW.status, OLD.status, NEW.current_epoch, NEW.error,
                    clock_timestamp());
        END IF;
        RETURN NULL;
    END $$
    """,
    """
    CREATE TRIGGER trg_jobs_status_event AFTER INSERT OR UPDATE OF status ON jobs
    FOR EACH ROW EXECUTE FUNCTION cnn_job_status_event()
    """,
    """
    CREATE FUNCTION cnn_epoch_event() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        -- Take the job's row lock before the event id (see the module docstring).
        PERFORM 1 FROM jobs WHERE id = NEW.job_id FOR UPDATE;
        INSERT INTO job_events (job_id, kind, epoch, epoch_id, created_at)
        VALUES (NEW.job_id, 'epoch', NEW.epoch, NEW.id, clock_timestamp());
        RETURN NULL;
    END $$
    """,
    """
    CREATE TRIGGER trg_epochs_event AFTER INSERT ON epochs
    FOR EACH ROW EXECUTE FUNCTION cnn_epoch_event()
    """,
]

SQLITE_NOW = "strftime('%Y-%m-%d %H:%M:%f', 'now')"
SQLITE = [
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
    f"""
    CREATE TRIGGER trg_epochs_event AFTER INSERT ON epochs
    BEGIN
        INSERT INTO job_events ({EPOCH_COLUMNS})
        VALUES (NEW.job_id, 'epoch', NEW.epoch, NEW.id, {SQLITE_NOW});
    END
    """,
]


def upgrade() -> None:
    op.create_table(
        "job_events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("job_id", sa.Uuid(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=True),
        sa.Column("previous_status", sa.String(length=16), nullable=True),
        sa.Column("epoch", sa.Integer(), nullable=True),
        sa.Column("epoch_id", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_job_events_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_events")),
    )
    op.create_index("ix_job_events_job_id_id", "job_events", ["job_id", "id"], unique=False)
    # Back-fill what existing jobs already did: their epochs, then their current status.
    op.execute(
        f"INSERT INTO job_events ({EPOCH_COLUMNS}) "
        "SELECT e.job_id, 'epoch', e.epoch, e.id, e.created_at FROM epochs e "
        "ORDER BY e.job_id, e.epoch"
    )
    op.execute(
        f"INSERT INTO job_events ({STATUS_COLUMNS}) "
        "SELECT j.id, 'status', j.status, NULL, j.current_epoch, j.error, j.created_at "
        "FROM jobs j ORDER BY j.created_at"
    )
    statements = POSTGRES if op.get_bind().dialect.name == "postgresql" else SQLITE
    for statement in statements:
        op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS trg_epochs_event ON epochs")
        op.execute("DROP TRIGGER IF EXISTS trg_jobs_status_event ON jobs")
        op.execute("DROP FUNCTION IF EXISTS cnn_epoch_event()")
        op.execute("DROP FUNCTION IF EXISTS cnn_job_status_event()")
    else:
        op.execute("DROP TRIGGER IF EXISTS trg_epochs_event")
        op.execute("DROP TRIGGER IF EXISTS trg_jobs_status_event")
        op.execute("DROP TRIGGER IF EXISTS trg_jobs_insert_event")
    op.drop_index("ix_job_events_job_id_id", table_name="job_events")
    op.drop_table("job_events")
