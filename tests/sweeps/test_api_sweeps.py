"""POST/GET /sweeps, cancel, the PNG, and the service's advance, over HTTP on PostgreSQL.

No worker runs here: a trial's job is ended by writing its row and epochs (`end_job`), as
a worker would, and then the sweep is advanced as the workers' loop does.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import select, update

from app.models import EpochMetric, Evaluation, Job, Sweep, SweepTrial
from app.sweeps import service

LR = {"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}}


def search_body(**fields: Any) -> dict[str, Any]:
    return {
        "base": {"net": "net1", "epochs": 3, "train_limit": 200, "batch_size": 32},
        "space": LR,
        "sampler": "random",
        "max_trials": 4,
        "parallelism": 2,
        "seed": 1,
        **fields,
    }


@pytest.fixture
def end_job(session_factory) -> Callable[..., None]:
    """end_job(job_id, status, [val_accuracy per epoch], test_accuracy=None): the job ends as
    a worker would leave it (epochs stored, evaluation when it succeeded)."""

    def end(
        job_id: Any, status: str, vals: list[float], test_accuracy: float | None = None
    ) -> None:
        now = datetime.now(UTC)
        with session_factory() as session:
            for epoch, val in enumerate(vals, start=1):
                session.add(
                    EpochMetric(job_id=job_id, epoch=epoch, loss=1.0, accuracy=0.5, val_loss=2.0 - val,
                                val_accuracy=val, seconds=1.0, images_per_second=100.0, created_at=now)
                )  # fmt: skip
            session.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(status=status, current_epoch=len(vals), finished_at=now, started_at=now,
                        error="boom" if status == "failed" else None)
            )  # fmt: skip
            if status == "succeeded":
                session.add(
                    Evaluation(job_id=job_id, test_loss=1.0, test_accuracy=test_accuracy or 0.5,
                               first_image={}, per_class_accuracy=[], confusion_matrix=[], created_at=now)
                )  # fmt: skip
            session.commit()

    return end


def advance(session_factory, settings, sweep_id) -> service.AdvanceReport:
    with session_factory() as session:
        return service.advance(session, settings, uuid.UUID(str(sweep_id)), send=lambda _: True)


def test_a_search_queues_its_first_trials_as_ordinary_jobs_of_the_key(
    client, training_queue, session_factory
):
    response = client.post("/sweeps", json=search_body())
    assert response.status_code == 201, response.text
    sweep = response.json()
    assert response.headers["Location"] == f"/sweeps/{sweep['id']}"
    assert sweep["status"] == "running" and sweep["kind"] == "search"
    assert sweep["objective"] == {"metric": "val_accuracy", "direction": "maximize"}
    assert [t["number"] for t in sweep["trials"]] == [0, 1]  # parallelism 2
    assert {t["state"] for t in sweep["trials"]} == {"running"}
    for trial in sweep["trials"]:
        job = client.get(f"/jobs/{trial['job_id']}").json()
        assert job["status"] == "queued"
        assert job["parameters"]["learning_rate"] == trial["params"]["learning_rate"]
        assert job["parameters"]["train_limit"] == 200 and job["parameters"]["epochs"] == 3
    queued = {args[0] for _, args in training_queue.messages()}
    assert queued == {t["job_id"] for t in sweep["trials"]}
    with session_factory() as session:
        keys = session.scalars(select(Job.idempotency_key).order_by(Job.created_at)).all()
        owners = set(session.scalars(select(Job.owner_id)).all())
    assert keys == [f"sweep:{sweep['id']}:0", f"sweep:{sweep['id']}:1"]
    assert len(owners) == 1 and None not in owners  # the admin key that posted it


def test_advance_tells_finished_trials_asks_more_and_chooses_by_validation(
    client, session_factory, settings, end_job
):
    sweep = client.post("/sweeps", json=search_body()).json()
    sweep_id = sweep["id"]
    first, second = (t["job_id"] for t in sweep["trials"])
    # Trial 0 validates best but tests worst: the choice must follow validation.
    end_job(first, "succeeded", [0.30, 0.45, 0.60], test_accuracy=0.10)
    end_job(second, "failed", [0.2])
    report = advance(session_factory, settings, sweep_id)
    assert report.told == [0, 1] and report.asked == [2, 3]
    body = client.get(f"/sweeps/{sweep_id}").json()
    trial0, trial1 = body["trials"][:2]
    assert trial0["state"] == "complete" and trial0["value"] == pytest.approx(0.60)
    assert trial0["value_epoch"] == 3 and [
        p["val_accuracy"] for p in trial0["curve"]
    ] == pytest.approx([0.3, 0.45, 0.6])
    assert trial1["state"] == "fail" and "boom" in trial1["error"]
    third, fourth = (t["job_id"] for t in body["trials"][2:])
    end_job(third, "succeeded", [0.2, 0.3, 0.4], test_accuracy=0.90)
    end_job(fourth, "succeeded", [0.5, 0.55, 0.58], test_accuracy=0.80)
    report = advance(session_factory, settings, sweep_id)
    assert report.told == [2, 3] and report.asked == [] and report.finished
    body = client.get(f"/sweeps/{sweep_id}").json()
    assert body["status"] == "finished" and body["finished_at"]
    assert body["counts"] == {"running": 0, "complete": 3, "pruned": 0, "fail": 1}
    assert body["best_trial"]["number"] == 0 and body["best_trial"][
        "test_accuracy"
    ] == pytest.approx(0.10)
    assert set(body["importances"]) == {"learning_rate"} and body["importances_note"] is None
    # A finished sweep asks nothing more.
    assert advance(session_factory, settings, sweep_id).asked == []
    listing = client.get("/sweeps").json()
    assert listing["total"] == 1 and listing["sweeps"][0]["best_value"] == pytest.approx(0.60)
    assert listing["sweeps"][0]["best_trial"] == 0


def test_a_pruned_trial_ends_pruned_with_its_epoch_and_value(
    client, session_factory, settings, end_job
):
    sweep = client.post("/sweeps", json=search_body(pruner={"type": "asha"})).json()
    job_id = sweep["trials"][0]["job_id"]
    with session_factory() as session:
        session.execute(
            update(SweepTrial).where(SweepTrial.job_id == uuid.UUID(job_id)).values(pruned_epoch=1)
        )
        session.commit()
    end_job(job_id, "cancelled", [0.25])
    advance(session_factory, settings, sweep["id"])
    trial = client.get(f"/sweeps/{sweep['id']}").json()["trials"][0]
    assert trial["state"] == "pruned" and trial["pruned_epoch"] == 1
    assert trial["value"] == pytest.approx(0.25) and trial["value_epoch"] == 1


def test_cancel_cancels_the_trials_and_a_second_cancel_is_409(
    client, session_factory, expect_error
):
    sweep = client.post("/sweeps", json=search_body()).json()
    response = client.post(f"/sweeps/{sweep['id']}/cancel")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "cancelled"
    for trial in body["trials"]:
        assert client.get(f"/jobs/{trial['job_id']}").json()["status"] == "cancelled"
        assert trial["state"] == "fail" and trial["error"] == "the trial's job was cancelled"
    expect_error(client.post(f"/sweeps/{sweep['id']}/cancel"), 409, "sweep_terminal")


def test_concurrent_advancers_never_ask_a_number_twice_nor_run_past_parallelism(
    client, session_factory, settings, end_job
):
    sweep = client.post("/sweeps", json=search_body(max_trials=8, parallelism=3)).json()
    for trial in sweep["trials"]:
        end_job(trial["job_id"], "succeeded", [0.3, 0.4, 0.5])
    errors: list[BaseException] = []

    def run() -> None:
        try:
            advance(session_factory, settings, sweep["id"])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    with session_factory() as session:
        trials = session.scalars(select(SweepTrial).order_by(SweepTrial.number)).all()
        jobs = session.scalars(select(Job.id)).all()
    assert [t.number for t in trials] == list(range(6))
    assert sum(t.state == "running" for t in trials) == 3
    assert len(jobs) == 6 and len({t.job_id for t in trials}) == 6


def test_an_advancer_that_died_after_creating_a_job_leaves_it_to_be_adopted(
    client, session_factory, settings
):
    sweep = client.post("/sweeps", json=search_body(parallelism=1)).json()
    with session_factory() as session:  # the trial row is lost; the job stays
        trial = session.scalars(select(SweepTrial)).one()
        job_id = trial.job_id
        session.delete(trial)
        session.commit()
    report = advance(session_factory, settings, sweep["id"])
    assert report.asked == [0]
    with session_factory() as session:
        assert session.scalars(select(SweepTrial.job_id)).all() == [job_id]
        assert len(session.scalars(select(Job.id)).all()) == 1


def test_a_search_whose_first_trials_all_fail_stops(client, session_factory, settings, end_job):
    sweep = client.post("/sweeps", json=search_body(max_trials=10, parallelism=3)).json()
    for trial in sweep["trials"]:
        end_job(trial["job_id"], "failed", [])
    advance(session_factory, settings, sweep["id"])
    body = client.get(f"/sweeps/{sweep['id']}").json()
    assert body["status"] == "finished" and "the first 3 trials failed" in body["error"]
    assert len(body["trials"]) == 3


def test_the_png_draws_history_and_parameters_once_a_trial_has_a_value(
    client, end_job, expect_error, session_factory, settings
):
    sweep = client.post("/sweeps", json=search_body()).json()
    expect_error(client.get(f"/sweeps/{sweep['id']}.png"), 409, "no_finished_trials")
    end_job(sweep["trials"][0]["job_id"], "succeeded", [0.3, 0.4, 0.5])
    # Reading changes nothing: the trial has a value once an advancer told it.
    expect_error(client.get(f"/sweeps/{sweep['id']}.png"), 409, "no_finished_trials")
    advance(session_factory, settings, sweep["id"])
    png = client.get(f"/sweeps/{sweep['id']}.png")
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG\r\n\x1a\n")
    assert png.headers["cache-control"] == "no-store"


def test_an_ablation_runs_its_plan_and_the_report_finds_its_jobs(
    client, session_factory, settings, end_job
):
    response = client.post(
        "/sweeps", json={"kind": "ablation", "epochs": 2, "train_limit": 100, "parallelism": 2}
    )
    assert response.status_code == 201, response.text
    sweep = response.json()
    assert sweep["kind"] == "ablation" and sweep["max_trials"] == len(sweep["plan"]) == 14
    assert [t["role"] for t in sweep["trials"]] == ["baseline", "target"]
    assert sweep["trials"][1]["levers"] == [
        "architecture",
        "augmentation",
        "label_smoothing",
        "adamw",
        "schedule",
        "training_share",
    ]
    assert sweep["importances"] == {} and "fixed plan" in sweep["importances_note"]
    with session_factory() as session:
        found = service.ablation_jobs(session, uuid.UUID(sweep["id"]))
    assert [(role, levers) for role, levers, _ in found] == [
        ("baseline", ()),
        ("target", tuple(sweep["trials"][1]["levers"])),
    ]
    baseline_job = found[0].job
    assert (
        baseline_job.net,
        baseline_job.epochs,
        baseline_job.train_limit,
        baseline_job.batch_size,
    ) == ("net3", 2, 100, 128)
    assert found[1].job.net == "net4" and found[1].job.label_smoothing == 0.2
    end_job(str(baseline_job.id), "succeeded", [0.3, 0.35])
    advance(session_factory, settings, sweep["id"])
    roles = [t["role"] for t in client.get(f"/sweeps/{sweep['id']}").json()["trials"]]
    assert roles == ["baseline", "target", "baseline+augmentation"]


def test_bad_requests_are_clear_4xx(client, expect_error, api_key, settings, client_for):
    expect_error(client.get(f"/sweeps/{uuid.uuid4()}"), 404, "sweep_not_found")
    expect_error(client.post(f"/sweeps/{uuid.uuid4()}/cancel"), 404, "sweep_not_found")
    error = expect_error(
        client.post(
            "/sweeps", json=search_body(space={"dropout": {"type": "float", "low": 0, "high": 1}})
        ),
        422,
        "validation_error",
    )
    assert "'dropout' is not a training option" in error["message"]
    error = expect_error(
        client.post("/sweeps", json=search_body(max_trials=101)), 422, "sweep_too_large"
    )
    assert "SWEEP_MAX_TRIALS" in error["message"]
    expect_error(client.post("/sweeps", json=search_body(parallelism=5)), 422, "sweep_too_large")
    expect_error(
        client.post("/sweeps", json=search_body(base={"net": "net1", "epochs": 500})),
        422,
        "job_too_large",
    )
    # The base is a job as documented (JobCreate's bounds) even where the space overrides
    # the field: schemathesis found a base batch_size over JOB_MAX_BATCH_SIZE accepted.
    over = settings.JOB_MAX_BATCH_SIZE + 1
    batch_space = {"batch_size": {"type": "choice", "choices": [32, 64]}}
    error = expect_error(
        client.post(
            "/sweeps",
            json=search_body(base={"net": "net1", "batch_size": over}, space=batch_space),
        ),
        422,
        "job_too_large",
    )
    assert "JOB_MAX_BATCH_SIZE" in error["message"]
    # Integers are integers, as the schema says (schemathesis: "1" and true were accepted).
    for seed in ("1", True):
        expect_error(client.post("/sweeps", json=search_body(seed=seed)), 422, "validation_error")
        ablation = {"kind": "ablation", "epochs": 1, "seed": seed}
        expect_error(client.post("/sweeps", json=ablation), 422, "validation_error")
    expect_error(client.post("/sweeps", content=b"kind=search"), 415, "unsupported_media_type")
    expect_error(
        client.post("/sweeps", json=search_body(), headers={"Authorization": ""}),
        401,
        "unauthorized",
    )
    reader = {"Authorization": f"Bearer {api_key('read')}"}
    expect_error(client.post("/sweeps", json=search_body(), headers=reader), 403, "forbidden")
    # A train key sees and cancels only its own sweeps.
    sweep = client.post("/sweeps", json=search_body()).json()
    trainer = {"Authorization": f"Bearer {api_key('train')}"}
    expect_error(client.get(f"/sweeps/{sweep['id']}", headers=trainer), 403, "forbidden")
    expect_error(client.post(f"/sweeps/{sweep['id']}/cancel", headers=trainer), 403, "forbidden")
    assert client.get("/sweeps", headers=trainer).json()["total"] == 0
    # Sweeps per key.
    with client_for(
        settings.model_copy(update={"MAX_ACTIVE_SWEEPS_PER_KEY": 1}), scopes="train"
    ) as limited:
        assert (
            limited.post(
                "/sweeps", json=search_body(base={"net": "net1", "epochs": 3, "model_name": "mine"})
            ).status_code
            == 201
        )
        expect_error(
            limited.post(
                "/sweeps", json=search_body(base={"net": "net1", "epochs": 3, "model_name": "mine"})
            ),
            429,
            "quota_exceeded",
        )
        # The model name of another key.
        expect_error(limited.post("/sweeps", json=search_body()), 403, "forbidden")


def test_the_sweep_survives_the_api_that_made_it(client, client_for, settings, session_factory):
    sweep = client.post("/sweeps", json=search_body()).json()
    with client_for(settings) as other:  # a second API process (a restart) reads the same state
        body = other.get(f"/sweeps/{sweep['id']}").json()
    assert [t["job_id"] for t in body["trials"]] == [t["job_id"] for t in sweep["trials"]]
    with session_factory() as session:
        assert session.get(Sweep, uuid.UUID(sweep["id"])).status == "running"
