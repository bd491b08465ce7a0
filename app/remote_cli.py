"""`cnn jobs ...`, `cnn sweeps ...`, `cnn models ...`, `cnn workers` and `cnn predict --remote`: the service
from a terminal.

The URL and key come from `--url` / `--api-key` or CNN_URL / CNN_API_KEY (default URL
http://127.0.0.1:8000). Output is for people by default; `--json` prints the service's JSON
answer instead. Exit codes: 0 done (for `watch`: the job succeeded, the sweep finished), 1 the
job failed (`sweeps best`: no complete trial), 3 the job or sweep was cancelled, 2 an error
(the service's message is printed on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from app.client import DEFAULT_URL, ApiClient, ApiError, ApiUnreachable

EXIT_OK, EXIT_FAILED, EXIT_ERROR, EXIT_CANCELLED = 0, 1, 2, 3
OUTCOME_EXIT = {"succeeded": EXIT_OK, "failed": EXIT_FAILED, "cancelled": EXIT_CANCELLED}


# ---------------------------------------------------------------------- formatting
def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=False)).rstrip()
        for r in [header, *rows]
    ]
    return "\n".join(lines)


def _pct(value: Any) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, int | float) else "-"


def _num(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) else "-"


def _time(value: str | None) -> str:
    if not value:
        return "-"
    return datetime.fromisoformat(value).strftime("%Y-%m-%d %H:%M:%S")


def _duration(job: dict[str, Any]) -> str:
    if not job.get("started_at"):
        return "-"
    start = datetime.fromisoformat(job["started_at"])
    end = datetime.fromisoformat(job["finished_at"]) if job.get("finished_at") else None
    if end is None:
        end = datetime.now(start.tzinfo)
    seconds = max((end - start).total_seconds(), 0)
    minutes, sec = divmod(int(round(seconds)), 60)
    return f"{minutes}m{sec:02d}s" if minutes else f"{sec}s"


def _progress(job: dict[str, Any]) -> str:
    progress = job.get("progress") or {}
    return f"{progress.get('epoch', 0)}/{progress.get('epochs', '?')}"


def _test_accuracy(job: dict[str, Any]) -> str:
    evaluation = job.get("evaluation") or {}
    return _pct(evaluation.get("test_accuracy"))


def epoch_line(row: dict[str, Any], epochs: Any = "?") -> str:
    """`epoch 3/20  loss 1.2345  acc 55.1%  val_loss 1.3000  val_acc 52.0%  12.3 s`"""
    return (
        f"epoch {row['epoch']}/{epochs}  loss {_num(row.get('loss'))}  "
        f"acc {_pct(row.get('accuracy'))}  val_loss {_num(row.get('val_loss'))}  "
        f"val_acc {_pct(row.get('val_accuracy'))}  {_num(row.get('seconds'), 1)} s"
    )


def _print(args: argparse.Namespace, body: Any, human: Callable[[Any], str]) -> None:
    print(json.dumps(body, indent=2) if args.json else human(body))


# ---------------------------------------------------------------------- commands
def _client(args: argparse.Namespace) -> ApiClient:
    return ApiClient(args.url, args.api_key)


def _job_params(args: argparse.Namespace) -> dict[str, Any]:
    params: dict[str, Any] = {"net": args.net}
    for name in _job_fields():
        value = getattr(args, f"job_{name}", None)
        if value is not None:
            params[name] = value
    for item in args.set or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE. Received: {item!r}")
        try:
            params[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            params[key.strip()] = raw
    return params


def cmd_jobs_submit(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.submit_job(_job_params(args), idempotency_key=args.idempotency_key)
    _print(
        args,
        job,
        lambda j: (
            f"job {j['id']} {j['status']}: {j['net']}, {j['progress']['epochs']} epochs\n"
            f"follow it with: cnn jobs watch {j['id']}"
        ),
    )
    if args.watch and not args.json:
        args.job_id = job["id"]
        return cmd_jobs_watch(args)
    return EXIT_OK


def _jobs_table(body: dict[str, Any]) -> str:
    rows = [
        [
            j["id"],
            j["status"],
            j["net"],
            _progress(j),
            _test_accuracy(j),
            _time(j.get("started_at")),
            _duration(j),
        ]
        for j in body["jobs"]
    ]
    if not rows:
        return "no jobs"
    header = ["ID", "STATUS", "NET", "EPOCH", "TEST ACC", "STARTED", "DURATION"]
    shown = f"\n({len(rows)} of {body['total']})" if body["total"] > len(rows) else ""
    return _table(rows, header) + shown


def cmd_jobs_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        body = client.list_jobs(status=args.status, net=args.net, limit=args.limit)
    _print(args, body, _jobs_table)
    return EXIT_OK


def cmd_jobs_watch(args: argparse.Namespace) -> int:
    """Follow the job's events: a progress bar and one line per epoch; exit code by outcome."""
    from tqdm import tqdm

    with _client(args) as client:
        job = client.job(args.job_id)
        total = job["progress"]["epochs"]
        bar = None if args.json else tqdm(total=total, unit="epoch", file=sys.stderr)
        seen = 0
        final = job["status"]
        for event in client.follow(args.job_id):
            if args.json:
                print(json.dumps({"id": event.id, "event": event.kind, "data": event.data}))
                sys.stdout.flush()
            elif event.kind == "epoch":
                epoch = event.data["epoch"]
                if bar is not None:
                    bar.write(epoch_line(event.data, total))
                    bar.update(epoch - seen)  # negative after a restart from scratch
                seen = epoch
            elif event.kind == "status" and bar is not None:
                bar.set_postfix_str(event.data["status"])
                if event.data.get("error"):
                    bar.write(f"{event.data['status']}: {event.data['error']}")
            if event.kind == "status":
                final = event.data["status"]
        if bar is not None:
            bar.close()
            summary = f"job {args.job_id} {final}"
            end = client.job(args.job_id)
            if end.get("evaluation"):
                summary += f": test accuracy {_pct(end['evaluation']['test_accuracy'])}"
            print(summary)
    return OUTCOME_EXIT.get(final, EXIT_ERROR)


