"""Multi-GPU jobs (issue 19): DataParallel over two devices trains as one device does.

The two devices are the CPU split in two by XLA (`--xla_force_host_platform_device_count=2`),
which must be set before JAX is imported: hence subprocesses on the JAX backend, whatever
this run's backend is. Two fresh subprocesses train NET I three ways on the same 160
synthetic images (128 to train, 32 to validate: multiples of 2, so no image is left out;
the same seed and global batch 32): on one device (gpus 0), on two (gpus 2), and on two
resumed from a one-epoch checkpoint. Both use Keras' `fit` loop, the one multi-device jobs
train with (a gpus-0 job on JAX defaults to the compiled `device` loop, which shuffles with
its own generator: other batches, other losses).

Tolerance: rtol 1e-4 on every epoch's loss and val_loss, and on the test loss. Both runs see
the same batches in the same order and apply one update per global batch; only the order of
the sums may differ (a global batch's gradient is the mean over two shards, all-reduced,
instead of one sum over 32 images), which float32 puts at about 1e-7 relative per step.
Measured here: identical (0.0); on 400 real CIFAR-10 images with batch 64, 1e-7
(docs/scaling.md). 1e-4 leaves room for that to grow over two epochs and still fails on any
real difference (a different batch split, a scaled learning rate, a lost update).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from app.ml.distribute import check_loop
from app.ml.training import Prepared, even_shards

pytestmark = pytest.mark.slow  # three compiled JAX runs: about a minute and a half here

ROOT = Path(__file__).resolve().parents[2]
RTOL = 1e-4

SCRIPT = textwrap.dedent(
    """
    import json, sys, tempfile
    import numpy as np
    from app.ml.data import Cifar10
    from app.ml.params import TrainConfig
    from app.ml.distribute import DistributionError
    from app.ml.training import train

    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, size=200)
    x = (rng.integers(0, 60, size=(200, 32, 32, 3)) + (y * 20)[:, None, None, None])
    data = Cifar10(x[:160].astype(np.uint8), y[:160], x[160:].astype(np.uint8), y[160:], "synthetic")

    def run(gpus, epochs=2, checkpoint_dir=None, loop="auto"):
        config = TrainConfig(net="net1", epochs=epochs, batch_size=32, precision="float32",
                             seed=3, gpus=gpus)
        result = train(config, data, checkpoint_dir=checkpoint_dir, loop=loop)
        return {"resumed_from": result.resumed_from_epoch,
                "epochs": [[r.epoch, r.loss, r.val_loss] for r in result.epochs],
                "test_loss": float(result.model.evaluate(data.x_test / 255.0, data.y_test,
                                                         verbose=0)[0])}

    if sys.argv[1] == "one":
        out = {"one": run(0, loop="fit")}
    else:
        out = {"two": run(2)}
        with tempfile.TemporaryDirectory() as folder:
            run(2, epochs=1, checkpoint_dir=__import__("pathlib").Path(folder))
            out["resumed"] = run(2, epochs=2, checkpoint_dir=__import__("pathlib").Path(folder))
        try:
            run(4)
        except DistributionError as exc:
            out["four"] = str(exc)
    print("RESULT " + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def runs() -> dict:
    env = {
        **os.environ,
        "KERAS_BACKEND": "jax",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "CUDA_VISIBLE_DEVICES": "",
        "JAX_PLATFORMS": "cpu",
    }
    found: dict = {}
    for which in ("one", "two"):  # each in a fresh process, as each job is to its worker
        proc = subprocess.run(
            [sys.executable, "-c", SCRIPT, which],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        line = next(s for s in proc.stdout.splitlines() if s.startswith("RESULT "))
        found |= json.loads(line.removeprefix("RESULT "))
    return found


def test_two_devices_match_one_device_epoch_by_epoch(runs):
    one, two = np.array(runs["one"]["epochs"]), np.array(runs["two"]["epochs"])
    assert one[:, 0].tolist() == two[:, 0].tolist() == [1, 2]
    np.testing.assert_allclose(two[:, 1:], one[:, 1:], rtol=RTOL)
    assert two[1, 1] < two[0, 1]  # it learns: the loss falls
    assert runs["two"]["test_loss"] == pytest.approx(runs["one"]["test_loss"], rel=RTOL)
    print("largest relative difference:", float(np.max(np.abs(two[:, 1:] / one[:, 1:] - 1))))


def test_a_resumed_two_device_job_continues_from_its_checkpoint(runs):
    resumed = runs["resumed"]
    assert resumed["resumed_from"] == 1 and [e[0] for e in resumed["epochs"]] == [2]
    assert np.isfinite(resumed["epochs"][0][1])


def test_more_devices_than_the_worker_has_fail_with_a_clear_message(runs):
    assert runs["four"].startswith("the job asks for 4 devices but this worker sees 2 (")
    assert "WORKER_GPUS" in runs["four"]


def test_every_batch_splits_evenly():
    x = np.zeros((131, 32, 32, 3), np.uint8)
    prepared = Prepared(x, np.zeros(131), x[:33], np.zeros(33), "float32")
    cut = even_shards(prepared, 2)
    assert len(cut.x_train) == len(cut.y_train) == 130 and len(cut.x_val) == 32
    assert even_shards(prepared, 1) is prepared and even_shards(prepared, 0) is prepared


def test_multi_device_jobs_train_with_keras_fit():
    assert check_loop(2, "auto") == "fit" and check_loop(0, "auto") == "auto"
    with pytest.raises(ValueError, match="loop='fit'"):
        check_loop(2, "device")
