"""The dashboard: GET / serves app/static/index.html, /static/* its scripts and styles.

Plain files, no build step and nothing fetched from elsewhere at run time, so it loads fast
and works offline. The files are public; every API call the page makes carries the key
the user typed in (kept in the browser tab's sessionStorage).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

router = APIRouter(include_in_schema=False)


@router.get("/")
def index() -> FileResponse:
    # Revalidate each time, so a deploy's new page is seen at the next load.
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
