"""Training throughput: the course's plain script against the worker's path and each lever,
in one run, on the same images, with test accuracy beside.

    .venv/bin/python bench/bench_training.py [--nets net1 net2 net3] [--images 50000]
        [--epochs 2] [--variants plain fit-spe32 data data-spe32 ...] [--json out.json]

`plain` is the seed's script: float64 arrays `x / 255.0`, `model.fit(x, y, batch_size=128,
validation_split=0.2)` in float32. The other variants go through `app.ml.training.train` (the
worker's code) with one lever changed at a time:

| variant | loop | steps per execution | precision |
|---|---|---|---|
| `fit` | model.fit on float32 arrays | 1 | float32 |
| `fit-spe32` | model.fit on float32 arrays | 32 | float32 |
| `data` | tf.data from uint8, normalised on the fly | 1 | float32 |
| `data-spe32` | tf.data from uint8 | 32 | float32 |
| `data-spe32-bf16` | tf.data from uint8 | 32 | mixed_bfloat16 |
| `worker` | the worker's defaults (`loop=auto`, `precision=auto`) | auto | auto |

images/s is the steady training rate (the last epoch's training pass, without validation);
images/CPU-s divides the same images by the process's CPU seconds in that pass (all threads),
a figure that a busy shared machine disturbs much less than wall time does;
seconds is the whole fit including the first epoch's tracing and every validation pass.
Uses the real CIFAR-10 JPEGs when ../shared/data/cifar10-jpeg.tar.gz is there (decoded once,
cached under var/cache), else random pixels (then accuracy means nothing).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from app.ml import backend
from app.ml.data import Cifar10, load_cifar10, subset
from app.ml.nets import get_net
from app.ml.training import TrainConfig, train

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg.tar.gz"

VARIANTS: dict[str, dict[str, Any]] = {
    "fit": {"loop": "fit", "steps_per_execution": 1, "precision": "float32"},
    "fit-spe32": {"loop": "fit", "steps_per_execution": 32, "precision": "float32"},
    "data": {"loop": "data", "steps_per_execution": 1, "precision": "float32"},
    "data-spe32": {"loop": "data", "steps_per_execution": 32, "precision": "float32"},
    "data-spe32-bf16": {"loop": "data", "steps_per_execution": 32, "precision": "mixed_bfloat16"},
    "device": {"loop": "device", "steps_per_execution": None, "precision": "float32"},
    "device-bf16": {"loop": "device", "steps_per_execution": None, "precision": "mixed_bfloat16"},
    "worker": {"loop": "auto", "steps_per_execution": None, "precision": "auto"},
}


def dataset(images: int, test_images: int | None) -> Cifar10:
    if SHARED.is_file():
        data = load_cifar10(str(SHARED), cache_dir=Path("var/cache"))
    else:
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, size=(images, 32, 32, 3), dtype=np.uint8)
        y = rng.integers(0, 10, size=images)
        data = Cifar10(x, y, x[: images // 5], y[: images // 5], source="random")
    return subset(data, images if images < len(data.x_train) else None, test_images, seed=0)


def cpu_timer() -> Any:
    """A callback measuring the process CPU seconds of each epoch's training pass."""
    import keras

    class CpuTimer(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.seconds: list[float] = []

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self.start = self.end = time.process_time()

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            self.end = time.process_time()

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            self.seconds.append(max(self.end - self.start, 1e-9))

    return CpuTimer()


def _keras_test_accuracy(model: Any, data: Cifar10) -> float:
    x = np.asarray(data.x_test, dtype=np.float32) / np.float32(255.0)
    y = np.asarray(data.y_test).reshape(-1)
    return float(model.evaluate(x, y, batch_size=256, verbose=0, return_dict=True)["accuracy"])


def plain(net: str, data: Cifar10, epochs: int) -> dict[str, Any]:
    """The seed's script, as a course participant writes it."""
    import keras

    keras.utils.set_random_seed(0)
    keras.mixed_precision.set_global_policy("float32")
    x = data.x_train / 255.0
    y = np.asarray(data.y_train).reshape(-1)
    model = get_net(net).builder()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])

    n_train = int(len(x) * 0.8)
    times: list[tuple[float, float]] = []

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self.start = self.end = time.perf_counter()

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            self.end = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            times.append((self.end - self.start, time.perf_counter() - self.start))

    cpu = cpu_timer()
    start = time.perf_counter()
    history = model.fit(
        x,
        y,
        batch_size=128,
        epochs=epochs,
        validation_split=0.2,
        callbacks=[Timer(), cpu],
        verbose=0,
    )
    seconds = time.perf_counter() - start
    return {
        "images_per_second": n_train / times[-1][0],
        "images_per_cpu_second": n_train / cpu.seconds[-1],
        "seconds": seconds,
        "val_accuracy": float(history.history["val_accuracy"][-1]),
        "test_accuracy": _keras_test_accuracy(model, data),
        "precision": "float32",
    }


def worker_path(net: str, data: Cifar10, epochs: int, variant: str) -> dict[str, Any]:
    settings = VARIANTS[variant]
    config = TrainConfig(net=net, epochs=epochs, precision=settings["precision"])
    cpu = cpu_timer()
    start = time.perf_counter()
    result = train(
        config,
        data,
        loop=settings["loop"],
        steps_per_execution=settings["steps_per_execution"],
        callbacks=[cpu],
    )
    seconds = time.perf_counter() - start
    return {
        "images_per_second": result.epochs[-1].images_per_second,
        "images_per_cpu_second": int(len(data.x_train) * (1 - config.validation_split))
        / cpu.seconds[-1],
        "seconds": seconds,
        "val_accuracy": result.epochs[-1].val_accuracy,
        "test_accuracy": _keras_test_accuracy(result.model, data),
        "precision": result.precision,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nets", nargs="+", default=["net1", "net2", "net3"])
    parser.add_argument("--images", type=int, default=50000, help="training images (with val)")
    parser.add_argument("--test-images", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["fit", "fit-spe32", "data", "data-spe32", "data-spe32-bf16", "worker"],
        help=f"from {', '.join(VARIANTS)}",
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    data = dataset(args.images, args.test_images)
    header = (
        f"data: {data.source}, {len(data.x_train)} images (80% train, 20% validation), "
        f"{len(data.x_test)} test images, {args.epochs} epochs, batch 128; "
        f"backend {backend.name()}, device {backend.describe_device()}, {platform.processor() or platform.machine()}"
    )
    print(header)
    print(
        "| net | path | precision | images/s | vs plain | images/CPU-s | vs plain | seconds "
        "| val acc | test acc |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for net in args.nets:
        base = plain(net, data, args.epochs)
        results = [("plain", base)]
        for variant in args.variants:
            results.append((variant, worker_path(net, data, args.epochs, variant)))
        for name, r in results:
            ratio = r["images_per_second"] / base["images_per_second"]
            cpu_ratio = r["images_per_cpu_second"] / base["images_per_cpu_second"]
            print(
                f"| {net} | {name} | {r['precision']} | {r['images_per_second']:,.0f} | "
                f"{ratio:.2f}x | {r['images_per_cpu_second']:,.0f} | {cpu_ratio:.2f}x | "
                f"{r['seconds']:.1f} | {r['val_accuracy']:.3f} | {r['test_accuracy']:.3f} |",
                flush=True,
            )
            rows.append({"net": net, "path": name, "ratio": ratio, "cpu_ratio": cpu_ratio, **r})
    if args.json:
        args.json.write_text(json.dumps({"header": header, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
