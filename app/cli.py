"""The `cnn` command: the course's workflow from a terminal, and the service's entry points.

cnn nets                      list the architectures
cnn summary net1 [--json]     parameter and shape calculations, checked against Keras
cnn train net1 --data PATH --out DIR [--epochs N ...]
cnn predict MODEL.keras IMAGE ten class probabilities
cnn predict --remote IMAGE    the same from a running service (--model NAME --alias A)
cnn jobs submit|list|watch|history|evaluation|cancel   jobs on a running service
cnn models list|alias         the registry of a running service
cnn serve [--host H --port P] API + worker (embedded default without servers)
cnn worker                    one Celery training worker (one per GPU)
cnn migrate                   apply the Alembic migrations to DATABASE_URL
cnn keys create --name N --scope read,predict   a new API key (printed once)
cnn keys list | cnn keys revoke ID_OR_NAME
cnn report --jobs ID,... [--ablation SWEEP] --out DIR   results.md + PNGs + results.export.json
cnn report --from DIR/results.export.json               the same report again, from the export alone
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from app.client import ApiError, ApiUnreachable
from app.config import get_settings
from app.errors import DomainError
from app.ml.options import Option
from app.ml.params import OPTIONS
from app.remote_cli import EXIT_ERROR, add_commands, connection_options


def _cmd_nets(_: argparse.Namespace) -> int:
    from app.ml.nets import NETS

    for spec in NETS.values():
        print(f"{spec.name:<6} {spec.title:<8} {spec.layout}")
        print(f"{'':<15} {spec.description}")
    return 0


def _cmd_summary(args: argparse.Namespace) -> int:
    from app.ml.summary import format_table, summarize

    summary = summarize(args.net)
    print(json.dumps(summary.to_dict(), indent=2) if args.json else format_table(summary))
    return 0 if summary.agrees else 1


def _print_epoch_line(record: object) -> None:
    from app.ml.training import EpochRecord

    assert isinstance(record, EpochRecord)
    print(
        f"epoch {record.epoch}: loss {record.loss:.4f} accuracy {record.accuracy:.4f} "
        f"val_loss {record.val_loss if record.val_loss is None else round(record.val_loss, 4)} "
        f"val_accuracy "
        f"{record.val_accuracy if record.val_accuracy is None else round(record.val_accuracy, 4)} "
        f"({record.seconds:.1f} s, {record.images_per_second:,.0f} images/s"
        + ("" if record.learning_rate is None else f", lr {record.learning_rate:.3g}")
        + ")",
        flush=True,
    )


def _cmd_train(args: argparse.Namespace) -> int:
    from app.ml.analysis import analyse
    from app.ml.data import load_cifar10
    from app.ml.evaluation import evaluate
    from app.ml.nets import CLASS_NAMES
    from app.ml.plots import history_png
    from app.ml.training import TrainConfig, train

    settings = get_settings()
    config = TrainConfig.from_attributes(args, precision=args.precision or settings.PRECISION)
    source = args.data or settings.CIFAR10_SOURCE
    print(f"loading CIFAR-10 from {source} ...", flush=True)
    data = load_cifar10(source, cache_dir=settings.cache_dir)
    result = train(config, data, on_epoch=_print_epoch_line, verbose=1 if args.progress else 0)
    print(f"trained on {result.device} with precision {result.precision}")
    if result.best_epoch is not None:
        stopped = f"stopped after epoch {result.stopped_epoch}; " if result.stopped_epoch else ""
        print(f"early stopping: {stopped}the model has the weights of epoch {result.best_epoch}")
    evaluation = evaluate(result.model, data.x_test, data.y_test)
    rows = [record.to_dict() for record in result.epochs]
    analysis = analyse(rows)
    first = evaluation.first_image
    print(f"test loss {evaluation.test_loss:.4f}, test accuracy {evaluation.test_accuracy:.4f}")
    print(
        f"first test image: predicted {CLASS_NAMES[first['predicted_class']]}, "
        f"true {CLASS_NAMES[first['true_class']]}, match {first['match']}"
    )
    print(
        f"lowest val_loss at epoch {analysis.best_epoch}; overfitting after epoch "
        f"{analysis.overfitting_after_epoch}; final train-val accuracy gap {analysis.final_gap}"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result.model.save(out / "model.keras")
    report = {
        "config": config.__dict__,
        "device": result.device,
        "precision": result.precision,
        "epochs": rows,
        "history": {
            key: [row[key] for row in rows]
            for key in ("loss", "accuracy", "val_loss", "val_accuracy")
        },
        "analysis": analysis.to_dict(),
        "evaluation": evaluation.to_dict(),
    }
    (out / "history.json").write_text(json.dumps(report, indent=2))
    (out / "curves.png").write_bytes(history_png(rows, title=f"{config.net} on CIFAR-10"))
    print(f"wrote {out / 'model.keras'}, {out / 'history.json'}, {out / 'curves.png'}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    if args.remote:
        from app.remote_cli import cmd_predict_remote

        return cmd_predict_remote(args)
    if len(args.files) != 2:
        raise ValueError("local prediction takes MODEL.keras IMAGE (or use --remote IMAGE)")
    from app.config import get_settings
    from app.ml.inference import Predictor, predict_probabilities
    from app.serving.inputs import PixelBudget, decode_image

    model_path, image_path = args.files
    budget = PixelBudget(get_settings().PREDICT_RESIZE_MAX_PIXELS)
    image = decode_image(Path(image_path).read_bytes(), resize=args.resize, budget=budget)
    predictor = Predictor.from_path(Path(model_path))
    (prediction,) = predict_probabilities(predictor, image)
    if args.json:
        print(json.dumps(prediction))
    else:
        from app.ml.nets import CLASS_NAMES

        for name, p in zip(CLASS_NAMES, prediction["probabilities"], strict=True):
            print(f"{name:<11} {p:.4f}")
        print(f"predicted: {prediction['class_name']}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from app.serve import serve

    settings = get_settings()
    return (
        serve(
            settings,
            host=args.host or settings.API_HOST,
            port=args.port or settings.API_PORT,
            gpus=args.gpus,
        )
        or 0
    )


def _cmd_worker(args: argparse.Namespace) -> int:
    if args.gpu is not None:
        # Before TensorFlow or JAX is imported: this worker sees (and owns) that GPU only.
        os.environ["CUDA_VISIBLE_DEVICES"] = str(args.gpu)
    # The worker's entry point lives in the `worker` package, which app/ never imports:
    # this process becomes `python -m worker.run` (same pid, environment and settings).
    os.execv(sys.executable, [sys.executable, "-m", "worker.run"])
    return 0  # not reached: execv replaces this process


def _cmd_report(args: argparse.Namespace) -> int:
    from app.reports.export import read_export, write_export

    if args.from_file:
        if args.jobs or args.ablation or args.export:
            raise ValueError(
                "--from reads every job from the export: no --jobs, --ablation or --export"
            )
        source = Path(args.from_file)
        export, sha256 = read_export(source)
        out = Path(args.out) if args.out else source.parent
        name = args.name or f"{_stem(source.name)}.md"
        export_name = source.name
    else:
        export = _collect_report(args)
        if args.export:
            write_export(export, Path(args.export))
            print(f"wrote {args.export} ({len(export.all_jobs())} jobs)")
            return 0
        out = Path(args.out or "docs")
        name = args.name or REPORT_NAME
        export_name = f"{_stem(name)}.export.json"
        sha256 = write_export(export, out / export_name)
    prefix = args.image_prefix or f"{_stem(name)}-"
    regenerate = f"cnn report --from {export_name}"
    if name != f"{_stem(export_name)}.md":
        regenerate += f" --name {name}"
    if prefix != f"{_stem(name)}-":
        regenerate += f" --image-prefix {prefix}"
    written = _write_report(export, out, name, prefix, export_name, sha256, regenerate)
    print(f"wrote {out / name}, {out / export_name} and {written} PNGs")
    return 0


REPORT_NAME = "results.md"
REPORT_JOBS_FILE = "scripts/report_jobs.json"


def _stem(file_name: str) -> str:
    """'results-cpu.md' and 'results-cpu.export.json' -> 'results-cpu'."""
    for suffix in (".export.json", ".json", ".md"):
        if file_name.endswith(suffix):
            return file_name[: -len(suffix)]
    return file_name


def _collect_report(args: argparse.Namespace) -> Any:
    """The export of --jobs and --ablation, read from DATABASE_URL."""
    import uuid
    from datetime import UTC, datetime

    from app.db import session_factory
    from app.reports import ablation
    from app.reports.compare import export_rows, parse_job_ids, require_finished
    from app.reports.export import collect

    if not args.jobs and not args.ablation:
        raise ValueError("name the jobs: --jobs ID,..., --ablation SWEEP_ID, or --from EXPORT")
    ids = parse_job_ids(args.jobs) if args.jobs else []
    try:
        sweep = uuid.UUID(args.ablation) if args.ablation else None
    except ValueError:
        raise ValueError(
            f"--ablation is a sweep id (a UUID). Received: {args.ablation[:40]!r}"
        ) from None
    with session_factory(get_settings())() as session:
        export = collect(
            session,
            ids,
            exported_at=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            command=report_command(args, ids),
            jobs_file=args.jobs_file if ids else None,
            sweep_id=sweep,
            ablation_source=ablation.ablation_jobs,
        )
    require_finished(export_rows(export))
    if export.ablation is not None and ids:
        planned = {entry.job.id for entry in export.ablation.entries}
        if {str(i) for i in ids} <= planned:
            # Every job is one of the ablation's: they came from its sweep, not from a file
            # of POST /jobs bodies, so the Reproduce section names no such file.
            export = export.model_copy(update={"jobs_file": None})
    return export


def _write_report(
    export: Any, out: Path, name: str, prefix: str, export_name: str, sha256: str, regenerate: str
) -> int:
    """The Markdown report and its PNGs in `out`; returns how many PNGs."""
    from app.ml.plots import history_png
    from app.reports.compare import export_rows
    from app.reports.markdown import export_header, render_report, title
    from app.reports.plots import compare_png

    out.mkdir(parents=True, exist_ok=True)
    rows = export_rows(export)
    (out / f"{prefix}compare.png").write_bytes(compare_png(rows))
    curves = {}
    for row in rows:
        file = f"{prefix}curves-{row['net']}-{row['id'][:8]}.png"
        epochs = [
            {key: row["history"][key][i] for key in row["history"]}
            for i in range(len(row["history"]["epoch"]))
        ]
        (out / file).write_bytes(history_png(epochs, title=f"{title(row)}: job {row['id'][:8]}"))
        curves[row["id"]] = file
    reproduce = ""
    if export.jobs_file:
        reproduce = REPRODUCE.format(jobs_file=export.jobs_file)
    reproduce += REGENERATE.format(command=export.command, regenerate=regenerate)
    text = render_report(
        export,
        header=export_header(export, export_name, sha256, regenerate),
        compare_image=f"{prefix}compare.png",
        curve_images=curves,
        reproduce=reproduce,
    )
    (out / name).write_text(text)
    return len(rows) + 1


def report_command(args: argparse.Namespace, ids: list[Any]) -> str:
    """The `cnn report` call that wrote this export, with every option that is not the
    default, so that the report's own Reproduce section repeats it exactly."""
    parts = ["cnn report"]
    if ids:
        parts.append(f"--jobs {','.join(str(i) for i in ids)}")
    if args.ablation:
        parts.append(f"--ablation {args.ablation}")
    if args.export:
        parts.append(f"--export {args.export}")
    else:
        parts.append(f"--out {args.out or 'docs'}")
        name = args.name or REPORT_NAME
        if name != REPORT_NAME:
            parts.append(f"--name {name}")
        if args.image_prefix and args.image_prefix != f"{_stem(name)}-":
            parts.append(f"--image-prefix {args.image_prefix}")
    if ids and args.jobs_file != REPORT_JOBS_FILE:
        parts.append(f"--jobs-file {args.jobs_file}")
    return " ".join(parts)


