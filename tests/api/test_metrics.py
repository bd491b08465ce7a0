"""GET /metrics: the Prometheus exposition, database figures and this process's counters."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta

import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: dict, name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


def test_metrics_read_jobs_epochs_and_heartbeats_from_the_database(client, make_job, add_epochs):
    make_job("queued")
    make_job("queued")
    running = make_job(
        "running",
        worker="gpu-worker-1",
        device="GPU:0 NVIDIA H100",
        heartbeat_at=datetime.now(UTC) - timedelta(seconds=30),
    )
    make_job("succeeded", net="net2")
    add_epochs(running.id, 3)

    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    found = samples(response.text)
    assert value(found, "cnn_jobs", status="queued") == 2
    assert value(found, "cnn_jobs", status="running") == 1
    assert value(found, "cnn_jobs", status="succeeded") == 1
    assert value(found, "cnn_jobs", status="failed") == 0
    assert value(found, "cnn_queue_depth") == 2
    assert value(found, "cnn_epochs_stored", net="net1") == 3
    gpu = {"net": "net1", "device": "GPU:0 NVIDIA H100"}
    assert value(found, "cnn_epoch_duration_seconds_count", **gpu) == 3
    assert value(found, "cnn_epoch_duration_seconds_sum", **gpu) == 4.5  # 3 x 1.5 s
    assert value(found, "cnn_epoch_duration_seconds_bucket", le="1.0", **gpu) == 0
    assert value(found, "cnn_epoch_duration_seconds_bucket", le="2.0", **gpu) == 3
    assert value(found, "cnn_epoch_images_per_second_bucket", le="+Inf", **gpu) == 3
    age = value(found, "cnn_worker_heartbeat_age_seconds", worker="gpu-worker-1")
    assert 29 <= age < 120


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_predict_requests_latency_and_cache_are_counted(client, register_model, tmp_path):
    import keras

    model = keras.Sequential(
        [keras.Input((32, 32, 3)), keras.layers.Flatten(), keras.layers.Dense(10, "softmax")]
    )
    model.save(tmp_path / "tiny.keras")
    register_model("tiny", (tmp_path / "tiny.keras").read_bytes())
    before = samples(client.get("/metrics").text)

    def count(found: dict, name: str, **labels: str) -> float:
        return found.get((name, tuple(sorted(labels.items()))), 0.0)

    image = np.zeros((32, 32, 3), dtype=np.uint8).tolist()
    for _ in range(2):
        assert client.post(
            "/predict", json={"model": "tiny", "instances": [image, image]}
        ).is_success
    upload = client.post(
        "/predict/image", data={"model": "tiny"}, files={"file": ("x.png", _png(), "image/png")}
    )
    assert upload.status_code == 200
    assert client.post("/predict", json={"model": "nope", "instances": [image]}).status_code == 404

    after = samples(client.get("/metrics").text)

    def delta(name: str, **labels: str) -> float:
        return count(after, name, **labels) - count(before, name, **labels)

    assert delta("cnn_predict_requests_total", model="tiny", status="200", input="instances") == 2
    assert delta("cnn_predict_requests_total", model="tiny", status="200", input="multipart") == 1
    assert (
        delta("cnn_predict_requests_total", model="unknown", status="404", input="instances") == 1
    )
    assert delta("cnn_predict_latency_seconds_count", input="instances") == 3
    assert delta("cnn_model_cache_loads_total", model="tiny") == 1
    assert delta("cnn_model_cache_hits_total", model="tiny") == 2
    assert delta("cnn_predict_batch_size_count") >= 3
    assert delta("cnn_predict_batch_size_bucket", le="2.0") >= 3


def test_compose_has_a_prometheus_scraping_the_api_under_a_profile():
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[2]
    compose = yaml.safe_load((root / "docker-compose.yml").read_text())
    prometheus = compose["services"]["prometheus"]
    assert prometheus["profiles"] == ["monitoring"]
    mounted = {v.split(":")[0]: v.split(":")[1] for v in prometheus["volumes"]}
    assert mounted["./deploy/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    config = yaml.safe_load((root / "deploy" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    # Every API replica is a target (found by DNS), not the proxy, which picks one at random.
    (discovery,) = job["dns_sd_configs"]
    assert discovery["names"] == ["api"]
    assert discovery["port"] == 8000
    assert "api" in compose["services"]
    assert job["authorization"]["credentials_file"] in mounted.values()


def test_metrics_need_a_read_key_unless_the_operator_opens_them(client, client_for, settings):
    assert client.get("/metrics", headers={"Authorization": ""}).status_code == 401
    with client_for(settings, "predict") as predict_only:
        assert predict_only.get("/metrics").status_code == 403
    with client_for(settings.model_copy(update={"METRICS_PUBLIC": True})) as open_metrics:
        assert open_metrics.get("/metrics", headers={"Authorization": ""}).status_code == 200
