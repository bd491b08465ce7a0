"""The issue-11 levers as job options: validated, stored, shown, and in the history."""

from __future__ import annotations

import pytest

from app.models import EpochMetric

RECIPE = {
    "net": "net4",
    "epochs": 12,
    "batch_size": 256,
    "optimizer": "adamw",
    "learning_rate": 0.002,
    "augment_crop": 4,
    "augment_flip": True,
    "cutout": 8,
    "label_smoothing": 0.1,
    "weight_decay": 0.05,
    "clipnorm": 2.0,
    "lr_schedule": "one_cycle",
    "warmup_epochs": 3,
    "early_stopping_patience": 5,
}


def test_levers_are_stored_and_shown_in_the_parameters(client, training_queue):
    response = client.post("/jobs", json=RECIPE)
    assert response.status_code == 202, response.text
    parameters = response.json()["parameters"]
    for name, value in RECIPE.items():
        if name != "net":
            assert parameters[name] == value, name
    again = client.get(f"/jobs/{response.json()['id']}").json()
    assert again["parameters"] == parameters


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"augment_crop": 17}, "augment_crop"),
        ({"cutout": -1}, "cutout"),
        ({"label_smoothing": 1}, "label_smoothing"),
        ({"lr_schedule": "step"}, "lr_schedule"),
        ({"early_stopping_patience": 0}, "early_stopping_patience"),
        ({"clipnorm": 0}, "clipnorm"),
    ],
)
def test_out_of_range_levers_are_422_naming_the_field(client, bad, field):
    response = client.post("/jobs", json={"net": "net1", **bad})
    assert response.status_code == 422, response.text
    assert field in response.text


def test_levers_that_do_not_fit_together_are_422_with_the_reason(client):
    response = client.post("/jobs", json={"net": "net1", "weight_decay": 0.01})
    assert response.status_code == 422
    assert "adamw" in response.text
    response = client.post("/jobs", json={"net": "net1", "epochs": 3, "warmup_epochs": 3})
    assert response.status_code == 422 and "warmup_epochs" in response.text


def test_idempotency_compares_the_levers_too(client, training_queue):
    headers = {"Idempotency-Key": "levers-1"}
    first = client.post("/jobs", json={"net": "net1", "augment_flip": True}, headers=headers)
    assert first.status_code == 202
    again = client.post("/jobs", json={"net": "net1", "augment_flip": True}, headers=headers)
    assert again.json()["id"] == first.json()["id"]
    other = client.post("/jobs", json={"net": "net1"}, headers=headers)
    assert other.status_code == 409 and "augment_flip" in other.text


def test_history_has_the_learning_rate_and_the_restored_epoch(client, make_job, session_factory):
    job = make_job("succeeded", epochs=6, early_stopping_patience=2)
    val_losses = [1.0, 0.8, 0.7, 0.75, 0.9]  # best epoch 3, stopped after 2 worse epochs
    with session_factory() as session:
        session.add_all(
            EpochMetric(
                job_id=job.id,
                epoch=i + 1,
                loss=1.0 / (i + 1),
                accuracy=0.5,
                val_loss=v,
                val_accuracy=0.4,
                seconds=1.0,
                learning_rate=0.001 * (5 - i) / 5,
            )
            for i, v in enumerate(val_losses)
        )
        session.commit()
    history = client.get(f"/jobs/{job.id}/history").json()
    assert [e["learning_rate"] for e in history["epochs"]] == pytest.approx(
        [0.001, 0.0008, 0.0006, 0.0004, 0.0002]
    )
    assert history["history"]["learning_rate"] == [e["learning_rate"] for e in history["epochs"]]
    assert history["analysis"]["restored_epoch"] == 3
    assert history["analysis"]["stopped_early"] is True
