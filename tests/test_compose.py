"""The compose stack's files, checked without a Docker engine.

docker-compose.yml parses; the services docs/deploy.md names exist; every long-running
service has a health check whose command exists in its image, and start-up waits for
health, the bucket and the migration; commands are real entry points; every environment
key of an app service is a Settings field (or a variable deploy/environment.yaml names;
tests/test_k8s.py watches its `pending` list) and the values validate; no volume is shared between app containers (the artifacts live in
the S3 bucket); the proxy in front of the API replicas streams server-sent events
unbuffered with long read timeouts, for every event route the app has; secrets are
required, not defaulted; Dockerfile.gpu builds on the TensorFlow GPU image of the pinned
version and runs as a non-root user.
"""

from __future__ import annotations

import re
import shlex
import tomllib
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.config import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_TEXT = (ROOT / "docker-compose.yml").read_text()
COMPOSE: dict[str, Any] = yaml.safe_load(COMPOSE_TEXT)
SERVICES: dict[str, Any] = COMPOSE["services"]
APP_SERVICES = ("migrate", "api", "worker-gpu", "worker-cpu")
WORKERS = ("worker-gpu", "worker-cpu")
ONE_SHOTS = ("migrate", "s3-bucket")
INTERPOLATION = re.compile(r"\$\{(\w+)(?::([?-])([^}]*))?\}")
ENVIRONMENT = yaml.safe_load((ROOT / "deploy" / "environment.yaml").read_text())
NGINX_CONF = ROOT / "deploy" / "nginx.conf"

# What each image has for its health check, and the evidence (no engine here to look):
# the official postgres and redis images ship their clients; nginx:*-alpine installs curl
# (docker-nginx's stable/alpine/Dockerfile, `apk add --no-cache curl ca-certificates`);
# SeaweedFS's image installs curl since 4.03 (docker/Dockerfile.go_build, "docker: add curl
# for HTTPS healthcheck support", seaweedfs#7709); ours is Python.
HEALTH_TOOLS = {
    "postgres": "pg_isready",
    "redis": "redis-cli",
    "chrislusf/seaweedfs": "curl",
    "nginx": "curl",
    "cnn-service": "python",
}


def _interpolate(value: str) -> str:
    """Compose's ${VAR:?msg} / ${VAR:-default}, with every required variable set to 'x'."""
    return INTERPOLATION.sub(lambda m: m.group(3) if m.group(2) == "-" else "x", value)


def _command(service: str) -> list[str]:
    command = SERVICES[service]["command"]
    return (
        [_interpolate(part) for part in command]
        if isinstance(command, list)
        else shlex.split(command)
    )


def _environment(service: str) -> dict[str, str]:
    return {
        key: _interpolate(str(value)) for key, value in SERVICES[service]["environment"].items()
    }


def _uvicorn_options(command: list[str]) -> dict[str, Any]:
    """uvicorn's own parser on the command line (parses, runs nothing)."""
    from uvicorn.main import main as uvicorn_cli

    assert command[0] == "uvicorn"
    return dict(uvicorn_cli.make_context("uvicorn", command[1:]).params)


def _api_options() -> dict[str, Any]:
    return _uvicorn_options(_command("api"))


# --- nginx.conf: a small reader for its block structure ---------------------------------

