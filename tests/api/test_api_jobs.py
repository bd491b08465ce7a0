"""POST/GET /jobs and the per-job resources, over HTTP on PostgreSQL.

Jobs in states other than `queued` are written straight through the ORM (make_job): the
worker that would move them there is not part of these tests.
"""

from __future__ import annotations

import inspect
import io
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import func, select

from app.auth import AUTH_OFF, authenticate
from app.errors import JobTooLarge
from app.jobs.queue import TRAIN_TASK
from app.jobs.service import create_job, submit_job
from app.ml.nets import CLASS_NAMES, NETS
from app.ml.params import OPTIONS
from app.models import Evaluation, Job
from app.schemas import JobCreate

SEED_DEFAULTS = {
    "epochs": 20,
    "batch_size": 128,
    "validation_split": 0.2,
    "optimizer": "adam",
    "learning_rate": 0.001,
    "seed": 0,
    "train_limit": None,
    "model_name": "net1",
    "precision": None,
    # The issue-11 levers, all off.
    "augment_crop": 0,
    "augment_flip": False,
    "cutout": 0,
    "label_smoothing": 0.0,
    "weight_decay": 0.0,
    "clipnorm": None,
    "lr_schedule": "constant",
    "warmup_epochs": 0,
    "early_stopping_patience": None,
}


def shown_defaults() -> dict[str, Any]:
    """A new job's parameters: the seed's, pinned above, and every other declared option
    (app/ml/params.py) at its default, so that adding an option needs no edit here."""
    return {o.name: o.request_default for o in OPTIONS} | SEED_DEFAULTS


def job_count(session_factory) -> int:
    with session_factory() as session:
        return session.scalar(select(func.count()).select_from(Job))


# --------------------------------------------------------------------------- POST /jobs


def test_post_job_applies_the_seed_defaults_and_enqueues_it(client, training_queue):
    response = client.post("/jobs", json={"net": "net1"})
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/jobs/{job['id']}"
    assert job["status"] == "queued"
    assert job["net"] == "net1"
    assert job["parameters"] == shown_defaults()
    assert job["progress"] == {"epoch": 0, "epochs": 20}
    assert job["attempts"] == 0 and job["cancel_requested"] is False
    assert job["evaluation"] is None and job["model_version"] is None
    assert job["started_at"] is None and job["finished_at"] is None
    # The broker has the message (by task name, id only) and the job knows it was sent.
    assert training_queue.messages() == [(TRAIN_TASK, [job["id"]])]
    assert job["enqueued_at"] is not None

    fetched = client.get(response.headers["location"])
    assert fetched.status_code == 200
    assert fetched.json() == job


def test_post_job_keeps_every_given_parameter(client):
    body = {
        "net": "net2",
        "epochs": 3,
        "batch_size": 64,
        "validation_split": 0.0,
        "optimizer": "rmsprop",
        "learning_rate": 0.01,
        "seed": 7,
        "train_limit": 500,
        "model_name": "net2-small.v1",
        "precision": "mixed_bfloat16",
    }
    job = client.post("/jobs", json=body).json()
    assert job["net"] == "net2"
    assert job["parameters"] == shown_defaults() | {k: v for k, v in body.items() if k != "net"}
    assert job["progress"] == {"epoch": 0, "epochs": 3}


def test_job_stays_queued_when_the_broker_is_down(clean_db, settings, session_factory, client_for):
    # Nothing listens on port 1: the broker refuses like a stopped Redis.
    down = settings.model_copy(update={"CELERY_BROKER_URL": "redis://127.0.0.1:1/0"})
    with client_for(down) as client:
        started = time.monotonic()
        response = client.post("/jobs", json={"net": "net1", "epochs": 2})
        elapsed = time.monotonic() - started
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["status"] == "queued"
    assert job["enqueued_at"] is None  # the sweep re-sends jobs like this one
    assert elapsed < 10
    with session_factory() as session:
        assert session.get(Job, uuid.UUID(job["id"])).enqueued_at is None


