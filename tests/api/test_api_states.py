"""The job state machine, on its own and through POST /jobs/{id}/cancel."""

from __future__ import annotations

import itertools

import pytest

from app.models import Job
from app.states import InvalidTransition, JobStatus, check_transition, is_terminal

# The machine, written out independently of app.states.ALLOWED:
# queued -> running -> succeeded | failed | cancelled; queued -> cancelled; plus the
# internal requeue (running -> queued) and a job that fails before it starts.
EXPECTED_ALLOWED = {
    ("queued", "running"),
    ("queued", "cancelled"),
    ("queued", "failed"),
    ("running", "succeeded"),
    ("running", "failed"),
    ("running", "cancelled"),
    ("running", "queued"),
}
STATUSES = ["queued", "running", "succeeded", "failed", "cancelled"]


@pytest.mark.parametrize(("current", "target"), list(itertools.product(STATUSES, STATUSES)))
def test_every_transition_is_allowed_or_refused(current, target):
    if (current, target) in EXPECTED_ALLOWED:
        check_transition(current, target)
    else:
        with pytest.raises(InvalidTransition) as raised:
            check_transition(current, target)
        assert raised.value.current == JobStatus(current)
        assert raised.value.target == JobStatus(target)


def test_terminal_statuses():
    assert {s for s in STATUSES if is_terminal(s)} == {"succeeded", "failed", "cancelled"}


def test_cancel_a_queued_job_cancels_it_at_once(client, make_job, session_factory):
    job = make_job("queued")
    response = client.post(f"/jobs/{job.id}/cancel")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "cancelled"
    assert body["finished_at"] is not None
    assert body["cancel_requested"] is True
    with session_factory() as session:
        assert session.get(Job, job.id).status == "cancelled"


def test_cancel_a_running_job_asks_the_worker(client, make_job, expect_error):
    job = make_job("running", current_epoch=1)
    body = client.post(f"/jobs/{job.id}/cancel").json()
    # The worker stops the fit at the next batch and writes `cancelled` itself.
    assert body["status"] == "running"
    assert body["cancel_requested"] is True
    assert body["finished_at"] is None
    # Asking again is harmless while it still runs.
    assert client.post(f"/jobs/{job.id}/cancel").json()["cancel_requested"] is True


@pytest.mark.parametrize("status", ["succeeded", "failed", "cancelled"])
def test_cancel_a_finished_job_is_409(client, make_job, session_factory, expect_error, status):
    job = make_job(status)
    error = expect_error(client.post(f"/jobs/{job.id}/cancel"), 409, "job_terminal")
    assert status in error["message"]
    with session_factory() as session:
        row = session.get(Job, job.id)
        assert row.status == status and row.cancel_requested is False


def test_second_cancel_of_a_queued_job_is_409(client, make_job, expect_error):
    job = make_job("queued")
    assert client.post(f"/jobs/{job.id}/cancel").status_code == 200
    expect_error(client.post(f"/jobs/{job.id}/cancel"), 409, "job_terminal")
