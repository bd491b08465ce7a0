"""Serving benchmark of issue 10: the real service on loopback against two baselines, one run.

    .venv/bin/python bench/bench_serving.py [--out bench/results] [--nets net1,net3] [--quick]

Starts, each in its own process on 127.0.0.1 (free ports):
- the service itself (`uvicorn app.main:create_app --factory`, the embedded SQLite default,
  three registered models net1/net2/net3 with untrained weights: they time like trained ones),
- the naive baseline (pydantic body + `model.predict`) and the compiled, unbatched baseline
  (`json.loads` + one `tf.function` call per request), both in bench/serving_baselines.py,
- the load generator (an asyncio HTTP/1.1 keep-alive client, this file with `--loadgen`),
  which reports the CPU it used, so that it can be seen not to be the bottleneck.

Loads, for each net: 1 client sending 1 image (p50, p99); 32 clients sending 1 image each
(images/s, p99, errors); 4 clients sending 64 images per request as JSON `instances` (all
three endpoints), and on the service also as a raw uint8 tensor (JSON `tensor`, and an
`application/octet-stream` body) and as base64 PNGs; the in-process compiled batch-64 rate
is the ceiling those are compared with. Then, on the service only: /health p99 while 64
clients hammer /predict, 1 vs API_WORKERS=2 processes, and the API's resident memory over
10,000 requests spread over the three models. Forms the service does not accept (before
issue 10) are reported as "n/a". Writes `<out>/serving.json` and `<out>/serving.md`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# ------------------------------------------------------------------------- load generator


async def _client(
    port: int,
    requests: list[bytes],
    stop_at: float,
    max_requests: list[int],
    out: dict[str, Any],
    offset: int,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    i = offset
    try:
        while time.perf_counter() < stop_at and max_requests[0] > 0:
            max_requests[0] -= 1
            req = requests[i % len(requests)]
            i += 1
            start = time.perf_counter()
            writer.write(req)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            body = await reader.readexactly(length) if length else b""
            out["latencies"].append(time.perf_counter() - start)
            if status != 200:
                out["errors"] += 1
                if len(out["samples"]) < 3:
                    out["samples"].append(f"{status} {body[:200]!r}")
    finally:
        writer.close()


def _request(path: str, body: bytes, content_type: str, headers: dict[str, str]) -> bytes:
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
        f"{extra}Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _run_load(spec: dict[str, Any]) -> dict[str, Any]:
    requests = []
    for item in spec["requests"]:
        body = Path(item["body_file"]).read_bytes() if item.get("body_file") else b""
        if item.get("method") == "GET":
            requests.append(f"GET {item['path']} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        else:
            headers = item.get("headers", {})
            requests.append(_request(item["path"], body, item["content_type"], headers))
    out: dict[str, Any] = {"latencies": [], "errors": 0, "samples": [], "keep": spec.get("keep")}
    side: dict[str, Any] = {"latencies": [], "errors": 0, "samples": []}
    budget = [spec.get("max_requests") or 10**12]
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    stop_at = start + spec["duration"]
    tasks = [
        _client(spec["port"], requests, stop_at, budget, out, k) for k in range(spec["clients"])
    ]
    if spec.get("side"):  # one more client on another path (e.g. GET /health), own stats
        side_req = [f"GET {spec['side']} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()]
        tasks.append(_client(spec["port"], side_req, stop_at, [10**12], side, 0))
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - start
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    result = _stats(out, wall)
    result["images"] = result["requests"] * spec.get("images_per_request", 1)
    result["images_per_s"] = result["images"] / wall
    result["loadgen_cpu"] = cpu / wall  # fraction of one core
    if spec.get("side"):
        result["side"] = _stats(side, wall)
    return result


def _stats(out: dict[str, Any], wall: float) -> dict[str, Any]:
    lat = sorted(out["latencies"])
    n = len(lat)

    def pct(p: float) -> float | None:
        return lat[min(n - 1, int(p * n))] * 1000 if n else None

    return {
        "requests": n,
        "errors": out["errors"],
        "error_samples": out["samples"],
        "wall_s": wall,
        "p50_ms": pct(0.5),
        "p99_ms": pct(0.99),
        "latencies_ms": [x * 1000 for x in out["latencies"]] if out.get("keep") else None,
    }


def merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from several rounds of the same load (kept latencies pooled)."""
    lat = sorted(x for r in runs for x in r["latencies_ms"])
    wall = sum(r["wall_s"] for r in runs)
    n = len(lat)
    out = dict(runs[0])
    out.update(
        requests=n,
        errors=sum(r["errors"] for r in runs),
        wall_s=wall,
        p50_ms=lat[min(n - 1, n // 2)] if n else None,
        p99_ms=lat[min(n - 1, int(0.99 * n))] if n else None,
        images=sum(r["images"] for r in runs),
        images_per_s=sum(r["images"] for r in runs) / wall,
        loadgen_cpu=max(r["loadgen_cpu"] for r in runs),
        latencies_ms=None,
    )
    return out


def loadgen_main() -> None:
    """Read one JSON load spec per line on stdin, answer one JSON result per line."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    for line in sys.stdin:
        spec = json.loads(line)
        print(json.dumps(asyncio.run(_run_load(spec))), flush=True)


class LoadGen:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--loadgen"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def run(self, **spec: Any) -> dict[str, Any]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(spec) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=10)


# ------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, name: str, cmd: list[str], env: dict[str, str], port: int, log: Path):
        self.name, self.port = name, port
        self.log = open(log, "wb")
        self.proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited; see {self.log.name}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"{self.name} did not start in {timeout} s")

    def rss_mb(self) -> float:
        """Resident memory of the server and its children (uvicorn workers), MB."""
        pids = [self.proc.pid]
        out = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(self.proc.pid)], capture_output=True, text=True
        ).stdout.split()
        pids += [int(p) for p in out]
        total = 0
        for pid in pids:
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            except OSError:
                pass
        return total / 1024

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


# ------------------------------------------------------------------------- set-up


def build_models(folder: Path, names: list[str]) -> dict[str, Path]:
    import keras

    from app.ml.nets import build_net

    paths = {}
    for name in names:
        keras.utils.set_random_seed(0)
        path = folder / f"{name}.keras"
        build_net(name).save(path)
        paths[name] = path
    return paths


def register(state: Path, paths: dict[str, Path]) -> str | None:
    """Register the models; where the code base has API keys, also make a `predict` key."""
    import hashlib

    from app.config import Settings
    from app.db import session_factory
    from app.migrate import upgrade
    from app.registry import versions as registry

    settings = Settings(_env_file=None, STATE_DIR=state)
    state.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database_url)
    with session_factory(settings)() as session:
        for name, path in paths.items():
            data = path.read_bytes()
            registry.register_version(
                session,
                name=name,
                net=name,
                job_id=None,
                artifact_path=str(path),
                sha256=hashlib.sha256(data).hexdigest(),
                size_bytes=len(data),
                metrics={},
            )
        session.commit()
        try:
            from app import auth  # type: ignore[attr-defined]
        except ImportError:  # before API keys existed
            return None
        return str(auth.create_key(session, "bench", "predict").key)


def ceiling(paths: dict[str, Path], nets: list[str], repeat: int = 40) -> dict[str, float]:
    """In-process compiled call at batch 64 (no HTTP): images/s, the target's denominator."""
    import keras
    import numpy as np
    import tensorflow as tf

    x = np.random.default_rng(0).random((64, 32, 32, 3), dtype=np.float32)
    rates = {}
    for net in nets:
        model = keras.saving.load_model(paths[net], compile=False)
        fn = tf.function(
            lambda t, m=model: m(t, training=False),
            input_signature=[tf.TensorSpec((None, 32, 32, 3), tf.float32)],
        )
        for _ in range(5):
            fn(x).numpy()
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn(x).numpy()
            times.append(time.perf_counter() - start)
        rates[net] = 64 / statistics.median(times)
    return rates


def make_bodies(folder: Path, nets: list[str]) -> dict[str, Path]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    one = pixels[:1]
    pngs = []
    for img in pixels:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        pngs.append({"b64": base64.b64encode(buf.getvalue()).decode()})

    def tensor(arr: Any) -> dict[str, Any]:
        return {
            "b64": base64.b64encode(arr.tobytes()).decode(),
            "shape": list(arr.shape),
            "dtype": "uint8",
        }

    files: dict[str, Path] = {}

    def put(key: str, data: bytes) -> None:
        path = folder / f"{key}.body"
        path.write_bytes(data)
        files[key] = path

    for net in nets + ["net2"]:
        put(f"svc-inst1-{net}", json.dumps({"model": net, "instances": one.tolist()}).encode())
        put(f"svc-tensor1-{net}", json.dumps({"model": net, "tensor": tensor(one)}).encode())
        put(f"svc-inst64-{net}", json.dumps({"model": net, "instances": pixels.tolist()}).encode())
        put(f"svc-tensor64-{net}", json.dumps({"model": net, "tensor": tensor(pixels)}).encode())
        put(f"svc-png64-{net}", json.dumps({"model": net, "images": pngs}).encode())
    put("raw1", one.tobytes())
    put("raw64", pixels.tobytes())
    put("base-inst1", json.dumps({"instances": one.tolist()}).encode())
    put("base-inst64", json.dumps({"instances": pixels.tolist()}).encode())
    return files


# ------------------------------------------------------------------------- the run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--nets", default="net1,net3")
    parser.add_argument("--label", default="", help="a name for this run (e.g. before, after)")
    parser.add_argument("--quick", action="store_true", help="shorter loads (a smoke run)")
    parser.add_argument("--rss-requests", type=int, default=10_000)
    parser.add_argument(
        "--service-workers",
        type=int,
        default=1,
        help="API worker processes of the measured service",
    )
    args = parser.parse_args()
    # Stopped from outside: still stop the servers (the finally below).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    nets = args.nets.split(",")
    scale = 0.4 if args.quick else 1.0
    t0 = time.time()
    sys.path.insert(0, str(ROOT))

    tmp = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    state = tmp / "state"
    print(f"working in {tmp}", flush=True)
    paths = build_models(tmp, sorted(set(nets) | {"net1", "net2", "net3"}))
    key = register(state, paths)
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    bodies = make_bodies(tmp, nets)
    rates = ceiling(paths, nets)
    print(
        "ceiling (in-process compiled, batch 64):",
        {k: round(v) for k, v in rates.items()},
        flush=True,
    )

    env = {
        **os.environ,
        "STATE_DIR": str(state),
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PYTHONPATH": str(ROOT),
        # No per-key rate limit: this measures capacity (a setting a version lacks is ignored).
        "PREDICT_RATE_PER_S": "0",
    }
    env.pop("DATABASE_URL", None)
    env.pop("CELERY_BROKER_URL", None)
    py = sys.executable
    model_args = [a for n in nets for a in ("--model", f"{n}={paths[n]}")]

    def service(workers: int) -> Server:
        port = free_port()
        return Server(
            f"service-w{workers}",
            [
                py,
                "-m",
                "uvicorn",
                "app.main:create_app",
                "--factory",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                str(workers),
                "--log-level",
                "warning",
                "--no-access-log",
            ],
            {**env, "API_WORKERS": str(workers)},
            port,
            tmp / f"service-w{workers}.log",
        )

    servers: dict[str, Server] = {}
    load = LoadGen()
    results: dict[str, Any] = {
        "label": args.label,
        "machine": machine(),
        "command": " ".join(sys.argv),
        "ceiling_images_per_s": rates,
        "nets": {},
        "service_workers": args.service_workers,
    }
    try:
        servers["service"] = service(args.service_workers)
        for kind in ("naive", "compiled"):
            port = free_port()
            servers[kind] = Server(
                kind,
                [
                    py,
                    str(ROOT / "bench" / "serving_baselines.py"),
                    kind,
                    "--port",
                    str(port),
                    *model_args,
                ],
                env,
                port,
                tmp / f"{kind}.log",
            )
        for s in servers.values():
            s.wait_ready()
        svc, naive, comp = servers["service"], servers["naive"], servers["compiled"]

        def req(name: str, path: str, ctype: str = "application/json") -> dict[str, Any]:
            headers = auth if path.split("?")[0] == "/predict" else {}
            return {
                "path": path,
                "body_file": str(bodies[name]),
                "content_type": ctype,
                "headers": headers,
            }

        # Warm every endpoint and model (the service loads a model on first use).
        for net in nets + ["net2"]:
            load.run(
                port=svc.port,
                clients=1,
                duration=30,
                max_requests=3,
                requests=[req(f"svc-inst1-{net}", "/predict")],
            )
        for s in (naive, comp):
            for net in nets:
                load.run(
                    port=s.port,
                    clients=1,
                    duration=30,
                    max_requests=3,
                    requests=[req("base-inst1", f"/predict/{net}")],
                )
        time.sleep(3)  # let the warm-ups' background threads (tf.data, model loads) settle

        for net in nets:
            r: dict[str, Any] = {}
            endpoints = {
                "service": (svc.port, lambda k, n=net: req(f"svc-{k}-{n}", "/predict")),
                "compiled": (comp.port, lambda k, n=net: req(f"base-{k}", f"/predict/{n}")),
                "naive": (naive.port, lambda k, n=net: req(f"base-{k}", f"/predict/{n}")),
            }
            # One client: alternating rounds, so that a noisy moment hits every endpoint.
            rounds: dict[str, list[dict[str, Any]]] = {ep: [] for ep in endpoints}
            for _ in range(3):
                for ep, (port, mk) in endpoints.items():
                    rounds[ep].append(
                        load.run(
                            port=port,
                            clients=1,
                            duration=1.2 * scale,
                            max_requests=150,
                            keep=True,
                            requests=[mk("inst1")],
                        )
                    )
            for ep in endpoints:
                r[f"{ep}/1client"] = merge(rounds[ep])
            for ep, (port, mk) in endpoints.items():
                r[f"{ep}/32clients"] = load.run(
                    port=port, clients=32, duration=5 * scale, requests=[mk("inst1")]
                )
                r[f"{ep}/64img-instances"] = load.run(
                    port=port,
                    clients=4,
                    duration=4 * scale,
                    images_per_request=64,
                    requests=[mk("inst64")],
                )
                print(
                    net,
                    ep,
                    {k.split("/")[1]: summary(v) for k, v in r.items() if k.startswith(ep)},
                    flush=True,
                )
            svc_extra = {
                "1client-tensor": (1, 1, req(f"svc-tensor1-{net}", "/predict")),
                "1client-octet": (
                    1,
                    1,
                    req(
                        "raw1", f"/predict?model={net}&shape=1,32,32,3", "application/octet-stream"
                    ),
                ),
                "32clients-octet": (
                    32,
                    1,
                    req(
                        "raw1", f"/predict?model={net}&shape=1,32,32,3", "application/octet-stream"
                    ),
                ),
                "64img-tensor": (4, 64, req(f"svc-tensor64-{net}", "/predict")),
                "64img-octet": (
                    4,
                    64,
                    req(
                        "raw64",
                        f"/predict?model={net}&shape=64,32,32,3",
                        "application/octet-stream",
                    ),
                ),
                "64img-png": (4, 64, req(f"svc-png64-{net}", "/predict")),
            }
            for key, (clients, per, spec) in svc_extra.items():
                r[f"service/{key}"] = load.run(
                    port=svc.port,
                    clients=clients,
                    duration=(3 if clients == 1 else 4) * scale,
                    max_requests=400 if clients == 1 else None,
                    images_per_request=per,
                    requests=[spec],
                )
            print(
                net,
                "service extra",
                {k: summary(v) for k, v in r.items() if k.split("/")[1] in svc_extra},
                flush=True,
            )
            results["nets"][net] = r

        first = nets[0]
        results["health_under_load"] = load.run(
            port=svc.port,
            clients=64,
            duration=5 * scale,
            side="/health",
            requests=[req(f"svc-inst1-{first}", "/predict")],
        )
        print("health under load", summary(results["health_under_load"]["side"]), flush=True)

        # Resident memory over N requests spread over three models (1 image each).
        rss_start = svc.rss_mb()
        rss = load.run(
            port=svc.port,
            clients=32,
            duration=300,
            max_requests=args.rss_requests,
            requests=[
                req(f"svc-inst1-{n}", "/predict")
                for n in ("net1", "net2", "net3")
                if f"svc-inst1-{n}" in bodies
            ],
        )
        rss["rss_start_mb"], rss["rss_end_mb"] = rss_start, svc.rss_mb()
        results["rss"] = rss
        print(
            f"RSS {rss_start:.0f} -> {rss['rss_end_mb']:.0f} MB over {rss['requests']} "
            f"requests ({rss['errors']} errors)",
            flush=True,
        )

        # One extra service with the other number of API worker processes: 1 vs 2.
        naive.stop()
        comp.stop()
        other = 2 if args.service_workers == 1 else 1
        svc2 = servers["service-other"] = service(other)
        svc2.wait_ready()
        for n in nets:
            load.run(
                port=svc2.port,
                clients=2,
                duration=60,
                max_requests=6,
                requests=[req(f"svc-inst1-{n}", "/predict")],
            )
        workers: dict[str, Any] = {}
        for w, s in ((args.service_workers, svc), (other, svc2)):
            workers[f"{w}/1client"] = load.run(
                port=s.port,
                clients=1,
                duration=3 * scale,
                max_requests=400,
                requests=[req(f"svc-inst1-{first}", "/predict")],
            )
            workers[f"{w}/32clients"] = load.run(
                port=s.port,
                clients=32,
                duration=5 * scale,
                requests=[req(f"svc-inst1-{first}", "/predict")],
            )
            workers[f"{w}/64img-instances"] = load.run(
                port=s.port,
                clients=4,
                duration=4 * scale,
                images_per_request=64,
                requests=[req(f"svc-inst64-{first}", "/predict")],
            )
        results["workers"] = workers
        print("workers", {k: summary(v) for k, v in workers.items()}, flush=True)
    finally:
        load.close()
        for s in servers.values():
            s.stop()
    results["elapsed_s"] = time.time() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"serving{'-' + args.label if args.label else ''}"
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=1))
    table = markdown(results)
    (args.out / f"{stem}.md").write_text(table)
    print(table)
    print(f"total {results['elapsed_s']:.0f} s; logs and bodies in {tmp}")
    return 0