def test_idempotency_key_returns_the_same_job(client, session_factory, training_queue):
    headers = {"Idempotency-Key": "retry-me-1"}
    first = client.post("/jobs", json={"net": "net1", "epochs": 2}, headers=headers)
    second = client.post("/jobs", json={"net": "net1", "epochs": 2}, headers=headers)
    assert first.status_code == second.status_code == 202
    assert second.json()["id"] == first.json()["id"]
    assert second.headers["location"] == first.headers["location"]
    assert second.headers.get("idempotent-replayed") == "true"
    assert job_count(session_factory) == 1
    assert len(training_queue.messages()) == 1  # enqueued once, not per retry
    # Without a key, or with another key, a POST is a new job.
    client.post("/jobs", json={"net": "net1", "epochs": 2})
    client.post("/jobs", json={"net": "net1", "epochs": 2}, headers={"Idempotency-Key": "k2"})
    assert job_count(session_factory) == 3


def test_idempotency_key_reused_with_other_parameters_is_409(client, session_factory, expect_error):
    headers = {"Idempotency-Key": "retry-me-2"}
    assert client.post("/jobs", json={"net": "net1"}, headers=headers).status_code == 202
    error = expect_error(
        client.post("/jobs", json={"net": "net1", "epochs": 5}, headers=headers),
        409,
        "idempotency_key_reused",
    )
    assert "epochs" in error["message"]
    assert job_count(session_factory) == 1


def test_concurrent_posts_with_one_key_create_one_job(client, session_factory, race_a_held_row):
    """The second INSERT waits on the first's uncommitted row, fails, and re-reads it."""
    key = "racing-key"
    holder = session_factory()
    owner = authenticate(holder, client.admin_key).id  # keys are scoped to their caller
    holder.commit()
    winner = Job(
        id=uuid.uuid4(), idempotency_key=key, status="queued", current_epoch=0, attempts=0,
        cancel_requested=False, created_at=datetime.now(UTC), net="net1", owner_id=owner,
        **SEED_DEFAULTS,
    )  # fmt: skip
    holder.add(winner)
    holder.flush()  # the row exists, uncommitted: a concurrent INSERT must wait for it

    def post() -> Any:
        return client.post("/jobs", json={"net": "net1"}, headers={"Idempotency-Key": key})

    response = race_a_held_row(holder, post, "the API's INSERT")
    assert response.status_code == 202, response.text
    assert response.json()["id"] == str(winner.id)
    assert job_count(session_factory) == 1


def test_submit_job_creates_sends_and_marks_in_one_call(
    clean_db, settings, session_factory, training_queue
):
    """The service owns the whole submission; a replay sends nothing again."""
    body = JobCreate(net="net1", epochs=2)
    with session_factory() as session:
        job, created = submit_job(session, body, "once", principal=AUTH_OFF, settings=settings)
        assert created and job.enqueued_at is not None and job.owner_id is None
        again, created = submit_job(session, body, "once", principal=AUTH_OFF, settings=settings)
        assert not created and again.id == job.id
    assert training_queue.messages() == [(TRAIN_TASK, [str(job.id)])]


def test_create_job_cannot_skip_its_checks(clean_db, settings, session_factory):
    """principal and settings are required: no caller can skip the size, quota and
    ownership checks by leaving them out, and AUTH=off (AUTH_OFF) still gets the size bound."""
    for function in (create_job, submit_job):
        parameters = inspect.signature(function).parameters
        assert parameters["principal"].default is inspect.Parameter.empty
        assert parameters["settings"].default is inspect.Parameter.empty
    small = settings.model_copy(update={"JOB_MAX_EPOCHS": 1})
    with session_factory() as session, pytest.raises(JobTooLarge):
        create_job(
            session, JobCreate(net="net1", epochs=2), None, principal=AUTH_OFF, settings=small
        )
    assert job_count(session_factory) == 0


BAD_BODIES = [
    ({"net": "net1", "epochs": 0}, "epochs", "1 to 1000"),
    ({"net": "net1", "epochs": 1001}, "epochs", "1 to 1000"),
    ({"net": "net1", "batch_size": 0}, "batch_size", "1 to 8192"),
    ({"net": "net1", "validation_split": 1.5}, "validation_split", "0 (inclusive) to 1"),
    ({"net": "net1", "validation_split": -0.1}, "validation_split", "0 (inclusive) to 1"),
    ({"net": "net1", "learning_rate": 0}, "learning_rate", "greater than 0"),
    ({"net": "net1", "train_limit": 5}, "train_limit", "10 to"),
    ({"net": "net1", "epochs": "many"}, "epochs", "1 to 1000"),
    # JSON types are strict: true is not 1, "3" is not 3, 1 is not true (schemathesis ST201).
    ({"net": "net1", "batch_size": True}, "batch_size", "1 to 8192"),
    ({"net": "net1", "epochs": "3"}, "epochs", "1 to 1000"),
    ({"net": "net1", "augment_flip": 1}, "augment_flip", "boolean"),
    ({"net": "net1", "learning_rate": True}, "learning_rate", "greater than 0"),
    ({"net": "zzz_net"}, "net", "net1, net2, net3"),
    (
        {"net": "net1", "optimizer": "zzz_adagrad"},
        "optimizer",
        "'adam', 'sgd', 'rmsprop' or 'adamw'",
    ),
    ({"net": "net1", "precision": "zzz_half"}, "precision", "mixed_bfloat16"),
    ({"net": "net1", "model_name": "zzz bad/name"}, "model_name", "A-Z"),
    ({"net": "net1", "zzz_extra": 1}, "zzz_extra", "not permitted"),
    ({"epochs": 3}, "net", "required"),
]


