"""API keys: created at random and shown once, stored as a hash, listed, revoked; the CLI,
the admin-only /keys endpoints, the bearer scheme in OpenAPI, and `cnn serve`'s admin key."""

from __future__ import annotations

import json
import stat
import time

import pytest
from sqlalchemy import select

from app import auth
from app.cli import main as cli
from app.models import ApiKey


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_a_key_is_random_shown_once_and_stored_as_its_hash(db_session):
    first = auth.create_key(db_session, "one", "read,predict")
    second = auth.create_key(db_session, "two", ["read"])
    assert first.key != second.key and first.key.startswith("cnn_") and len(first.key) > 40
    rows = db_session.scalars(select(ApiKey).order_by(ApiKey.id)).all()
    stored = {value for row in rows for value in (row.key_hash, row.prefix, row.scopes, row.name)}
    assert first.key not in stored and second.key not in stored
    assert rows[0].key_hash == auth.hash_key(first.key)
    assert rows[0].scopes == "read predict" and rows[0].prefix == first.key[:10]


def test_authenticate_records_last_use_and_refuses_revoked_and_unknown_keys(db_session):
    created = auth.create_key(db_session, "app", "predict")
    assert created.row.last_used_at is None
    principal = auth.authenticate(db_session, created.key)
    assert principal.id == created.row.id and principal.scopes == {"predict"}
    assert not principal.is_admin and principal.allows("predict") and not principal.allows("read")
    db_session.refresh(created.row)
    assert created.row.last_used_at is not None
    auth.revoke_key(db_session, "app")
    for key in (created.key, "cnn_" + "x" * 43, "not-a-key", "cnn_" + "x" * 500):
        with pytest.raises(auth.Unauthorized):
            auth.authenticate(db_session, key)


@pytest.mark.parametrize("scopes", ["", "read,root", "everything"])
def test_unknown_scopes_are_refused(db_session, scopes):
    with pytest.raises(ValueError, match="scope"):
        auth.create_key(db_session, "bad", scopes)


def test_the_admin_scope_implies_every_other():
    admin = auth.Principal(id=1, name="a", scopes=frozenset({"admin"}))
    assert all(admin.allows(scope) for scope in auth.SCOPES) and admin.owns(99)
    train = auth.Principal(id=2, name="t", scopes=frozenset({"train"}))
    assert train.owns(2) and not train.owns(3) and not train.owns(None)


# ----------------------------------------------------------------------------- HTTP
def test_keys_endpoints_create_list_revoke(client, expect_error):
    created = client.post("/keys", json={"name": "dashboard", "scopes": ["read", "predict"]})
    assert created.status_code == 201, created.text
    body = created.json()
    key = body.pop("key")
    assert body["scopes"] == ["read", "predict"] and body["revoked_at"] is None
    assert key.startswith(body["prefix"])

    listed = client.get("/keys").json()["keys"]
    assert {row["name"] for row in listed} == {"test-admin", "dashboard"}
    assert all("key" not in row for row in listed)
    assert key not in json.dumps(listed)

    assert client.get("/nets", headers=bearer(key)).status_code == 200
    expect_error(
        client.post("/keys", json={"name": "dashboard", "scopes": ["read"]}), 409, "key_name_taken"
    )
    revoked = client.delete(f"/keys/{body['id']}")
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    assert client.delete(f"/keys/{body['id']}").status_code == 200  # idempotent
    expect_error(client.get("/nets", headers=bearer(key)), 401, "unauthorized")
    expect_error(client.delete("/keys/999999"), 404, "key_not_found")
    own = next(row["id"] for row in listed if row["name"] == "test-admin")
    expect_error(client.delete(f"/keys/{own}"), 409, "key_in_use")


@pytest.mark.parametrize(
    "body",
    [
        {"name": "x", "scopes": []},
        {"name": "x", "scopes": ["root"]},
        {"name": "../etc", "scopes": ["read"]},
        {"name": "x" * 65, "scopes": ["read"]},
        {"name": "x", "scopes": ["read"], "admin": True},
    ],
)
def test_keys_endpoint_validates(client, expect_error, body):
    expect_error(client.post("/keys", json=body), 422, "validation_error")


def test_only_admin_keys_manage_keys(client, api_key, expect_error):
    for scopes in ("read", "read,predict,train"):
        key = api_key(scopes)
        expect_error(client.get("/keys", headers=bearer(key)), 403, "forbidden")
        expect_error(
            client.post("/keys", json={"name": "n", "scopes": ["admin"]}, headers=bearer(key)),
            403,
            "forbidden",
        )
    missing = client.get("/keys", headers={"Authorization": ""})
    expect_error(missing, 401, "unauthorized")
    assert missing.headers["www-authenticate"] == "Bearer"


