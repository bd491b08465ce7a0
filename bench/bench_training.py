"""Training throughput by precision policy, as ratios against float32 in the same process.

    .venv/bin/python bench/bench_training.py [--nets net1 net2] [--images 5000] [--epochs 2]

Uses the real CIFAR-10 JPEGs when ../shared/data/cifar10-jpeg.tar.gz is there (decoded once,
cached under var/cache), else random pixels of the same shape (throughput does not depend on
the pixel values). The first epoch includes tracing, so the last epoch's images/s is reported.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from app.ml.data import Cifar10, load_cifar10
from app.ml.training import TrainConfig, train

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def dataset(images: int) -> Cifar10:
    if SHARED.is_file():
        return load_cifar10(str(SHARED), cache_dir=Path("var/cache"))
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(images, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, size=images)
    return Cifar10(x, y, x[:100], y[:100], source="random")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nets", nargs="+", default=["net1", "net2"])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--policies", nargs="+", default=["float32", "mixed_bfloat16"])
    args = parser.parse_args()
    data = dataset(args.images)
    print(f"data: {data.source}, {args.images} training images, {args.epochs} epochs, batch 128")
    for net in args.nets:
        baseline = None
        for policy in args.policies:
            config = TrainConfig(
                net=net, epochs=args.epochs, train_limit=args.images, precision=policy
            )
            result = train(config, data)
            speed = result.epochs[-1].images_per_second
            baseline = baseline or speed
            print(
                f"{net:<5} {policy:<15} {speed:>8,.0f} images/s  "
                f"{speed / baseline:4.2f}x float32  val_acc {result.epochs[-1].val_accuracy:.3f}"
            )


if __name__ == "__main__":
    main()
