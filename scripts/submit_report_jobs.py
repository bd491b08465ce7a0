#!/usr/bin/env python3
"""POST every body of scripts/report_jobs.json to a running service and print the job ids.

    python scripts/submit_report_jobs.py [--url http://localhost:8000] [--key API_KEY]
        [--jobs scripts/report_jobs.json] [--wait]

Standard library only. Each POST carries an Idempotency-Key derived from the body, so
running it twice does not train twice. With --wait it polls until every job is terminal
and then prints the `cnn report` command for them, which writes the report and its export
(scripts/report_jobs_cpu.json -> docs/results-cpu.md and docs/results-cpu.export.json).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent


def call(url: str, key: str | None, method: str = "GET", body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    if body is not None:
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:32]
        request.add_header("Idempotency-Key", f"report-{digest}")
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://localhost:8000")
    parser.add_argument("--key", default=None, help="API key with the train and read scopes")
    parser.add_argument("--jobs", default=str(HERE / "report_jobs.json"))
    parser.add_argument("--wait", action="store_true", help="poll until all jobs are terminal")
    args = parser.parse_args()
    bodies = json.loads(Path(args.jobs).read_text())
    ids = []
    for body in bodies:
        job = call(f"{args.url}/jobs", args.key, "POST", body)
        ids.append(job["id"])
        print(f"{body['net']}: {job['id']} ({job['status']})", flush=True)
    while args.wait:
        states = [call(f"{args.url}/jobs/{i}", args.key)["status"] for i in ids]
        if all(s in ("succeeded", "failed", "cancelled") for s in states):
            break
        time.sleep(30)
    print(report_command(ids, Path(args.jobs)))
    return 0


def report_command(ids: list[str], jobs: Path) -> str:
    """The `cnn report` call for these jobs; a jobs file `report_jobs_<x>.json` gets its own
    report, `results-<x>.md`, so that it never overwrites another one."""
    command = f"cnn report --jobs {','.join(ids)} --out docs"
    if jobs.resolve() == (HERE / "report_jobs.json").resolve():
        return command
    suffix = jobs.stem.removeprefix("report_jobs").strip("_-").replace("_", "-")
    name = f"results-{suffix}.md" if suffix else f"results-{jobs.stem}.md"
    return f"{command} --name {name} --jobs-file {jobs}"


if __name__ == "__main__":
    sys.exit(main())
