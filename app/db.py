"""Engine and session factory, built from the settings' DATABASE_URL."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, cast

from sqlalchemy import CursorResult, Engine, Result, create_engine, event, make_url, text
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings, get_settings


def make_engine(url: str) -> Engine:
    """An engine that behaves the same on PostgreSQL and on the embedded SQLite file."""
    if url.startswith("sqlite"):
        owner_only_sqlite(url)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            # WAL lets the API read while the worker writes; FKs are off by default in SQLite.
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def owner_only_sqlite(url: str) -> None:
    """The SQLite file of `url` (it holds the key hashes) readable by its owner only: created
    0600 when missing, narrowed to 0600 with its -wal and -shm files when wider. SQLite
    gives the -wal and -shm files it creates the database file's mode."""
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    path = Path(database)
    if not path.parent.is_dir():
        return  # created later by whoever creates the folder
    os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
    for file in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        if file.exists() and file.stat().st_mode & 0o077:
            file.chmod(0o600)


@lru_cache(maxsize=8)
def _engine_for(url: str) -> Engine:
    return make_engine(url)


def get_engine(settings: Settings | None = None) -> Engine:
    return _engine_for((settings or get_settings()).database_url)


def session_factory(settings: Settings | None = None) -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(settings), expire_on_commit=False)


def rowcount(result: Result[Any]) -> int:
    """How many rows an UPDATE/DELETE matched (Session.execute types its result as Result)."""
    return cast(CursorResult[Any], result).rowcount


def serialize(session: Session, kind: int, key: int) -> None:
    """Until this transaction ends, no other transaction that calls serialize() with the same
    (kind, key) runs, in any process: on PostgreSQL a transaction-level advisory lock, on
    SQLite the database's write lock itself (BEGIN IMMEDIATE, which serialises every writer).

    Call it before the reads that the transaction's writes depend on (a count, then an
    insert): without it SQLite reads outside any transaction (pysqlite opens one only at
    the first write) and two requests both see room for one more row.
    """
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        connection.execute(
            text("SELECT pg_advisory_xact_lock(CAST(:kind AS integer), CAST(:key AS integer))"),
            {"kind": kind, "key": key},
        )
    elif connection.dialect.name == "sqlite":
        raw = connection.connection.dbapi_connection
        if not getattr(raw, "in_transaction", False):
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        # Already in a transaction: it has written, so it holds the write lock already.