REPRODUCE = """The jobs are the POST /jobs bodies of `{jobs_file}`. With the service running:

```bash
python scripts/submit_report_jobs.py --url http://localhost:8000 --key "$(cat var/admin.key)" \\
    --jobs {jobs_file} --wait   # prints the job ids, then waits until they are done
```

"""
REGENERATE = """In the service's folder (same DATABASE_URL), this wrote the export and the report:

```bash
{command}
```

and this regenerates the report from the export alone, in the export's folder:

```bash
{regenerate}
```"""


def _cmd_migrate(_: argparse.Namespace) -> int:
    from app.migrate import upgrade

    upgrade(get_settings().database_url)
    print("database is at the latest migration")
    return 0


def _cmd_keys(args: argparse.Namespace) -> int:
    from app.db import session_factory
    from app.migrate import upgrade

    settings = get_settings()
    settings.STATE_DIR.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database_url)
    from app.errors import DomainError

    with session_factory(settings)() as session:
        try:
            return _keys(session, args)
        except DomainError as exc:
            print(f"cnn keys: error: {exc.message}", file=sys.stderr)
            return 2


def _keys(session: Any, args: argparse.Namespace) -> int:
    from app import auth

    if args.keys_command == "create":
        created = auth.create_key(session, args.name, args.scope)
        row = created.row
        if args.json:
            print(json.dumps({**_key_dict(row), "key": created.key}))
        else:
            print(created.key)
            print(
                f"key {row.id} {row.name!r} with scopes {row.scopes.replace(' ', ',')}; "
                "this is the only time it is shown",
                file=sys.stderr,
            )
    elif args.keys_command == "list":
        rows = auth.list_keys(session)
        if args.json:
            print(json.dumps([_key_dict(row) for row in rows]))
            return 0
        print(f"{'id':>4}  {'name':<24} {'prefix':<13} {'scopes':<24} {'last used':<19}  revoked")
        for row in rows:
            print(
                f"{row.id:>4}  {row.name:<24} {row.prefix + '...':<13} "
                f"{row.scopes.replace(' ', ','):<24} {_when(row.last_used_at) or 'never':<19}  "
                f"{_when(row.revoked_at)}"
            )
    else:
        row = auth.revoke_key(session, args.key)
        print(f"key {row.id} {row.name!r} revoked")
    return 0