@pytest.mark.parametrize(("body", "field", "expected"), BAD_BODIES)
def test_bad_job_parameters_are_422_naming_field_and_range(
    client, session_factory, expect_error, body, field, expected
):
    response = client.post("/jobs", json=body)
    error = expect_error(response, 422, "validation_error")
    assert error["message"].startswith(f"{field}:"), error["message"]
    assert expected in error["message"]
    assert [entry["field"] for entry in error["details"]["fields"]] == [field]
    # The payload is not echoed back (the bad value itself appears nowhere).
    for value in body.values():
        if isinstance(value, str) and value.startswith("zzz"):
            assert value not in response.text
    assert job_count(session_factory) == 0


def test_non_json_body_is_422(client, expect_error):
    response = client.post(
        "/jobs", content=b'{"net": "net1",', headers={"Content-Type": "application/json"}
    )
    expect_error(response, 422, "validation_error")
    assert "JSON" in response.json()["error"]["message"]


def test_json_body_that_is_not_an_object_is_422(client, expect_error):
    expect_error(client.post("/jobs", json=["net1"]), 422, "validation_error")


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]
)
def test_wrong_content_type_is_415(client, session_factory, expect_error, content_type):
    response = client.post(
        "/jobs", content=b'{"net": "net1"}', headers={"Content-Type": content_type}
    )
    error = expect_error(response, 415, "unsupported_media_type")
    assert "application/json" in error["message"]
    assert job_count(session_factory) == 0


def test_empty_body_is_422(client, expect_error):
    expect_error(client.post("/jobs"), 422, "validation_error")


def test_overlong_idempotency_key_is_422(client, expect_error):
    response = client.post("/jobs", json={"net": "net1"}, headers={"Idempotency-Key": "k" * 256})
    error = expect_error(response, 422, "validation_error")
    assert "Idempotency-Key" in error["message"]


# --------------------------------------------------------------------------- GET /jobs


def test_list_jobs_newest_first_with_filters_and_pages(client, make_job):
    now = datetime.now(UTC)
    made = [
        make_job("queued", net="net1", created_at=now - timedelta(minutes=10)),
        make_job("running", net="net2", created_at=now - timedelta(minutes=8)),
        make_job("succeeded", net="net1", created_at=now - timedelta(minutes=6)),
        make_job("failed", net="net3", error="boom", created_at=now - timedelta(minutes=4)),
        make_job("cancelled", net="net1", created_at=now - timedelta(minutes=2)),
    ]
    newest_first = [str(job.id) for job in reversed(made)]

    page = client.get("/jobs").json()
    assert page["total"] == 5 and page["limit"] == 50 and page["offset"] == 0
    assert [job["id"] for job in page["jobs"]] == newest_first

    page = client.get("/jobs", params={"limit": 2, "offset": 1}).json()
    assert page["total"] == 5 and page["limit"] == 2 and page["offset"] == 1
    assert [job["id"] for job in page["jobs"]] == newest_first[1:3]

    page = client.get("/jobs", params={"net": "net1"}).json()
    assert page["total"] == 3
    assert {job["net"] for job in page["jobs"]} == {"net1"}

    page = client.get("/jobs", params={"status": "failed"}).json()
    assert [job["id"] for job in page["jobs"]] == [str(made[3].id)]
    assert page["jobs"][0]["error"] == "boom"

    page = client.get("/jobs", params={"status": "succeeded", "net": "net2"}).json()
    assert page == {"jobs": [], "total": 0, "limit": 50, "offset": 0}

    assert client.get("/jobs", params={"offset": 100}).json()["total"] == 5


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 201}, "limit"),
        ({"offset": -1}, "offset"),
        ({"status": "zzz_done"}, "status"),
    ],
)
def test_bad_list_parameters_are_422(client, expect_error, params, field):
    response = client.get("/jobs", params=params)
    error = expect_error(response, 422, "validation_error")
    assert error["message"].startswith(f"{field}:")
    assert "zzz" not in response.text


