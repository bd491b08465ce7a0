"""Guards in front of the routes (issue 8): the Host allow-list, body limits while reading,
the bearer header on state-changing requests, anonymous and AUTH=off modes, the job quota,
job size bounds and the /predict rate limit."""

from __future__ import annotations

import logging
from typing import Any

import pytest


def bearer(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}" if key else ""}


# ----------------------------------------------------------------------------- Host
@pytest.mark.parametrize("host", ["attacker.example", "127.0.0.1.nip.io", "localhost.evil", ""])
def test_a_foreign_host_header_is_refused(client, expect_error, host):
    """DNS rebinding: a page whose name now resolves to 127.0.0.1 still sends its own name."""
    error = expect_error(client.get("/health", headers={"host": host}), 400, "host_not_allowed")
    assert "ALLOWED_HOSTS" in error["message"]


@pytest.mark.parametrize("host", ["localhost", "localhost:8000", "127.0.0.1:1234", "[::1]:80"])
def test_loopback_names_are_served_with_any_port(client, host):
    assert client.get("/health", headers={"host": host}).status_code == 200


def test_allowed_hosts_is_a_setting(settings, client_for):
    with client_for(settings.model_copy(update={"ALLOWED_HOSTS": "api.example.org"})) as c:
        assert c.get("/health", headers={"host": "api.example.org"}).status_code == 200
        assert c.get("/health", headers={"host": "localhost"}).status_code == 400
    with client_for(settings.model_copy(update={"ALLOWED_HOSTS": "*"})) as c:
        assert c.get("/health", headers={"host": "anything.example"}).status_code == 200


# ----------------------------------------------------------------------------- bodies
def _chunks(total: int, size: int = 64 * 1024) -> Any:
    sent = 0
    while sent < total:
        yield b" " * min(size, total - sent)
        sent += size


@pytest.mark.parametrize(
    ("path", "limit_setting"),
    [
        ("/jobs", "MAX_JSON_BODY_BYTES"),
        ("/keys", "MAX_JSON_BODY_BYTES"),
        ("/models/m/aliases/a", "MAX_JSON_BODY_BYTES"),
        ("/predict", "PREDICT_MAX_BODY_BYTES"),
    ],
)
def test_bodies_over_the_limit_are_413_declared_or_streamed(
    client, settings, expect_error, path, limit_setting
):
    limit = getattr(settings, limit_setting)
    method = "PUT" if "aliases" in path else "POST"
    json_type = {"content-type": "application/json"}
    declared = client.request(method, path, content=b" " * (limit + 1), headers=json_type)
    error = expect_error(declared, 413, "too_large")
    assert limit_setting in error["message"]
    # No Content-Length (chunked): counted while read, cut off at the limit.
    streamed = client.request(method, path, content=_chunks(limit + 1), headers=json_type)
    expect_error(streamed, 413, "too_large")


def test_a_multipart_upload_is_cut_off_while_it_streams(client, settings, expect_error):
    boundary = "b0undary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\nm\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()

    def body() -> Any:
        yield head
        yield from _chunks(settings.UPLOAD_MAX_FILE_BYTES * 2)

    response = client.post(
        "/predict/image",
        content=body(),
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
    )
    expect_error(response, 413, "too_large")


def test_small_bodies_pass(client):
    assert client.post("/jobs", json={"net": "net1", "epochs": 1}).status_code == 202


# ----------------------------------------------------------------------------- CSRF
def test_a_cross_site_form_post_cannot_cancel_a_job(client, make_job, expect_error):
    """A page on another site can send a text/plain POST, but never an Authorization header."""
    job = make_job("queued")
    response = client.post(
        f"/jobs/{job.id}/cancel",
        content=b"x=1",
        headers={"Authorization": "", "content-type": "text/plain", "origin": "https://evil"},
    )
    expect_error(response, 401, "unauthorized")
    assert client.get(f"/jobs/{job.id}").json()["status"] == "queued"


@pytest.fixture
def auth_off(settings, client_for):
    with client_for(settings.model_copy(update={"AUTH": "off"})) as c:
        yield c


def test_auth_off_serves_everyone_but_state_changes_need_the_header(
    auth_off, make_job, expect_error
):
    assert auth_off.get("/jobs", headers=bearer(None)).status_code == 200
    job = make_job("queued")
    expect_error(auth_off.post(f"/jobs/{job.id}/cancel", headers=bearer(None)), 401, "unauthorized")
    anything = {"Authorization": "Bearer anything"}
    assert auth_off.post(f"/jobs/{job.id}/cancel", headers=anything).status_code == 200


