"""Fault tests on the real stack: PostgreSQL, Redis, the API and `cnn worker` processes.

Each test does what an operator fears, then checks that every job ends in the right state
with every epoch stored exactly once and no model registered twice (docs/reliability.md
names the promise each test proves).
"""

from __future__ import annotations

import random
import shutil
import signal
import time
import uuid

import pytest
from sqlalchemy import select

from app.models import ModelVersion

from .conftest import (
    TINY_JOB,
    FaultStack,
    Proc,
    Processes,
    pid_of,
    skewed_worker_command,
    wait_for,
)

pytestmark = pytest.mark.slow


def _submit(stack: FaultStack, **params: object) -> str:
    return str(stack.api.submit(**{**TINY_JOB, **params})["id"])


# ------------------------------------------------------------------------- the broker
def test_redis_restarted_while_jobs_are_queued_every_job_runs_once(
    fault_stack: FaultStack, worker: Proc
):
    stack = fault_stack
    ids = [_submit(stack, epochs=2, model_name="redis-restart") for _ in range(3)]
    wait_for(lambda: stack.job(ids[0]).status == "running", 120, "the first job to run")

    stack.redis.restart()  # no persistence: the queued messages are gone

    for job_id in ids:
        stack.wait_terminal(job_id, 180)
    for job_id in ids:
        job = stack.assert_succeeded_once(job_id, 2)
        assert job.claims == 1  # ran once: never claimed a second time
    versions = sorted(v.version for job_id in ids for v in stack.versions(job_id))
    assert versions == [1, 2, 3]


# ------------------------------------------------------------------------- the API
def test_api_restarted_while_a_job_trains_the_job_is_unaffected(
    fault_stack: FaultStack, worker: Proc
):
    stack = fault_stack
    job_id = _submit(stack, epochs=4, train_limit=500)
    wait_for(lambda: stack.epochs(job_id), 120, "epoch 1 to be stored", interval=0.05)

    stack.restart_api()  # SIGKILL, then a new API process on the same port

    seen = stack.api.epochs(job_id)  # history reads continue from the new process
    assert seen == list(range(1, len(seen) + 1)) and seen
    stack.wait_terminal(job_id, 180)
    job = stack.assert_succeeded_once(job_id, 4)
    assert (job.attempts, job.claims) == (1, 1)
    assert stack.api.epochs(job_id) == [1, 2, 3, 4]


# ------------------------------------------------------------------------- PostgreSQL
def test_postgres_connections_killed_during_training_lose_and_double_nothing(
    fault_stack: FaultStack, worker: Proc
):
    stack = fault_stack
    job_id = _submit(stack, epochs=4, train_limit=500)
    wait_for(lambda: stack.job(job_id).status == "running", 120, "the job to run")

    killed = 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        killed += stack.terminate_backends()
        time.sleep(0.7)
        try:
            if stack.job(job_id).status != "running":
                break
        except Exception:  # noqa: BLE001 - our own connection may be the one just killed
            continue
    assert killed > 0
    stack.wait_terminal(job_id, 120)
    job = stack.assert_succeeded_once(job_id, 4)
    assert job.attempts == 1  # an infrastructure fault is not the job's failure


# ------------------------------------------------------------------------- the artifact store
def test_unwritable_artifact_store_at_the_end_of_a_fit_keeps_the_checkpoint_and_finishes(
    fault_stack: FaultStack, worker: Proc
):
    stack = fault_stack
    # staging/ replaced by a plain file: every write below it fails (ENOTDIR), even as root.
    staging = stack.settings.artifact_dir / "staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.parent.mkdir(parents=True, exist_ok=True)
    staging.write_text("the store is broken")
    try:
        job_id = _submit(stack, epochs=2)
        wait_for(
            lambda: "artifact store" in (stack.job(job_id).error or ""),
            120,
            "the worker to report the store fault",
        )
        job = stack.job(job_id)
        assert job.status == "running"  # retrying with back-off, still its own job
        assert stack.epochs(job_id) == [1, 2]
        assert any(stack.checkpoint_dir(job_id).iterdir())  # the checkpoint is kept
        assert stack.versions(job_id) == []
    finally:
        staging.unlink()  # the operator repairs the store
    stack.wait_terminal(job_id, 60)
    job = stack.assert_succeeded_once(job_id, 2)
    assert (job.attempts, job.claims, job.error) == (1, 1, None)


