"""The report's input, as one JSON document: the jobs a report needs, read back without a database.

`collect` reads it from the database (jobs, their epochs and evaluations, the nets' per-layer
parameters from /summary, an ablation's roles); `cnn report --export FILE` writes it;
`cnn report --from FILE` renders the report from it alone. `cnn report --jobs` writes the
export beside the report and renders from it, so the report can always be regenerated from
the file committed beside it, byte for byte.

The document is a pydantic model, so reading an export checks its shape and bounds and
says what is wrong; nothing here imports a framework except `collect`, through /summary.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from app.ml.params import MAX_EPOCHS, OPTIONS

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

MAX_EXPORT_BYTES = 16 * 1024 * 1024  # 20 jobs of 1,000 epochs are well under 2 MiB
MAX_REPORT_JOBS = 20  # as GET /compare
MAX_ABLATION_JOBS = 64  # the ablation plan has about 14
MAX_LAYERS = 256
Number = float | None


class ExportError(ValueError):
    """An export file that cannot be read: the message says where and what."""


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EpochEntry(_Entry):
    epoch: int = Field(ge=1, le=MAX_EPOCHS)
    loss: float
    accuracy: float
    val_loss: Number = None
    val_accuracy: Number = None
    val_ce_loss: Number = None
    seconds: float = Field(ge=0)
    learning_rate: Number = None


class FirstImageEntry(_Entry):
    probabilities: list[float] = Field(min_length=2, max_length=1000)
    predicted_class: int = Field(ge=0)
    true_class: int = Field(ge=0)
    match: bool


class DataEntry(_Entry):
    archive: str = Field(max_length=1000)
    sha256: str | None = Field(default=None, max_length=64)
    first_test_image: str = Field(max_length=1000)
    train_images: int = Field(ge=0)
    test_images: int = Field(ge=0)


class EvaluationEntry(_Entry):
    test_loss: float
    test_accuracy: float
    test_ce_loss: Number = None
    first_image: FirstImageEntry | None = None
    data: DataEntry | None = None
    # Test-time augmentation (issue 21): the accuracy of the mean over the views; null without.
    tta_accuracy: Number = None
    tta_views: list[str] | None = Field(default=None, max_length=16)


class JobEntry(_Entry):
    id: str = Field(max_length=36)
    net: str = Field(max_length=64)
    status: str = Field(max_length=16)
    model_name: str = Field(max_length=128)
    epochs_requested: int = Field(ge=1, le=MAX_EPOCHS)
    precision: str | None = Field(default=None, max_length=16)
    device: str | None = Field(default=None, max_length=255)
    # Every training option of the job (app/ml/params.py), by name.
    training: dict[str, Any] = Field(max_length=len(OPTIONS))
    epochs: list[EpochEntry] = Field(max_length=MAX_EPOCHS)
    evaluation: EvaluationEntry | None = None


class LayerEntry(_Entry):
    name: str = Field(max_length=64)
    type: str = Field(max_length=64)
    input_shape: list[int] = Field(max_length=8)
    output_shape: list[int] = Field(max_length=8)
    kernel: list[int] | None = Field(default=None, max_length=2)
    params: int = Field(ge=0)
    formula: str = Field(max_length=500)


class NetEntry(_Entry):
    net: str = Field(max_length=64)
    title: str = Field(max_length=64)
    total_params: int = Field(ge=0)
    macs_per_image: int = Field(ge=0)
    layers: list[LayerEntry] = Field(max_length=MAX_LAYERS)


class AblationEntry(_Entry):
    role: str = Field(max_length=64)  # "baseline", "target", "baseline+augmentation", ...
    levers: dict[str, Any] = Field(max_length=64)
    job: JobEntry


def lever_flags(levers_on: Sequence[str]) -> dict[str, bool]:
    """The sweeps service names the levers a job has on; the export states every lever but
    the architecture (which the job's net shows) as on or off."""
    from app.sweeps.ablation import LEVERS

    return {name: name in levers_on for name in LEVERS if name != "architecture"}


class AblationExport(_Entry):
    sweep_id: str = Field(max_length=64)
    entries: list[AblationEntry] = Field(max_length=MAX_ABLATION_JOBS)


class ReportExport(_Entry):
    """Everything a report is computed from."""

    format: Literal["cnn-report-export"] = "cnn-report-export"
    version: Literal[1] = 1
    exported_at: str = Field(max_length=64)  # "YYYY-MM-DD HH:MM UTC"
    command: str = Field(max_length=4000)  # what wrote the export
    jobs_file: str | None = Field(default=None, max_length=500)  # the jobs' POST bodies
    classes: list[str] = Field(max_length=1000)
    jobs: list[JobEntry] = Field(max_length=MAX_REPORT_JOBS)
    nets: dict[str, NetEntry] = Field(max_length=64)
    ablation: AblationExport | None = None

    @model_validator(mode="after")
    def _every_net_is_described(self) -> ReportExport:
        used = {j.net for j in self.jobs}
        if self.ablation is not None:
            used |= {e.job.net for e in self.ablation.entries}
        missing = sorted(used - set(self.nets))
        if missing:
            raise ValueError(f"nets {missing} are used by jobs but not described under 'nets'")
        return self

    def all_jobs(self) -> list[JobEntry]:
        """The listed jobs, then the ablation's, each once."""
        seen: dict[str, JobEntry] = {j.id: j for j in self.jobs}
        for entry in self.ablation.entries if self.ablation else []:
            seen.setdefault(entry.job.id, entry.job)
        return list(seen.values())


# ----------------------------------------------------------------------------- files
def to_json(export: ReportExport) -> str:
    """The file's text: stable key order and indentation, so the same export diffs cleanly."""
    return export.model_dump_json(indent=1) + "\n"


def write_export(export: ReportExport, path: Path) -> str:
    """Write the export; returns its sha256 (the report's header names it)."""
    text = to_json(export)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return hashlib.sha256(text.encode()).hexdigest()


def read_export(path: Path) -> tuple[ReportExport, str]:
    """(the export, its sha256); ExportError names the file and the first problems."""
    try:
        size = path.stat().st_size
        if size > MAX_EXPORT_BYTES:
            raise ExportError(
                f"{path} is {size:,} bytes; an export is at most {MAX_EXPORT_BYTES:,} bytes"
            )
        raw = path.read_bytes()
    except OSError as exc:
        raise ExportError(f"cannot read the export {path}: {exc.strerror or exc}") from exc
    try:
        export = ReportExport.model_validate_json(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'document'}: {e['msg']}"
            for e in exc.errors()[:5]
        )
        raise ExportError(f"{path} is not a report export ({problems})") from None
    return export, hashlib.sha256(raw).hexdigest()


