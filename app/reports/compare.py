"""GET /compare's rows: one per job, from the database (job, epochs, evaluation) and /summary.

No HTTP here; the router and `cnn report` both call `compare_jobs`.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from sqlalchemy.orm import Session

from app.errors import InvalidJobIds, JobNotFinished
from app.ml.analysis import analyse
from app.ml.options import Option
from app.ml.params import OPTIONS

MAX_COMPARE_JOBS = 20
HISTORY_KEYS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy")


def training_fields(options: Sequence[Option]) -> tuple[str, ...]:
    """The options a row lists under `training` (app/ml/params.py declares which: precision
    has a column of its own)."""
    return tuple(o.name for o in options if o.compared)


TRAINING_FIELDS = training_fields(OPTIONS)


@lru_cache(maxsize=32)
def net_size(net: str) -> tuple[int, int]:
    """(parameters, multiply-accumulates per image) of a registered net, by formula."""
    from app.ml.summary import summarize

    summary = summarize(net)
    return summary.total_params, summary.macs_per_image


def parse_job_ids(text: str) -> list[uuid.UUID]:
    """'ID,ID,...' -> UUIDs in the given order, without repeats; InvalidJobIds (422) when malformed."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts:
        raise InvalidJobIds("jobs must list at least one job id (ID,ID,...)")
    if len(parts) > MAX_COMPARE_JOBS:
        raise InvalidJobIds(
            f"at most {MAX_COMPARE_JOBS} jobs can be compared at once (got {len(parts)})"
        )
    ids: list[uuid.UUID] = []
    for part in parts:
        try:
            job_id = uuid.UUID(part)
        except ValueError:
            raise InvalidJobIds(f"not a job id: {part[:40]!r} (expected a UUID)") from None
        if job_id not in ids:
            ids.append(job_id)
    return ids


def job_row(job: Any, epochs: Sequence[Any]) -> dict[str, Any]:
    """The comparison row of one job (ORM job with its evaluation, its epoch rows in order)."""
    rows = [
        {key: getattr(e, key) for key in (*HISTORY_KEYS, "seconds", "learning_rate")}
        for e in epochs
    ]
    analysis = analyse(rows)
    params, macs = net_size(job.net)
    evaluation = job.evaluation
    return {
        "id": str(job.id),
        "net": job.net,
        "status": job.status,
        "model_name": job.model_name,
        "parameters": params,
        "macs": macs,
        "epochs": len(rows),
        "epochs_requested": job.epochs,
        "precision": job.precision,
        "device": job.device,
        "training_seconds": round(sum(float(r["seconds"]) for r in rows), 3),
        "test_loss": None if evaluation is None else evaluation.test_loss,
        "test_accuracy": None if evaluation is None else evaluation.test_accuracy,
        "best_epoch": analysis.best_epoch,
        "overfitting_after_epoch": analysis.overfitting_after_epoch,
        "final_gap": analysis.final_gap,
        "max_gap": analysis.max_gap,
        "max_gap_epoch": analysis.max_gap_epoch,
        "restored_epoch": (
            analysis.best_epoch if getattr(job, "early_stopping_patience", None) else None
        ),
        "training": {name: getattr(job, name, None) for name in TRAINING_FIELDS},
        "history": {
            **{key: [r[key] for r in rows] for key in HISTORY_KEYS},
            "learning_rate": [r["learning_rate"] for r in rows],
        },
    }


def compare_jobs(session: Session, job_ids: Sequence[uuid.UUID]) -> list[dict[str, Any]]:
    """Rows for the given jobs, in order; JobNotFound (404) for an unknown id."""
    from app.jobs import service as job_service

    out = []
    for job_id in job_ids:
        job = job_service.get_job(session, job_id)
        out.append(job_row(job, job_service.list_epochs(session, job_id)))
    return out


def require_finished(rows: Sequence[dict[str, Any]]) -> None:
    """A report is written from succeeded jobs only: JobNotFinished (409) else."""
    pending = [f"{r['id']} ({r['status']})" for r in rows if r["status"] != "succeeded"]
    if pending:
        raise JobNotFinished("a report needs succeeded jobs; not succeeded: " + ", ".join(pending))
