"""A large fleet's database load, simulated against PostgreSQL: at what size does it give out?

    .venv/bin/python bench/bench_fleet.py [--levels 500 1000 2000 4000] [--seconds 20]
        [--processes 2] [--connections 16] [--control-polls]

Each simulated worker runs one job and sends what a real `cnn worker` sends (the same SQL
as app/fleet/records.py and app/jobs/execution/progress.py, one transaction each):
- its presence beat (UPDATE workers ...) every 5 s (HEARTBEAT_INTERVAL_S);
- its job's heartbeat (SET LOCAL idle_in_transaction_session_timeout, SELECT now(),
  UPDATE jobs ... fenced by the claim) every 5 s;
- an epoch row every 30 s (UPDATE jobs current_epoch/heartbeat_at, then INSERT INTO epochs
  ON CONFLICT DO NOTHING, which fires the job_events trigger), a realistic rate: NET IV on one
  GPU trains an epoch of CIFAR-10 in tens of seconds (docs/gpu.md);
- with --control-polls, also the training loop's cancel/lease check (SELECT status, claims,
  cancel_requested) every 0.5 s (CONTROL_POLL_S in app/jobs/runner.py), a read.

The load is open-loop: every worker's events have fixed times (random phases), and a late
event is not dropped, so when the database falls behind the lag grows. Reported per level:
offered and achieved transactions/s, p50/p99 latency of the writes (execute + commit) and
p99 lag (completion minus scheduled time), and the CPU seconds of PostgreSQL's processes
and of this load generator. Clients share `--processes` x `--connections` connections:
a real fleet holds at least one connection per worker, far above max_connections (100 by
default), so a fleet this size needs a pooler (PgBouncer) in front of PostgreSQL anyway.
Runs on a throw-away database on 127.0.0.1:5432, dropped at the end.
"""

from __future__ import annotations

import argparse
import heapq
import json
import multiprocessing as mp
import os
import queue
import random
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PG = "host=127.0.0.1 user=postgres"
PRESENCE_S, HEARTBEAT_S, EPOCH_S, CONTROL_S = 5.0, 5.0, 30.0, 0.5

# The statements the app issues (compiled from the ORM; see the module docstring).
SQL_PRESENCE = (
    "UPDATE workers SET queues=%s::JSON, current_job_id=%s::UUID, last_heartbeat_at=%s, "
    "stopped_at=NULL WHERE workers.name = %s"
)
SQL_TIMEOUT = "SET LOCAL idle_in_transaction_session_timeout = '60s'"
SQL_NOW = "SELECT now()"
SQL_HEARTBEAT = (
    "UPDATE jobs SET heartbeat_at=%s WHERE jobs.id = %s::UUID AND jobs.status = 'running' "
    "AND jobs.claims = 1"
)
SQL_EPOCH_JOB = (
    "UPDATE jobs SET current_epoch=CASE WHEN (jobs.current_epoch < %s) THEN %s "
    "ELSE jobs.current_epoch END, heartbeat_at=%s WHERE jobs.id = %s::UUID "
    "AND jobs.status = 'running' AND jobs.claims = 1"
)
SQL_EPOCH_ROW = (
    "INSERT INTO epochs (job_id, epoch, loss, accuracy, val_loss, val_accuracy, seconds, "
    "images_per_second, learning_rate, val_ce_loss, created_at) VALUES (%s::UUID, %s, 1.2, "
    "0.55, 1.3, 0.52, 30.0, 1333.0, 0.001, 1.3, %s) ON CONFLICT (job_id, epoch) DO NOTHING "
    "RETURNING epochs.id"
)
SQL_CONTROL = "SELECT jobs.status, jobs.claims, jobs.cancel_requested FROM jobs WHERE jobs.id = %s"
QUEUES = json.dumps(["maintenance", "training"])


# ------------------------------------------------------------------------- setup
def create_database() -> tuple[str, str]:
    import psycopg

    from app.migrate import upgrade

    name = f"cnn_fleet_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(f"{PG} dbname=postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    upgrade(f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}")
    return name, f"{PG} dbname={name}"