def _when(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value is not None else ""


def _key_dict(row: object) -> dict[str, object]:
    from app.schemas import ApiKeyPublic

    return ApiKeyPublic.from_row(row).model_dump(mode="json")


def add_train_options(parser: argparse.ArgumentParser, options: Sequence[Option]) -> None:
    """A flag per declared option (app/ml/params.py), named as the job field in kebab case.

    The values are checked where TrainConfig is built, with the API's bounds and messages.
    """
    levers = parser.add_argument_group("levers (all off by default)")
    for o in options:
        group = levers if o.lever else parser
        default = o.request_default
        shown = o.null_means if o.null_means else "none" if default is None else default
        # argparse formats help with %, so a literal % (e.g. "30%") must be doubled.
        text = f"{o.help} Default: {shown}.".replace("%", "%%")
        if o.type is bool:
            group.add_argument(
                o.flag, action=argparse.BooleanOptionalAction, default=default, help=text
            )
        else:
            group.add_argument(
                o.flag, type=o.type, choices=o.choices or None, default=default, help=text
            )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cnn", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("nets", help="list the architectures").set_defaults(func=_cmd_nets)

    p = sub.add_parser("summary", help="parameter and output-shape calculations")
    p.add_argument("net")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_summary)

    p = sub.add_parser("train", help="train a net, evaluate it, write model, history and curves")
    p.add_argument("net")
    p.add_argument("--data", help="CIFAR-10 source: 'keras' or a path (default: CIFAR10_SOURCE)")
    p.add_argument("--out", default="runs/latest", help="output folder (default: runs/latest)")
    add_train_options(p, OPTIONS)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "predict",
        help="class probabilities of one image",
        parents=[connection_options()],
        usage="cnn predict MODEL.keras IMAGE | cnn predict --remote IMAGE... [--model NAME]",
    )
    p.add_argument(
        "files", nargs="+", metavar="FILE", help="MODEL.keras IMAGE, or with --remote IMAGE..."
    )
    p.add_argument("--resize", action="store_true", help="resize images that are not 32x32")
    p.add_argument("--remote", action="store_true", help="ask the service at --url instead")
    p.add_argument("--model", default=None, help="--remote: registered name (default: newest)")
    p.add_argument("--version", type=int, default=None, help="--remote: this version")
    p.add_argument("--alias", default=None, help="--remote: this alias, e.g. production")
    p.set_defaults(func=_cmd_predict)

    add_commands(sub)

    p = sub.add_parser("serve", help="run the API and its workers (one per visible GPU)")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument(
        "--gpus",
        default="all",
        help="'all' (one worker per visible GPU, or one CPU worker when there is none), "
        "'none' (one worker, GPUs hidden) or a list such as 0,1",
    )
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("worker", help="run one training worker")
    p.add_argument("--gpu", type=int, default=None, help="own this GPU (sets CUDA_VISIBLE_DEVICES)")
    p.set_defaults(func=_cmd_worker)
    sub.add_parser("migrate", help="apply database migrations").set_defaults(func=_cmd_migrate)

    p = sub.add_parser("keys", help="create, list and revoke API keys")
    p.set_defaults(func=_cmd_keys)
    keys = p.add_subparsers(dest="keys_command", required=True)
    k = keys.add_parser("create", help="create a key and print it (once)")
    k.add_argument("--name", required=True, help="a unique name for the key's holder")
    k.add_argument("--scope", required=True, help="comma-separated: read, predict, train, admin")
    k.add_argument("--json", action="store_true")
    k = keys.add_parser("list", help="every key (never the key itself)")
    k.add_argument("--json", action="store_true")
    k = keys.add_parser("revoke", help="revoke a key at once")
    k.add_argument("key", help="the key's id or name")
    p = sub.add_parser(
        "report",
        help="Markdown report + PNGs + its export, from finished jobs (DATABASE_URL) or an export",
    )
    p.add_argument("--jobs", default=None, help="comma-separated job ids, in table order")
    p.add_argument("--ablation", default=None, help="an ablation sweep's id (exercise 19's why)")
    p.add_argument(
        "--from", dest="from_file", default=None, help="render from this export, no database"
    )
    p.add_argument("--export", default=None, help="only write the export of the jobs here")
    p.add_argument(
        "--out", default=None, help="output folder (default: docs; with --from the export's)"
    )
    p.add_argument(
        "--name",
        default=None,
        help=f"report file name (default: {REPORT_NAME}; with --from the export's name)",
    )
    p.add_argument("--image-prefix", default=None, help="PNG name prefix (default: NAME's stem-)")
    p.add_argument(
        "--jobs-file",
        default=REPORT_JOBS_FILE,
        help=f"the POST /jobs bodies the Reproduce section names (default: {REPORT_JOBS_FILE})",
    )
    p.set_defaults(func=_cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `cnn` console script; user errors print one line and exit 2."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    # User-facing failures (bad data, bad model file, NaN loss) are ValueError/OSError/
    # RuntimeError subclasses with a message that names the culprit.
    except DomainError as exc:  # e.g. `cnn report` with an unknown job id
        print(f"cnn {args.command}: error: {exc.message}", file=sys.stderr)
        return 2
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        print(f"cnn {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ApiError as exc:
        print(
            f"cnn {args.command}: error: {exc.code}: {exc.message} (HTTP {exc.status})",
            file=sys.stderr,
        )
        return EXIT_ERROR
    except ApiUnreachable as exc:
        print(f"cnn {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
