"""How much the serving path saves: forward pass and JSON body parse, in one process.

    .venv/bin/python bench/bench_predict.py [--repeat 30]

Forward pass on NET I (untrained weights time the same as trained ones), batch 1 and 64:
`model.predict(x)` (the baseline) vs `model(x, training=False)` vs the compiled
`Predictor.predict`. Body parse of a 64-image /predict body: pydantic's
`TypeAdapter(list[list[list[list[float]]]]).validate_json` (the baseline) vs the
orjson + numpy path the route uses (`parse_json` + `instances_to_batch` with the cyclic
collector tuned as the service tunes it: `tune_gc_for_serving`, gc.freeze() after the model
is loaded plus a higher young-generation threshold; shown before and after the tuning,
since TensorFlow's ~300k live objects make every collection triggered by the ~65k new lists
expensive).
Prints median milliseconds and the ratio against each baseline.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import orjson
import pydantic

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.config import Settings  # noqa: E402
from app.ml.inference import Predictor  # noqa: E402
from app.serving.inputs import instances_to_batch, parse_json  # noqa: E402
from app.serving.service import tune_gc_for_serving  # noqa: E402

# The route's default bound on images per request.
MAX_INSTANCES = Settings.model_fields["PREDICT_MAX_INSTANCES"].default


def median_ms(fn: Callable[[], object], repeat: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def parse_like_the_route(body: bytes) -> np.ndarray:
    return instances_to_batch(parse_json(body)["instances"], MAX_INSTANCES)


def tuned_ms(body: bytes, repeat: int) -> float:
    """The parse after the service's GC tuning (which stays in force for the process)."""
    tune_gc_for_serving()
    return median_ms(lambda: parse_like_the_route(body), repeat)


def report(title: str, rows: list[tuple[str, float]]) -> None:
    baseline = rows[0][1]
    print(f"\n{title}")
    for label, ms in rows:
        print(f"  {label:<44} {ms:9.2f} ms   x{baseline / ms:6.1f} vs {rows[0][0]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args(argv)

    import tensorflow as tf

    from app.ml.nets import build_net

    model = build_net("net1")
    start = time.perf_counter()
    predictor = Predictor(model, name="net1")
    print(f"Predictor load (trace + warm-up call): {(time.perf_counter() - start) * 1000:.0f} ms")
    print(
        f"TensorFlow {tf.__version__}, {len(tf.config.list_physical_devices('CPU'))} CPU device(s)"
    )

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    for n in (1, 64):
        x = pixels[:n].astype(np.float32) / 255
        np.testing.assert_allclose(predictor.predict(x), model(x, training=False), atol=1e-5)
        report(
            f"NET I forward pass, batch {n}",
            [
                (
                    "model.predict(x)",
                    median_ms(lambda x=x: model.predict(x, verbose=0), args.repeat),
                ),
                (
                    "model(x, training=False)",
                    median_ms(lambda x=x: model(x, training=False), args.repeat),
                ),
                (
                    "Predictor.predict(x) (tf.function)",
                    median_ms(lambda x=x: predictor.predict(x), args.repeat),
                ),
            ],
        )

    instances = pixels.tolist()
    body = orjson.dumps({"model": "net1", "instances": instances})
    array_json = orjson.dumps(instances)
    adapter = pydantic.TypeAdapter(list[list[list[list[float]]]])
    expected = pixels.astype(np.float32) / 255
    np.testing.assert_array_equal(
        instances_to_batch(parse_json(body)["instances"], MAX_INSTANCES), expected
    )
    print(f"\n64-image body: {len(body):,} bytes, {pixels.size:,} numbers")
    report(
        "Body parse, 64 images",
        [
            (
                "pydantic validate_json (lists only)",
                median_ms(lambda: adapter.validate_json(array_json), args.repeat),
            ),
            (
                "pydantic validate_json + np.asarray",
                median_ms(
                    lambda: np.asarray(adapter.validate_json(array_json), np.float32), args.repeat
                ),
            ),
            (
                "orjson + instances_to_batch, default GC",
                median_ms(lambda: parse_like_the_route(body), args.repeat),
            ),
            ("orjson + instances_to_batch, GC tuned (the route)", tuned_ms(body, args.repeat)),
        ],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
