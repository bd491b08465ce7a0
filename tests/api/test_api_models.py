"""The registry over HTTP: /models, /models/{name}, aliases, and artifact downloads."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from sqlalchemy import select

from app.auth import AUTH_OFF, Principal
from app.errors import Forbidden, ModelNotFound
from app.models import ModelAlias
from app.registry.service import move_alias


def test_no_models_yet(client):
    assert client.get("/models").json() == {"models": []}


def test_list_models_shows_latest_version_and_aliases(client, register_model):
    register_model("alpha", b"a1", metrics={"test_accuracy": 0.4})
    register_model("alpha", b"a2", metrics={"test_accuracy": 0.6})
    register_model("beta", b"b1", net="net2")
    assert client.put("/models/alpha/aliases/production", json={"version": 1}).status_code == 200

    models = client.get("/models").json()["models"]
    assert [m["name"] for m in models] == ["alpha", "beta"]
    alpha, beta = models
    assert alpha["versions"] == 2
    assert alpha["aliases"] == {"production": 1}
    latest = alpha["latest_version"]
    assert latest["version"] == 2
    assert latest["metrics"] == {"test_accuracy": 0.6}
    assert latest["sha256"] == hashlib.sha256(b"a2").hexdigest()
    assert latest["size_bytes"] == 2
    assert latest["aliases"] == []
    assert latest["artifact_url"] == "/models/alpha/versions/2/artifact"
    assert beta["latest_version"]["net"] == "net2" and beta["aliases"] == {}


def test_model_detail_lists_versions_with_metrics_and_aliases(client, register_model, make_job):
    job = make_job("succeeded")
    register_model("gamma", b"g1", job_id=job.id)
    register_model("gamma", b"g2", metrics={"test_accuracy": 0.7, "test_loss": 0.9})
    client.put("/models/gamma/aliases/production", json={"version": 2})
    client.put("/models/gamma/aliases/staging", json={"version": 2})

    body = client.get("/models/gamma").json()
    assert body["name"] == "gamma"
    assert body["latest_version"] == 2
    assert body["aliases"] == {"production": 2, "staging": 2}
    assert [v["version"] for v in body["versions"]] == [1, 2]
    first, second = body["versions"]
    assert first["job_id"] == str(job.id)
    assert second["metrics"] == {"test_accuracy": 0.7, "test_loss": 0.9}
    assert second["aliases"] == ["production", "staging"]
    assert "artifact_path" not in second  # server paths stay on the server


def test_unknown_model_is_404(client, expect_error):
    expect_error(client.get("/models/nobody"), 404, "model_not_found")
    expect_error(
        client.put("/models/nobody/aliases/production", json={"version": 1}), 404, "model_not_found"
    )
    expect_error(client.get("/models/nobody/versions/1/artifact"), 404, "model_not_found")


def test_alias_moves_in_place(client, register_model, session_factory):
    register_model("delta", b"d1")
    register_model("delta", b"d2")
    first = client.put("/models/delta/aliases/production", json={"version": 1})
    assert first.status_code == 200, first.text
    assert first.json()["name"] == "delta" and first.json()["alias"] == "production"
    assert first.json()["version"] == 1

    moved = client.put("/models/delta/aliases/production", json={"version": 2})
    assert moved.json()["version"] == 2
    assert client.get("/models/delta").json()["aliases"] == {"production": 2}
    with session_factory() as session:
        rows = session.scalars(select(ModelAlias).where(ModelAlias.name == "delta")).all()
        assert [(row.alias, row.version) for row in rows] == [("production", 2)]


def test_alias_to_a_missing_version_is_404_and_changes_nothing(
    client, register_model, expect_error
):
    register_model("eps", b"e1")
    client.put("/models/eps/aliases/production", json={"version": 1})
    error = expect_error(
        client.put("/models/eps/aliases/production", json={"version": 3}), 404, "model_not_found"
    )
    assert "3" in error["message"]
    assert client.get("/models/eps").json()["aliases"] == {"production": 1}


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        ("/models/zeta/aliases/bad.alias", {"version": 1}, 422, "validation_error"),
        ("/models/zeta/aliases/" + "a" * 65, {"version": 1}, 422, "validation_error"),
        ("/models/zeta/aliases/production", {"version": 0}, 422, "validation_error"),
        ("/models/zeta/aliases/production", {"version": "two"}, 422, "validation_error"),
        ("/models/zeta/aliases/production", {}, 422, "validation_error"),
        ("/models/zeta/aliases/production", {"version": 1, "x": 1}, 422, "validation_error"),
        ("/models/bad name/aliases/production", {"version": 1}, 422, "validation_error"),
    ],
)
def test_bad_alias_requests_are_4xx(client, register_model, expect_error, path, body, status, code):
    register_model("zeta", b"z1")
    expect_error(client.put(path, json=body), status, code)
    assert client.get("/models/zeta").json()["aliases"] == {}


def test_alias_body_must_be_json(client, register_model, expect_error):
    register_model("eta", b"h1")
    response = client.put(
        "/models/eta/aliases/production",
        content=b"version=1",
        headers={"Content-Type": "text/plain"},
    )
    expect_error(response, 415, "unsupported_media_type")


def test_artifact_download(client, register_model):
    content = b"\x00keras-zip-bytes\xff" * 100
    register_model("theta", b"t1")
    row = register_model("theta", content)
    response = client.get("/models/theta/versions/2/artifact")
    assert response.status_code == 200
    assert response.content == content
    assert response.headers["content-type"] == "application/octet-stream"
    assert 'filename="theta-v2.keras"' in response.headers["content-disposition"]
    assert response.headers["x-checksum-sha256"] == row.sha256


def test_artifact_of_missing_version_or_file_is_404(client, register_model, expect_error):
    row = register_model("iota", b"i1")
    expect_error(client.get("/models/iota/versions/2/artifact"), 404, "model_not_found")
    Path(row.artifact_path).unlink()
    expect_error(client.get("/models/iota/versions/1/artifact"), 404, "artifact_missing")
    expect_error(client.get("/models/iota/versions/0/artifact"), 422, "validation_error")


# --------------------------------------------------------------------------- the service


def test_move_alias_tells_the_listener_after_the_commit(register_model, session_factory):
    register_model("kappa", b"k1")
    heard = []

    def listener(name: str) -> None:
        with session_factory() as other:  # committed: another session already sees it
            heard.append((name, other.get(ModelAlias, (name, "production")).version))

    with session_factory() as session:
        row = move_alias(session, AUTH_OFF, "kappa", "production", 1, on_moved=listener)
    assert (row.name, row.alias, row.version) == ("kappa", "production", 1)
    assert heard == [("kappa", 1)]


def test_a_refused_move_tells_nobody(register_model, session_factory):
    register_model("lambda", b"l1")
    heard: list[str] = []
    stranger = Principal(id=None, name="stranger", scopes=frozenset({"train"}))
    with session_factory() as session:
        with pytest.raises(ModelNotFound):
            move_alias(session, AUTH_OFF, "lambda", "production", 2, on_moved=heard.append)
        with pytest.raises(ModelNotFound):
            move_alias(session, AUTH_OFF, "nobody", "production", 1, on_moved=heard.append)
        with pytest.raises(Forbidden):  # a name nobody claimed: administrators only
            move_alias(session, stranger, "lambda", "production", 1, on_moved=heard.append)
    assert heard == []


def test_two_creations_of_one_alias_end_as_one_row(
    register_model, session_factory, race_a_held_row
):
    """The second INSERT of a new alias waits on the first's row, fails, and becomes a move."""
    register_model("mu", b"m1")
    register_model("mu", b"m2")
    holder = session_factory()
    holder.add(ModelAlias(name="mu", alias="production", version=1))
    holder.flush()  # the row exists, uncommitted: a concurrent INSERT must wait for it
    heard: list[str] = []

    def move() -> int:
        with session_factory() as session:
            row = move_alias(session, AUTH_OFF, "mu", "production", 2, on_moved=heard.append)
            return row.version

    assert race_a_held_row(holder, move, "the second INSERT of the alias") == 2
    assert heard == ["mu"]
    with session_factory() as session:
        rows = session.scalars(select(ModelAlias).where(ModelAlias.name == "mu")).all()
        assert [(row.alias, row.version) for row in rows] == [("production", 2)]
