"""POST /predict (JSON or raw uint8 pixels) and POST /predict/image (multipart upload).

The routes only deal with the transport: media type, body, query and form fields. Input
rules, model resolution, batching and the answer's shape belong to app.serving (see
docs/serving.md); it raises domain errors (app.errors), rendered by the app's handlers.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.deps import PredictAccess, bearer_scheme, predict_principal, rate_limited_predict
from app.errors import InputError, PayloadTooLarge, UnsupportedMediaType, error_response
from app.schemas import (
    ALIAS_PATTERN,
    INT32_MAX,
    MODEL_NAME_PATTERN,
    OutputForm,
    PredictBody,
    PredictResponse,
)
from app.serving.service import PredictionService

router = APIRouter(tags=["predict"])
log = logging.getLogger(__name__)

# An upload larger than this is refused before decoding (a 32x32 PNG is a few KB).
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
OCTET = "application/octet-stream"

_ERRORS: dict[int | str, dict[str, Any]] = {
    200: {"model": PredictResponse},
    400: {"description": "The body is not valid JSON (`bad_json`)."},
    404: {"description": "No such model, version or alias (`model_not_found`)."},
    413: {"description": "More images than PREDICT_MAX_INSTANCES (`too_many_instances`)."},
    415: {"description": "Wrong Content-Type (`unsupported_media_type`)."},
    422: {"description": "Bad shape, range, value, image or base64; the message says why."},
    503: {
        "description": "The artifact is missing or fails its sha256 check (`model_unavailable`), "
        "or too many predictions are in progress (`overloaded`, with Retry-After)."
    },
}


def _service(request: Request) -> PredictionService:
    service: PredictionService = request.app.state.prediction
    return service


def _json(data: bytes) -> Response:
    return Response(data, media_type="application/json")


def _media(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


@router.post(
    "/predict",
    dependencies=[PredictAccess],
    responses=_ERRORS,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": PredictBody.model_json_schema()},
                OCTET: {
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
async def predict(request: Request) -> Response:
    """Without version or alias the latest version serves."""
    service = _service(request)
    media = _media(request)
    if media == OCTET:
        return _json(await _predict_raw(request, service))
    if media != "application/json" and not (
        media.startswith("application/") and media.endswith("+json")
    ):
        raise UnsupportedMediaType(
            "the request body must be JSON sent with Content-Type: application/json, or "
            f"raw uint8 pixels sent as {OCTET} (got {media[:100] or 'no content type'})"
        )
    return _json(await service.predict_json(await request.body()))


class PredictFastPath:
    """POST /predict from the ASGI scope straight to `predict`, past the router and FastAPI's
    per-request dependency solving: for one-image requests those were a third of the event
    loop's time (docs/performance.md). The same key check, rate limit, handler and error
    rendering as the route, which stays for OpenAPI and every other method and path."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/predict" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        response: Response
        try:
            credentials = await bearer_scheme(request)
            await rate_limited_predict(request, await predict_principal(request, credentials))
            response = await predict(request)
        except Exception as exc:
            response = error_response(request, exc)
        await response(scope, receive, send)


async def _predict_raw(request: Request, service: PredictionService) -> bytes:
    query = request.query_params
    unknown = set(query) - {"model", "version", "alias", "top_k", "output", "shape", "resize"}
    if unknown:
        raise InputError(
            "validation_error", f"unknown query parameter(s): {', '.join(sorted(unknown))[:200]}"
        )
    length_text = request.headers.get("content-length")
    length = int(length_text) if length_text and length_text.isdigit() else None
    shape = service.raw_shape(query.get("shape") or request.headers.get("x-tensor-shape"), length)
    fields: dict[str, Any] = {
        k: query[k] for k in ("model", "version", "alias", "top_k", "output") if k in query
    }
    return await service.predict_raw(await request.body(), shape, fields)


def require_multipart(request: Request) -> None:
    media = _media(request)
    if media != "multipart/form-data":
        raise UnsupportedMediaType(
            "POST /predict/image takes a multipart/form-data upload with a 'file' field "
            f"(got {media[:100] or 'no content type'}); send JSON to POST /predict"
        )


@router.post(
    "/predict/image",
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
    data = await file.read(MAX_UPLOAD_BYTES + 1)
    if len(data) > MAX_UPLOAD_BYTES:
        raise PayloadTooLarge(
            f"the upload is larger than {MAX_UPLOAD_BYTES} bytes; send a 32x32 image"
        )
    return _json(await _service(request).predict_upload(data, fields))
