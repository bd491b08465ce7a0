"""POST /predict (JSON or raw uint8 pixels) and POST /predict/image (multipart upload).

The routes only deal with the transport: media type, body, query and form fields. Input
rules, model resolution, batching and the answer's shape belong to app.serving (see
docs/serving.md); it raises domain errors (app.errors), rendered by the app's handlers.

/predict admits a body before reading a byte of it, in this order: the key, its scope and
its rate (authorise_predict), the media type and a raw body's shape, then the service's
room for one more prediction and the body's bytes in flight (PredictionService.admit). The body is then read into one buffer of its declared
size, not kept as a list of the server's chunks until it is whole (those pieces lived as long
as a slow body took, scattered through the heap, and stayed as fragmentation after a flood).
It must arrive within BODY_TIMEOUT_S (app/api/limits.py).
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import Response

from app.api.deps import PredictAccess, get_app_settings
from app.api.fast_path import RouteFastPath
from app.api.limits import caller_of
from app.api.transport import (
    JSON,
    MULTIPART,
    OCTET_STREAM,
    PREDICT_IMAGE_PATH,
    PREDICT_PATH,
    is_json,
    media_type,
    unsupported,
)
from app.auth import Principal
from app.errors import InputError, PayloadTooLarge
from app.schemas import (
    ALIAS_PATTERN,
    INT32_MAX,
    MODEL_NAME_PATTERN,
    OutputForm,
    PredictBody,
    PredictResponse,
)
from app.serving.admission import Admission
from app.serving.service import PredictionService

router = APIRouter(tags=["predict"])
log = logging.getLogger(__name__)

_ERRORS: dict[int | str, dict[str, Any]] = {
    200: {"model": PredictResponse},
    400: {"description": "The body is not valid JSON (`bad_json`)."},
    404: {"description": "No such model, version or alias (`model_not_found`)."},
    408: {"description": "The body did not arrive within BODY_TIMEOUT_S (`request_timeout`)."},
    413: {"description": "More images than PREDICT_MAX_INSTANCES (`too_many_instances`)."},
    415: {"description": "Wrong Content-Type (`unsupported_media_type`)."},
    422: {"description": "Bad shape, range, value, image or base64; the message says why."},
    429: {
        "description": "Over this key's rate, or its bodies in flight would pass "
        "PREDICT_INFLIGHT_BYTES_PER_KEY (`rate_limited`, with Retry-After)."
    },
    503: {
        "description": "The artifact is missing or fails its sha256 check (`model_unavailable`), "
        "or too many predictions or body bytes are in progress (`overloaded`, with Retry-After)."
    },
}
PredictPrincipal = Annotated[Principal, PredictAccess]


def _service(request: Request) -> PredictionService:
    service: PredictionService = request.app.state.prediction
    return service


def _json(data: bytes) -> Response:
    return Response(data, media_type=JSON)


@router.post(
    PREDICT_PATH,
    responses=_ERRORS,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                JSON: {"schema": PredictBody.model_json_schema()},
                OCTET_STREAM: {
                    "schema": {"type": "string", "format": "binary"},
                    "description": "Raw uint8 pixels of an (N, 32, 32, 3) array, row-major; "
                    "the shape in the `shape` query parameter or the X-Tensor-Shape header, "
                    "the options in the query.",
                },
            },
        },
        "parameters": [
            {
                "name": name,
                "in": "query",
                "required": False,
                "description": f"octet-stream bodies only: {text}",
                "schema": schema,
            }
            for name, text, schema in (
                (
                    "model",
                    "registered model name (required)",
                    {"type": "string", "pattern": MODEL_NAME_PATTERN},
                ),
                (
                    "version",
                    "a version number",
                    {"type": "integer", "minimum": 1, "maximum": INT32_MAX},
                ),
                ("alias", "an alias", {"type": "string", "pattern": ALIAS_PATTERN}),
                (
                    "top_k",
                    "answer only the k most probable classes",
                    {"type": "integer", "minimum": 1, "maximum": 10},
                ),
                ("output", "full or probabilities", {"enum": ["full", "probabilities"]}),
                (
                    "shape",
                    "N,32,32,3 (N may be left out)",
                    {"type": "string", "pattern": r"^(\d+,)?32,32,3$"},
                ),
            )
        ],
    },
    summary="Class probabilities for images sent as pixel arrays, raw tensors or base64 PNG/JPEG",
)
async def predict(request: Request, principal: PredictPrincipal) -> Response:
    """Without version or alias the latest version serves."""
    service = _service(request)
    media = media_type(request.headers)
    raw: tuple[tuple[int, ...], dict[str, Any]] | None = None
    if media == OCTET_STREAM:
        raw = _raw_request(request, service)
    elif not is_json(media):
        raise unsupported(
            "the request body must be JSON sent with Content-Type: application/json, or "
            f"raw uint8 pixels sent as {OCTET_STREAM}",
            media,
        )
    caller = caller_of(principal, request.client)
    with service.admit(caller, _declared_length(request)) as admission:
        body = await read_body(request, admission)
        if raw is not None:
            return _json(await service.predict_raw(body, *raw))
        return _json(await service.predict_json(body))


class PredictFastPath(RouteFastPath):
    """POST /predict from the ASGI scope straight to `predict`, running the route's own
    dependencies (authorise_predict) without FastAPI's per-request solving; see
    app/api/fast_path.py and docs/performance.md."""

    method = "POST"
    path = PREDICT_PATH


def _declared_length(request: Request) -> int | None:
    text = request.headers.get("content-length")
    return int(text) if text and text.isdigit() else None


async def read_body(request: Request, admission: Admission) -> bytes:
    """The whole body. A body that comes in one piece is used as it is; a longer one is
    copied into one buffer of its declared size as it arrives (a chunked one, which has no
    size, grows one buffer and is charged to `admission` piece by piece). The parsers take
    bytes: the finished buffer is copied once into them and freed at once."""
    declared = _declared_length(request)
    buffer: bytearray | None = None
    filled = 0
    async for chunk in request.stream():
        if not chunk:
            continue
        if declared is None:
            admission.take(len(chunk))
        elif buffer is None and len(chunk) == declared:
            return chunk
        if buffer is None:
            buffer = bytearray(declared or 0)
        if declared is None:
            buffer += chunk
        else:
            buffer[filled : filled + len(chunk)] = chunk
        filled += len(chunk)
    if buffer is None:
        return b""
    return bytes(memoryview(buffer)[:filled])


def _raw_request(
    request: Request, service: PredictionService
) -> tuple[tuple[int, ...], dict[str, Any]]:
    """An octet-stream request's shape and options, checked before its body is read."""
    query = request.query_params
    unknown = set(query) - {"model", "version", "alias", "top_k", "output", "shape", "resize"}
    if unknown:
        raise InputError(
            "validation_error", f"unknown query parameter(s): {', '.join(sorted(unknown))[:200]}"
        )
    shape = service.raw_shape(
        query.get("shape") or request.headers.get("x-tensor-shape"), _declared_length(request)
    )
    fields: dict[str, Any] = {
        k: query[k] for k in ("model", "version", "alias", "top_k", "output") if k in query
    }
    return shape, fields


