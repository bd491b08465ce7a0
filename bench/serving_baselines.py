"""The two endpoints bench_serving.py measures the service against (run as their own processes).

    python bench/serving_baselines.py naive|compiled --port P --model net1=/path/net1.keras ...

`naive`: what a first FastAPI endpoint looks like: a pydantic body of nested float lists,
then `model.predict`. `compiled`: the "15-line" endpoint of issue 10: `json.loads` of the
body and one `tf.function` call of the same model per request, no batching, no database.
Both answer POST /predict/{name} with {"instances": [...]} (pixels 0-255) and return
{"predictions": [[10 probabilities], ...]}.
"""

import argparse
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def naive_app(paths: dict[str, str]):  # type: ignore[no-untyped-def]
    import keras
    import numpy as np
    from fastapi import FastAPI
    from pydantic import BaseModel

    models = {name: keras.saving.load_model(path, compile=False) for name, path in paths.items()}
    app = FastAPI()

    class Body(BaseModel):
        instances: list[list[list[list[float]]]]

    @app.post("/predict/{name}")
    def predict(name: str, body: Body) -> dict:  # type: ignore[type-arg]
        x = np.asarray(body.instances, dtype=np.float32) / 255.0
        return {"predictions": models[name].predict(x, verbose=0).tolist()}

    return app


def compiled_app(paths: dict[str, str]):  # type: ignore[no-untyped-def]
    # The whole endpoint is the 15 lines below the imports.
    import keras
    import numpy as np
    import tensorflow as tf
    from fastapi import FastAPI, Request
    from fastapi.responses import Response

    app, fns = FastAPI(), {}
    for name, path in paths.items():
        model = keras.saving.load_model(path, compile=False)
        fn = tf.function(
            lambda x, m=model: m(x, training=False),
            input_signature=[tf.TensorSpec((None, 32, 32, 3), tf.float32)],
        )
        fn(np.zeros((1, 32, 32, 3), np.float32))  # trace once
        fns[name] = fn

    @app.post("/predict/{name}")
    async def predict(name: str, request: Request) -> Response:
        x = np.asarray(json.loads(await request.body())["instances"], np.float32) / 255.0
        probs = fns[name](x).numpy().tolist()
        return Response(json.dumps({"predictions": probs}), media_type="application/json")

    return app


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["naive", "compiled"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", action="append", default=[], help="name=path.keras")
    args = parser.parse_args()
    paths = dict(item.split("=", 1) for item in args.model)
    app = naive_app(paths) if args.kind == "naive" else compiled_app(paths)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
