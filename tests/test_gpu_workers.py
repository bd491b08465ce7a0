"""One worker per GPU: which GPUs `cnn serve` starts workers for, and `cnn worker --gpu N`."""

from __future__ import annotations

import os
import sys

import pytest

from app import cli, serve


@pytest.mark.parametrize(
    ("visible", "selection", "expected"),
    [
        ("0,1", "all", ["0", "1"]),
        ("3", "all", ["3"]),
        ("", "all", []),
        ("-1", "all", []),
        ("0,1", "none", []),
        ("0,1", "1", ["1"]),
        (None, "2, 5", ["2", "5"]),
    ],
)
def test_visible_gpus(monkeypatch, visible, selection, expected):
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert serve.visible_gpus(selection) == expected


def test_without_nvidia_smi_there_is_no_gpu(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    assert serve.visible_gpus("all") == []


def test_worker_commands_pin_one_gpu_each():
    assert serve.worker_command(None) == [sys.executable, "-m", "app.cli", "worker"]
    assert serve.worker_command("1")[-2:] == ["--gpu", "1"]


def test_cnn_worker_gpu_sets_the_visible_device(monkeypatch):
    seen = {}

    def fake_execv(path, argv):
        seen["argv"] = argv[1:]
        seen["visible"] = os.environ.get("CUDA_VISIBLE_DEVICES")
        seen["name"] = os.environ.get("WORKER_NAME")
        return 0

    monkeypatch.setattr(os, "execv", fake_execv)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    monkeypatch.setenv("WORKER_NAME", "box@host")
    cli.main(["worker", "--gpu", "2"])
    # The name stays the one `cnn serve` gave it: it hands a dead worker's jobs back by name.
    assert seen == {"argv": ["-m", "worker.run"], "visible": "2", "name": "box@host"}


# --- the queues a worker serves (issue 19) --------------------------------------------
def _settings(**values):
    from app.config import Settings

    return Settings(_env_file=None, **values)


@pytest.mark.parametrize(
    ("gpus", "queue"), [(0, "train.any"), (1, "train.gpu1"), (2, "train.gpu2"), (16, "train.gpu16")]
)
def test_a_job_goes_to_the_queue_of_its_gpus(gpus, queue):
    from app.jobs.queue import training_queue

    assert training_queue(_settings(), gpus) == queue


@pytest.mark.parametrize(
    ("worker_gpus", "queues"),
    [
        (0, ["train.any", "maintenance"]),
        (1, ["train.gpu1", "train.any", "maintenance"]),
        (4, ["train.gpu1", "train.gpu2", "train.gpu3", "train.gpu4", "train.any", "maintenance"]),
    ],
)
def test_a_worker_serves_every_job_its_gpus_can_run(worker_gpus, queues):
    from worker.run import worker_options

    assert worker_options(_settings(WORKER_GPUS=worker_gpus))["queues"] == queues


@pytest.mark.parametrize(("visible", "count"), [("0,1,2", 3), ("1", 1), ("", 0), ("-1", 0)])
def test_an_unset_worker_gpus_counts_the_visible_gpus(monkeypatch, visible, count):
    from worker.run import worker_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert worker_gpus(_settings()) == count
    assert worker_gpus(_settings(WORKER_GPUS=2)) == 2  # the setting wins


def test_the_queue_prefix_and_the_visibility_timeout_are_settings():
    from app.jobs.queue import create_celery, worker_queues

    settings = _settings(
        TRAINING_QUEUE="t-1",
        CELERY_BROKER_URL="redis://127.0.0.1:6379/11",
        CELERY_VISIBILITY_TIMEOUT_S=7,
    )
    assert worker_queues(settings, 2) == ["t-1.gpu1", "t-1.gpu2", "t-1.any", "maintenance"]
    app = create_celery(settings)
    assert app.conf.broker_transport_options == {"visibility_timeout": 7}
    assert app.conf.task_acks_late and app.conf.task_reject_on_worker_lost
    assert app.conf.worker_prefetch_multiplier == 1


@pytest.mark.parametrize(
    "values",
    [{"WORKER_GPUS": -1}, {"WORKER_GPUS": 17}, {"CELERY_VISIBILITY_TIMEOUT_S": 0}],
)
def test_the_new_settings_are_bounded(values):
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        _settings(**values)
