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