def drop_database(name: str) -> None:
    import psycopg

    with psycopg.connect(f"{PG} dbname=postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def seed(dsn: str, workers: int) -> list[tuple[str, str]]:
    """`workers` running jobs and their workers' rows; (worker name, job id) each."""
    import psycopg

    now = datetime.now(UTC)
    fleet = [(f"sim-{i:05d}@host-{i // 8:04d}", str(uuid.uuid4())) for i in range(workers)]
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO jobs (id, net, model_name, epochs, batch_size, validation_split, "
            "optimizer, learning_rate, seed, status, current_epoch, attempts, claims, "
            "cancel_requested, created_at, started_at, heartbeat_at, worker, device) VALUES "
            "(%s, 'net4', 'fleet', 1000000, 128, 0.2, 'adam', 0.001, 0, 'running', 0, 1, 1, "
            "false, %s, %s, %s, %s, 'GPU:0 simulated')",
            [(job, now, now, now, name) for name, job in fleet],
        )
        cur.executemany(
            "INSERT INTO workers (name, host, pid, device_kind, device, gpu_count, queues, "
            "keras_backend, current_job_id, started_at, last_heartbeat_at) VALUES "
            "(%s, %s, %s, 'gpu', 'GPU:0 simulated', 1, %s::JSON, 'jax', %s, %s, %s)",
            [(n, n.split("@")[1], i, QUEUES, job, now, now) for i, (n, job) in enumerate(fleet)],
        )
        conn.commit()
    return fleet


# ------------------------------------------------------------------------- load
def run_transaction(conn: Any, kind: str, name: str, job: str, epoch: int) -> None:
    with conn.cursor() as cur:
        if kind == "presence":
            cur.execute(SQL_PRESENCE, (QUEUES, job, datetime.now(UTC), name))
        elif kind == "heartbeat":
            cur.execute(SQL_TIMEOUT)
            cur.execute(SQL_NOW)
            (now,) = cur.fetchone()
            cur.execute(SQL_HEARTBEAT, (now, job))
        elif kind == "epoch":
            cur.execute(SQL_TIMEOUT)
            cur.execute(SQL_NOW)
            (now,) = cur.fetchone()
            cur.execute(SQL_EPOCH_JOB, (epoch, epoch, now, job))
            cur.execute(SQL_EPOCH_ROW, (job, epoch, now))
        else:  # control: a read, then the rollback the app does
            cur.execute(SQL_CONTROL, (job,))
            cur.fetchone()
            conn.rollback()
            return
    conn.commit()


def client(
    dsn: str,
    fleet: list[tuple[str, str]],
    seconds: float,
    connections: int,
    control: bool,
    epoch_base: int,
    out: Any,
) -> None:
    """One load process: its share of the fleet, an event heap, `connections` threads."""
    import psycopg

    periods = {"presence": PRESENCE_S, "heartbeat": HEARTBEAT_S, "epoch": EPOCH_S}
    if control:
        periods["control"] = CONTROL_S
    rng = random.Random(os.getpid())
    start = time.monotonic() + 1.0
    heap: list[tuple[float, int, str]] = []
    for index in range(len(fleet)):
        for kind, period in periods.items():
            heapq.heappush(heap, (start + rng.uniform(0, period), index, kind))
    work: queue.Queue[tuple[float, int, str] | None] = queue.Queue()
    results: list[tuple[str, float, float, float]] = []
    epochs = [epoch_base] * len(fleet)
    lock = threading.Lock()

    def consume() -> None:
        conn = psycopg.connect(dsn)
        mine = []
        while (item := work.get()) is not None:
            due, index, kind = item
            name, job = fleet[index]
            if kind == "epoch":
                with lock:
                    epochs[index] += 1
                    epoch = epochs[index]
            else:
                epoch = 0
            began = time.monotonic()
            run_transaction(conn, kind, name, job, epoch)
            ended = time.monotonic()
            mine.append((kind, due, began, ended))
        conn.close()
        with lock:
            results.extend(mine)

    threads = [threading.Thread(target=consume, daemon=True) for _ in range(connections)]
    for thread in threads:
        thread.start()
    end = start + seconds
    while heap and heap[0][0] < end:
        due, index, kind = heapq.heappop(heap)
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        work.put((due, index, kind))
        heapq.heappush(heap, (due + periods[kind], index, kind))
    for _ in threads:
        work.put(None)
    for thread in threads:
        thread.join()
    usage = os.times()
    out.put({"results": results, "cpu": usage.user + usage.system, "start": start, "end": end})


def postgres_cpu() -> float:
    """CPU seconds of every PostgreSQL process on this host, those already exited included."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        if not name.startswith("postgres"):
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        # utime + stime, and cutime + cstime: the backends that exited (the postmaster reaps them)
        total += sum(int(v) for v in fields[11:15])
    return total / tick


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_level(
    dsn: str, fleet: list[tuple[str, str]], args: argparse.Namespace, level: int
) -> dict[str, Any]:
    shares = [fleet[i :: args.processes] for i in range(args.processes)]
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    pg_before, wall_before = postgres_cpu(), time.monotonic()
    procs = [
        ctx.Process(
            target=client,
            args=(
                dsn,
                share,
                args.seconds,
                args.connections,
                args.control_polls,
                level * 1000,
                out,
            ),
        )
        for share in shares
    ]
    for proc in procs:
        proc.start()
    parts = [out.get() for _ in procs]
    for proc in procs:
        proc.join()
    wall = time.monotonic() - wall_before
    pg_cpu = postgres_cpu() - pg_before
    results = [r for part in parts for r in part["results"]]
    # Every event due in the window ran; how long it took to run them all is the throughput.
    began = min(part["start"] for part in parts)
    window = max([args.seconds, *(ended - began for *_, ended in results)])
    writes = [r for r in results if r[0] != "control"]
    service = [(ended - began) * 1000 for _, _, began, ended in writes]
    lag = [(ended - due) * 1000 for _, due, _, ended in results]
    per_s = (2 / PRESENCE_S) + (1 / EPOCH_S) + (1 / CONTROL_S if args.control_polls else 0)
    return {
        "workers": level,
        "offered_tps": level * per_s,
        "achieved_tps": len(results) / window,
        "write_p50_ms": percentile(service, 0.50),
        "write_p99_ms": percentile(service, 0.99),
        "lag_p99_ms": percentile(lag, 0.99),
        "pg_cpu_s_per_s": pg_cpu / wall,
        "client_cpu_s_per_s": sum(p["cpu"] for p in parts) / wall,
        "load_average": os.getloadavg()[0],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", type=int, nargs="+", default=[500, 1000, 2000, 4000])
    parser.add_argument("--seconds", type=float, default=20.0, help="each level's window")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--connections", type=int, default=16, help="per process")
    parser.add_argument("--control-polls", action="store_true")
    args = parser.parse_args()

    name, dsn = create_database()
    try:
        fleet = seed(dsn, max(args.levels))
        print(
            f"{'workers':>8} {'offered/s':>10} {'done/s':>8} {'write p50':>10} "
            f"{'write p99':>10} {'lag p99':>10} {'pg CPU':>7} {'client CPU':>10} {'load':>5}",
            flush=True,
        )
        for level in args.levels:
            row = run_level(dsn, fleet[:level], args, level)
            print(
                f"{row['workers']:>8} {row['offered_tps']:>10.0f} {row['achieved_tps']:>8.0f} "
                f"{row['write_p50_ms']:>8.2f}ms {row['write_p99_ms']:>8.2f}ms "
                f"{row['lag_p99_ms']:>8.0f}ms {row['pg_cpu_s_per_s']:>7.2f} "
                f"{row['client_cpu_s_per_s']:>10.2f} {row['load_average']:>5.1f}",
                flush=True,
            )
    finally:
        drop_database(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
