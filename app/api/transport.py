"""What the routes and the middleware in front of them read off the transport, declared once.

The /predict paths are matched by the routes, the body-size guard (app/api/limits.py), the
request counters (app/metrics.py) and the OpenAPI completion (app/main.py); a request's media
type is read by every route that takes a body and by the counters. Each is written here only.
No FastAPI in here: the counters import it from below the web stack.
"""

from __future__ import annotations

from collections.abc import Mapping

from app.errors import UnsupportedMediaType

PREDICT_PATH = "/predict"
PREDICT_IMAGE_PATH = f"{PREDICT_PATH}/image"

JSON = "application/json"
OCTET_STREAM = "application/octet-stream"
MULTIPART = "multipart/form-data"


def media_type(headers: Mapping[str, str]) -> str:
    """The Content-Type without its parameters, in lower case; "" when there is none."""
    return headers.get("content-type", "").split(";", 1)[0].strip().lower()


def is_json(media: str) -> bool:
    """application/json or a structured-syntax JSON type such as application/problem+json."""
    return media == JSON or (media.startswith("application/") and media.endswith("+json"))


def unsupported(expected: str, media: str, hint: str = "") -> UnsupportedMediaType:
    """415 saying what the route takes and what came (cut short: a header is no place to
    echo at length)."""
    return UnsupportedMediaType(f"{expected} (got {media[:100] or 'no content type'}){hint}")
