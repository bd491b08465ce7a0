"""SIGTERM at any phase hands the job back in bounded time without using an attempt.

In-process runner on PostgreSQL with a tiny dataset: the worker's shutdown event is set
from inside each phase (data loading, evaluation, saving the model), the way Celery's
warm-shutdown signal sets it while the task runs.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from app.jobs.runner import Outcome, run_job
from app.models import Job
from app.registry.store import LocalArtifactStore

from .conftest import write_tiny_cifar10

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_cifar10(tmp_path_factory.mktemp("tiny") / "cifar-10-batches-py")


@pytest.mark.parametrize("phase", ["data loading", "evaluation", "saving the model"])
def test_sigterm_in_any_phase_hands_the_job_back_without_an_attempt(
    phase, settings, make_job, session_factory, tiny, monkeypatch
):
    import app.ml.data
    import app.ml.evaluation

    settings = settings.model_copy(update={"CIFAR10_SOURCE": str(tiny), "PRECISION": "float32"})
    job = make_job("queued", net="net1", epochs=1, batch_size=32, train_limit=64)
    shutdown = threading.Event()

    def during(original):  # the signal lands while this phase runs
        def wrapped(*args, **kwargs):
            shutdown.set()
            return original(*args, **kwargs)

        return wrapped

    if phase == "data loading":
        monkeypatch.setattr(app.ml.data, "load_cifar10", during(app.ml.data.load_cifar10))
    elif phase == "evaluation":
        monkeypatch.setattr(app.ml.evaluation, "evaluate", during(app.ml.evaluation.evaluate))
    else:
        stage = LocalArtifactStore.stage_model
        monkeypatch.setattr(LocalArtifactStore, "stage_model", during(stage))

    started = time.monotonic()
    outcome = run_job(settings, job.id, "w-shutdown", shutdown=shutdown)
    assert outcome == Outcome.REQUEUED
    with session_factory() as session:
        row = session.get(Job, job.id)
        assert (row.status, row.attempts, row.claims, row.worker) == ("queued", 0, 1, None)
        assert row.model_version_id is None
    assert time.monotonic() - started < 120  # bounded: one phase, never the rest of the job
    if phase != "data loading":  # the fit ran: its checkpoint stays for the next claim
        assert any(LocalArtifactStore.from_settings(settings).checkpoint_dir(job.id).iterdir())
