"""Init container of the API and worker pods: wait until the database has this image's schema.

The cnn-migrate Job migrates; pods of a new image must not serve or train before it has
(the old pods keep serving meanwhile: the rollout waits for readiness). Exits 0 once the
database's Alembic revision is the head this image ships, 1 after WAIT_S seconds without
(Kubernetes starts the init container again, with back-off). Reads DATABASE_URL through
the service's own Settings, like every process of the image.
"""

from __future__ import annotations

import sys
import time

from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine
from sqlalchemy.exc import SQLAlchemyError

from app.config import get_settings
from app.migrate import alembic_config

WAIT_S = 900.0
POLL_S = 3.0


def current_heads(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return set(MigrationContext.configure(connection).get_current_heads())
    finally:
        engine.dispose()


def main() -> int:
    url = get_settings().database_url
    wanted = set(ScriptDirectory.from_config(alembic_config(url)).get_heads())
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            current = current_heads(url)
        except SQLAlchemyError as exc:
            print(f"waiting for the database: {type(exc).__name__}: {exc}", flush=True)
        else:
            if current == wanted:
                print(f"database schema is at {', '.join(sorted(wanted))}", flush=True)
                return 0
            print(
                f"database schema is at {', '.join(sorted(current)) or 'nothing'}, this image "
                f"needs {', '.join(sorted(wanted))}: waiting for the cnn-migrate Job",
                flush=True,
            )
        if time.monotonic() >= deadline:
            print(f"gave up after {WAIT_S:.0f} s: has the cnn-migrate Job run?", flush=True)
            return 1
        time.sleep(POLL_S)


if __name__ == "__main__":
    sys.exit(main())