def test_limit_200_is_allowed(client):
    assert client.get("/jobs", params={"limit": 200}).status_code == 200


# --------------------------------------------------------------------------- GET /jobs/{id}


def test_get_running_job_shows_progress_worker_and_device(client, make_job):
    job = make_job("running", epochs=10, current_epoch=4, cancel_requested=False)
    body = client.get(f"/jobs/{job.id}").json()
    assert body["status"] == "running"
    assert body["progress"] == {"epoch": 4, "epochs": 10}
    assert body["worker"] == "test-worker" and body["device"] == "CPU"
    assert body["attempts"] == 1
    assert body["started_at"] is not None and body["heartbeat_at"] is not None
    assert body["finished_at"] is None
    # Timestamps carry their zone so clients can compare them.
    assert datetime.fromisoformat(body["created_at"]).tzinfo is not None


def _evaluation(job_id: uuid.UUID, **values: Any) -> Evaluation:
    """An evaluation row: a correct first image and uniform numbers unless `values` say else."""
    first_image = {"probabilities": [0.1] * 10, "predicted_class": 3, "true_class": 3}
    defaults: dict[str, Any] = {
        "first_image": {**first_image, "match": True},
        "per_class_accuracy": [0.5] * 10,
        "confusion_matrix": [[1] * 10 for _ in range(10)],
    }
    return Evaluation(job_id=job_id, **{**defaults, **values})


def test_get_succeeded_job_shows_evaluation_and_model_version(
    client, make_job, register_model, session_factory
):
    job = make_job("succeeded", model_name="champion")
    version = register_model(name="champion", job_id=job.id)
    with session_factory() as session:
        session.add(_evaluation(job.id, test_loss=1.25, test_accuracy=0.55))
        session.get(Job, job.id).model_version_id = version.id
        session.commit()
    body = client.get(f"/jobs/{job.id}").json()
    assert body["status"] == "succeeded"
    assert body["progress"] == {"epoch": 3, "epochs": 3}
    assert body["evaluation"] == {"test_loss": 1.25, "test_accuracy": 0.55}
    assert body["model_version"] == {"name": "champion", "version": 1}
    assert body["finished_at"] is not None


def test_bad_job_id_is_422_and_unknown_job_is_404(client, expect_error):
    for path in ("/jobs/not-a-uuid", "/jobs/123/history", "/jobs/x/cancel"):
        method = client.post if path.endswith("cancel") else client.get
        error = expect_error(method(path), 422, "validation_error")
        assert error["message"].startswith("job_id:")
    missing = uuid.uuid4()
    for path in ("", "/history", "/history.png", "/evaluation"):
        error = expect_error(client.get(f"/jobs/{missing}{path}"), 404, "job_not_found")
        assert str(missing) in error["message"]
    expect_error(client.post(f"/jobs/{missing}/cancel"), 404, "job_not_found")


# --------------------------------------------------------------------------- history


def test_history_of_a_running_job_holds_its_finished_epochs(client, make_job, add_epochs):
    job = make_job("running", epochs=5, current_epoch=3)
    rows = add_epochs(job.id, 3)
    body = client.get(f"/jobs/{job.id}/history").json()
    assert set(body) == {"job_id", "status", "epochs", "history", "analysis"}
    assert body["job_id"] == str(job.id) and body["status"] == "running"
    assert body["epochs"] == [row | {"learning_rate": None, "val_ce_loss": None} for row in rows]
    assert body["history"] == {
        key: [row.get(key) for row in rows]
        for key in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "val_ce_loss")
    }
    analysis = body["analysis"]
    # Validation loss is lowest at epoch 2 and ends 0.1 above it (beyond 5% of 1.5) while
    # training loss keeps falling: overfitting, with the numbers the verdict rests on.
    assert analysis["best_epoch"] == 2
    assert analysis["overfitting_after_epoch"] == 2
    assert analysis["final_gap"] == pytest.approx(0.6 - 0.45)
    assert analysis["max_gap"] == pytest.approx(0.6 - 0.45)
    verdict = analysis["verdict"]
    assert verdict["kind"] == "overfitting"
    assert verdict["best_epoch"] == 2 and verdict["epochs"] == 3
    assert verdict["val_loss_rise"] == pytest.approx(0.1)
    assert verdict["tolerance"] == pytest.approx(0.075)
    assert verdict["train_at_or_below_val"] == 1
    assert "beyond the tolerance of 0.075" in verdict["reason"]