Directive = tuple[str, list[str], list[Any] | None]
TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[{};]|[^\s{};"]+')


def _nginx(text: str) -> list[Directive]:
    """nginx's configuration as (name, arguments, block or None) directives, comments dropped."""
    tokens = TOKEN.findall(re.sub(r"#[^\n]*", "", text))
    position = 0

    def block() -> list[Directive]:
        nonlocal position
        directives: list[Directive] = []
        words: list[str] = []
        while position < len(tokens):
            token = tokens[position]
            position += 1
            if token == ";":
                directives.append((words[0], words[1:], None))
                words = []
            elif token == "{":
                directives.append((words[0], words[1:], block()))
                words = []
            elif token == "}":
                return directives
            else:
                words.append(token.strip('"'))
        return directives

    return block()


NGINX = _nginx(NGINX_CONF.read_text())


def _find(directives: list[Directive], name: str) -> list[Directive]:
    return [d for d in directives if d[0] == name]


def _value(directives: list[Directive], name: str) -> list[str]:
    (found,) = _find(directives, name)
    return found[1]


def _seconds(value: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    return float(value[:-1]) * units[value[-1]] if value[-1] in units else float(value)


def _bytes(value: str) -> int:
    units = {"k": 1024, "m": 1024**2, "g": 1024**3}
    return int(value[:-1]) * units[value[-1].lower()] if value[-1].lower() in units else int(value)


(SERVER,) = [d[2] for d in _find(NGINX, "server")]
(UPSTREAM,) = _find(NGINX, "upstream")
LOCATIONS = {" ".join(d[1]): d[2] for d in _find(SERVER, "location")}
(SSE_PATTERN,) = [key.removeprefix("~ ") for key in LOCATIONS if key.startswith("~ ")]


# --- services, health and start-up order ------------------------------------------------


def test_every_service_the_docs_name_exists_and_no_other():
    docs = (ROOT / "docs" / "deploy.md").read_text()
    named = set(re.findall(r"^\| `([a-z0-9-]+)` \|", docs, flags=re.MULTILINE))
    assert named == set(SERVICES)
    assert set(SERVICES) >= {
        "postgres", "redis", "s3", "s3-bucket", "migrate", "api", "proxy", *WORKERS, "flower"
    }  # fmt: skip


def test_third_party_images_are_pinned_to_a_version():
    for name, service in SERVICES.items():
        image = service["image"]
        if image.startswith("cnn-service:"):
            continue  # built here from Dockerfile.gpu
        repository, _, tag = image.partition(":")
        assert re.match(r"v?\d+(\.\d+)*(-[a-z]+)?$", tag), f"{name}: {image} is not pinned"


@pytest.mark.parametrize("service", ["postgres", "redis", "s3", "api", "proxy"])
def test_long_running_services_have_health_checks_their_image_can_run(service):
    check = SERVICES[service]["healthcheck"]
    assert check["test"][0] in {"CMD", "CMD-SHELL"} and len(check["test"]) > 1
    assert check["retries"] >= 3
    image = _interpolate(SERVICES[service]["image"]).rsplit(":", 1)[0]
    program = shlex.split(check["test"][1])[0]
    assert program == HEALTH_TOOLS[image], f"{service}: {program} is not known to be in {image}"


def test_the_s3_health_check_asks_the_s3_gateway_on_the_port_the_app_uses():
    check = SERVICES["s3"]["healthcheck"]["test"]
    url = check[-1]
    endpoint = SERVICES["api"]["environment"]["S3_ENDPOINT_URL"]
    port = endpoint.rsplit(":", 1)[1]
    assert url == f"http://127.0.0.1:{port}/healthz"
    assert endpoint == f"http://s3:{port}"
    # weed mini's S3 gateway listens on 8333 unless -s3.port says otherwise.
    assert port == "8333" and not any(a.startswith("-s3.port=") for a in _command("s3"))


def test_start_up_order_waits_for_health_the_bucket_and_the_migration():
    assert SERVICES["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert SERVICES["s3-bucket"]["depends_on"]["s3"]["condition"] == "service_healthy"
    for one_shot in ONE_SHOTS:
        assert SERVICES[one_shot]["restart"] == "no"
    for service in ("api", *WORKERS):
        depends = SERVICES[service]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert depends["s3-bucket"]["condition"] == "service_completed_successfully"
        assert depends["redis"]["condition"] == "service_healthy"
    assert SERVICES["proxy"]["depends_on"]["api"]["condition"] == "service_healthy"


def test_the_bucket_one_shot_creates_the_bucket_the_app_uses_with_the_apps_credentials():
    one_shot = SERVICES["s3-bucket"]
    script = one_shot["command"][0]
    # Idempotent: an existing bucket is fine, so `docker compose up` may run it again.
    assert "head-bucket" in script and "create-bucket" in script and "||" in script
    environment = one_shot["environment"]
    store = _environment("api")["ARTIFACT_STORE"]
    assert store == f"s3://{_interpolate(environment['BUCKET'])}/artifacts"
    assert environment["AWS_ENDPOINT_URL"] == SERVICES["api"]["environment"]["S3_ENDPOINT_URL"]
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        # The server's admin identity, the one-shot and the app: one pair.
        assert environment[key] == SERVICES["s3"]["environment"][key]
        assert environment[key] == SERVICES["api"]["environment"][key]


# --- the app services -----------------------------------------------------------------


def test_commands_are_real_entry_points():
    from app.cli import build_parser

    for service in ("migrate", *WORKERS):
        command = _command(service)
        assert command[0] == "cnn"
        build_parser().parse_args(command[1:])  # SystemExit on an unknown sub-command
    assert _command("migrate")[1] == "migrate"
    assert all(_command(worker)[1] == "worker" for worker in WORKERS)

    options = _api_options()
    assert options["factory"] and options["app"] == "app.main:create_app"
    from app.main import create_app

    assert callable(create_app)


def test_the_gpu_worker_reserves_as_many_gpus_as_it_serves_and_the_cpu_worker_none():
    gpu = SERVICES["worker-gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    assert int(gpu["environment"]["WORKER_GPUS"]) == device["count"]
    cpu = SERVICES["worker-cpu"]
    assert "deploy" not in cpu and cpu["environment"]["WORKER_GPUS"] == "0"
    for worker in WORKERS:
        # Replicas need distinct names and no fixed host port.
        assert "container_name" not in SERVICES[worker] and "ports" not in SERVICES[worker]
        assert SERVICES[worker]["build"]["dockerfile"] == "Dockerfile.gpu"
        # SIGTERM hands the job back after the current batch: room for a slow one.
        assert int(SERVICES[worker]["stop_grace_period"].removesuffix("s")) >= 30


def test_flower_is_optional():
    assert SERVICES["flower"]["profiles"] == ["monitoring"]
    assert SERVICES["prometheus"]["profiles"] == ["monitoring"]


@pytest.mark.parametrize("service", APP_SERVICES)
def test_app_environment_is_settings_fields_and_validates(service):
    environment = SERVICES[service]["environment"]
    assert isinstance(environment, dict)
    known = set(Settings.model_fields) | set(ENVIRONMENT["standard"]) | set(ENVIRONMENT["pending"])
    unknown = set(environment) - known
    assert not unknown, f"{service} sets variables no Settings field reads: {unknown}"
    values = {k: v for k, v in _environment(service).items() if k in Settings.model_fields}
    settings = Settings(_env_file=None, **values)
    assert settings.DATABASE_URL.startswith("postgresql+psycopg://")
    assert settings.CELERY_BROKER_URL.startswith("redis://redis:")
    assert not settings.embedded_broker


def test_no_volume_is_shared_between_app_containers():
    """Models and checkpoints are in the S3 bucket; nothing on a disk is needed by two."""
    mounted: dict[str, list[str]] = {}
    for name in APP_SERVICES:
        service = SERVICES[name]
        replicas = service.get("deploy", {}).get("replicas", 1)
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            assert not source.startswith((".", "/")), f"{name} mounts a host folder: {mount}"
            mounted.setdefault(source, []).extend([name] * replicas)
    shared = {volume: users for volume, users in mounted.items() if len(users) > 1}
    assert not shared, f"volumes mounted by more than one app container: {shared}"
    for name in APP_SERVICES:
        environment = _environment(name)
        assert "ARTIFACT_DIR" not in environment
        assert environment["ARTIFACT_STORE"].startswith("s3://")
        state = environment["STATE_DIR"]
        assert environment["SCRATCH_DIR"].startswith(state + "/")


def test_secrets_are_required_not_defaulted():
    uses = INTERPOLATION.findall(COMPOSE_TEXT)
    for secret in ("POSTGRES_PASSWORD", "S3_SECRET_KEY"):
        found = [(op, msg) for name, op, msg in uses if name == secret]
        assert found and all(op == "?" and msg for op, msg in found), secret
    assert SERVICES["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith(
        "${POSTGRES_PASSWORD:?"
    )
    # The host's own AWS credentials are never picked up by interpolation.
    assert not any(name.startswith("AWS_") for name, _, _ in uses)


# --- the API replicas and the proxy -----------------------------------------------------


def test_two_api_replicas_reached_only_through_the_proxy():
    api = SERVICES["api"]
    assert api["deploy"]["replicas"] >= 2
    assert "ports" not in api and "container_name" not in api
    (published,) = SERVICES["proxy"]["ports"]
    container_port = _interpolate(published).rsplit(":", 1)[1]
    assert _value(SERVER, "listen") == [container_port]
    volumes = SERVICES["proxy"]["volumes"]
    assert "./deploy/nginx.conf:/etc/nginx/conf.d/default.conf:ro" in volumes


def test_the_proxy_sends_to_every_api_replica_by_name():
    name, block = UPSTREAM[1][0], UPSTREAM[2]
    (server,) = _find(block, "server")
    assert server[1] == [f"api:{_api_options()['port']}", "resolve"]
    assert _find(block, "resolver") and _find(block, "zone")
    for location, directives in LOCATIONS.items():
        if location != "= /proxy-health":
            assert _value(directives, "proxy_pass") == [f"http://{name}"], location


def test_the_proxy_streams_every_event_route_unbuffered_and_keeps_it_open(tmp_path):
    from app.main import create_app

    paths = create_app(Settings(_env_file=None, STATE_DIR=tmp_path)).openapi()["paths"]
    streams = [
        path
        for path, operations in paths.items()
        for operation in operations.values()
        if "text/event-stream" in operation.get("responses", {}).get("200", {}).get("content", {})
    ]
    assert streams, "the app has no event stream any more: update deploy/nginx.conf"
    for path in streams:
        concrete = re.sub(r"\{[^}]+\}", str(uuid.uuid4()), path)
        assert re.search(SSE_PATTERN, concrete), f"{path} is not in nginx's SSE location"
    assert not re.search(SSE_PATTERN, "/jobs"), "the SSE location must not catch other routes"
    sse = LOCATIONS[f"~ {SSE_PATTERN}"]
    assert _value(sse, "proxy_buffering") == ["off"]
    assert _value(sse, "proxy_cache") == ["off"]
    # The API sends a comment every 15 s on an idle stream; the proxy waits far longer.
    from app.api.events import KEEPALIVE_S

    assert _seconds(_value(sse, "proxy_read_timeout")[0]) >= max(600.0, 10 * KEEPALIVE_S)


def test_the_proxy_passes_bodies_the_api_accepts_and_never_reuses_a_closed_connection():
    settings = Settings(_env_file=None)
    largest = max(settings.PREDICT_MAX_BODY_BYTES, settings.UPLOAD_MAX_FILE_BYTES)
    assert _bytes(_value(SERVER, "client_max_body_size")[0]) >= largest
    assert _value(SERVER, "proxy_request_buffering") == ["off"]
    assert _value(SERVER, "proxy_http_version") == ["1.1"]
    upstream_idle = _seconds(_value(UPSTREAM[2], "keepalive_timeout")[0])
    assert _api_options()["timeout_keep_alive"] > upstream_idle


def test_the_api_trusts_forwarded_headers_only_from_the_proxys_network():
    headers = {d[1][0]: d[1][1] for d in _find(SERVER, "proxy_set_header")}
    assert headers["X-Forwarded-For"] == "$remote_addr"  # replaced, never appended to
    assert headers["Host"] == "$http_host"
    options = _api_options()
    (edge,) = COMPOSE["networks"]["edge"]["ipam"]["config"]
    assert options["proxy_headers"] and options["forwarded_allow_ips"] == _interpolate(
        edge["subnet"]
    )
    assert SERVICES["proxy"]["networks"] == ["edge"]
    members = [name for name, s in SERVICES.items() if "edge" in s.get("networks", [])]
    assert sorted(members) == ["api", "proxy"]


def test_the_proxy_health_check_is_served_by_nginx_itself():
    check = SERVICES["proxy"]["healthcheck"]["test"]
    path = check[-1].split(":8000", 1)[1]
    assert _value(LOCATIONS[f"= {path}"], "return")[0] == "200"


def test_the_api_checks_the_host_header_and_its_health_check_passes_it():
    hosts = _interpolate(SERVICES["api"]["environment"]["ALLOWED_HOSTS"])
    assert "*" not in hosts and {"localhost", "127.0.0.1"} <= set(hosts.split(","))
    assert "127.0.0.1:8000/health" in " ".join(SERVICES["api"]["healthcheck"]["test"])


def _published(service: str) -> list[str]:
    return [_interpolate(str(port)) for port in SERVICES[service].get("ports", [])]


def test_published_ports_are_on_loopback_by_default():
    """Flower and Prometheus have no password: nothing but this machine may reach them."""
    for service in ("flower", "prometheus"):
        assert _published(service) and all(p.startswith("127.0.0.1:") for p in _published(service))
    (proxy,) = SERVICES["proxy"]["ports"]
    assert proxy.startswith("${API_BIND:-127.0.0.1}:")


def test_prometheus_scrapes_every_api_replica():
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    (discovery,) = job["dns_sd_configs"]
    assert discovery["names"] == ["api"] and discovery["type"] == "A"
    assert discovery["port"] == _api_options()["port"]


# --- the image ------------------------------------------------------------------------


def test_gpu_image_is_the_official_tensorflow_image_of_the_pinned_version():
    dockerfile = (ROOT / "Dockerfile.gpu").read_text()
    (base,) = re.findall(r"^FROM\s+(\S+)", dockerfile, flags=re.MULTILINE)
    pinned = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (tf_pin,) = [d for d in pinned if d.startswith("tensorflow==")]
    minor = tf_pin.removeprefix("tensorflow==").removesuffix(".*")
    assert re.fullmatch(rf"tensorflow/tensorflow:{re.escape(minor)}\.\d+-gpu", base), base
    assert re.search(r'^CMD \["cnn", "worker"\]', dockerfile, flags=re.MULTILINE)
    assert "pip install" in dockerfile


def test_the_image_runs_as_a_numeric_non_root_user():
    dockerfile = (ROOT / "Dockerfile.gpu").read_text()
    (user,) = re.findall(r"^USER\s+(\S+)", dockerfile, flags=re.MULTILINE)
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) > 0
    # STATE_DIR and its folders belong to that user (volumes mounted there start writable).
    state = SERVICES["api"]["environment"]["STATE_DIR"]
    assert re.search(rf"chown -R {uid}:\d+ {re.escape(state)}\b", dockerfile)


def test_dockerignore_keeps_local_state_out_of_the_image():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "var", ".git", ".env"} <= set(ignored)
