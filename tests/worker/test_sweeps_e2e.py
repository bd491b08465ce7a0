"""Sweeps end to end: HTTP, a real Celery worker process, Redis, PostgreSQL (and SQLite with
two workers), NET I on tiny subsets of the real CIFAR-10 archive.

The search has 12 trials with ASHA: at least one is pruned (the job ends `cancelled` with
the pruner's reason, after the epoch the trial records), and the best trial is the one
with the best validation value. The same stack serves `cnn sweeps ...` and the dashboard's
Sweeps page in a real browser.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from app.client import ApiClient
from app.config import Settings
from app.migrate import upgrade

from .conftest import Processes, admin_key, free_port, stack_settings, wait_for

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
# Tiny and quick: NET I on 1,000 images (800 train, 200 validate), 4 epochs of 25 steps.
BASE = {"net": "net1", "epochs": 4, "train_limit": 1000, "batch_size": 32, "precision": "float32"}
SEARCH = {
    "name": "e2e asha",
    "base": BASE,
    "space": {
        # From hopeless to fast: ASHA has clear losers to stop.
        "learning_rate": {"type": "float", "low": 1e-5, "high": 3e-2, "log": True},
        "augment_flip": {"type": "choice", "choices": [True, False]},
    },
    "sampler": "random",
    "max_trials": 12,
    # One worker: one trial trains while the next waits in the queue, so it never idles.
    "parallelism": 2,
    # val_loss is continuous, so no two trials tie at a rung.
    "objective": {"metric": "val_loss"},
    "pruner": {"type": "asha", "min_resource": 1, "reduction_factor": 2},
    "seed": 7,
}


@dataclass
class Stack:
    url: str
    key: str
    settings: Settings
    client: ApiClient
    procs: Processes


def start_stack(url: str, name: str, tmp: Any, cache: Path, archive: Path, workers: int) -> Stack:
    settings = stack_settings(
        url, "redis://127.0.0.1:6379/11", name, tmp.mktemp(f"{name}-state"), cache, archive
    )
    procs = Processes(tmp.mktemp(f"{name}-logs"))
    port = free_port()
    for _ in range(workers):
        procs.worker(settings)
    procs.api(settings, port)
    base = f"http://127.0.0.1:{port}"
    key = admin_key(settings)
    return Stack(base, key, settings, ApiClient(base, key, timeout=30), procs)


@pytest.fixture(scope="module")
def stack(
    fresh_pg_database, tmp_path_factory, cifar10_archive, cifar10_cache, cifar10
) -> Iterator[Stack]:
    url = fresh_pg_database()
    upgrade(url)
    procs = None
    try:
        running = start_stack(url, "sweeps", tmp_path_factory, cifar10_cache, cifar10_archive, 1)
        procs = running.procs
        yield running
        running.client.close()
    except BaseException:
        if procs is not None:
            print(procs.tails())
        raise
    finally:
        if procs is not None:
            procs.cleanup()


def wait_sweep(client: ApiClient, sweep_id: str, timeout: float) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        sweep = client.sweep(sweep_id)
        return sweep if sweep["status"] != "running" and not sweep["counts"]["running"] else None

    return wait_for(ended, timeout, f"sweep {sweep_id} to end", interval=1.0)


@pytest.fixture(scope="module")
def finished_search(stack: Stack) -> dict[str, Any]:
    sweep = stack.client.submit_sweep(SEARCH)
    try:
        return wait_sweep(stack.client, sweep["id"], timeout=900)
    except AssertionError:
        print(stack.procs.tails())
        raise


def test_a_search_of_12_trials_with_asha_runs_end_to_end(
    stack: Stack, finished_search: dict[str, Any]
):
    sweep = finished_search
    assert sweep["status"] == "finished", sweep.get("error")
    trials = sweep["trials"]
    assert len(trials) == 12
    assert {t["state"] for t in trials} <= {"complete", "pruned"}, [t["error"] for t in trials]
    pruned = [t for t in trials if t["state"] == "pruned"]
    assert pruned, "ASHA pruned no trial"
    for trial in pruned:
        job = stack.client.job(trial["job_id"])
        assert job["status"] == "cancelled" and "pruned by the sweep's asha pruner" in job["error"]
        epochs = [row["epoch"] for row in stack.client.history(trial["job_id"])["epochs"]]
        assert epochs == list(range(1, trial["pruned_epoch"] + 1)) and trial["pruned_epoch"] < 4
    complete = [t for t in trials if t["state"] == "complete"]
    assert complete
    for trial in complete:
        history = stack.client.history(trial["job_id"])["epochs"]
        assert len(history) == 4 and trial["value"] == pytest.approx(history[-1]["val_loss"])
        assert stack.client.job(trial["job_id"])["status"] == "succeeded"
    # The best trial is chosen by validation, whatever the test set says.
    best = min(complete, key=lambda t: (t["value"], t["number"]))
    assert sweep["best_trial"]["number"] == best["number"]
    assert sweep["importances"] or sweep["importances_note"]
    png = stack.client.sweep_png(sweep["id"])
    assert png.startswith(b"\x89PNG\r\n\x1a\n")


def test_cnn_sweeps_list_watch_best_and_an_ablation_submitted_then_cancelled(
    stack: Stack,
    finished_search: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
):
    from app.cli import main

    monkeypatch.setenv("CNN_URL", stack.url)
    monkeypatch.setenv("CNN_API_KEY", stack.key)

    def cnn(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    sweep_id = finished_search["id"]
    code, out, _ = cnn("sweeps", "list")
    assert code == 0 and sweep_id in out and "12/12" in out and "finished" in out
    code, out, _ = cnn("sweeps", "watch", sweep_id)
    assert code == 0 and out.count("\ntrial ") + out.startswith("trial ") == 12
    assert f"sweep {sweep_id} finished" in out and "pruned after epoch" in out
    code, out, _ = cnn("sweeps", "best", sweep_id)
    best = finished_search["best_trial"]
    assert code == 0 and f"trial {best['number']} complete" in out and "(not used to choose)" in out
    code, out, _ = cnn("sweeps", "best", sweep_id, "--json")
    assert json.loads(out)["number"] == best["number"]

    code, out, _ = cnn(
        "sweeps", "submit", "--ablation", "--epochs", "1", "--train-limit", "100", "--json"
    )
    ablation = json.loads(out)
    assert code == 0 and ablation["kind"] == "ablation" and len(ablation["plan"]) == 14
    code, out, _ = cnn("sweeps", "cancel", ablation["id"])
    assert code == 0 and "cancelled" in out
    code, _, err = cnn("sweeps", "cancel", ablation["id"])
    assert code == 2 and "sweep_terminal" in err
    spec = tmp_path / "bad.json"
    spec.write_text(
        json.dumps({**SEARCH, "space": {"dropout": {"type": "choice", "choices": [0.5]}}})
    )
    code, _, err = cnn("sweeps", "submit", str(spec))
    assert code == 2 and "validation_error" in err and "not a training option" in err


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


def test_the_sweeps_page_in_a_browser(
    stack: Stack, finished_search: dict[str, Any], browser: Any, tmp_path: Path
):
    page = browser.new_page(viewport={"width": 1366, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.set_default_timeout(30_000)
    shots = Path(os.environ.get("DASHBOARD_SCREENSHOTS") or tmp_path)
    try:
        page.goto(stack.url + "/")
        page.fill("#key-input", stack.key)
        page.click("text=Use this key")
        page.wait_for_selector("#jobs-table")
        page.click("#nav a[data-page=sweeps]")
        row = page.locator(f"#sweeps-table tr[data-id='{finished_search['id']}']")
        row.wait_for()
        assert "12/12" in row.inner_text() and "finished" in row.inner_text()
        row.locator("a").click()
        page.wait_for_selector("#trials-table tbody tr >> nth=11")
        assert page.locator("#trials-table tbody tr").count() == 12
        assert "null" not in page.inner_text("#sweep-header")
        assert (
            page.locator("#trials-table [data-state=pruned]").count()
            == finished_search["counts"]["pruned"]
        )
        best = finished_search["best_trial"]
        assert page.locator(f"#trials-table tr.best[data-number='{best['number']}']").count() == 1
        assert f"{best['value']:.4f}" in page.inner_text("#best-value")
        # Every trial's validation curve: a point per stored epoch (a trial pruned after
        # its first epoch is a lone point, without a line).
        points = sum(len(t["curve"]) for t in finished_search["trials"])
        assert page.locator("#sweep-curves circle.point").count() == points
        page.wait_for_selector("#sweep-png")
        assert page.evaluate("document.querySelector('#sweep-png').naturalWidth") > 0
        page.screenshot(path=str(shots / "dashboard-sweep.png"), full_page=True)

        # A new sweep from the form: the ablation example, cancelled from its page.
        page.goto(stack.url + "/#/sweeps")
        page.click("#new-sweep-toggle")
        page.click("text=Ablation example")
        page.fill("#sweep-json", json.dumps({"kind": "ablation", "epochs": 1, "train_limit": 100}))
        page.click("#sweep-submit")
        page.wait_for_url("**/#/sweep/*")
        page.wait_for_selector("#trials-table tbody tr")
        page.click("#sweep-cancel")
        page.wait_for_selector("#sweep-header [data-status=cancelled]")
    except BaseException:
        page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
        print(f"screenshot: {tmp_path / 'failure.png'}; page errors: {errors}")
        raise
    finally:
        page.close()
    assert errors == []


def test_sqlite_with_two_workers_runs_a_sweep_without_database_is_locked(
    tmp_path_factory: pytest.TempPathFactory,
    cifar10_archive: Path,
    cifar10_cache: Path,
    cifar10: Any,
):
    state = tmp_path_factory.mktemp("sqlite-db")
    url = f"sqlite:///{state / 'cnn.db'}"
    upgrade(url)
    running = start_stack(
        url, "sqlite", tmp_path_factory, cifar10_cache, cifar10_archive, workers=2
    )
    try:
        spec = {**SEARCH, "name": "sqlite", "max_trials": 6, "base": {**BASE, "epochs": 3}}
        sweep = running.client.submit_sweep(spec)
        ended = wait_sweep(running.client, sweep["id"], timeout=900)
        assert ended["status"] == "finished", ended.get("error")
        assert len(ended["trials"]) == 6
        assert {t["state"] for t in ended["trials"]} <= {"complete", "pruned"}
        workers = {running.client.job(t["job_id"])["worker"] for t in ended["trials"]}
        assert len(workers) == 2, "both workers should have trained trials"
        logs = [p.log_path.read_text(errors="replace") for p in running.procs.started]
        assert not any("database is locked" in log for log in logs)
    except BaseException:
        print(running.procs.tails())
        raise
    finally:
        running.client.close()
        running.procs.cleanup()
