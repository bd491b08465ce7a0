"""GET /compare's rows: one per job, computed from the job's export entry (app.reports.export).

No HTTP here; the router, `cnn report` and the report's renderer all read these rows. Each
row carries the job's own analysis (app.ml.analysis) and how it is chosen: by validation,
from the weights the job kept.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from app.errors import InvalidJobIds, JobNotFinished
from app.ml.analysis import analyse
from app.ml.options import Option
from app.ml.params import OPTIONS, default
from app.reports.export import MAX_REPORT_JOBS, JobEntry, NetEntry, ReportExport

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

MAX_COMPARE_JOBS = MAX_REPORT_JOBS
HISTORY_KEYS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy")


def training_fields(options: Sequence[Option]) -> tuple[str, ...]:
    """The options a row lists under `training` (app/ml/params.py declares which: precision
    has a column of its own)."""
    return tuple(o.name for o in options if o.compared)


TRAINING_FIELDS = training_fields(OPTIONS)


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


def kept_epoch(job: JobEntry) -> int | None:
    """The epoch whose weights the job kept, and so tested and registered: the epoch early
    stopping restored (the lowest val_loss), else the last one."""
    if not job.epochs:
        return None
    if job.training.get("early_stopping_patience") and job.status == "succeeded":
        best = analyse([e.model_dump() for e in job.epochs]).best_epoch
        if best is not None:
            return best
    return job.epochs[-1].epoch


def validation_images(job: JobEntry) -> int | None:
    """How many images the job validated on (Keras' split of its training images), when the
    data it used was recorded."""
    data = job.evaluation.data if job.evaluation else None
    if data is None:
        return None
    limit = job.training.get("train_limit")
    n = data.train_images if limit is None else min(int(limit), data.train_images)
    split = float(job.training.get("validation_split") or 0.0)
    return n - int(n * (1.0 - split)) if split > 0 else 0


def job_row(job: JobEntry, net: NetEntry) -> dict[str, Any]:
    """The comparison row of one job."""
    rows = [e.model_dump() for e in job.epochs]
    analysis = analyse(rows)
    evaluation = job.evaluation
    kept = kept_epoch(job)
    kept_row = rows[[r["epoch"] for r in rows].index(kept)] if kept is not None else {}
    return {
        "id": job.id,
        "net": job.net,
        "title": net.title,
        "status": job.status,
        "model_name": job.model_name,
        "parameters": net.total_params,
        "macs": net.macs_per_image,
        "epochs": len(rows),
        "epochs_requested": job.epochs_requested,
        "precision": job.precision,
        "device": job.device,
        "training_seconds": round(sum(float(r["seconds"]) for r in rows), 3),
        "test_loss": None if evaluation is None else evaluation.test_loss,
        "test_accuracy": None if evaluation is None else evaluation.test_accuracy,
        "test_ce_loss": None if evaluation is None else evaluation.test_ce_loss,
        "tta_accuracy": None if evaluation is None else evaluation.tta_accuracy,
        "best_epoch": analysis.best_epoch,
        "overfitting_after_epoch": analysis.overfitting_after_epoch,
        "final_gap": analysis.final_gap,
        "max_gap": analysis.max_gap,
        "max_gap_epoch": analysis.max_gap_epoch,
        "verdict": None if analysis.verdict is None else analysis.verdict.to_dict(),
        "restored_epoch": analysis.best_epoch
        if job.training.get("early_stopping_patience")
        else None,
        "kept_epoch": kept,
        "val_accuracy": kept_row.get("val_accuracy"),
        "val_ce_loss": kept_row.get("val_ce_loss"),
        "validation_images": validation_images(job),
        "first_image": (
            None
            if evaluation is None or evaluation.first_image is None
            else evaluation.first_image.model_dump()
        ),
        "data": None
        if evaluation is None or evaluation.data is None
        else evaluation.data.model_dump(),
        # An export older than an option trained with its default: an option's default is
        # the behaviour from before it existed.
        "training": {name: job.training.get(name, default(name)) for name in TRAINING_FIELDS},
        "history": {
            **{key: [r[key] for r in rows] for key in HISTORY_KEYS},
            "learning_rate": [r["learning_rate"] for r in rows],
            "val_ce_loss": [r["val_ce_loss"] for r in rows],
        },
    }


def export_rows(export: ReportExport) -> list[dict[str, Any]]:
    """The rows of the export's listed jobs, in order."""
    return [job_row(job, export.nets[job.net]) for job in export.jobs]


def compare_jobs(session: Session, job_ids: Sequence[uuid.UUID]) -> list[dict[str, Any]]:
    """Rows for the given jobs, in order; JobNotFound (404) for an unknown id."""
    from app.jobs import service as job_service
    from app.reports.export import job_entry, net_entry

    out = []
    for job_id in job_ids:
        job = job_entry(
            job_service.get_job(session, job_id), job_service.list_epochs(session, job_id)
        )
        out.append(job_row(job, net_entry(job.net)))
    return out


def require_finished(rows: Sequence[dict[str, Any]]) -> None:
    """A report is written from succeeded jobs only: JobNotFinished (409) else."""
    pending = [f"{r['id']} ({r['status']})" for r in rows if r["status"] != "succeeded"]
    if pending:
        raise JobNotFinished("a report needs succeeded jobs; not succeeded: " + ", ".join(pending))
