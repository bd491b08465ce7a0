"""The /predict flood of issue 18 item 1 against a real `cnn serve`, one run.

    .venv/bin/python bench/bench_predict_flood.py [--connections 150] [--flood-s 45]

Starts `cnn serve` on a free loopback port (the embedded default: SQLite and the server-less
broker in a temporary STATE_DIR, every setting at its default; the standby worker off so
that it does not compete for the CPU), with NET I (untrained weights: they time like trained
ones) registered and two `predict` keys, and the rate limit off (PREDICT_RATE_PER_S=0), so
that nothing but the body admission stands between the flood and the memory. Then:

1. quiet: the other key's one-image /predict p50 and /health p99, one sequential client each;
2. flood: `--connections` connections of the flooding key (`--flood-keys` spreads them over
   more keys, to fill the process's budget rather than one key's), each sending a /predict
   header declaring 8 MiB and then all of the body but its last KiB, and pausing until the
   server answers or closes; then again after `--retry-s` (1 s), until the flood ends.
   Meanwhile the same two sequential clients measure, and the API process's resident memory
   and CPU time are sampled;
3. after: the flood stopped, a few seconds later, the resident memory again.

Prints RSS idle / peak / after, the other key's p50 quiet and under flood (and the ratio),
/health p99 under flood, and how the flooding requests were answered. The targets (issue 18):
RSS within 300 MB of idle, the other key's p50 within 2x, /health p99 under 100 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
MIB = 1024 * 1024
BODY = 8 * MIB
UNSENT = 1024  # the flood keeps back the last KiB of every body
PIECE = 256 * 1024
# The measuring clients send a request every PACE_S (an app's steady traffic, not a load).
PACE_S = 0.02


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    load = os.getloadavg()[0]
    return f"{os.cpu_count()} vCPU {cpu}; load average at start {load:.1f}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def seed(state: Path, flooders: int) -> tuple[list[str], str]:
    """Migrate, register NET I as `net1`, make the flooding keys and the other key."""
    import keras

    from app import auth
    from app.config import Settings
    from app.db import session_factory
    from app.migrate import upgrade
    from app.ml.nets import build_net
    from app.registry import versions as registry

    settings = Settings(_env_file=None, STATE_DIR=state)
    state.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database_url)
    keras.utils.set_random_seed(0)
    path = state / "net1.keras"
    build_net("net1").save(path)
    data = path.read_bytes()
    with session_factory(settings)() as session:
        registry.register_version(
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
        flooding = [
            auth.create_key(session, f"flooder-{i}", "predict").key for i in range(flooders)
        ]
        other = auth.create_key(session, "other", "predict").key
    return flooding, other


def start_serve(state: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "STATE_DIR": str(state),
        "SERVE_STANDBY_WORKER": "false",
        # The rate limit off: the flood meets only the body admission (the worst case).
        "PREDICT_RATE_PER_S": "0",
        "PYTHONUNBUFFERED": "1",
    }
    command = [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--gpus", "none"]
    with log.open("wb") as out:
        return subprocess.Popen(
            command, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


# ------------------------------------------------------------------------- HTTP clients
def predict_request(key: str) -> bytes:
    pixels = "[" + ",".join(["[" + ",".join(["[0,0,0]"] * 32) + "]"] * 32) + "]"
    body = f'{{"model": "net1", "instances": [{pixels}]}}'.encode()
    head = (
        "POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {key}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


HEALTH = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


async def read_answer(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    if length:
        await reader.readexactly(length)
    return int(head[9:12])


async def sequential(
    port: int, request: bytes, until: list[float], out: list[float], pause: float = 0.0
) -> Counter:
    """One keep-alive client sending `request` again and again until `until[0]` (monotonic),
    `pause` seconds apart; the latencies of its 200 answers go to `out`."""
    statuses: Counter = Counter()
    connection: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    while time.monotonic() < until[0]:
        if connection is None:
            connection = await asyncio.open_connection("127.0.0.1", port)
        reader, writer = connection
        start = time.perf_counter()
        try:
            writer.write(request)
            status = await read_answer(reader)
        except (OSError, asyncio.IncompleteReadError):
            statuses["closed"] += 1
            writer.close()
            connection = None
            continue
        if status == 200:
            out.append(time.perf_counter() - start)
        statuses[status] += 1
        await asyncio.sleep(pause if status == 200 else max(pause, 0.05))
    if connection is not None:
        connection[1].close()
    return statuses


async def flood_connection(
    port: int, key: str, until: float, answers: Counter, retry_s: float
) -> None:
    """Declare 8 MiB, send all but the last KiB, pause until answered; again `retry_s` later."""
    head = (
        "POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {key}\r\nContent-Length: {BODY}\r\n\r\n"
    ).encode()
    piece = b"[" * PIECE
    while time.monotonic() < until:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            answers["connect failed"] += 1
            await asyncio.sleep(min(retry_s, max(until - time.monotonic(), 0)))
            continue
        answer = asyncio.ensure_future(read_answer(reader))
        try:
            writer.write(head)
            sent = 0
            while sent < BODY - UNSENT and not answer.done():
                n = min(PIECE, BODY - UNSENT - sent)
                writer.write(piece[:n])
                await writer.drain()
                sent += n
        except OSError:
            pass  # refused: the server answered and closed without reading the body
        try:
            status = await asyncio.wait_for(answer, max(until - time.monotonic(), 0.1))
            answers[str(status)] += 1
        except (OSError, asyncio.IncompleteReadError):
            answers["closed without an answer"] += 1
        except TimeoutError:
            answers["unanswered at the end"] += 1
        finally:
            writer.close()
        await asyncio.sleep(min(retry_s, max(until - time.monotonic(), 0)))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(
    port: int, pid: int, flooding: list[str], other: str, args: Any
) -> dict[str, Any]:
    result: dict[str, Any] = {}
    predict = predict_request(other)
    # 1. quiet
    quiet_predict: list[float] = []
    quiet_health: list[float] = []
    until = [time.monotonic() + args.quiet_s]
    await asyncio.gather(
        sequential(port, predict, until, quiet_predict, PACE_S),
        sequential(port, HEALTH, until, quiet_health, PACE_S),
    )
    result["rss_idle"] = rss_mb(pid)
    # 2. flood
    flood_predict: list[float] = []
    flood_health: list[float] = []
    answers: Counter = Counter()
    peak = [result["rss_idle"]]
    end = time.monotonic() + args.flood_s
    until = [end]

    async def sample() -> None:
        while time.monotonic() < end:
            peak[0] = max(peak[0], rss_mb(pid))
            await asyncio.sleep(0.2)

    flooders = [
        flood_connection(port, flooding[i % len(flooding)], end, answers, args.retry_s)
        for i in range(args.connections)
    ]
    cpu_before = cpu_seconds(pid)
    own = resource.getrusage(resource.RUSAGE_SELF)
    outcome = await asyncio.gather(
        sequential(port, predict, until, flood_predict, PACE_S),
        sequential(port, HEALTH, until, flood_health, PACE_S),
        sample(),
        *flooders,
    )
    result["rss_peak"] = peak[0]
    result["api_cpu_flood"] = (cpu_seconds(pid) - cpu_before) / args.flood_s
    now = resource.getrusage(resource.RUSAGE_SELF)
    spent = (now.ru_utime - own.ru_utime) + (now.ru_stime - own.ru_stime)
    result["loadgen_cpu_flood"] = spent / args.flood_s
    # 3. after
    await asyncio.sleep(args.settle_s)
    result["rss_after"] = rss_mb(pid)
    result["p50_quiet_ms"] = statistics.median(quiet_predict) * 1000
    result["p50_flood_ms"] = statistics.median(flood_predict) * 1000
    for name, values in (("quiet", quiet_health), ("flood", flood_health)):
        for q in (50, 99):
            result[f"health_p{q}_{name}_ms"] = percentile(values, q / 100) * 1000
    result["other_statuses_flood"] = dict(outcome[0])
    result["flood_answers"] = dict(answers)
    result["other_requests"] = (len(quiet_predict), len(flood_predict))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=150)
    parser.add_argument("--flood-s", type=float, default=45.0)
    parser.add_argument("--quiet-s", type=float, default=10.0)
    parser.add_argument("--settle-s", type=float, default=5.0)
    parser.add_argument(
        "--retry-s", type=float, default=1.0, help="a flooding connection's pause between tries"
    )
    parser.add_argument(
        "--flood-keys",
        type=int,
        default=1,
        help="spread the connections over this many keys (the issue's flood: 1)",
    )
    args = parser.parse_args()
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="flood-") as tmp:
        state = Path(tmp) / "var"
        flooding, other = seed(state, args.flood_keys)
        port = free_port()
        log = Path(tmp) / "serve.log"
        proc = start_serve(state, port, log)
        try:
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None, log.read_text()[-3000:]
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=1):
                        break
                except OSError:
                    assert time.monotonic() < deadline, "cnn serve did not start"
                    time.sleep(0.5)
            # Warm up: TensorFlow and the model load on the first /predict.
            asyncio.run(measure_warm_up(port, other))
            result = asyncio.run(measure(port, proc.pid, flooding, other, args))
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    report(result, args)
    return 0


async def measure_warm_up(port: int, key: str) -> None:
    samples: list[float] = []
    await sequential(port, predict_request(key), [time.monotonic() + 5], samples)


def report(r: dict[str, Any], args: Any) -> None:
    grown = r["rss_peak"] - r["rss_idle"]
    ratio = r["p50_flood_ms"] / r["p50_quiet_ms"]
    print(
        f"flood: {args.connections} connections x {BODY // MIB} MiB from {args.flood_keys} "
        f"key(s) for {args.flood_s:g} s"
    )
    print(
        f"API resident memory: idle {r['rss_idle']:.0f} MB, peak {r['rss_peak']:.0f} MB "
        f"(+{grown:.0f} MB; target +300), after {r['rss_after']:.0f} MB"
    )
    print(
        f"other key's /predict p50: quiet {r['p50_quiet_ms']:.1f} ms, under flood "
        f"{r['p50_flood_ms']:.1f} ms ({ratio:.2f}x; target 2x); requests "
        f"{r['other_requests'][0]} quiet, {r['other_requests'][1]} under flood, statuses "
        f"{r['other_statuses_flood']}"
    )
    print(
        f"/health p50 / p99: quiet {r['health_p50_quiet_ms']:.1f} / "
        f"{r['health_p99_quiet_ms']:.1f} ms, under flood {r['health_p50_flood_ms']:.1f} / "
        f"{r['health_p99_flood_ms']:.1f} ms (target p99 < 100)"
    )
    print(
        f"CPU under flood: the API process {r['api_cpu_flood']:.0%} of one core, this load "
        f"generator {r['loadgen_cpu_flood']:.0%} (the same two cores)"
    )
    print(f"flooding requests answered: {r['flood_answers']}")


if __name__ == "__main__":
    raise SystemExit(main())