@pytest.mark.parametrize(
    "update",
    [{"AUTH": "off"}, {"ANONYMOUS_READ": True}, {"ANONYMOUS_PREDICT": True}],
    ids=["auth-off", "anonymous-read", "anonymous-predict"],
)
def test_open_access_is_logged_at_every_start(settings, client_for, caplog, update):
    with caplog.at_level(logging.WARNING, logger="app.main"):
        with client_for(settings.model_copy(update=update)):
            pass
    assert any(next(iter(update)) in r.getMessage() for r in caplog.records), caplog.text


def test_anonymous_read_opens_reads_only(settings, client_for, expect_error):
    with client_for(settings.model_copy(update={"ANONYMOUS_READ": True})) as c:
        assert c.get("/jobs", headers=bearer(None)).status_code == 200
        assert c.get("/models", headers=bearer(None)).status_code == 200
        expect_error(
            c.post("/jobs", json={"net": "net1"}, headers=bearer(None)), 401, "unauthorized"
        )
        expect_error(
            c.post(
                "/predict", json={"model": "m", "instances": [[[[0, 0, 0]]]]}, headers=bearer(None)
            ),
            401,
            "unauthorized",
        )
        # A wrong key is still refused: a typo never passes as anonymous.
        expect_error(c.get("/jobs", headers=bearer("cnn_typo")), 401, "unauthorized")


def test_anonymous_predict_opens_predict_only(settings, client_for, expect_error):
    with client_for(settings.model_copy(update={"ANONYMOUS_PREDICT": True})) as c:
        response = c.post("/predict", json={"model": "nope", "images": []}, headers=bearer(None))
        assert response.status_code not in (401, 403), response.text
        expect_error(c.get("/jobs", headers=bearer(None)), 401, "unauthorized")


@pytest.mark.parametrize(
    "header", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer " + "x" * 5000, "cnn_abc", "Token cnn_x"]
)
def test_malformed_authorization_is_401(client, expect_error, header):
    expect_error(client.get("/jobs", headers={"Authorization": header}), 401, "unauthorized")


# ----------------------------------------------------------------------------- quotas
@pytest.fixture
def quota_client(settings, client_for):
    variant = settings.model_copy(update={"MAX_ACTIVE_JOBS_PER_KEY": 2})
    with client_for(variant, scopes="train") as c:
        yield c


def test_a_key_has_at_most_n_queued_or_running_jobs(quota_client, expect_error):
    small = {"net": "net1", "epochs": 1, "train_limit": 10}
    first = quota_client.post("/jobs", json=small).json()
    assert quota_client.post("/jobs", json=small).status_code == 202
    error = expect_error(quota_client.post("/jobs", json=small), 429, "quota_exceeded")
    assert "MAX_ACTIVE_JOBS_PER_KEY=2" in error["message"]
    # Cancelling one frees a slot.
    assert quota_client.post(f"/jobs/{first['id']}/cancel").status_code == 200
    assert quota_client.post("/jobs", json=small).status_code == 202


def test_other_keys_have_their_own_quota(quota_client, api_key, client):
    small = {"net": "net1", "epochs": 1, "train_limit": 10}
    for _ in range(2):
        assert quota_client.post("/jobs", json=small).status_code == 202
    other = bearer(api_key("train"))
    # The client fixture's app has a high quota; the other key is counted on its own.
    mine = {**small, "model_name": "others-net1"}  # net1 is the first key's name now
    assert client.post("/jobs", json=mine, headers=other).status_code == 202


def test_quota_exceeded_says_when_to_retry(quota_client, expect_error):
    small = {"net": "net1", "epochs": 1, "train_limit": 10}
    for _ in range(2):
        assert quota_client.post("/jobs", json=small).status_code == 202
    refused = quota_client.post("/jobs", json=small)
    expect_error(refused, 429, "quota_exceeded")
    assert int(refused.headers["retry-after"]) >= 1


def _owned_names(session_factory) -> dict[str, int | None]:
    from sqlalchemy import select

    from app.models import ModelOwner

    with session_factory() as session:
        return {
            name: owner
            for name, owner in session.execute(select(ModelOwner.name, ModelOwner.owner_id))
        }