# ------------------------------------------------------------------------- a stalled worker
def test_worker_stopped_past_the_timeout_then_continued_is_fenced_off(
    fault_stack: FaultStack, worker: Proc, processes: Processes
):
    stack = fault_stack
    other = processes.worker(stack.settings)  # two workers: either may take the job
    job_id = _submit(stack, epochs=5, train_limit=500)
    wait_for(lambda: stack.epochs(job_id), 120, "epoch 1 to be stored", interval=0.05)
    first_owner = stack.job(job_id).worker
    stalled = worker if pid_of(first_owner) == worker.pid else other
    assert pid_of(first_owner) == stalled.pid
    stalled.popen.send_signal(signal.SIGSTOP)
    try:
        # The heartbeat goes stale, the other worker's sweep requeues, the other one claims.
        wait_for(lambda: stack.job(job_id).claims >= 2, 60, "another worker to take the job")
    finally:
        stalled.popen.send_signal(signal.SIGCONT)
    stack.wait_terminal(job_id, 180)
    job = stack.assert_succeeded_once(job_id, 5)
    assert job.worker != first_owner and job.claims == 2
    # The stalled worker noticed, wrote nothing, and is alive and idle again.
    wait_for(lambda: f"job {job_id} lost" in stalled.log_path.read_text(), 30, "it to let go")
    assert stalled.alive()


# ------------------------------------------------------------------------- clocks
def test_a_sweeper_with_a_skewed_clock_requeues_nothing_that_is_alive(
    fault_stack: FaultStack, worker: Proc, processes: Processes
):
    stack = fault_stack
    # Two more workers whose clocks are 10 minutes ahead and behind; each sweeps every second.
    processes.start("worker-ahead", skewed_worker_command(600), stack.settings)
    processes.start("worker-behind", skewed_worker_command(-600), stack.settings)
    ids = [_submit(stack, epochs=4, train_limit=500, model_name="skew") for _ in range(2)]
    stack.wait_terminal(ids[0], 240)
    stack.wait_terminal(ids[1], 240)
    for job_id in ids:
        job = stack.assert_succeeded_once(job_id, 4)
        assert job.claims == 1, "a live job was requeued"


# ------------------------------------------------------------------------- cancel vs. success
def test_cancel_racing_the_end_of_training_is_either_refused_or_wins(
    fault_stack: FaultStack, worker: Proc
):
    stack = fault_stack
    rng = random.Random(9)
    # A warm-up job gives the length of "last epoch + evaluation + registration" here.
    warm = _submit(stack, model_name="race-warmup")
    wait_for(lambda: stack.job(warm).status == "running", 120, "the warm-up job to run")
    started = time.monotonic()
    stack.wait_terminal(warm, 120)
    span = time.monotonic() - started

    outcomes = []
    for _ in range(20):
        job_id = _submit(stack, model_name="race")
        wait_for(lambda j=job_id: stack.job(j).status == "running", 60, "the job to run", 0.01)
        time.sleep(rng.uniform(0, span * 1.2))
        response = stack.api.http.post(f"/jobs/{job_id}/cancel")
        job = stack.wait_terminal(job_id, 60)
        if response.status_code == 200:
            assert job.status == "cancelled", job.status
            assert job.model_version_id is None and stack.versions(job_id) == []
        else:
            assert response.status_code == 409, response.text
            assert job.status == "succeeded" and len(stack.versions(job_id)) == 1
        outcomes.append(job.status)
    print("cancel race outcomes:", {s: outcomes.count(s) for s in set(outcomes)})


# ------------------------------------------------------------------------- a burst
def test_twenty_jobs_at_once_on_one_worker_all_run_once_in_order(
    fault_stack: FaultStack, worker: Proc
):
    stack = fault_stack
    name = f"burst-{uuid.uuid4().hex[:6]}"
    ids = [_submit(stack, model_name=name, train_limit=64) for _ in range(20)]
    for job_id in ids:
        stack.wait_terminal(job_id, 300)
    jobs = [stack.assert_succeeded_once(job_id, 1) for job_id in ids]
    assert all((job.attempts, job.claims) == (1, 1) for job in jobs)
    starts = [job.started_at for job in jobs]
    assert starts == sorted(starts)  # in submission order
    with stack.sessions() as session:
        registered = session.execute(
            select(ModelVersion.version, ModelVersion.job_id)
            .where(ModelVersion.name == name)
            .order_by(ModelVersion.version)
        ).all()
    # Versions 1..20, one per job, numbered in the order the jobs were submitted.
    assert [(v, str(j)) for v, j in registered] == list(zip(range(1, 21), ids, strict=True))