def require_multipart(request: Request) -> None:
    media = media_type(request.headers)
    if media != MULTIPART:
        raise unsupported(
            f"POST {PREDICT_IMAGE_PATH} takes a {MULTIPART} upload with a 'file' field",
            media,
            f"; send JSON to POST {PREDICT_PATH}",
        )


@router.post(
    PREDICT_IMAGE_PATH,
    dependencies=[PredictAccess, Depends(require_multipart)],
    responses=_ERRORS,
    summary="Class probabilities for one uploaded PNG or JPEG",
)
async def predict_image(
    request: Request,
    file: Annotated[UploadFile, File(description="A PNG or JPEG, 32x32 unless resize is set.")],
    model: Annotated[str, Form(pattern=MODEL_NAME_PATTERN)],
    version: Annotated[int | None, Form(ge=1, le=INT32_MAX)] = None,
    alias: Annotated[str | None, Form(pattern=ALIAS_PATTERN)] = None,
    resize: Annotated[bool, Form()] = False,
    top_k: Annotated[int | None, Form(ge=1, le=10)] = None,
    output: Annotated[OutputForm, Form()] = "full",
) -> Response:
    fields = {
        "model": model,
        "version": version,
        "alias": alias,
        "resize": resize,
        "top_k": top_k,
        "output": output,
    }
    limit = get_app_settings(request).UPLOAD_MAX_FILE_BYTES
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise PayloadTooLarge(
            f"the upload is larger than {limit:,} bytes (UPLOAD_MAX_FILE_BYTES); send a 32x32 image"
        )
    return _json(await _service(request).predict_upload(data, fields))