def test_history_returns_the_plain_cross_entropy_and_an_under_fitting_verdict(
    client, make_job, session_factory
):
    """NET III's shape: training accuracy at or below validation in most epochs, a small
    late rise of val_loss; val_ce_loss (no L2, no smoothing) comes back beside val_loss."""
    from app.models import EpochMetric

    job = make_job("succeeded", net="net3", epochs=4)
    acc, val_acc = [0.30, 0.45, 0.52, 0.58], [0.40, 0.50, 0.56, 0.57]
    val_loss = [1.50, 1.30, 1.20, 1.23]
    with session_factory() as session:
        session.add_all(
            EpochMetric(job_id=job.id, epoch=i + 1, loss=2.0 - 0.2 * i, accuracy=acc[i],
                        val_loss=val_loss[i], val_accuracy=val_acc[i], seconds=1.0,
                        val_ce_loss=val_loss[i] - 0.3)
            for i in range(4)
        )  # fmt: skip
        session.commit()
    body = client.get(f"/jobs/{job.id}/history").json()
    assert body["history"]["val_ce_loss"] == pytest.approx([1.2, 1.0, 0.9, 0.93])
    assert [e["val_ce_loss"] for e in body["epochs"]] == pytest.approx([1.2, 1.0, 0.9, 0.93])
    analysis = body["analysis"]
    assert analysis["verdict"]["kind"] == "underfitting"
    assert analysis["verdict"]["train_at_or_below_val"] == 3
    assert "within the tolerance of 0.060" in analysis["verdict"]["reason"]
    assert analysis["overfitting_after_epoch"] is None


def test_history_without_epochs_is_empty(client, make_job):
    job = make_job("queued")
    body = client.get(f"/jobs/{job.id}/history").json()
    assert body["epochs"] == []
    assert body["history"] == {
        "loss": [],
        "accuracy": [],
        "val_loss": [],
        "val_accuracy": [],
        "learning_rate": [],
        "val_ce_loss": [],
    }
    assert body["analysis"]["best_epoch"] is None
    assert body["analysis"]["verdict"] is None


def test_history_png_is_an_image_once_epochs_exist(client, make_job, add_epochs, expect_error):
    job = make_job("running", epochs=4)
    error = expect_error(client.get(f"/jobs/{job.id}/history.png"), 404, "no_history")
    assert str(job.id) in error["message"]
    add_epochs(job.id, 2)
    response = client.get(f"/jobs/{job.id}/history.png")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert response.headers["cache-control"] == "no-store"
    image = Image.open(io.BytesIO(response.content))
    assert image.format == "PNG" and image.width > image.height > 100


# --------------------------------------------------------------------------- evaluation


def test_evaluation_is_404_until_written(client, make_job, session_factory, expect_error):
    job = make_job("running")
    expect_error(client.get(f"/jobs/{job.id}/evaluation"), 404, "no_evaluation")
    matrix = [[10 if i == j else 0 for j in range(10)] for i in range(10)]
    first_image = {"probabilities": [0.05] * 9 + [0.55], "predicted_class": 9, "true_class": 3}
    with session_factory() as session:
        session.add(
            _evaluation(
                job.id,
                test_loss=0.9,
                test_accuracy=0.7,
                first_image={**first_image, "match": False},
                per_class_accuracy=[float(i) / 10 for i in range(10)],
                confusion_matrix=matrix,
            )
        )
        session.commit()
    body = client.get(f"/jobs/{job.id}/evaluation").json()
    assert body["job_id"] == str(job.id)
    assert body["test_loss"] == 0.9 and body["test_accuracy"] == 0.7
    assert body["first_image"]["predicted_class"] == 9
    assert body["first_image"]["match"] is False
    assert len(body["first_image"]["probabilities"]) == 10
    assert body["per_class_accuracy"][3] == 0.3
    assert body["confusion_matrix"] == matrix
    assert body["classes"] == list(CLASS_NAMES)


def test_every_net_can_be_submitted(client):
    for name in NETS:
        response = client.post("/jobs", json={"net": name, "epochs": 1})
        assert response.status_code == 202
        assert response.json()["parameters"]["model_name"] == name
