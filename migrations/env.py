"""Alembic environment: one schema (app.models.Base.metadata) for PostgreSQL and SQLite.

The URL is `sqlalchemy.url` when the caller set one (app.migrate, tests), else the
settings' database_url, so `alembic upgrade head` and `cnn serve` migrate the same database.
"""

from __future__ import annotations

from logging.config import fileConfig
from pathlib import Path

from alembic import context
from sqlalchemy import Connection, engine_from_config, pool
from sqlalchemy.engine import make_url

from app.config import get_settings
from app.models import Base

config = context.config

# app.migrate turns this off so a programmatic upgrade does not reset the host's logging.
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _database_url() -> str:
    url = config.get_main_option("sqlalchemy.url") or get_settings().database_url
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        # SQLite creates the file but not its folder (e.g. a fresh STATE_DIR).
        Path(parsed.database).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
    return url


def _configure(**kwargs: object) -> None:
    url = kwargs.pop("url", None)
    connection = kwargs.pop("connection", None)
    dialect = (
        connection.dialect.name if connection is not None else make_url(url).get_backend_name()
    )
    context.configure(
        url=url,
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things in place; batch mode copies the table instead.
        render_as_batch=dialect == "sqlite",
        compare_type=True,
        **kwargs,
    )


def run_migrations_offline() -> None:
    """Emit SQL to stdout (`alembic upgrade head --sql`) without a database."""
    _configure(url=_database_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def _run_on(connection: Connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    # A caller may hand us an open connection (config.attributes["connection"]).
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_on(connection)
        return
    section = config.get_section(config.config_ini_section, {})
    section["sqlalchemy.url"] = _database_url()
    engine = engine_from_config(section, prefix="sqlalchemy.", poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            _run_on(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
