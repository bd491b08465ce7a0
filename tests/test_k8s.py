"""deploy/k8s/, checked without a cluster.

Every manifest validates against the schemas of the Kubernetes versions below
(kubernetes-validate, strict: an unknown or misspelt field fails); the kustomization lists
exactly the manifests and never the Secret's placeholders; the settings the pods get are
Settings fields (or variables deploy/environment.yaml names) and validate; commands,
ports and probe paths are the app's own; the GPU worker asks for as many GPUs as it says it
serves; every pod runs as the image's non-root user with a read-only root filesystem, with
requests and limits; the init containers' schema wait works against a real database.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import kubernetes_validate
import pytest
import yaml

from app.config import Settings

KUBERNETES_VERSIONS = ("1.33.0", "1.37.0")
ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
KUSTOMIZATION: dict[str, Any] = yaml.safe_load((K8S / "kustomization.yaml").read_text())
SECRET_EXAMPLE = "secret.example.yaml"
ENVIRONMENT = yaml.safe_load((ROOT / "deploy" / "environment.yaml").read_text())
# Routes the probes use that another branch of this round adds (issue 18: GET /ready).


def _documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


MANIFESTS = {name: _documents(name) for name in KUSTOMIZATION["resources"]}
APPLIED = [doc for docs in MANIFESTS.values() for doc in docs]
(SECRET,) = _documents(SECRET_EXAMPLE)


def _one(kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in APPLIED if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


CONFIG = _one("ConfigMap", "cnn-config")["data"]
API = _one("Deployment", "cnn-api")
WORKER_GPU = _one("Deployment", "cnn-worker-gpu")
WORKER_CPU = _one("Deployment", "cnn-worker-cpu")
MIGRATE = _one("Job", "cnn-migrate")
WORKLOADS = (API, WORKER_GPU, WORKER_CPU, MIGRATE)


def _pod(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def _containers(workload: dict[str, Any], init: bool = True) -> list[dict[str, Any]]:
    pod = _pod(workload)
    return [*(pod.get("initContainers", []) if init else []), *pod["containers"]]


def _main(workload: dict[str, Any]) -> dict[str, Any]:
    (container,) = _pod(workload)["containers"]
    return container


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", [])}


def _settings(**overrides: str) -> Settings:
    """The settings a pod would read: the ConfigMap and the Secret, then its own `env`."""
    values = {**CONFIG, **SECRET["stringData"], **overrides}
    return Settings(
        _env_file=None, **{k: v for k, v in values.items() if k in Settings.model_fields}
    )


# --- the files --------------------------------------------------------------------------


def test_the_kustomization_lists_every_manifest_and_never_the_secret_placeholders():
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", SECRET_EXAMPLE}
    assert set(KUSTOMIZATION["resources"]) == on_disk
    # `kubectl apply -k` must never overwrite the real Secret with placeholders.
    assert SECRET_EXAMPLE not in KUSTOMIZATION["resources"]
    assert not [d for d in APPLIED if d["kind"] == "Secret"]
    for generator in KUSTOMIZATION["configMapGenerator"]:
        assert all((K8S / file).is_file() for file in generator["files"])


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name", [*KUSTOMIZATION["resources"], SECRET_EXAMPLE])
def test_every_manifest_validates_against_the_stated_kubernetes_versions(name, version):
    for document in _documents(name):
        kubernetes_validate.validate(document, version, strict=True)


@pytest.mark.parametrize(
    "spoil",
    [
        lambda d: d["spec"].update(replica=2),  # misspelt field
        lambda d: d["spec"].update(replicas="two"),  # wrong type
        lambda d: d["spec"]["template"]["spec"]["containers"][0].pop("name"),  # required
    ],
    ids=["unknown-field", "wrong-type", "missing-required"],
)
def test_the_validation_rejects_what_a_cluster_would(spoil):
    """The check above can fail: the same validator on a spoilt copy of the API Deployment."""
    spoilt = yaml.safe_load(yaml.safe_dump(API))
    spoil(spoilt)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(spoilt, KUBERNETES_VERSIONS[0], strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) not here")
def test_the_kustomization_builds_and_its_output_validates():
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    built = [d for d in yaml.safe_load_all(out) if d]
    assert {d["metadata"]["namespace"] for d in built if d["kind"] != "Namespace"} == {"cnn"}
    (scripts,) = [d for d in built if d["metadata"]["name"].startswith("cnn-scripts-")]
    for document in built:
        kubernetes_validate.validate(document, KUBERNETES_VERSIONS[-1], strict=True)
        if document["kind"] == "Deployment":
            volumes = {v["name"]: v for v in document["spec"]["template"]["spec"]["volumes"]}
            assert volumes["scripts"]["configMap"]["name"] == scripts["metadata"]["name"]


# --- settings -------------------------------------------------------------------------


def _set_variables() -> dict[str, set[str]]:
    where: dict[str, set[str]] = {
        "ConfigMap cnn-config": set(CONFIG),
        "Secret cnn-secrets": set(SECRET["stringData"]),
    }
    for workload in WORKLOADS:
        for container in _containers(workload):
            where[f"{workload['metadata']['name']}/{container['name']}"] = set(_env(container))
    return where


def test_every_variable_the_pods_get_is_a_setting_or_a_documented_one():
    known = set(Settings.model_fields) | set(ENVIRONMENT["standard"]) | set(ENVIRONMENT["pending"])
    for where, names in _set_variables().items():
        assert not names - known, f"{where} sets variables no Settings field reads: {names - known}"


def test_the_settings_validate_and_reach_the_servers_by_url():
    settings = _settings()
    assert settings.DATABASE_URL.startswith("postgresql+psycopg://")
    assert settings.CELERY_BROKER_URL.startswith("redis://") and not settings.embedded_broker
    assert CONFIG["ARTIFACT_STORE"].startswith("s3://")
    assert "ARTIFACT_DIR" not in CONFIG
    for folder in ("SCRATCH_DIR", "CACHE_DIR"):
        assert CONFIG[folder].startswith(CONFIG["STATE_DIR"] + "/")
    # Nothing the pods need is deployed here: no PostgreSQL, Redis or S3 server.
    images = {c["image"] for w in WORKLOADS for c in _containers(w)}
    assert images == {"cnn-service"}


def test_every_pod_reads_the_configmap_and_the_secret():
    for workload in WORKLOADS:
        for container in _containers(workload):
            assert container["envFrom"] == [
                {"configMapRef": {"name": "cnn-config"}},
                {"secretRef": {"name": SECRET["metadata"]["name"]}},
            ], container["name"]


def test_the_secret_holds_placeholders_only():
    assert "data" not in SECRET
    for key, value in SECRET["stringData"].items():
        assert "CHANGE-ME" in value, f"{key} looks like a real value"


def test_pending_settings_are_not_settings_fields_yet():
    """A name waiting in `pending` for a parallel branch leaves it when the field lands."""
    landed = set(ENVIRONMENT.get("pending") or {}) & set(Settings.model_fields)
    assert not landed, (
        f"now Settings fields, remove from deploy/environment.yaml's pending: {landed}"
    )


# --- commands, ports and probes ---------------------------------------------------------


def test_commands_are_the_apps_entry_points():
    from uvicorn.main import main as uvicorn_cli

    from app.cli import build_parser

    for workload, sub_command in (
        (WORKER_GPU, "worker"),
        (WORKER_CPU, "worker"),
        (MIGRATE, "migrate"),
    ):
        command = _main(workload)["command"]
        assert command[:2] == ["cnn", sub_command]
        build_parser().parse_args(command[1:])

    command = _main(API)["command"]
    assert command[0] == "uvicorn"
    options = uvicorn_cli.make_context("uvicorn", command[1:]).params
    assert options["factory"] and options["app"] == "app.main:create_app"
    (port,) = _main(API)["ports"]
    assert (port["name"], port["containerPort"]) == ("http", options["port"])
    service = _one("Service", "cnn-api")
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] == "http"


def test_the_init_containers_run_the_schema_wait_from_the_generated_configmap():
    (generator,) = KUSTOMIZATION["configMapGenerator"]
    for workload in (API, WORKER_GPU, WORKER_CPU):
        (init,) = _pod(workload)["initContainers"]
        mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
        volumes = {v["name"]: v for v in _pod(workload)["volumes"]}
        assert volumes["scripts"]["configMap"]["name"] == generator["name"]
        assert init["command"] == ["python", f"{mounts['scripts']}/{generator['files'][0]}"]


def _app_paths(tmp_path: Path) -> set[str]:
    from app.main import create_app

    return set(create_app(Settings(_env_file=None, STATE_DIR=tmp_path)).openapi()["paths"])


def test_probes_ask_the_apps_own_routes_with_a_host_it_serves(tmp_path):
    container = _main(API)
    probes = {kind: container[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert probes["livenessProbe"]["httpGet"]["path"] == "/health"
    paths = _app_paths(tmp_path)
    allowed = _settings().allowed_hosts
    for kind, probe in probes.items():
        get = probe["httpGet"]
        assert get["port"] == "http"
        assert get["path"] in paths, f"{kind}: the app has no {get['path']}"
        # Without it the kubelet sends the pod's IP, which the API refuses (ALLOWED_HOSTS).
        (host,) = [h["value"] for h in get["httpHeaders"] if h["name"] == "Host"]
        assert host in allowed
    # A short database outage (/health asks it) restarts nothing.
    live = probes["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] >= 60


# --- workers and GPUs -------------------------------------------------------------------


def test_the_gpu_worker_owns_one_gpu_and_serves_the_queues_of_that_count():
    container = _main(WORKER_GPU)
    gpus = container["resources"]["limits"]["nvidia.com/gpu"]
    assert gpus == 1 == int(_env(container)["WORKER_GPUS"])
    assert "nvidia.com/gpu" not in container["resources"].get("requests", {})
    tolerations = _pod(WORKER_GPU)["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
    # No spare GPU to surge onto.
    assert WORKER_GPU["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0


def test_pods_without_a_gpu_limit_see_no_gpu():
    for workload in (API, WORKER_CPU, MIGRATE):
        for container in _containers(workload):
            assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
            assert _env(container)["NVIDIA_VISIBLE_DEVICES"] == "void", container["name"]
    assert _env(_main(WORKER_CPU))["WORKER_GPUS"] == "0"


def test_workers_have_time_to_hand_their_job_back():
    for workload in (WORKER_GPU, WORKER_CPU):
        assert _pod(workload)["terminationGracePeriodSeconds"] >= 60
        # The database heartbeat is the worker's liveness; a kubelet restart would cut a fit.
        assert "livenessProbe" not in _main(workload)


# --- availability ---------------------------------------------------------------------


def _selects(selector: dict[str, str], workload: dict[str, Any]) -> bool:
    labels = workload["spec"]["template"]["metadata"]["labels"]
    return selector.items() <= labels.items()


def test_the_service_and_the_disruption_budget_select_the_api_pods_only():
    service = _one("Service", "cnn-api")["spec"]["selector"]
    budget = _one("PodDisruptionBudget", "cnn-api")["spec"]
    for selector in (service, budget["selector"]["matchLabels"]):
        assert _selects(selector, API)
        assert not any(_selects(selector, w) for w in (WORKER_GPU, WORKER_CPU, MIGRATE))
    # A drain can still make progress: the budget leaves at least one pod to evict.
    assert 1 <= budget["minAvailable"] < API["spec"]["replicas"]
    assert API["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_the_migration_job_retries_and_cleans_up():
    spec = MIGRATE["spec"]
    assert spec["template"]["spec"]["restartPolicy"] in {"OnFailure", "Never"}
    assert spec["backoffLimit"] >= 1 and spec["ttlSecondsAfterFinished"] > 0


# --- security and resources -------------------------------------------------------------


def test_pods_run_as_the_images_non_root_user_with_a_read_only_root():
    dockerfile = (ROOT / "Dockerfile.gpu").read_text()
    (user,) = re.findall(r"^USER\s+(\d+):(\d+)", dockerfile, flags=re.MULTILINE)
    for workload in WORKLOADS:
        pod = _pod(workload)
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True
        assert (str(context["runAsUser"]), str(context["runAsGroup"])) == user
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        assert pod["enableServiceLinks"] is False  # no stray <SERVICE>_PORT variables
        for container in _containers(workload):
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False
            assert security["readOnlyRootFilesystem"] is True
            assert security["capabilities"] == {"drop": ["ALL"]}


def test_what_the_processes_write_is_on_bounded_empty_dirs():
    for workload in WORKLOADS:
        volumes = {v["name"]: v for v in _pod(workload)["volumes"]}
        for container in _containers(workload):
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert "/tmp" in mounts
            writable = [mounts["/tmp"]]
            if container in _pod(workload)["containers"]:
                # STATE_DIR holds SCRATCH_DIR and CACHE_DIR: the pod's own, lost with it.
                writable.append(mounts[CONFIG["STATE_DIR"]])
            for name in writable:
                assert volumes[name]["emptyDir"]["sizeLimit"], name


def _quantity(value: str | int) -> float:
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    text = str(value)
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return float(text.removesuffix(suffix)) * factor
    return float(text)


def test_every_container_has_requests_within_its_limits():
    for workload in WORKLOADS:
        for container in _containers(workload):
            requests, limits = container["resources"]["requests"], container["resources"]["limits"]
            for resource in ("cpu", "memory"):
                assert _quantity(requests[resource]) <= _quantity(limits[resource]), (
                    f"{container['name']}: {resource}"
                )


def test_one_pinned_image_for_every_pod():
    (image,) = KUSTOMIZATION["images"]
    assert image["name"] == "cnn-service"
    assert image["newTag"] and image["newTag"] != "latest"
    for workload in WORKLOADS:
        for container in _containers(workload):
            assert container["imagePullPolicy"] == "IfNotPresent"


# --- the init containers' schema wait, against a real database -------------------------


def _wait_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("wait_for_schema", K8S / "wait_for_schema.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_schema_wait_waits_until_the_database_is_migrated(tmp_path, monkeypatch, capsys):
    from app.migrate import upgrade

    settings = Settings(_env_file=None, STATE_DIR=tmp_path)
    module = _wait_module()
    monkeypatch.setattr(module, "get_settings", lambda: settings)
    monkeypatch.setattr(module, "WAIT_S", 0.0)
    assert module.main() == 1
    assert "waiting for the cnn-migrate Job" in capsys.readouterr().out

    upgrade(settings.database_url)
    assert module.main() == 0


def test_the_schema_wait_runs_as_the_init_container_runs_it(tmp_path):
    from app.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'cnn.db'}"
    upgrade(url)
    done = subprocess.run(
        [sys.executable, str(K8S / "wait_for_schema.py")],
        env={"DATABASE_URL": url, "STATE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "database schema is at" in done.stdout
