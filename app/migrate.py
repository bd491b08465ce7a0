"""Run the Alembic migrations from Python (used by `cnn serve` and the tests).

alembic.ini and migrations/ sit next to the `app` package, so they are found from any
working directory; the URL is passed in rather than read from the environment.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

ROOT = Path(__file__).resolve().parent.parent
ALEMBIC_INI = ROOT / "alembic.ini"
MIGRATIONS = ROOT / "migrations"


def alembic_config(url: str) -> Config:
    """An Alembic Config bound to `url`, independent of the current directory."""
    cfg = Config(str(ALEMBIC_INI))
    cfg.set_main_option("script_location", str(MIGRATIONS))
    # ConfigParser interpolates '%', which URL-encoded passwords contain.
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    # Keep the host process's logging as it is (env.py would otherwise apply alembic.ini's).
    cfg.attributes["configure_logger"] = False
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at `url` to `revision` (default: the latest schema)."""
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    """Take the database at `url` back to `revision` (default: no tables at all)."""
    command.downgrade(alembic_config(url), revision)