def test_a_refused_job_claims_no_model_name(
    quota_client, client, api_key, session_factory, expect_error
):
    """Issue 18 item 2: a key at its quota sent jobs under new names; all were refused, and
    all the names were its own. A name is claimed only by the job that is accepted."""
    small = {"net": "net1", "epochs": 1, "train_limit": 10}
    for _ in range(2):
        assert quota_client.post("/jobs", json=small).status_code == 202
    for name in ("net2", "net3", "someone-elses"):
        refused = quota_client.post("/jobs", json={**small, "model_name": name})
        expect_error(refused, 429, "quota_exceeded")
    assert set(_owned_names(session_factory)) == {"net1"}
    other = bearer(api_key("train"))
    for name in ("net2", "net3"):
        response = client.post("/jobs", json={**small, "model_name": name}, headers=other)
        assert response.status_code == 202, response.text
    # Any other refusal claims nothing either: a job over the size bounds.
    too_big = {**small, "model_name": "too-big", "epochs": 10_000}
    assert client.post("/jobs", json=too_big, headers=other).status_code == 422
    assert "too-big" not in _owned_names(session_factory)


def test_a_key_owns_a_bounded_number_of_model_names(settings, client_for, expect_error):
    variant = settings.model_copy(update={"MAX_MODEL_NAMES_PER_KEY": 2})
    small = {"net": "net1", "epochs": 1, "train_limit": 10}
    with client_for(variant, scopes="train") as c:
        for name in ("mine-a", "mine-b"):
            assert c.post("/jobs", json={**small, "model_name": name}).status_code == 202
        error = expect_error(
            c.post("/jobs", json={**small, "model_name": "mine-c"}), 422, "too_many_model_names"
        )
        assert "MAX_MODEL_NAMES_PER_KEY=2" in error["message"]
        # Its own names stay usable.
        assert c.post("/jobs", json={**small, "model_name": "mine-a"}).status_code == 202
    # Administrators' names belong to the administrators and are not counted.
    with client_for(variant) as admin:
        for name in ("admin-a", "admin-b", "admin-c"):
            assert admin.post("/jobs", json={**small, "model_name": name}).status_code == 202


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"net": "net1", "epochs": 201}, "JOB_MAX_EPOCHS"),
        ({"net": "net1", "batch_size": 4096}, "JOB_MAX_BATCH_SIZE"),
    ],
)
def test_job_size_bounds_come_from_the_settings(client, expect_error, body, words):
    error = expect_error(client.post("/jobs", json=body), 422, "job_too_large")
    assert words in error["message"]


def test_epochs_times_images_is_bounded(settings, client_for, expect_error):
    variant = settings.model_copy(update={"JOB_MAX_IMAGE_EPOCHS": 100_000})
    with client_for(variant) as c:
        error = expect_error(
            c.post("/jobs", json={"net": "net1", "epochs": 3}), 422, "job_too_large"
        )
        assert "train_limit" in error["message"]
        body = {"net": "net1", "epochs": 3, "train_limit": 1000}
        assert c.post("/jobs", json=body).status_code == 202
        schema = c.get("/openapi.json").json()["components"]["schemas"]["JobCreate"]
    assert schema["properties"]["epochs"]["maximum"] == settings.JOB_MAX_EPOCHS


# ----------------------------------------------------------------------------- rate limit
def test_predict_is_rate_limited_per_key_with_retry_after(
    settings, client_for, api_key, expect_error
):
    variant = settings.model_copy(update={"PREDICT_RATE_PER_S": 0.5, "PREDICT_BURST": 2})
    body = {"model": "nope", "instances": [[[[0, 0, 0]] * 32] * 32]}
    with client_for(variant, scopes="predict") as c:
        for _ in range(2):
            assert c.post("/predict", json=body).status_code == 404
        limited = c.post("/predict", json=body)
        expect_error(limited, 429, "rate_limited")
        assert 1 <= int(limited.headers["retry-after"]) <= 2
        # Another key has its own bucket.
        other = c.post("/predict", json=body, headers=bearer(api_key("predict")))
        assert other.status_code == 404


