"""Issue 18 on this machine, one run: fair sharing of /predict, 2 API processes against 1, and
how soon an alias moved through one API replica is served by another.

    .venv/bin/python bench/bench_replicas.py [--out bench/results] [--quick] [--parts fair,workers,aliases]

Reuses bench/bench_serving.py's machinery (servers on free loopback ports, the asyncio load
generator in its own process, NET I with untrained weights). Prints ratios; writes
`<out>/replicas.json` and `<out>/replicas.md`.

- **fair**: one service process (embedded SQLite, keys on) with fair sharing on (the
  defaults), on with `PREDICT_CAPACITY_IMAGES_PER_S=8000` (about this machine's batched
  images/s) and off (`PREDICT_FAIR_SHARE=false`, no limit at all). A "light" key's one-image
  p50 alone, then while a "heavy" key floods with 256-image requests (4 clients, raw uint8);
  the ratio of the two p50s, the heavy key's images/s and 429s. Then 32 clients of one key
  alone: images/s with sharing on against off (a key alone may use the whole machine).
- **workers**: `API_WORKERS` 1 against 2 (uvicorn worker processes): 1 client p50, 32
  one-image clients' images/s, 4 clients of 64 images.
- **aliases**: two API processes on one database, twenty alias moves through either; the
  time until the other process serves the new target (p50, p99). Once on the embedded
  SQLite (the registry poll, REGISTRY_POLL_S) and once on PostgreSQL with Redis (pushed).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_serving as serving  # noqa: E402

PG_ADMIN = {"host": "127.0.0.1", "port": 5432, "user": "postgres", "dbname": "postgres"}
REDIS = "redis://127.0.0.1:6379/13"


# ------------------------------------------------------------------------- set-up
def seed(settings: Any, paths: list[Path]) -> dict[str, str]:
    """Migrate, register `paths` as versions 1, 2, ... of net1, make the keys."""
    import hashlib

    from app import auth
    from app.db import session_factory
    from app.migrate import upgrade
    from app.registry import versions

    settings.STATE_DIR.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database_url)
    with session_factory(settings)() as session:
        for path in paths:
            data = path.read_bytes()
            versions.register_version(
                session,
                name="net1",
                net="net1",
                job_id=None,
                artifact_path=str(path),
                sha256=hashlib.sha256(data).hexdigest(),
                size_bytes=len(data),
                metrics={},
            )
        session.commit()
        return {
            role: auth.create_key(session, role, scopes).key
            for role, scopes in (("heavy", "predict"), ("light", "predict"), ("admin", "admin"))
        }


def env_for(settings: Any, **extra: str) -> dict[str, str]:
    from app.config import Settings
    from app.serve import settings_env

    names = {name.upper() for name in Settings.model_fields}
    env = {k: v for k, v in os.environ.items() if k.upper() not in names}
    env.update(settings_env(settings))
    env.update(PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2", **extra)
    return env


def uvicorn(env: dict[str, str], name: str, log_dir: Path, workers: int = 1) -> serving.Server:
    port = serving.free_port()
    command = [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    command += ["--log-level", "warning", "--no-access-log"]
    server = serving.Server(name, command, env, port, log_dir / f"{name}.log")
    server.wait_ready()
    return server


def bodies(folder: Path) -> dict[str, Path]:
    import numpy as np

    pixels = np.random.default_rng(1).integers(0, 256, (256, 32, 32, 3), dtype=np.uint8)
    files = {
        "one": json.dumps({"model": "net1", "instances": pixels[:1].tolist()}).encode(),
        "raw256": pixels.tobytes(),
        "raw64": pixels[:64].tobytes(),
    }
    out = {}
    for name, data in files.items():
        out[name] = folder / f"{name}.body"
        out[name].write_bytes(data)
    return out


def request(files: dict[str, Path], key: str, kind: str) -> dict[str, Any]:
    auth = {"Authorization": f"Bearer {key}"}
    if kind == "one":
        return {
            "path": "/predict",
            "body_file": str(files["one"]),
            "content_type": "application/json",
            "headers": auth,
        }
    n = 256 if kind == "raw256" else 64
    return {
        "path": f"/predict?model=net1&shape={n},32,32,3",
        "body_file": str(files[kind]),
        "content_type": "application/octet-stream",
        "headers": auth,
    }


def ok_images_per_s(result: dict[str, Any], per: int) -> float:
    return (result["requests"] - result["errors"]) * per / result["wall_s"]


def run_into(out: dict[str, Any], load: serving.LoadGen, spec: dict[str, Any]) -> None:
    """load.run(**spec) into `out` (for a load that runs beside another, on a thread)."""
    out.update(load.run(**spec))


def warm(load: serving.LoadGen, port: int, spec: dict[str, Any], n: int = 6) -> None:
    load.run(port=port, clients=2, duration=120, max_requests=n, requests=[spec])


# ------------------------------------------------------------------------- the parts
def part_fair(
    settings: Any, keys: dict[str, str], files: dict[str, Path], tmp: Path, scale: float
) -> dict[str, Any]:
    """Both services up at once; the quiet and "alone" loads alternate between them in rounds
    (so a noisy moment of a shared machine hits both), then each takes the flood in turn."""
    modes = {
        "fair": {},  # the defaults: PREDICT_CAPACITY_IMAGES_PER_S=1000
        "fair, capacity 8000": {"PREDICT_CAPACITY_IMAGES_PER_S": "8000"},
        "off": {"PREDICT_FAIR_SHARE": "false"},
    }
    servers = {
        m: uvicorn(env_for(settings, **extra), f"fair-{i}", tmp)
        for i, (m, extra) in enumerate(modes.items())
    }
    light_load, heavy_load = serving.LoadGen(), serving.LoadGen()
    light = request(files, keys["light"], "one")
    heavy = request(files, keys["heavy"], "raw256")
    out: dict[str, Any] = {m: {"quiet": [], "alone": []} for m in modes}
    window = settings.PREDICT_FAIR_WINDOW_S
    try:
        for server in servers.values():
            warm(light_load, server.port, light)
            warm(heavy_load, server.port, heavy, n=4)
        time.sleep(2 * window)
        for _ in range(3):
            for mode, server in servers.items():
                out[mode]["quiet"].append(
                    light_load.run(
                        port=server.port,
                        clients=1,
                        duration=1.5 * scale,
                        keep=True,
                        requests=[light],
                    )
                )
                out[mode]["alone"].append(
                    light_load.run(
                        port=server.port,
                        clients=32,
                        duration=2 * scale,
                        keep=True,
                        requests=[light],
                    )
                )
        for mode, server in servers.items():
            time.sleep(2 * window)  # nobody active: the heavy key starts alone
            flood: dict[str, Any] = {}
            spec = {"port": server.port, "clients": 4, "duration": 9 * scale}
            spec.update(images_per_request=256, requests=[heavy])
            thread = threading.Thread(target=run_into, args=(flood, heavy_load, spec))
            thread.start()
            time.sleep(2 * scale)  # alone first: the whole machine is the heavy key's
            under = light_load.run(
                port=server.port, clients=1, duration=5 * scale, keep=True, requests=[light]
            )
            thread.join()
            r = out[mode]
            r["light_quiet"] = serving.merge(r.pop("quiet"))
            alone = serving.merge(r.pop("alone"))
            r.update(light_under_flood=under, heavy=flood, alone_32=alone)
            r["heavy_ok_images_per_s"] = ok_images_per_s(flood, 256)
            r["alone_32_ok_images_per_s"] = ok_images_per_s(alone, 1)
            print(
                f"fair sharing {mode}: light p50 {r['light_quiet']['p50_ms']:.1f} ms quiet, "
                f"{under['p50_ms']:.1f} ms under the flood ({under['errors']} errors); heavy "
                f"{r['heavy_ok_images_per_s']:,.0f} images/s, {flood['errors']} refused; "
                f"32 clients alone {r['alone_32_ok_images_per_s']:,.0f} images/s "
                f"({alone['errors']} errors)",
                flush=True,
            )
    finally:
        light_load.close()
        heavy_load.close()
        for server in servers.values():
            server.stop()
    return out


def part_workers(
    settings: Any, keys: dict[str, str], files: dict[str, Path], tmp: Path, scale: float
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    one, raw64 = request(files, keys["light"], "one"), request(files, keys["light"], "raw64")
    for workers in (1, 2):
        server = uvicorn(
            env_for(settings, API_WORKERS=str(workers)), f"workers-{workers}", tmp, workers
        )
        load = serving.LoadGen()
        try:
            warm(load, server.port, one, n=24)  # each process loads the model once
            warm(load, server.port, raw64, n=12)
            time.sleep(2)
            result = {
                "1client": load.run(
                    port=server.port,
                    clients=1,
                    duration=3 * scale,
                    max_requests=400,
                    requests=[one],
                ),
                "32clients": load.run(
                    port=server.port, clients=32, duration=5 * scale, requests=[one]
                ),
                "64img": load.run(
                    port=server.port,
                    clients=4,
                    duration=4 * scale,
                    images_per_request=64,
                    requests=[raw64],
                ),
            }
        finally:
            load.close()
            server.stop()
        out[str(workers)] = result
        print(
            f"API_WORKERS={workers}: 1 client p50 {result['1client']['p50_ms']:.1f} ms, "
            f"32 clients {ok_images_per_s(result['32clients'], 1):,.0f} images/s "
            f"(p99 {result['32clients']['p99_ms']:.0f} ms), 4 x 64 images "
            f"{ok_images_per_s(result['64img'], 64):,.0f} images/s",
            flush=True,
        )
    return out


def part_aliases(
    name: str, settings: Any, keys: dict[str, str], tmp: Path, moves: int
) -> dict[str, Any]:
    env = env_for(settings)
    replicas = [uvicorn(env, f"alias-{name}-{i}", tmp) for i in range(2)]
    auth = {"Authorization": f"Bearer {keys['admin']}"}
    body = {"model": "net1", "alias": "live", "instances": [[[[0, 0, 0]] * 32] * 32]}
    urls = [f"http://127.0.0.1:{r.port}" for r in replicas]
    lags: list[float] = []
    try:
        with httpx.Client(headers=auth, timeout=60) as http:

            def served(url: str) -> int:
                answer = http.post(f"{url}/predict", json=body)
                answer.raise_for_status()
                return int(answer.json()["model"]["version"])

            def move(url: str, version: int) -> None:
                http.put(
                    f"{url}/models/net1/aliases/live", json={"version": version}
                ).raise_for_status()

            move(urls[0], 1)
            for url in urls:  # both versions loaded and warm on both processes
                for version in (1, 2):
                    payload = {k: v for k, v in body.items() if k != "alias"} | {"version": version}
                    http.post(f"{url}/predict", json=payload).raise_for_status()
                while served(url) != 1:
                    time.sleep(0.05)
            for i in range(moves):
                target = 2 if i % 2 == 0 else 1
                through, other = (urls[0], urls[1]) if i % 4 < 2 else (urls[1], urls[0])
                start = time.perf_counter()
                move(through, target)
                while served(other) != target:
                    time.sleep(0.005)
                lags.append(time.perf_counter() - start)
                time.sleep(0.3)
            pushed = http.get(f"{urls[0]}/ready").json()["pushed"]
    finally:
        for replica in replicas:
            replica.stop()
    ordered = sorted(lags)
    result = {
        "moves": moves,
        "pushed": pushed,
        "p50_s": statistics.median(ordered),
        "p99_s": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        "max_s": ordered[-1],
        "lags_s": lags,
    }
    print(
        f"aliases on {name} ({'pushed' if pushed else 'polled'}): the other replica serves a "
        f"move after p50 {result['p50_s'] * 1000:.0f} ms, p99 {result['p99_s'] * 1000:.0f} ms "
        f"over {moves} moves",
        flush=True,
    )
    return result


def fresh_pg_database() -> str:
    import psycopg

    name = f"cnn_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(**PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name


def drop_pg_database(name: str) -> None:
    import psycopg

    with psycopg.connect(**PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# ------------------------------------------------------------------------- the run
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--quick", action="store_true", help="shorter loads (a smoke run)")
    parser.add_argument("--parts", default="fair,workers,aliases")
    parser.add_argument("--moves", type=int, default=20)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    parts = set(args.parts.split(","))
    scale = 0.5 if args.quick else 1.0
    from app.config import Settings

    tmp = Path(tempfile.mkdtemp(prefix="bench-replicas-"))
    print(f"working in {tmp}; machine: {serving.machine()}", flush=True)
    models = serving.build_models(tmp, ["net1"])
    second = tmp / "net1-v2.keras"
    import keras

    from app.ml.nets import build_net

    keras.utils.set_random_seed(1)
    build_net("net1").save(second)
    paths = [models["net1"], second]
    files = bodies(tmp)
    results: dict[str, Any] = {"machine": serving.machine(), "command": " ".join(sys.argv)}
    t0 = time.time()
    sqlite = Settings(_env_file=None, STATE_DIR=tmp / "state")
    keys = seed(sqlite, paths)
    if "fair" in parts:
        results["fair"] = part_fair(sqlite, keys, files, tmp, scale)
    if "workers" in parts:
        results["workers"] = part_workers(sqlite, keys, files, tmp, scale)
    if "aliases" in parts:
        results["aliases"] = {"sqlite": part_aliases("sqlite", sqlite, keys, tmp, args.moves)}
        database = fresh_pg_database()
        try:
            pg = Settings(
                _env_file=None,
                STATE_DIR=tmp / "state-pg",
                DATABASE_URL=f"postgresql+psycopg://postgres@127.0.0.1:5432/{database}",
                CELERY_BROKER_URL=REDIS,
            )
            pg_keys = seed(pg, paths)
            results["aliases"]["postgresql+redis"] = part_aliases(
                "postgresql+redis", pg, pg_keys, tmp, args.moves
            )
        finally:
            drop_pg_database(database)
    results["elapsed_s"] = time.time() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "replicas.json").write_text(json.dumps(results, indent=1))
    table = markdown(results)
    (args.out / "replicas.md").write_text(table)
    print(table)
    print(f"total {results['elapsed_s']:.0f} s; logs in {tmp}")
    return 0


def markdown(res: dict[str, Any]) -> str:
    lines = [f"Machine: {res['machine']}.", ""]
    fair = res.get("fair")
    if fair:
        lines += [
            "| /predict sharing | light key p50 alone | under a 256-image flood | ratio | heavy key images/s (429s) | 32 clients of one key alone, images/s |",
            "|---|---|---|---|---|---|",
        ]
        for mode, r in fair.items():
            quiet, under = r["light_quiet"]["p50_ms"], r["light_under_flood"]["p50_ms"]
            lines.append(
                f"| {mode} | {quiet:.1f} ms | {under:.1f} ms | {under / quiet:.1f}x "
                f"| {r['heavy_ok_images_per_s']:,.0f} ({r['heavy']['errors']}) "
                f"| {r['alone_32_ok_images_per_s']:,.0f} ({r['alone_32']['errors']} errors) |"
            )
        if {"fair", "off"} <= set(fair):
            on, off = fair["fair"], fair["off"]
            lines += [
                "",
                f"Fair sharing: the light key's p50 under the flood is "
                f"{on['light_under_flood']['p50_ms'] / off['light_under_flood']['p50_ms']:.2f}x "
                f"the one without sharing; one key alone gets "
                f"{on['alone_32_ok_images_per_s'] / off['alone_32_ok_images_per_s']:.2f}x the "
                "images/s of no limit at all.",
            ]
    workers = res.get("workers")
    if workers:
        lines += [
            "",
            "| API processes | 1 client p50 | 32 clients images/s (p99) | 4 x 64 images, images/s |",
            "|---|---|---|---|",
        ]
        for n, r in workers.items():
            lines.append(
                f"| {n} | {r['1client']['p50_ms']:.1f} ms | "
                f"{ok_images_per_s(r['32clients'], 1):,.0f} ({r['32clients']['p99_ms']:.0f} ms) | "
                f"{ok_images_per_s(r['64img'], 64):,.0f} |"
            )
        if {"1", "2"} <= set(workers):
            a, b = workers["1"], workers["2"]
            lines += [
                "",
                f"2 processes against 1: {ok_images_per_s(b['32clients'], 1) / ok_images_per_s(a['32clients'], 1):.2f}x "
                f"at 32 clients, {ok_images_per_s(b['64img'], 64) / ok_images_per_s(a['64img'], 64):.2f}x "
                "on 64-image requests.",
            ]
    aliases = res.get("aliases")
    if aliases:
        lines += [
            "",
            "| alias moves, two API processes | changes | p50 | p99 | max |",
            "|---|---|---|---|---|",
        ]
        for name, r in aliases.items():
            lines.append(
                f"| {name} ({r['moves']} moves) | {'pushed' if r['pushed'] else 'polled'} "
                f"| {r['p50_s'] * 1000:.0f} ms | {r['p99_s'] * 1000:.0f} ms | {r['max_s'] * 1000:.0f} ms |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
