"""`gpus` as a job option (issue 19): bounded, a divisor of the batch, routed to its queue."""

from __future__ import annotations

import pytest

from app.jobs.queue import TRAIN_TASK, gpu_queue

from ..conftest import TrainingQueue


@pytest.fixture
def gpu2_queue(settings):
    queue = TrainingQueue(gpu_queue(settings, 2))
    queue.clear()
    yield queue
    queue.clear()
    queue.close()


def test_a_gpus_job_goes_to_its_gpu_queue_and_says_what_it_waits_for(
    client, training_queue, gpu2_queue
):
    response = client.post("/jobs", json={"net": "net1", "gpus": 2, "batch_size": 128})
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["parameters"]["gpus"] == 2
    assert job["waiting_for"] == "a worker with at least 2 GPUs (WORKER_GPUS >= 2)"
    assert gpu2_queue.messages() == [(TRAIN_TASK, [job["id"]])]
    assert training_queue.messages() == []  # not on the any-device queue

    plain = client.post("/jobs", json={"net": "net1"}).json()
    assert plain["parameters"]["gpus"] == 0 and plain["waiting_for"] == "any worker"
    assert training_queue.messages() == [(TRAIN_TASK, [plain["id"]])]


def test_a_job_that_left_the_queue_waits_for_nothing(client, make_job):
    job = make_job("running", gpus=2)
    assert client.get(f"/jobs/{job.id}").json()["waiting_for"] is None


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"gpus": 2, "batch_size": 127}, "batch_size must be a multiple of gpus"),
        ({"gpus": 3, "batch_size": 128}, "Received: batch_size=128, gpus=3"),
        ({"gpus": 17}, "gpus"),
        ({"gpus": -1}, "gpus"),
        ({"gpus": "2"}, "gpus"),
    ],
)
def test_bad_gpus_are_422_with_the_reason(client, body, words):
    response = client.post("/jobs", json={"net": "net1", **body})
    assert response.status_code == 422, response.text
    assert words in response.text
    assert response.json()["error"]["code"] == "validation_error"


def test_one_gpu_takes_any_batch_size(client, settings):
    queue = TrainingQueue(gpu_queue(settings, 1))
    queue.clear()
    try:
        response = client.post("/jobs", json={"net": "net1", "gpus": 1, "batch_size": 127})
        assert response.status_code == 202, response.text
        assert queue.messages() == [(TRAIN_TASK, [response.json()["id"]])]
    finally:
        queue.clear()
        queue.close()