def _history_text(body: dict[str, Any]) -> str:
    rows = [
        [
            str(r["epoch"]),
            _num(r["loss"]),
            _pct(r["accuracy"]),
            _num(r.get("val_loss")),
            _pct(r.get("val_accuracy")),
            _num(r.get("seconds"), 1),
        ]
        for r in body["epochs"]
    ]
    if not rows:
        return f"job {body['job_id']} ({body['status']}) has no finished epoch yet"
    text = _table(rows, ["EPOCH", "LOSS", "ACC", "VAL_LOSS", "VAL_ACC", "SECONDS"])
    a = body.get("analysis") or {}
    text += (
        f"\n\nbest epoch (lowest val_loss): {a.get('best_epoch') or '-'}"
        f"\noverfitting after epoch: {a.get('overfitting_after_epoch') or '-'}"
        f"\nfinal gap (train - val accuracy): {_num(a.get('final_gap'), 3)}"
        f"   max gap: {_num(a.get('max_gap'), 3)}"
    )
    return text


def cmd_jobs_history(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _print(args, client.history(args.job_id), _history_text)
    return EXIT_OK


def _evaluation_text(body: dict[str, Any]) -> str:
    classes = body["classes"]
    lines = [
        f"test loss {_num(body['test_loss'])}   test accuracy {_pct(body['test_accuracy'])}",
        "",
        "per-class accuracy:",
    ]
    lines += [
        f"  {c:<11} {_pct(a)}" for c, a in zip(classes, body["per_class_accuracy"], strict=False)
    ]
    first = body["first_image"]
    lines += [
        "",
        f"first test image: predicted {classes[first['predicted_class']]}, "
        f"true {classes[first['true_class']]}",
        "",
        "confusion matrix (rows: true class, columns: predicted):",
    ]
    width = max(5, *(len(str(v)) + 1 for row in body["confusion_matrix"] for v in row))
    lines.append(" " * 12 + "".join(c[: width - 1].rjust(width) for c in classes))
    for name, row in zip(classes, body["confusion_matrix"], strict=False):
        lines.append(f"{name:<12}" + "".join(str(v).rjust(width) for v in row))
    return "\n".join(lines)


def cmd_jobs_evaluation(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _print(args, client.evaluation(args.job_id), _evaluation_text)
    return EXIT_OK


def cmd_jobs_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.cancel(args.job_id)
    _print(
        args,
        job,
        lambda j: (
            f"job {j['id']} {j['status']}"
            + (" (stops at its next batch)" if j["status"] == "running" else "")
        ),
    )
    return EXIT_OK


# ---------------------------------------------------------------------- sweeps
def _sweep_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The POST /sweeps body: a JSON file (or - for stdin), or `--ablation`; the flags given
    replace the file's fields."""
    spec: dict[str, Any] = {}
    if args.spec:
        text = sys.stdin.read() if args.spec == "-" else Path(args.spec).read_text()
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{args.spec} is not JSON: {exc}") from None
        if not isinstance(spec, dict):
            raise ValueError(f"{args.spec} must hold one JSON object (a POST /sweeps body)")
    if args.ablation:
        spec["kind"] = "ablation"
    if not spec:
        raise ValueError("give a JSON file with the sweep (see docs/sweeps.md) or --ablation")
    for name in ("name", "epochs", "train_limit", "seed", "parallelism", "max_trials"):
        value = getattr(args, name, None)
        if value is not None:
            spec[name] = value
    return spec


def _counts(sweep: dict[str, Any]) -> str:
    c = sweep["counts"]
    done = c["complete"] + c["pruned"] + c["fail"]
    return f"{done}/{sweep['max_trials']}"


def _value(value: Any) -> str:
    return _num(value) if isinstance(value, int | float) else "-"


def _sweeps_table(body: dict[str, Any]) -> str:
    rows = [
        [
            s["id"],
            s["kind"],
            s["status"],
            _counts(s),
            str(s["counts"]["running"]),
            str(s["counts"]["pruned"]),
            str(s["counts"]["fail"]),
            f"{s['objective']['metric']} {_value(s['best_value'])}",
            _time(s.get("created_at")),
        ]
        for s in body["sweeps"]
    ]
    if not rows:
        return "no sweeps"
    header = ["ID", "KIND", "STATUS", "TRIALS", "RUNNING", "PRUNED", "FAILED", "BEST", "CREATED"]
    shown = f"\n({len(rows)} of {body['total']})" if body["total"] > len(rows) else ""
    return _table(rows, header) + shown


def _trial_line(trial: dict[str, Any], metric: str) -> str:
    what = trial.get("role") or ", ".join(f"{k}={v}" for k, v in sorted(trial["params"].items()))
    line = f"trial {trial['number']} {trial['state']}: {what}"
    if trial.get("value") is not None:
        line += f"  {metric} {_num(trial['value'])} (epoch {trial.get('value_epoch')})"
    if trial.get("pruned_epoch") is not None:
        line += f"  pruned after epoch {trial['pruned_epoch']}"
    if trial["state"] == "fail" and trial.get("error"):
        line += f"  ({trial['error']})"
    return line


def _sweep_text(sweep: dict[str, Any]) -> str:
    metric = sweep["objective"]["metric"]
    lines = [
        f"sweep {sweep['id']} ({sweep['kind']}) {sweep['status']}: {_counts(sweep)} trials, "
        f"objective {sweep['objective']['direction']} {metric}"
    ]
    lines += [_trial_line(t, metric) for t in sweep["trials"]]
    best = sweep.get("best_trial")
    if best:
        lines.append(f"best: {_trial_line(best, metric)}")
    if sweep.get("importances"):
        shown = ", ".join(f"{k} {v:.2f}" for k, v in sweep["importances"].items())
        lines.append(f"importances: {shown}")
    if sweep.get("error"):
        lines.append(f"error: {sweep['error']}")
    return "\n".join(lines)


def cmd_sweeps_submit(args: argparse.Namespace) -> int:
    with _client(args) as client:
        sweep = client.submit_sweep(_sweep_spec(args))
    _print(
        args,
        sweep,
        lambda s: (
            f"sweep {s['id']} {s['status']}: {s['kind']}, up to {s['max_trials']} trials, "
            f"{s['parallelism']} at a time\nfollow it with: cnn sweeps watch {s['id']}"
        ),
    )
    if args.watch and not args.json:
        args.sweep_id = sweep["id"]
        return cmd_sweeps_watch(args)
    return EXIT_OK


def cmd_sweeps_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        body = client.list_sweeps(status=args.status, kind=args.kind, limit=args.limit)
    _print(args, body, _sweeps_table)
    return EXIT_OK


def cmd_sweeps_show(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _print(args, client.sweep(args.sweep_id), _sweep_text)
    return EXIT_OK


def cmd_sweeps_watch(args: argparse.Namespace) -> int:
    """A line per trial as it starts and ends, until the sweep ends; exit code by outcome."""
    import time

    seen: dict[int, str] = {}
    with _client(args) as client:
        while True:
            sweep = client.sweep(args.sweep_id)
            metric = sweep["objective"]["metric"]
            for trial in sweep["trials"]:
                if seen.get(trial["number"]) != trial["state"]:
                    seen[trial["number"]] = trial["state"]
                    if args.json:
                        print(json.dumps(trial))
                    else:
                        print(_trial_line(trial, metric))
                    sys.stdout.flush()
            if sweep["status"] != "running" and not sweep["counts"]["running"]:
                break
            time.sleep(args.interval)
    if not args.json:
        print(f"sweep {args.sweep_id} {sweep['status']}")
        if sweep.get("best_trial"):
            print(f"best: {_trial_line(sweep['best_trial'], metric)}")
    return EXIT_CANCELLED if sweep["status"] == "cancelled" else EXIT_OK


def cmd_sweeps_best(args: argparse.Namespace) -> int:
    """The best complete trial by the objective (a validation metric)."""
    with _client(args) as client:
        sweep = client.sweep(args.sweep_id)
    best = sweep.get("best_trial")
    if args.json:
        print(json.dumps(best, indent=2))
    elif best is None:
        print(f"sweep {sweep['id']} has no complete trial yet")
    else:
        metric = sweep["objective"]["metric"]
        print(_trial_line(best, metric))
        print(
            f"job {best['job_id']}  test accuracy {_pct(best.get('test_accuracy'))} (not used to choose)"
        )
        for name, value in sorted(best["params"].items()):
            print(f"  {name} = {value}")
    return EXIT_OK if best else EXIT_FAILED


def cmd_sweeps_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        sweep = client.cancel_sweep(args.sweep_id)
    _print(args, sweep, lambda s: f"sweep {s['id']} {s['status']}")
    return EXIT_OK


def _models_text(body: dict[str, Any]) -> str:
    rows = [
        [
            m["name"],
            str(m["latest_version"]["version"]),
            str(m["versions"]),
            ", ".join(f"{a}->v{v}" for a, v in sorted(m["aliases"].items())) or "-",
            _pct((m["latest_version"].get("metrics") or {}).get("test_accuracy")),
        ]
        for m in body["models"]
    ]
    if not rows:
        return "no registered models"
    return _table(rows, ["NAME", "LATEST", "VERSIONS", "ALIASES", "TEST ACC (LATEST)"])


def cmd_models_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _print(args, client.list_models(), _models_text)
    return EXIT_OK


def cmd_models_alias(args: argparse.Namespace) -> int:
    with _client(args) as client:
        body = client.set_alias(args.name, args.alias, args.version)
    _print(args, body, lambda b: f"{b['name']}@{b['alias']} -> version {b['version']}")
    return EXIT_OK


def _ago(value: str | None) -> str:
    if not value:
        return "-"
    when = datetime.fromisoformat(value)
    return f"{max((datetime.now(when.tzinfo) - when).total_seconds(), 0):.0f}s ago"


def workers_table(body: dict[str, Any]) -> str:
    """NAME HOST DEVICE GPUS BACKEND QUEUES JOB STATE HEARTBEAT, one row per worker."""
    rows = [
        [
            w["name"],
            w["host"],
            w["device"],
            str(w["gpu_count"]),
            w["keras_backend"],
            ",".join(w["queues"]) or "-",
            w["current_job_id"] or "-",
            w["state"],
            _ago(w["last_heartbeat_at"]),
        ]
        for w in body["workers"]
    ]
    if not rows:
        return "no live workers"
    header = ["NAME", "HOST", "DEVICE", "GPUS", "BACKEND", "QUEUES", "JOB", "STATE", "HEARTBEAT"]
    shown = f"\n({len(rows)} of {body['total']})" if body["total"] > len(rows) else ""
    return _table(rows, header) + shown


def cmd_workers(args: argparse.Namespace) -> int:
    """GET /workers, or with --local the same list from this machine's DATABASE_URL."""
    if args.local:
        from app.config import get_settings
        from app.db import session_factory
        from app.fleet.listing import MAX_LIMIT, worker_list

        if not 1 <= args.limit <= MAX_LIMIT:
            raise ValueError(f"--limit must be 1 to {MAX_LIMIT}. Received: {args.limit}")
        settings = get_settings()
        with session_factory(settings)() as session:
            listed = worker_list(
                session, settings, include_lost=args.include_lost, limit=args.limit
            )
        body = listed.model_dump(mode="json")
    else:
        with _client(args) as client:
            body = client.list_workers(include_lost=args.include_lost, limit=args.limit)
    _print(args, body, workers_table)
    return EXIT_OK


def _latest_model(client: ApiClient) -> str:
    models = client.list_models()["models"]
    if not models:
        raise ValueError("the service has no registered model yet; train one first")
    newest = max(models, key=lambda m: m["latest_version"]["created_at"])
    return str(newest["name"])


def cmd_predict_remote(args: argparse.Namespace) -> int:
    """Called by `cnn predict --remote IMAGE...`."""
    with _client(args) as client:
        model = args.model or _latest_model(client)
        answers = []
        for image in args.files:
            body = client.predict_file(Path(image), model, args.version, args.alias)
            answers.append({"image": image, **body})
    if args.json:
        print(json.dumps(answers if len(answers) > 1 else answers[0], indent=2))
        return EXIT_OK
    for answer in answers:
        (prediction,) = answer["predictions"]
        served = answer["model"]
        print(
            f"{answer['image']}: {prediction['class_name']} "
            f"({served['name']} version {served['version']})"
        )
        for name, p in zip(answer["classes"], prediction["probabilities"], strict=False):
            print(f"  {name:<11} {p:.4f}  {'#' * int(round(40 * p))}")
    return EXIT_OK


# ---------------------------------------------------------------------- parsers
def _job_fields() -> dict[str, dict[str, Any]]:
    """JobCreate's fields but `net`, from its JSON schema: every option of the job schema."""
    from app.schemas import JobCreate

    schema = JobCreate.model_json_schema()
    return {k: v for k, v in schema["properties"].items() if k != "net"}


def _field_type(spec: dict[str, Any]) -> Callable[[str], Any]:
    types = {s.get("type") for s in spec.get("anyOf", [spec])}
    if "boolean" in types:
        return _boolean
    if "integer" in types:
        return int
    if "number" in types:
        return float
    return str


def _boolean(value: str) -> bool:
    lowered = value.lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false. Received: {value!r}")


def connection_options() -> argparse.ArgumentParser:
    """--url, --api-key and --json, shared by every remote command."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--url",
        default=os.environ.get("CNN_URL", DEFAULT_URL),
        help=f"the service (default: $CNN_URL or {DEFAULT_URL})",
    )
    parent.add_argument(
        "--api-key",
        default=os.environ.get("CNN_API_KEY"),
        help="API key sent as 'Authorization: Bearer' (default: $CNN_API_KEY)",
    )
    parent.add_argument("--json", action="store_true", help="print the service's JSON")
    return parent


def add_commands(sub: Any) -> None:
    """Add `jobs`, `sweeps`, `workers` and `models` to the `cnn` parser's subcommands."""
    common = connection_options()

    jobs = sub.add_parser("jobs", help="training jobs on a running service")
    jobs_sub = jobs.add_subparsers(dest="jobs_command", required=True)

    p = jobs_sub.add_parser("submit", parents=[common], help="start a training job")
    p.add_argument("net", help="net1, net2, net3, ... (see `cnn nets`)")
    for name, spec in _job_fields().items():
        help_text = spec.get("description", "")
        if "default" in spec and spec["default"] is not None:
            help_text = f"{help_text} (default {spec['default']})".strip()
        p.add_argument(
            f"--{name.replace('_', '-')}",
            dest=f"job_{name}",
            metavar=name.upper(),
            type=_field_type(spec),
            default=None,
            # argparse formats help with %, so a literal % (e.g. "30%") must be doubled.
            help=help_text.replace("%", "%%") or None,
        )
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any other job field")
    p.add_argument("--idempotency-key", default=None, help="retry-safe submission")
    p.add_argument("--watch", action="store_true", help="then follow it like `cnn jobs watch`")
    p.set_defaults(func=cmd_jobs_submit)

    p = jobs_sub.add_parser("list", parents=[common], help="jobs, newest first")
    p.add_argument("--status", default=None)
    p.add_argument("--net", default=None)
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(func=cmd_jobs_list)

    for name, func, text in (
        ("watch", cmd_jobs_watch, "follow a job live until it ends (exit code by outcome)"),
        ("history", cmd_jobs_history, "per-epoch metrics and the overfitting analysis"),
        ("evaluation", cmd_jobs_evaluation, "test loss/accuracy, per class, confusion matrix"),
        ("cancel", cmd_jobs_cancel, "cancel a queued or running job"),
    ):
        p = jobs_sub.add_parser(name, parents=[common], help=text)
        p.add_argument("job_id")
        p.set_defaults(func=func)

    sweeps = sub.add_parser("sweeps", help="hyperparameter sweeps and ablations")
    sweeps_sub = sweeps.add_subparsers(dest="sweeps_command", required=True)
    p = sweeps_sub.add_parser("submit", parents=[common], help="start a sweep (docs/sweeps.md)")
    p.add_argument("spec", nargs="?", help="a JSON file with the POST /sweeps body, - for stdin")
    p.add_argument("--ablation", action="store_true", help="an ablation (NET III to NET IV)")
    p.add_argument("--name", default=None)
    p.add_argument("--epochs", type=int, default=None, help="ablation: every job's epochs")
    p.add_argument("--train-limit", type=int, default=None, help="ablation: training images")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--parallelism", type=int, default=None, help="trials queued or running at once")
    p.add_argument("--max-trials", type=int, default=None, help="search: trials at most")
    p.add_argument("--watch", action="store_true", help="then follow it like `cnn sweeps watch`")
    p.add_argument("--interval", type=float, default=2.0, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_sweeps_submit)
    p = sweeps_sub.add_parser("list", parents=[common], help="sweeps, newest first")
    p.add_argument("--status", default=None)
    p.add_argument("--kind", default=None)
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(func=cmd_sweeps_list)
    for name, func, text in (
        ("show", cmd_sweeps_show, "a sweep's trials, best trial and importances"),
        ("watch", cmd_sweeps_watch, "follow a sweep until it ends (exit code by outcome)"),
        ("best", cmd_sweeps_best, "the best trial by the objective (validation)"),
        ("cancel", cmd_sweeps_cancel, "cancel a sweep and its queued and running trials"),
    ):
        p = sweeps_sub.add_parser(name, parents=[common], help=text)
        p.add_argument("sweep_id")
        if name == "watch":
            p.add_argument("--interval", type=float, default=2.0, help="seconds between polls")
        p.set_defaults(func=func)

    p = sub.add_parser("workers", parents=[common], help="the training workers that are up")
    p.add_argument("--include-lost", action="store_true", help="also lost and stopped ones")
    p.add_argument("--limit", type=int, default=200, help="at most this many (1 to 1000)")
    p.add_argument(
        "--local", action="store_true", help="read DATABASE_URL here instead of asking --url"
    )
    p.set_defaults(func=cmd_workers)

    models = sub.add_parser("models", help="the model registry of a running service")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    p = models_sub.add_parser("list", parents=[common], help="registered models and aliases")
    p.set_defaults(func=cmd_models_list)
    p = models_sub.add_parser("alias", parents=[common], help="point ALIAS at VERSION")
    p.add_argument("name")
    p.add_argument("alias")
    p.add_argument("version", type=int)
    p.set_defaults(func=cmd_models_alias)


def run(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a remote command; service errors print one line on stderr and exit 2."""
    try:
        return func(args)
    except ApiError as exc:
        print(f"cnn: error: {exc.code}: {exc.message} (HTTP {exc.status})", file=sys.stderr)
    except ApiUnreachable as exc:
        print(f"cnn: error: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
    return EXIT_ERROR
