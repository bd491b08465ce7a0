"""The service's faces against the real thing: the `cnn` client commands and the dashboard.

One stack for the module: a fresh PostgreSQL database, uvicorn on a free loopback port, one
Celery worker (Redis queues unique to this run) training NET I on small subsets of the
real CIFAR-10 archive. The client tests run the `cnn` console script as a user would; the
browser test drives Debian's chromium through Playwright.

Screenshots: a failing browser test saves the page to its tmp folder (the path is printed).
`DASHBOARD_SCREENSHOTS=docs/img pytest tests/worker/test_faces.py -k browser` refreshes the
README's pictures of the job page and the compare page.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from app.client import ApiClient
from app.config import Settings
from app.jobs.queue import worker_queues
from app.migrate import upgrade

from .conftest import Processes, admin_key, free_port, process_env, stack_settings

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")


@dataclass
class Service:
    url: str
    key: str | None
    settings: Settings
    client: ApiClient
    workdir: Path

    def cnn(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        """Run the `cnn` console script with CNN_URL / CNN_API_KEY set, as a user would."""
        env = process_env(self.settings)
        env.update(CNN_URL=self.url, CNN_API_KEY=self.key or "")
        return subprocess.run(
            [str(Path(sys.executable).with_name("cnn")), *args],
            env=env,
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


@pytest.fixture(scope="module")
def service(
    fresh_pg_database: Any,
    tmp_path_factory: pytest.TempPathFactory,
    cifar10_archive: Path,
    cifar10_cache: Path,
    cifar10: Any,
) -> Iterator[Service]:
    url = fresh_pg_database()
    upgrade(url)
    settings = stack_settings(
        url,
        "redis://127.0.0.1:6379/11",
        "faces",
        tmp_path_factory.mktemp("faces-state"),
        cifar10_cache,
        cifar10_archive,
        EVENTS_POLL_S=0.2,
    )
    procs = Processes(tmp_path_factory.mktemp("faces-logs"))
    port = free_port()
    try:
        procs.worker(settings)
        procs.api(settings, port)
        base = f"http://127.0.0.1:{port}"
        key = admin_key(settings)
        client = ApiClient(base, key, timeout=30)
        yield Service(base, key, settings, client, tmp_path_factory.mktemp("faces-cwd"))
        client.close()
    except BaseException:
        print(procs.tails())
        raise
    finally:
        procs.cleanup()


@pytest.fixture(scope="module")
def test_png(service: Service, cifar10: Any) -> Path:
    """The first CIFAR-10 test image (a cat) as a PNG file."""
    path = service.workdir / "cat.png"
    Image.fromarray(cifar10.x_test[0]).save(path)
    return path


@pytest.fixture
def cnn(service: Service, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    """`cnn ARGS...` run in this process (app.cli.main) against the service: quicker than a
    subprocess per command; the console script itself is run by Service.cnn."""
    from app.cli import main

    monkeypatch.setenv("CNN_URL", service.url)
    monkeypatch.setenv("CNN_API_KEY", service.key or "")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["cnn", *args], code, out, err)

    return run


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


# ---------------------------------------------------------------------- the client
def test_client_commands_against_the_running_service(service: Service, cnn: Any, test_png: Path):
    submitted = json.loads(
        ok(cnn("jobs", "submit", "net1", "--epochs", "2", "--train-limit", "600", "--json"))
    )
    job_id = submitted["id"]
    assert submitted["status"] == "queued" and submitted["parameters"]["train_limit"] == 600

    # A second job waits behind the first (one worker): cancel it while it is queued.
    second = cnn("jobs", "submit", "net1", "--epochs", "50", "--model-name", "spare")
    assert "queued" in ok(second)
    spare_id = second.stdout.split()[1]
    cancelled = ok(cnn("jobs", "cancel", spare_id))
    assert "cancelled" in cancelled or "stops at its next batch" in cancelled

    watched = service.cnn("jobs", "watch", job_id)  # the console script itself
    out = ok(watched)
    assert f"job {job_id} succeeded: test accuracy" in out
    assert "epoch 1/2" in out and "epoch 2/2" in out and "val_acc" in out
    assert cnn("jobs", "watch", spare_id).returncode == 3  # exit code by outcome

    events = [json.loads(line) for line in ok(cnn("jobs", "watch", job_id, "--json")).splitlines()]
    assert [e["event"] for e in events] == ["status", "status", "epoch", "epoch", "status"]
    assert events[-1]["data"]["status"] == "succeeded"

    listing = ok(cnn("jobs", "list"))
    assert job_id in listing and spare_id in listing and "2/2" in listing and "cancelled" in listing
    as_json = json.loads(ok(cnn("jobs", "list", "--json", "--status", "succeeded")))
    assert [j["id"] for j in as_json["jobs"]] == [job_id]

    history = ok(cnn("jobs", "history", job_id))
    assert "EPOCH" in history and "best epoch (lowest val_loss)" in history
    assert len(json.loads(ok(cnn("jobs", "history", job_id, "--json")))["epochs"]) == 2

    evaluation = ok(cnn("jobs", "evaluation", job_id))
    assert "test accuracy" in evaluation and "confusion matrix" in evaluation
    assert "airplane" in evaluation and "first test image: predicted" in evaluation

    models = ok(cnn("models", "list"))
    assert "net1" in models
    assert "net1@production -> version 1" in ok(cnn("models", "alias", "net1", "production", "1"))
    assert "production->v1" in ok(cnn("models", "list"))

    predicted = ok(cnn("predict", "--remote", str(test_png), "--alias", "production"))
    assert "(net1 version 1)" in predicted and predicted.count("\n") == 11  # title + ten classes
    body = json.loads(ok(cnn("predict", "--remote", str(test_png), "--json")))
    assert len(body["predictions"][0]["probabilities"]) == 10

    # The module's one worker: live, on the CPU, consuming this run's two queues, idle now.
    workers = json.loads(ok(cnn("workers", "--json")))
    (worker,) = workers["workers"]
    assert worker["state"] == "live" and worker["current_job_id"] is None
    assert (worker["device_kind"], worker["gpu_count"]) == ("cpu", 0)
    assert worker["name"] == service.client.job(job_id)["worker"]
    assert set(worker["queues"]) == set(worker_queues(service.settings, 0))
    table = ok(cnn("workers"))
    assert worker["name"] in table and "live" in table and "QUEUES" in table
    local = json.loads(ok(service.cnn("workers", "--local", "--json")))  # the database itself
    assert [w["name"] for w in local["workers"]] == [worker["name"]]
    assert cnn("workers", "--limit", "0").returncode == 2  # 422 from the service

    # Errors: one line on stderr with the service's code, exit 2.
    missing = cnn("jobs", "history", str(uuid.uuid4()))
    assert missing.returncode == 2 and "job_not_found" in missing.stderr
    cancel_again = cnn("jobs", "cancel", job_id)
    assert cancel_again.returncode == 2 and "job_terminal" in cancel_again.stderr
    nowhere = cnn("jobs", "list", "--url", f"http://127.0.0.1:{free_port()}")
    assert nowhere.returncode == 2 and "cannot reach" in nowhere.stderr


# ---------------------------------------------------------------------- the dashboard
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium: scripts/setup.sh installs it with apt-get")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"]
        )
        yield chromium
        chromium.close()


def test_dashboard_in_a_browser(service: Service, browser: Any, test_png: Path, tmp_path: Path):
    page = browser.new_page(viewport={"width": 1366, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.set_default_timeout(30_000)
    shots = Path(os.environ.get("DASHBOARD_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    try:
        _walk_through_the_dashboard(page, service, test_png, shots)
    except BaseException:
        failure = tmp_path / "failure.png"
        page.screenshot(path=str(failure), full_page=True)
        print(f"screenshot of the failing page: {failure}\npage errors: {errors}")
        raise
    finally:
        page.close()
    assert errors == []


def _walk_through_the_dashboard(page: Any, service: Service, png: Path, shots: Path) -> None:
    finished = service.client.list_jobs(status="succeeded")["jobs"]
    other_id = (
        finished[0]["id"]
        if finished
        else service.client.submit_job({"net": "net1", "epochs": 2, "train_limit": 400})["id"]
    )

    # The key, entered once; it survives navigation (sessionStorage).
    page.goto(service.url + "/")
    page.fill("#key-input", service.key or "no-key-needed")
    page.click("text=Use this key")
    page.wait_for_selector("#jobs-table")

    # Start a tiny job from the form: the course's defaults are filled in.
    page.click("#new-job-toggle")
    assert page.input_value("#job-form [name=batch_size]") == "128"
    assert page.input_value("#job-form [name=epochs]") == "20"
    page.select_option("#job-form [name=net]", "net1")
    page.fill("#job-form [name=epochs]", "2")
    page.fill("#job-form [name=train_limit]", "800")
    page.fill("#job-form [name=model_name]", "dashboard")
    page.click("#job-submit")
    page.wait_for_url("**/#/job/*")
    job_id = page.url.rsplit("/", 1)[1]

    # Watch it live: succeeded, both curves drawn with two points per series.
    page.wait_for_selector("#job-header [data-status=succeeded]", timeout=240_000)
    page.wait_for_selector("#test-accuracy")
    for chart in ("#chart-accuracy", "#chart-loss"):
        assert page.locator(f"{chart} path.series").count() == 2
        assert page.locator(f"{chart} circle.point").count() == 4
    assert page.locator("#confusion tbody tr").count() == 10
    assert page.locator("#per-class .fill").count() == 10
    page.screenshot(path=str(shots / "dashboard-job.png"), full_page=True)

    # Compare it with another finished job (the client test's, or one trained now).
    for _event in service.client.follow(other_id):
        pass
    assert service.client.job(other_id)["status"] == "succeeded"
    page.goto(f"{service.url}/#/compare?jobs={job_id},{other_id}")
    page.wait_for_selector("#compare-table tbody tr >> nth=1")
    assert page.locator("#compare-table tbody tr").count() == 2
    assert page.locator("#compare-accuracy path.series").count() == 2
    assert page.locator("#compare-loss path.series").count() == 2
    page.screenshot(path=str(shots / "dashboard-compare.png"), full_page=True)

    # Predict: upload a PNG, see ten probability bars.
    page.goto(f"{service.url}/#/predict")
    page.select_option("#predict-model", "dashboard")
    page.set_input_files("#predict-file", str(png))
    page.wait_for_selector("#probabilities")
    assert page.locator("#probabilities .fill").count() == 10
    assert page.inner_text("#predicted-class") in {
        "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"
    }  # fmt: skip

    # Models: move an alias and see it land on that version.
    page.goto(f"{service.url}/#/models")
    card = page.locator("[data-model=dashboard]")
    card.locator("input[name=alias]").fill("staging")
    card.locator("select[name=version]").select_option("1")
    card.locator("text=Move alias").click()
    page.wait_for_selector("[data-model=dashboard] tr[data-version='1'] .aliases >> text=staging")
    assert service.client.model("dashboard")["aliases"] == {"staging": 1}

    # Networks: the summary table, layer by layer with formulas.
    page.goto(f"{service.url}/#/nets/net1")
    page.wait_for_selector("#layers tbody tr")
    assert "193,034" in page.inner_text("#net-params")

    # Workers: the module's worker, live, with this run's queues.
    page.goto(f"{service.url}/#/workers")
    row = page.locator("#workers-body tr[data-state=live]")
    row.wait_for()
    assert row.count() == 1
    assert service.settings.TRAINING_QUEUE in row.inner_text()
    assert "CPU" in row.inner_text()

    # A predict-only key: no job list (403), so the dashboard opens Predict with typed fields.
    created = service.client.request(
        "POST", "/keys", json={"name": f"kiosk-{os.getpid()}", "scopes": ["predict"]}
    ).json()
    kiosk = page.context.browser.new_page()  # its own context: a fresh sessionStorage
    try:
        kiosk.set_default_timeout(30_000)
        kiosk.goto(service.url + "/")
        kiosk.fill("#key-input", created["key"])
        kiosk.click("text=Use this key")
        kiosk.wait_for_url("**/#/predict")
        assert "predict only" in kiosk.inner_text("#key-label")
        kiosk.fill("#predict-model", "dashboard")
        kiosk.fill("#predict-target", "@staging")
        kiosk.set_input_files("#predict-file", str(png))
        kiosk.wait_for_selector("#probabilities")
        assert "dashboard version 1" in kiosk.inner_text("#predict-result")
    finally:
        kiosk.close()