def test_the_hard_cap_refills_and_counts_images():
    from app.quotas import ADMIT, CHARGE, Rules, settle

    rules = Rules(rate=2.0, burst=2, fair=False, window_s=2.0, capacity=1000.0)
    buckets: dict = {}

    def admit(now: float) -> float:
        return settle(rules, now, buckets, 1, [(ADMIT, "k", 1)])[0].wait

    assert admit(0.0) == 0 and admit(0.0) == 0
    assert admit(0.0) == pytest.approx(0.5)
    assert admit(0.5) == 0  # one image came back after 0.5 s
    settle(rules, 0.5, buckets, 1, [(CHARGE, "k", 63)])  # the rest of a 64-image request
    assert admit(1.0) == pytest.approx((1 - (1 - 63)) / 2.0)  # in debt: 31.5 s to repay
    assert admit(100.0) == 0 and buckets["k"].hard == 1  # never more than the burst


# ----------------------------------------------------------------------------- contract
def test_405_names_every_method_of_the_path(client, expect_error):
    response = client.options("/jobs")
    expect_error(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "GET, POST"
    assert client.delete("/jobs").headers["allow"] == "GET, POST"


def test_undecodable_json_is_422(client, expect_error):
    response = client.post(
        "/keys", content=b"\xff\xfe{", headers={"content-type": "application/json"}
    )
    expect_error(response, 422, "validation_error")


def test_an_idempotency_key_is_scoped_to_its_caller(client, api_key, expect_error):
    """Issue 18 item 5: another key's earlier use of the same string is invisible (no 409,
    no hint that it was used); each key replays only its own job."""
    headers = {"Idempotency-Key": "my-first-net1"}  # the README's own example
    body = {"net": "net1", "epochs": 1, "train_limit": 10, "model_name": "idem"}
    owner, other = bearer(api_key("train")), bearer(api_key("read,train"))
    first = client.post("/jobs", json=body, headers={**headers, **owner})
    assert first.status_code == 202
    theirs = {**body, "model_name": "idem-other", "epochs": 2}  # other parameters, too
    second = client.post("/jobs", json=theirs, headers={**headers, **other})
    assert second.status_code == 202, second.text
    assert second.json()["id"] != first.json()["id"]
    assert "idempotent-replayed" not in second.headers
    # Each key's retry replays its own job.
    again = client.post("/jobs", json=body, headers={**headers, **owner})
    assert again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"]
    again = client.post("/jobs", json=theirs, headers={**headers, **other})
    assert again.json()["id"] == second.json()["id"]
    # An admin has its own namespace too: it replays nobody else's job.
    mine = client.post("/jobs", json=body, headers=headers)
    assert mine.status_code == 202 and mine.json()["id"] not in {
        first.json()["id"],
        second.json()["id"],
    }


# ----------------------------------------------------------------------------- messages
def test_a_jobs_error_never_shows_absolute_paths(client, make_job):
    raw = 'could not load /srv/secret/data/cifar-10.tar.gz: File "/usr/lib/x.py", line 3'
    job = make_job("failed", error=raw)
    shown = client.get(f"/jobs/{job.id}").json()["error"]
    assert "/srv" not in shown and "/usr" not in shown
    assert "cifar-10.tar.gz" in shown  # what the user can still act on


def test_unexpected_training_failures_keep_their_text_in_the_log():
    from types import SimpleNamespace

    from app.jobs.runner import failure_message

    class Weird(Exception):
        pass

    job = SimpleNamespace(batch_size=32)
    message = failure_message(Weird("tensor at /home/u/x.npy: shape (3, 4)"), job, None, "CPU")  # type: ignore[arg-type]
    assert message == "training failed with Weird; the worker's log has the details"


def test_the_schema_states_the_rules_the_service_enforces(client):
    """Schemathesis' findings of the issue: what the schema allows is accepted."""
    spec = client.get("/openapi.json").json()
    predict = spec["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]
    body = predict["schema"]
    assert body["not"] == {"required": ["version", "alias"]}
    assert [rule["required"] for rule in body["oneOf"]] == [["instances"], ["images"], ["tensor"]]
    form = spec["components"]["schemas"]["Body_predict_image_predict_image_post"]
    assert form["not"] == {"required": ["version", "alias"]}
    assert "pattern" in form["properties"]["model"]
    assert all("null" not in str(field) for field in form["properties"].values())
    job = spec["components"]["schemas"]["JobCreate"]["properties"]
    assert set(job["net"]["enum"]) >= {"net1", "net2", "net3"}
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            if operation.get("security"):
                assert {"401", "403"} <= set(operation["responses"]), (method, path)
