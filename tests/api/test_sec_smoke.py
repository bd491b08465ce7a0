def test_smoke(client, api_key, expect_error):
    r = client.get("/keys")
    assert r.status_code == 200, r.text
    r = client.post("/keys", json={"name": "dash", "scopes": ["read"]})
    assert r.status_code == 201, r.text
    key = r.json()["key"]
    expect_error(client.get("/keys", headers={"Authorization": f"Bearer {key}"}), 403, "forbidden")
    expect_error(client.get("/keys", headers={"Authorization": "Bearer cnn_nope"}), 401, "unauthorized")
    expect_error(client.get("/keys", headers={"Authorization": ""}), 401, "unauthorized")
    r = client.options("/jobs")
    assert r.status_code == 405 and r.headers["allow"] == "GET, POST", r.headers
    r = client.post("/jobs", content=b"x" * 100_000, headers={"content-type": "application/json"})
    expect_error(r, 413, "too_large")
    def gen():
        for _ in range(100):
            yield b"x" * 10_000
    r = client.post("/jobs", content=gen(), headers={"content-type": "application/json"})
    expect_error(r, 413, "too_large")
    expect_error(client.get("/health", headers={"host": "attacker.example"}), 400, "host_not_allowed")
    print(client.app.openapi()["components"]["securitySchemes"])