def test_openapi_declares_the_bearer_scheme(client):
    schema = client.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["ApiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": schema["components"]["securitySchemes"]["ApiKey"]["description"],
    }
    assert schema["paths"]["/jobs"]["post"]["security"] == [{"ApiKey": []}]
    assert "security" not in schema["paths"]["/health"]["get"]


# ----------------------------------------------------------------------------- CLI
def test_cli_create_list_revoke(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STATE_DIR", str(tmp_path))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    from app.config import get_settings

    get_settings.cache_clear()
    try:
        assert cli(["keys", "create", "--name", "ci", "--scope", "read,train", "--json"]) == 0
        created = json.loads(capsys.readouterr().out)
        assert created["scopes"] == ["read", "train"] and created["key"].startswith("cnn_")
        assert cli(["keys", "list", "--json"]) == 0
        (listed,) = json.loads(capsys.readouterr().out)
        assert listed["name"] == "ci" and "key" not in listed
        assert cli(["keys", "create", "--name", "ci", "--scope", "read"]) == 2
        assert "exists already" in capsys.readouterr().err
        assert cli(["keys", "create", "--name", "x", "--scope", "root"]) == 2
        assert cli(["keys", "revoke", "ci"]) == 0
        assert cli(["keys", "list"]) == 0
        table = capsys.readouterr().out
        assert "ci" in table and created["key"] not in table
        assert cli(["keys", "revoke", "nobody"]) == 2
    finally:
        get_settings.cache_clear()


def test_first_start_writes_an_admin_key_readable_only_by_its_owner(tmp_path):
    from app.config import Settings
    from app.db import session_factory
    from app.migrate import upgrade
    from app.serve import _bootstrap_admin_key

    settings = Settings(_env_file=None, STATE_DIR=tmp_path / "state")
    upgrade(settings.database_url)
    _bootstrap_admin_key(settings)
    path = settings.admin_key_file
    assert path == (tmp_path / "state" / "admin.key").resolve()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = path.read_text().strip()
    with session_factory(settings)() as session:
        assert auth.authenticate(session, key).is_admin
    _bootstrap_admin_key(settings)  # second start: the same key, nothing new
    assert path.read_text().strip() == key
    path.unlink()  # a deleted file is not silently replaced by a second admin key
    _bootstrap_admin_key(settings)
    assert not path.exists()


# ------------------------------------------------------------------ /predict's key cache
PIXELS = [[[[0, 0, 0]] * 32] * 32]


def _predict_status(client, key: str) -> int:
    """404 (no such model) once the key is accepted; 401 when it is refused."""
    body = {"model": "no-such-model", "instances": PIXELS}
    return client.post("/predict", json=body, headers=bearer(key)).status_code


def test_a_key_revoked_through_the_api_stops_predicting_at_once(client, api_key, session_factory):
    key = api_key("predict", name="kiosk")
    assert _predict_status(client, key) == 404  # accepted, and now cached
    with session_factory() as session:
        key_id = auth.find_key(session, "kiosk").id
    assert client.delete(f"/keys/{key_id}").status_code == 200
    assert _predict_status(client, key) == 401


def test_a_key_revoked_elsewhere_stops_at_once_on_postgresql(
    client, client_for, settings, api_key, session_factory
):
    cached = api_key("predict", name="cached")
    assert _predict_status(client, cached) == 404  # accepted, and now cached
    with session_factory() as session:
        auth.revoke_key(session, "cached")  # another process: the CLI, another replica
    # PostgreSQL tells every API process (app.notices), well before AUTH_CACHE_S (5 s) ends.
    deadline = time.monotonic() + 2
    while _predict_status(client, cached) != 401:
        assert time.monotonic() < deadline, "the revocation was not pushed"
        time.sleep(0.05)
    # AUTH_CACHE_S=0: no cache, every request asks the database.
    with client_for(settings.model_copy(update={"AUTH_CACHE_S": 0.0})) as uncached:
        fresh = api_key("predict", name="fresh")
        assert _predict_status(uncached, fresh) == 404
        with session_factory() as session:
            auth.revoke_key(session, "fresh")
        assert _predict_status(uncached, fresh) == 401


def test_the_principal_cache_trusts_a_key_at_most_auth_cache_s(monkeypatch):
    """Without notices (SQLite), a key revoked elsewhere works here at most AUTH_CACHE_S."""
    now = [100.0]
    monkeypatch.setattr(auth.time, "monotonic", lambda: now[0])
    cache = auth.PrincipalCache(ttl=5.0)
    principal = auth.Principal(id=7, name="app", scopes=frozenset({"predict"}))
    cache.put("cnn_x", principal)
    now[0] += 4.9
    assert cache.get("cnn_x") is principal
    now[0] += 0.2
    assert cache.get("cnn_x") is None  # expired: the next request asks the database
    cache.put("cnn_x", principal)
    cache.put("cnn_y", auth.Principal(id=8, name="other"))
    cache.revoked(7)  # a revocation heard of: at once
    assert cache.get("cnn_x") is None and cache.get("cnn_y") is not None
