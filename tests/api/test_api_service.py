"""GET /health, /nets, /summary/{net}, and the OpenAPI documents, over HTTP."""

from __future__ import annotations

from app.ml.nets import NETS


def test_health_reports_the_database(client):
    response = client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["database"] == "ok"
    assert body["database_backend"] == "postgresql"


def test_health_is_503_when_the_database_does_not_answer(
    clean_db, settings, expect_error, client_for
):
    # Nothing listens on port 1: the connection is refused, as with a stopped server.
    down = settings.model_copy(
        update={"DATABASE_URL": "postgresql+psycopg://postgres@127.0.0.1:1/cnn"}
    )
    with client_for(down) as client:
        error = expect_error(client.get("/health"), 503, "database_unavailable")
    assert "database" in error["message"]


def test_other_endpoints_answer_503_while_the_database_is_down(
    clean_db, settings, expect_error, client_for
):
    down = settings.model_copy(
        update={"DATABASE_URL": "postgresql+psycopg://postgres@127.0.0.1:1/cnn"}
    )
    with client_for(down) as client:
        expect_error(client.post("/jobs", json={"net": "net1"}), 503, "database_unavailable")
        expect_error(client.get("/jobs"), 503, "database_unavailable")
        expect_error(client.get("/models"), 503, "database_unavailable")


def test_nets_lists_every_registered_architecture(client):
    response = client.get("/nets")
    assert response.status_code == 200
    nets = response.json()["nets"]
    assert [net["name"] for net in nets] == list(NETS)
    net1 = nets[0]
    assert net1["title"] == "NET I"
    assert net1["layout"] == "CONV-POOL-CONV-POOL-CONV-POOL-FC-FC"
    assert net1["summary_url"] == "/summary/net1"


def test_summary_of_each_net_agrees_with_keras(client):
    for name in NETS:
        response = client.get(f"/summary/{name}")
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["net"] == name
        assert body["total_params"] == body["keras_total_params"]
        assert body["layers"], "a summary without layers"
        for layer in body["layers"]:
            assert {
                "name",
                "type",
                "input_shape",
                "output_shape",
                "kernel",
                "stride",
                "padding",
                "params",
                "formula",
                "keras_output_shape",
                "keras_params",
                "agrees",
            } <= set(layer)
            assert layer["agrees"] is True, layer
        for key in ("trainable_params", "macs_per_image", "weight_bytes"):
            assert isinstance(body[key], int)


def test_summary_of_net1_matches_the_hand_calculation(client):
    # ((3*3*3)+1)*32 + ((3*3*32)+1)*64 + ((3*3*64)+1)*64 + (2*2*64+1)*512 + (512+1)*10
    body = client.get("/summary/net1").json()
    assert body["total_params"] == 896 + 18_496 + 36_928 + 131_584 + 5_130
    assert body["weight_bytes"] == 4 * body["total_params"]
    shapes = {layer["name"]: layer["output_shape"] for layer in body["layers"]}
    assert shapes["conv1"] == [30, 30, 32]
    assert shapes["pool3"] == [2, 2, 64]
    assert shapes["fc2"] == [10]


def test_unknown_net_summary_is_404_listing_known_nets(client, expect_error):
    error = expect_error(client.get("/summary/net99"), 404, "unknown_net")
    for name in NETS:
        assert name in error["message"]
    assert error["details"]["known"] == list(NETS)


def test_openapi_and_docs_are_served(client):
    spec = client.get("/openapi.json")
    assert spec.status_code == 200
    paths = spec.json()["paths"]
    for path in (
        "/health",
        "/nets",
        "/summary/{net}",
        "/jobs",
        "/jobs/{job_id}",
        "/jobs/{job_id}/history",
        "/jobs/{job_id}/history.png",
        "/jobs/{job_id}/evaluation",
        "/jobs/{job_id}/cancel",
        "/models",
        "/models/{name}",
        "/models/{name}/aliases/{alias}",
        "/models/{name}/versions/{version}/artifact",
    ):
        assert path in paths, path
    job_create = spec.json()["components"]["schemas"]["JobCreate"]["properties"]
    # The upper bound is the settings' JOB_MAX_EPOCHS (200 by default), see docs/security.md.
    assert job_create["epochs"]["minimum"] == 1 and job_create["epochs"]["maximum"] == 200
    assert client.get("/docs").status_code == 200


def test_unknown_path_uses_the_error_body(client, expect_error):
    expect_error(client.get("/no/such/path"), 404, "not_found")
