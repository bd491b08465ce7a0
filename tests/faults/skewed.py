"""Run a `cnn` command in a process whose clock is skewed: `python skewed.py SECONDS worker`.

Every clock the application reads in Python (app.models.utcnow and any module-level copy of
it, the API's own `_now`) is shifted by SECONDS, the way a host with a wrong clock would be.
The kernel's and the database's clocks are untouched: with the database's clock as the one
reference for heartbeats and staleness, such a worker or sweeper must behave normally.
"""

from __future__ import annotations

import importlib
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

SKEW = timedelta(seconds=float(sys.argv[1]))
# Whatever exists of these (module names before and after the app/jobs refactor).
MODULES = (
    "app.models",
    "app.services.execution",
    "app.services.jobs",
    "app.jobs.execution",
    "app.jobs.service",
    "app.jobs.runner",
    "app.jobs.sweeper",
    "app.training_job",
    "worker.sweeper",
)


def skewed_now() -> datetime:
    return datetime.now(UTC) + SKEW


def patch() -> None:
    import app.models

    original = app.models.utcnow
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for attr in ("utcnow", "_now"):
            if getattr(module, attr, None) is original or (
                attr == "_now" and callable(getattr(module, attr, None))
            ):
                setattr(module, attr, skewed_now)


if __name__ == "__main__":
    patch()
    from app.cli import main

    sys.exit(main(sys.argv[2:]))
