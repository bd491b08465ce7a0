"""The Alembic migrations build the schema of app.models on PostgreSQL and SQLite, and undo it."""

from __future__ import annotations

import uuid

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from app.migrate import downgrade, upgrade
from app.models import Base

TABLES = {
    "jobs",
    "epochs",
    "evaluations",
    "model_versions",
    "model_aliases",
    "api_keys",
    "model_owners",
    "job_events",
    "sweeps",
    "sweep_trials",
    "rate_buckets",
    "workers",
}


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    from app.migrate import alembic_config

    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return set(inspect(conn).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def drift(url: str) -> list:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            return compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()


@pytest.fixture
def empty_pg(fresh_pg_database) -> str:
    return fresh_pg_database()


def test_postgresql_upgrade_head_then_downgrade_base(empty_pg):
    assert tables(empty_pg) == set()
    upgrade(empty_pg)
    assert tables(empty_pg) == TABLES
    assert drift(empty_pg) == []
    engine = create_engine(empty_pg)
    try:
        with engine.connect() as conn:
            foreign_keys = {
                (table, fk["referred_table"], tuple(fk["constrained_columns"]))
                for table in TABLES
                for fk in inspect(conn).get_foreign_keys(table)
            }
            version = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
            assert version == head_revision()
    finally:
        engine.dispose()
    # Both sides of the jobs <-> model_versions cycle exist.
    assert ("jobs", "model_versions", ("model_version_id",)) in foreign_keys
    assert ("model_versions", "jobs", ("job_id",)) in foreign_keys
    assert ("model_aliases", "model_versions", ("name", "version")) in foreign_keys
    downgrade(empty_pg)
    assert tables(empty_pg) == set()
    # And back up again: the downgrade left nothing behind that blocks a new upgrade.
    upgrade(empty_pg)
    assert tables(empty_pg) == TABLES


def test_sqlite_upgrade_head_then_downgrade_base(tmp_path):
    # The parent folder does not exist yet, like a fresh STATE_DIR.
    url = f"sqlite:///{tmp_path / 'state' / 'cnn.db'}"
    upgrade(url)
    assert tables(url) == TABLES
    assert drift(url) == []
    downgrade(url)
    assert tables(url) == set()


def test_the_migrated_schema_enforces_the_models_constraints(tmp_path):
    """On SQLite (batch mode rebuilt jobs), the unique key on (owner, idempotency key)
    survived, and so did the triggers that write a job's events (0006 rebuilds them)."""
    url = f"sqlite:///{tmp_path / 'cnn.db'}"
    upgrade(url)
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            uniques = inspect(conn).get_unique_constraints("jobs")
            indexes = {ix["name"] for ix in inspect(conn).get_indexes("jobs")}
            triggers = conn.execute(
                text("SELECT name FROM sqlite_master WHERE type = 'trigger'")
            ).scalars()
            assert set(triggers) == {
                "trg_jobs_insert_event",
                "trg_jobs_status_event",
                "trg_epochs_event",
            }
    finally:
        engine.dispose()
    assert [u["column_names"] for u in uniques] == [["owner_id", "idempotency_key"]]
    assert {"ix_jobs_created_at", "ix_jobs_net", "ix_jobs_status"} <= indexes


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_idempotency_keys_become_per_owner_and_back(tmp_path, fresh_pg_database, backend):
    """0006_caller_scoped_keys: two owners may hold one key after it; going back keeps the
    oldest job's key only, so the old unique key can be restored."""
    url = f"sqlite:///{tmp_path / 'cnn.db'}" if backend == "sqlite" else fresh_pg_database()
    upgrade(url)
    engine = create_engine(url)
    insert = text(
        "INSERT INTO api_keys (id, name, prefix, key_hash, scopes, created_at) "
        "VALUES (:id, :name, 'cnn_x', :name, 'train', CURRENT_TIMESTAMP)"
    )
    job = text(
        "INSERT INTO jobs (id, net, epochs, batch_size, validation_split, optimizer, "
        "learning_rate, seed, model_name, status, current_epoch, attempts, cancel_requested, "
        "created_at, idempotency_key, owner_id) VALUES (:id, 'net1', 1, 32, 0.2, 'adam', "
        "0.001, 0, 'm', 'queued', 0, 0, false, :at, 'shared', :owner)"
    )

    def job_id(n: int) -> uuid.UUID | str:  # SQLite stores a Uuid as 32 hex digits
        return uuid.UUID(int=n) if backend == "postgresql" else uuid.UUID(int=n).hex

    try:
        with engine.begin() as conn:
            for owner in (1, 2):
                conn.execute(insert, {"id": owner, "name": f"k{owner}"})
                conn.execute(
                    job,
                    {"id": job_id(owner), "owner": owner, "at": f"2026-01-0{owner}"},
                )
        downgrade(url, "0002_job_events")
        with engine.connect() as conn:
            kept = conn.execute(text("SELECT owner_id, idempotency_key FROM jobs")).all()
        assert sorted(kept, key=lambda row: row[0]) == [(1, "shared"), (2, None)]
        upgrade(url)
        assert drift(url) == []
    finally:
        engine.dispose()


def test_models_and_migrations_do_not_drift_on_the_shared_database(db_url):
    assert drift(db_url) == []


def test_names_registered_before_keys_belong_to_the_administrators(tmp_path):
    """0003_api_keys: no key can take over a model name that existed before keys did."""
    url = f"sqlite:///{tmp_path / 'cnn.db'}"
    upgrade(url, "0001")
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO model_versions (name, version, net, artifact_path, sha256, "
                    "size_bytes, metrics, created_at) VALUES ('net1', 1, 'net1', 'a', 'x', 1, "
                    "'{}', CURRENT_TIMESTAMP)"
                )
            )
        upgrade(url, "0003_api_keys")
        with engine.connect() as conn:
            owners = conn.execute(text("SELECT name, owner_id FROM model_owners")).all()
    finally:
        engine.dispose()
    assert owners == [("net1", None)]
