"""NET V's recipe as job options (issue 21): stored, shown, refused when it does not fit,
and the evaluation's test-time augmentation shown beside the plain accuracy."""

from __future__ import annotations

import pytest

from tests.api.test_api_jobs import _evaluation

RECIPE = {
    "net": "net5",
    "epochs": 10,
    "batch_size": 1024,
    "validation_split": 0.0,
    "optimizer": "sgd",
    "learning_rate": 1.5,
    "momentum": 0.85,
    "nesterov": True,
    "weight_decay": 0.00133,
    "bias_lr_scale": 64.0,
    "lr_schedule": "triangular",
    "lookahead_steps": 5,
    "label_smoothing": 0.2,
    "whiten": True,
    "whiten_bias_epochs": 3,
    "augment_flip": True,
    "augment_flip_mode": "alternating",
    "augment_translate": 2,
    "tta": "flip_translate",
}


def test_the_recipe_is_stored_and_shown_in_the_parameters(client, training_queue):
    response = client.post("/jobs", json=RECIPE)
    assert response.status_code == 202, response.text
    parameters = response.json()["parameters"]
    for name, value in RECIPE.items():
        if name != "net":
            assert parameters[name] == value, name
    again = client.get(f"/jobs/{response.json()['id']}").json()
    assert again["parameters"] == parameters


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"net": "net4"}, "whiten needs a net"),
        ({"optimizer": "adamw"}, "momentum is SGD's"),
        ({"momentum": 0.0}, "nesterov needs"),
        ({"augment_crop": 2}, "augment_translate and augment_crop"),
        ({"augment_flip": False}, "alternating"),
    ],
)
def test_recipe_combinations_that_do_not_fit_are_422_with_the_reason(
    client, expect_error, changes, words
):
    error = expect_error(client.post("/jobs", json=RECIPE | changes), 422, "validation_error")
    assert words in error["message"], error["message"]


@pytest.mark.parametrize(
    "bad",
    [
        {"tta": "flip_rotate"},
        {"lookahead_steps": 1001},
        {"bias_lr_scale": 0.5},
        {"momentum": 1.0},
        {"augment_translate": 17},
    ],
)
def test_out_of_range_recipe_options_are_422_naming_the_field(client, expect_error, bad):
    error = expect_error(client.post("/jobs", json=RECIPE | bad), 422, "validation_error")
    assert error["message"].startswith(f"{next(iter(bad))}:"), error["message"]


def test_the_evaluation_shows_the_tta_views_and_both_accuracies(client, make_job, session_factory):
    job = make_job("succeeded", net="net5", tta="flip")
    views = [{"name": "identity", "weight": 0.5}, {"name": "flip", "weight": 0.5}]
    with session_factory() as session:
        session.add(
            _evaluation(
                job.id, test_loss=0.5, test_accuracy=0.80, tta_views=views, tta_accuracy=0.81
            )
        )
        session.commit()
    body = client.get(f"/jobs/{job.id}/evaluation").json()
    assert body["test_accuracy"] == 0.80
    assert body["tta_accuracy"] == 0.81
    assert body["tta_views"] == views
    plain = make_job("succeeded")
    with session_factory() as session:
        session.add(_evaluation(plain.id, test_loss=0.5, test_accuracy=0.7))
        session.commit()
    body = client.get(f"/jobs/{plain.id}/evaluation").json()
    assert body["tta_views"] is None and body["tta_accuracy"] is None
