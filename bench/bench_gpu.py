"""GPU training benchmark: the course's plain `fit` against the service's training path, in one
run, then the course's 20 epochs per net (docs/gpu.md).

    KERAS_BACKEND=jax python bench/bench_gpu.py [--nets net1 net2 net3] [--short 2]
        [--long 20] [--long-paths plain worker] [--out var/bench_gpu]

For every net: `--short` epochs with the plain script (float64 arrays / 255.0,
`model.fit(batch_size=128, validation_split=0.2)`, float32) and with the worker's path
(`app.ml.training.train`: on JAX the compiled on-device loop, `precision=auto`); then
`--long` epochs of each path in `--long-paths`. Prints and writes (OUT.md, OUT.json): steady
training images/s (the last epoch, validation excluded), the ratio to plain, the whole run's
seconds (compilation, every epoch and validation included) and the test accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_training import plain, worker_path  # noqa: E402

from app.ml import backend  # noqa: E402
from app.ml.data import Cifar10, load_cifar10, subset  # noqa: E402


def load(source: str | None, images: int | None) -> Cifar10:
    source = source or os.environ.get("CIFAR10_SOURCE") or "keras"
    data = load_cifar10(source, cache_dir=Path(os.environ.get("CACHE_DIR", "var/cache")))
    return subset(data, images, None, seed=0) if images else data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nets", nargs="+", default=["net1", "net2", "net3"])
    parser.add_argument("--short", type=int, default=2, help="epochs of the first comparison")
    parser.add_argument("--long", type=int, default=20, help="the course's epochs (0 skips)")
    parser.add_argument("--long-paths", nargs="+", default=["plain", "worker"])
    parser.add_argument("--images", type=int, default=None, help="a subset (with validation)")
    parser.add_argument("--data", default=None, help="CIFAR-10 source (default CIFAR10_SOURCE)")
    parser.add_argument("--out", type=Path, default=Path("var/bench_gpu"))
    parser.add_argument("--cache", type=Path, default=None, help="JAX compilation cache dir")
    args = parser.parse_args()

    if args.cache:
        backend.enable_compilation_cache(args.cache)
    data = load(args.data, args.images)
    header = (
        f"{backend.describe_device()}; Keras backend {backend.name()}; "
        f"precision auto = {backend.resolve_precision('auto')}; {len(data.x_train)} images "
        f"(80% train, 20% validation), {len(data.x_test)} test; batch 128; "
        f"{platform.python_version()}"
    )
    print(header, flush=True)
    lines = [
        "| net | epochs | path | precision | images/s | vs plain | seconds | test acc |",
        "|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    rows: list[dict[str, Any]] = []
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def record(net: str, epochs: int, path: str, r: dict[str, Any], base: float | None) -> None:
        ratio = r["images_per_second"] / base if base else float("nan")
        line = (
            f"| {net} | {epochs} | {path} | {r['precision']} | {r['images_per_second']:,.0f} | "
            f"{ratio:.2f}x | {r['seconds']:.1f} | {r['test_accuracy']:.4f} |"
        )
        print(line, flush=True)
        lines.append(line)
        rows.append({"net": net, "epochs": epochs, "path": path, "ratio": ratio, **r})
        args.out.with_suffix(".md").write_text(header + "\n\n" + "\n".join(lines) + "\n")
        args.out.with_suffix(".json").write_text(json.dumps({"header": header, "rows": rows}))

    plans = [(args.short, ["plain", "worker"])]
    if args.long:
        plans.append((args.long, args.long_paths))
    for epochs, paths in plans:
        for net in args.nets:
            base = None
            for path in paths:
                start = time.perf_counter()
                if path == "plain":
                    r = plain(net, data, epochs)
                    base = r["images_per_second"]
                else:
                    r = worker_path(net, data, epochs, "worker")
                r["wall_seconds"] = time.perf_counter() - start
                record(net, epochs, path, r, base)


if __name__ == "__main__":
    main()
