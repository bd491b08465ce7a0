"""The `cnn` command end to end on a tiny generated image tree: summary, train, predict."""

import json

import numpy as np
import pytest
from PIL import Image

from app.cli import main
from app.ml.nets import CLASS_NAMES


@pytest.fixture()
def image_tree(tmp_path):
    """train/<class>/*.png and test/<class>/*.png, 6 and 2 images per class."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("test", 2)):
        for label, name in enumerate(CLASS_NAMES):
            folder = tmp_path / "tree" / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 40, size=(32, 32, 3)) + label * 20
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i:04d}.png")
    return tmp_path / "tree"


def test_summary_json(capsys):
    assert main(["summary", "net2", "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["total_params"] == 686_090 and body["agrees"] is True


def test_nets_lists_all(capsys):
    assert main(["nets"]) == 0
    out = capsys.readouterr().out
    assert "NET I" in out and "NET III" in out


def test_unknown_net_is_a_one_line_error(capsys):
    assert main(["summary", "net42"]) == 2
    assert "known nets: net1, net2, net3" in capsys.readouterr().err


def test_train_then_predict(image_tree, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("STATE_DIR", str(tmp_path / "state"))
    from app.config import get_settings

    get_settings.cache_clear()
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "net1",
            "--data",
            str(image_tree),
            "--epochs",
            "2",
            "--batch-size",
            "16",
            "--out",
            str(out),
            "--precision",
            "float32",
            "--no-progress",
        ]
    )
    get_settings.cache_clear()
    assert code == 0
    printed = capsys.readouterr().out
    assert "test accuracy" in printed and "epoch 2:" in printed
    report = json.loads((out / "history.json").read_text())
    assert [row["epoch"] for row in report["epochs"]] == [1, 2]
    assert len(report["history"]["val_loss"]) == 2
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"

    image = next((image_tree / "test" / "frog").iterdir())
    assert main(["predict", str(out / "model.keras"), str(image), "--json"]) == 0
    prediction = json.loads(capsys.readouterr().out)
    assert len(prediction["probabilities"]) == 10
    assert sum(prediction["probabilities"]) == pytest.approx(1.0, abs=1e-4)


def test_train_with_missing_data_path_fails_cleanly(tmp_path, capsys):
    code = main(
        [
            "train",
            "net1",
            "--data",
            str(tmp_path / "nope.tar.gz"),
            "--epochs",
            "1",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2
    assert "nope.tar.gz" in capsys.readouterr().err
