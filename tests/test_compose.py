"""The production stack files, checked without a Docker engine.

docker-compose.yml parses; the services docs/jobs.md names exist; health checks and
start-up order are in place; commands are real entry points; every environment key of an
app service is a Settings field and the values validate; secrets are required, not
defaulted; Dockerfile.gpu builds on the TensorFlow GPU image of the pinned version.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.config import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_TEXT = (ROOT / "docker-compose.yml").read_text()
COMPOSE: dict[str, Any] = yaml.safe_load(COMPOSE_TEXT)
SERVICES: dict[str, Any] = COMPOSE["services"]
APP_SERVICES = ("migrate", "api", "worker")
INTERPOLATION = re.compile(r"\$\{(\w+)(?::([?-])([^}]*))?\}")


def _interpolate(value: str) -> str:
    """Compose's ${VAR:?msg} / ${VAR:-default}, with every required variable set to 'x'."""
    return INTERPOLATION.sub(lambda m: m.group(3) if m.group(2) == "-" else "x", value)


def _command(service: str) -> list[str]:
    command = SERVICES[service]["command"]
    return command if isinstance(command, list) else shlex.split(command)


def test_every_service_the_docs_name_exists_and_no_other():
    docs = (ROOT / "docs" / "jobs.md").read_text()
    named = set(re.findall(r"^\| `([a-z0-9-]+)` \|", docs, flags=re.MULTILINE))
    assert named == set(SERVICES)
    assert set(SERVICES) >= {"postgres", "redis", "migrate", "api", "worker", "flower"}


@pytest.mark.parametrize("service", ["postgres", "redis", "api"])
def test_long_running_dependencies_have_health_checks(service):
    check = SERVICES[service]["healthcheck"]
    assert check["test"][0] in {"CMD", "CMD-SHELL"} and len(check["test"]) > 1
    assert check["retries"] >= 3


def test_start_up_order_waits_for_health_and_for_the_migration():
    assert SERVICES["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert SERVICES["migrate"]["restart"] == "no"
    for service in ("api", "worker"):
        depends = SERVICES[service]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert depends["redis"]["condition"] == "service_healthy"


def test_commands_are_real_entry_points():
    from app.cli import build_parser

    for service in ("migrate", "worker"):
        command = _command(service)
        assert command[0] == "cnn"
        build_parser().parse_args(command[1:])  # SystemExit on an unknown sub-command
    assert _command("migrate")[1] == "migrate"
    assert _command("worker")[1] == "worker"

    api = _command("api")
    assert api[0] == "uvicorn" and "--factory" in api
    module, _, factory = api[1].partition(":")
    assert (module, factory) == ("app.main", "create_app")
    from app.main import create_app

    assert callable(create_app)


def test_worker_reserves_one_gpu_and_can_be_scaled():
    worker = SERVICES["worker"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    # Replicas need distinct names and no fixed host port.
    assert "container_name" not in worker and "ports" not in worker
    assert worker["build"]["dockerfile"] == "Dockerfile.gpu"


def test_flower_is_optional():
    assert SERVICES["flower"]["profiles"] == ["monitoring"]


@pytest.mark.parametrize("service", APP_SERVICES)
def test_app_environment_is_exactly_settings_fields_and_validates(service):
    environment = SERVICES[service]["environment"]
    assert isinstance(environment, dict)
    unknown = set(environment) - set(Settings.model_fields)
    assert not unknown, f"{service} sets variables no Settings field reads: {unknown}"
    values = {key: _interpolate(str(value)) for key, value in environment.items()}
    settings = Settings(_env_file=None, **values)
    assert settings.DATABASE_URL.startswith("postgresql+psycopg://")
    assert settings.CELERY_BROKER_URL.startswith("redis://redis:")
    assert not settings.embedded_broker


def test_api_and_workers_share_the_artifact_folder_at_the_same_path():
    artifact_dir = SERVICES["api"]["environment"]["ARTIFACT_DIR"]
    for service in ("api", "worker"):
        mounts = {m.split(":")[1]: m.split(":")[0] for m in SERVICES[service]["volumes"]}
        assert mounts[artifact_dir] == "artifacts"


def test_secrets_are_required_not_defaulted():
    uses = INTERPOLATION.findall(COMPOSE_TEXT)
    password = [(op, msg) for name, op, msg in uses if name == "POSTGRES_PASSWORD"]
    assert password and all(op == "?" and msg for op, msg in password)
    assert SERVICES["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith(
        "${POSTGRES_PASSWORD:?"
    )


def test_gpu_image_is_the_official_tensorflow_image_of_the_pinned_version():
    dockerfile = (ROOT / "Dockerfile.gpu").read_text()
    (base,) = re.findall(r"^FROM\s+(\S+)", dockerfile, flags=re.MULTILINE)
    pinned = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (tf_pin,) = [d for d in pinned if d.startswith("tensorflow==")]
    minor = tf_pin.removeprefix("tensorflow==").removesuffix(".*")
    assert re.fullmatch(rf"tensorflow/tensorflow:{re.escape(minor)}\.\d+-gpu", base), base
    assert re.search(r'^CMD \["cnn", "worker"\]', dockerfile, flags=re.MULTILINE)
    assert "pip install" in dockerfile


def test_dockerignore_keeps_local_state_out_of_the_image():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "var", ".git", ".env"} <= set(ignored)


def _published(service: str) -> list[str]:
    return [_interpolate(str(port)) for port in SERVICES[service].get("ports", [])]


def test_api_and_flower_publish_on_loopback_only():
    """Flower has no password: nothing but this machine may reach it (issue 8)."""
    assert _published("flower") and all(p.startswith("127.0.0.1:") for p in _published("flower"))
    # The API's bind address is a setting whose default is loopback.
    (api,) = SERVICES["api"]["ports"]
    assert api.startswith("${API_BIND:-127.0.0.1}:")


def test_the_api_checks_the_host_header():
    hosts = _interpolate(SERVICES["api"]["environment"]["ALLOWED_HOSTS"])
    assert "*" not in hosts and "localhost" in hosts.split(",")