def summary(r: dict[str, Any]) -> str:
    if r["requests"] and r["errors"] == r["requests"]:
        return "n/a"
    p50 = r["p50_ms"] or 0
    return f"{r.get('images_per_s', 0):.0f} img/s p50 {p50:.1f} ms err {r['errors']}"


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()
    return f"{os.cpu_count()} vCPU {cpu}; load average at start {load[0]:.1f}"


def markdown(res: dict[str, Any]) -> str:
    def ok(r: dict[str, Any] | None) -> bool:
        return bool(r) and r["requests"] > 0 and r["errors"] < r["requests"]  # type: ignore[index]

    def ms(r: dict[str, Any] | None, key: str = "p50_ms") -> str:
        return f"{r[key]:.1f} ms" if ok(r) else "n/a"  # type: ignore[index]

    def ips(r: dict[str, Any] | None) -> str:
        return f"{r['images_per_s']:,.0f}" if ok(r) else "n/a"  # type: ignore[index]

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}x" if a and b else "n/a"

    lines = [
        f"Machine: {res['machine']}. Service: {res['service_workers']} API worker process(es).",
        "",
        "| net | load | service | compiled endpoint | naive endpoint | service / compiled |",
        "|---|---|---|---|---|---|",
    ]
    for net, r in res["nets"].items():
        s1, c1, n1 = r["service/1client"], r["compiled/1client"], r["naive/1client"]
        lines.append(
            f"| {net} | 1 client, 1 image (JSON instances): p50 | {ms(s1)} | {ms(c1)} | {ms(n1)} "
            f"| {ratio(c1['p50_ms'], s1['p50_ms']) if ok(s1) else 'n/a'} (speed) |"
        )
        t1 = r["service/1client-tensor"]
        o1 = r["service/1client-octet"]
        lines.append(
            f"| {net} | 1 client, 1 image, service as JSON tensor / octet-stream: p50 "
            f"| {ms(t1)} / {ms(o1)} | | | "
            f"{ratio(c1['p50_ms'], t1['p50_ms']) if ok(t1) else 'n/a'} / "
            f"{ratio(c1['p50_ms'], o1['p50_ms']) if ok(o1) else 'n/a'} |"
        )
        s32, c32, n32 = r["service/32clients"], r["compiled/32clients"], r["naive/32clients"]
        lines.append(
            f"| {net} | 32 clients, 1 image each: images/s (p99, errors) "
            f"| {ips(s32)} ({ms(s32, 'p99_ms')}, {s32['errors']}) "
            f"| {ips(c32)} ({ms(c32, 'p99_ms')}, {c32['errors']}) "
            f"| {ips(n32)} ({ms(n32, 'p99_ms')}, {n32['errors']}) "
            f"| {ratio(s32['images_per_s'], c32['images_per_s']) if ok(s32) else 'n/a'} |"
        )
        o32 = r["service/32clients-octet"]
        lines.append(
            f"| {net} | 32 clients, 1 image each, octet-stream: images/s (p99, errors) "
            f"| {ips(o32)} ({ms(o32, 'p99_ms')}, {o32['errors']}) | | "
            f"| {ratio(o32['images_per_s'], c32['images_per_s']) if ok(o32) else 'n/a'} |"
        )
        ceil = res["ceiling_images_per_s"][net]
        for key, label in (
            ("64img-instances", "JSON instances"),
            ("64img-tensor", "JSON tensor"),
            ("64img-octet", "octet-stream"),
            ("64img-png", "base64 PNG"),
        ):
            s = r.get(f"service/{key}")
            c = r.get(f"compiled/{key}")
            n = r.get(f"naive/{key}")
            lines.append(
                f"| {net} | 4 clients x 64 images, {label}: images/s (share of in-process "
                f"{ceil:,.0f}) | {ips(s)} ({ratio(s['images_per_s'], ceil) if ok(s) else 'n/a'}) "
                f"| {ips(c)} | {ips(n)} "
                f"| {ratio(s['images_per_s'], c['images_per_s']) if ok(s) and ok(c) else ''} |"
            )
    lines.append("")
    lines.append(
        "Load generator CPU (fraction of one core), highest seen: "
        f"{max(v['loadgen_cpu'] for r in res['nets'].values() for v in r.values()):.2f}"
    )
    h = res.get("health_under_load")
    if h:
        lines.append(
            f"/health while 64 clients hammer /predict: p50 {ms(h['side'])}, p99 "
            f"{ms(h['side'], 'p99_ms')} ({h['side']['requests']} checks, "
            f"{h['side']['errors']} errors); /predict meanwhile {ips(h)} images/s, "
            f"{h['errors']} errors"
        )
    rss = res.get("rss")
    if rss:
        lines.append(
            f"Service RSS over {rss['requests']:,} requests on three models: "
            f"{rss['rss_start_mb']:.0f} MB -> {rss['rss_end_mb']:.0f} MB ({rss['errors']} errors)"
        )
    w = res.get("workers")
    if w:
        lines.append("")
        lines.append(
            "| API worker processes | 1 client p50 | 32 clients images/s (p99) "
            "| 64-image JSON images/s |"
        )
        lines.append("|---|---|---|---|")
        for n in sorted({k.split("/")[0] for k in w}):
            lines.append(
                f"| {n} | {ms(w[f'{n}/1client'])} | {ips(w[f'{n}/32clients'])} "
                f"({ms(w[f'{n}/32clients'], 'p99_ms')}) | {ips(w[f'{n}/64img-instances'])} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if "--loadgen" in sys.argv:
        loadgen_main()
    else:
        raise SystemExit(main())