# ----------------------------------------------------------------------------- database
def job_entry(job: Any, epochs: Sequence[Any]) -> JobEntry:
    """The export entry of one job (an ORM job with its evaluation, its epoch rows in order)."""
    evaluation = job.evaluation
    return JobEntry(
        id=str(job.id),
        net=job.net,
        status=job.status,
        model_name=job.model_name,
        epochs_requested=job.epochs,
        precision=job.precision,
        device=job.device,
        training={o.name: getattr(job, o.name, None) for o in OPTIONS if o.name != "precision"},
        epochs=[
            EpochEntry(
                epoch=e.epoch,
                loss=e.loss,
                accuracy=e.accuracy,
                val_loss=e.val_loss,
                val_accuracy=e.val_accuracy,
                val_ce_loss=e.val_ce_loss,
                seconds=e.seconds,
                learning_rate=e.learning_rate,
            )
            for e in epochs
        ],
        evaluation=None if evaluation is None else _evaluation_entry(evaluation),
    )


def _evaluation_entry(evaluation: Any) -> EvaluationEntry:
    first = evaluation.first_image or None  # rows written by hand in tests may hold {}
    return EvaluationEntry(
        test_loss=evaluation.test_loss,
        test_accuracy=evaluation.test_accuracy,
        test_ce_loss=evaluation.test_ce_loss,
        first_image=None if first is None else FirstImageEntry.model_validate(first),
        data=None if evaluation.data is None else DataEntry.model_validate(evaluation.data),
        tta_accuracy=getattr(evaluation, "tta_accuracy", None),
        tta_views=_view_names(getattr(evaluation, "tta_views", None)),
    )


def _view_names(views: Any) -> list[str] | None:
    """The TTA views' names: from the evaluation row's {name, weight} or an export's names."""
    if not views:
        return None
    return [v["name"] if isinstance(v, dict) else str(v) for v in views]


@lru_cache(maxsize=32)
def net_entry(net: str) -> NetEntry:
    """A net's per-layer parameters, from /summary's formulas (builds the Keras model once)."""
    from app.ml.summary import summarize

    summary = summarize(net)
    return NetEntry(
        net=summary.net,
        title=summary.title,
        total_params=summary.total_params,
        macs_per_image=summary.macs_per_image,
        layers=[
            LayerEntry(
                name=layer.name,
                type=layer.type,
                input_shape=layer.input_shape,
                output_shape=layer.output_shape,
                kernel=layer.kernel,
                params=layer.params,
                formula=layer.formula,
            )
            for layer in summary.layers
        ],
    )


AblationSource = Callable[["Session", uuid.UUID], Sequence[tuple[str, Any, Any]]]


def collect(
    session: Session,
    job_ids: Sequence[uuid.UUID],
    *,
    exported_at: str,
    command: str,
    jobs_file: str | None = None,
    sweep_id: uuid.UUID | None = None,
    ablation_source: AblationSource | None = None,
) -> ReportExport:
    """The export of these jobs (in this order) and of the sweep's ablation, from the database.

    JobNotFound (404) for an unknown id. With a sweep_id, `ablation_source` reads its roles:
    app.reports.ablation.ablation_jobs (the sweeps service), or a fixture's.
    """
    from app.jobs import service as job_service
    from app.ml.nets import CLASS_NAMES

    jobs = [
        job_entry(job_service.get_job(session, i), job_service.list_epochs(session, i))
        for i in job_ids
    ]
    ablation = None
    if sweep_id is not None:
        if ablation_source is None:
            raise ValueError("an ablation's export needs its ablation_source")
        found = ablation_source(session, sweep_id)
        ablation = AblationExport(
            sweep_id=str(sweep_id),
            entries=[
                AblationEntry(
                    role=role,
                    levers=lever_flags(levers),
                    job=job_entry(job, job_service.list_epochs(session, job.id)),
                )
                for role, levers, job in found
            ],
        )
    nets = {j.net for j in jobs}
    if ablation is not None:
        nets |= {e.job.net for e in ablation.entries}
    return ReportExport(
        exported_at=exported_at,
        command=command,
        jobs_file=jobs_file,
        classes=list(CLASS_NAMES),
        jobs=jobs,
        nets={net: net_entry(net) for net in sorted(nets)},
        ablation=ablation,
    )
