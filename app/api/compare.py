"""Jobs side by side (GET /compare, /compare.png) and the course's report (GET /report)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response

from app.api.deps import ReadAccess, SessionDep
from app.reports.compare import (
    MAX_COMPARE_JOBS,
    compare_jobs,
    export_rows,
    parse_job_ids,
    require_finished,
)

router = APIRouter(tags=["compare"], dependencies=[ReadAccess])

JobIds = Annotated[
    str,
    Query(
        max_length=40 * MAX_COMPARE_JOBS,
        description=f"Comma-separated job ids, at most {MAX_COMPARE_JOBS}; the order is kept.",
        examples=["3f0c...,9a1b..."],
    ),
]
ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"description": "A job does not exist (`job_not_found`)."},
    422: {"description": "The id list is empty, too long or malformed (`invalid_job_ids`)."},
}


@router.get("/compare", responses=ERRORS)
def compare(jobs: JobIds, session: SessionDep) -> dict[str, Any]:
    """One row per job: net, parameters, MACs, epochs, precision, device, training time,
    test loss and accuracy, best epoch, overfitting onset, final and largest gap, history."""
    return {"jobs": compare_jobs(session, parse_job_ids(jobs))}


@router.get(
    "/compare.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "Overlaid curves."}, **ERRORS},
)
def compare_png(jobs: JobIds, session: SessionDep) -> Response:
    """The validation accuracy and loss of every job, overlaid."""
    from app.reports.plots import compare_png as render

    rows = compare_jobs(session, parse_job_ids(jobs))
    return Response(render(rows), media_type="image/png", headers={"Cache-Control": "no-store"})


@router.get(
    "/report",
    response_class=Response,
    responses={
        200: {"content": {"text/markdown": {}}, "description": "The report as Markdown."},
        **ERRORS,
        404: {
            "description": "A job does not exist (`job_not_found`), or the sweep is not an "
            "ablation (`ablation_not_found`)."
        },
        409: {"description": "A job has not succeeded (`job_not_finished`)."},
    },
)
def report(
    jobs: JobIds,
    session: SessionDep,
    ablation: Annotated[
        uuid.UUID | None,
        Query(
            description="An ablation sweep's id: exercise 19's points per lever (404 "
            "`ablation_not_found` when the sweep is not an ablation)."
        ),
    ] = None,
) -> Response:
    """The course's report (table, curves, one paragraph per course question) as Markdown;
    its images link to /compare.png and /jobs/{id}/history.png."""
    from app.reports.ablation import ablation_jobs
    from app.reports.export import collect
    from app.reports.markdown import live_header, render_report

    ids = parse_job_ids(jobs)
    joined = ",".join(str(i) for i in ids)
    command = f"GET /report?jobs={joined}" + (f"&ablation={ablation}" if ablation else "")
    export = collect(
        session,
        ids,
        exported_at=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        command=command,
        sweep_id=ablation,
        ablation_source=ablation_jobs,
    )
    require_finished(export_rows(export))
    text = render_report(
        export,
        header=live_header(export),
        compare_image=f"/compare.png?jobs={joined}",
        curve_images={job.id: f"/jobs/{job.id}/history.png" for job in export.jobs},
    )
    return Response(text, media_type="text/markdown; charset=utf-8")
