"""POST /predict (JSON instances or base64 images) and POST /predict/image (multipart upload).

The JSON body is parsed by hand with orjson straight into numpy: pydantic validation of
a 64-image pixel array costs more than the model call itself. Only the small fields go
through pydantic. Parsing, loading and the forward pass run in the threadpool so the
event loop stays free for other requests.
"""

from __future__ import annotations

import logging
import threading
from typing import Annotated, Any

import numpy as np
import orjson
from fastapi import APIRouter, Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.api.deps import JsonBody, SessionDep, SettingsDep
from app.config import Settings
from app.errors import (
    InputError,
    ModelArtifactError,
    ModelIntegrityError,
    ModelUnavailable,
    PayloadTooLarge,
    RequestInvalid,
    UnsupportedMediaType,
)
from app.metrics import InstrumentedModelCache, note_predict
from app.ml.inference import (
    ModelCache,
    decode_b64,
    decode_image,
    gc_paused,
    images_to_batch,
    instances_to_batch,
    parse_json,
    predict_probabilities,
)
from app.ml.nets import CLASS_NAMES
from app.models import ModelVersion
from app.registry import versions as registry
from app.schemas import ALIAS_PATTERN, INT32_MAX, MODEL_NAME_PATTERN

router = APIRouter(tags=["predict"])
log = logging.getLogger(__name__)

# An upload larger than this is refused before decoding (a 32x32 PNG is a few KB).
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
_cache_lock = threading.Lock()


class PredictOptions(BaseModel):
    """The small fields of a /predict body; the pixel data is validated by app.ml.inference."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(pattern=MODEL_NAME_PATTERN, description="Registered model name.")
    version: int | None = Field(default=None, ge=1, le=INT32_MAX)
    alias: str | None = Field(default=None, pattern=ALIAS_PATTERN)
    resize: bool = Field(
        default=False, description="Resize images that are not 32x32 instead of refusing them."
    )


class PredictBody(PredictOptions):
    """The documented request body (OpenAPI only: the route parses it by hand)."""

    instances: list[list[list[list[float]]]] | None = Field(
        default=None, description="Images as (N, 32, 32, 3) nested lists of pixel values 0-255."
    )
    images: list[dict[str, str]] | None = Field(
        default=None,
        description='Images as [{"b64": "<standard base64 of a PNG or JPEG>"}], TF Serving style.',
    )


class ModelRef(BaseModel):
    name: str
    version: int


class Prediction(BaseModel):
    probabilities: list[float] = Field(description="Ten probabilities summing to 1.")
    class_id: int
    class_name: str


class PredictResponse(BaseModel):
    model: ModelRef
    classes: list[str]
    predictions: list[Prediction]


_ERRORS: dict[int | str, dict[str, Any]] = {
    200: {"model": PredictResponse},
    400: {"description": "The body is not valid JSON (`bad_json`)."},
    404: {"description": "No such model, version or alias (`model_not_found`)."},
    413: {"description": "More instances than PREDICT_MAX_INSTANCES (`too_many_instances`)."},
    415: {"description": "Wrong Content-Type (`unsupported_media_type`)."},
    422: {"description": "Bad shape, range, value, image or base64; the message says why."},
    503: {"description": "The artifact is missing or fails its sha256 check."},
}


def model_cache(app: FastAPI, settings: Settings) -> ModelCache:
    """The app's ModelCache, created on first use (create_app may also set it)."""
    cache = getattr(app.state, "model_cache", None)
    if cache is None:
        with _cache_lock:
            cache = getattr(app.state, "model_cache", None)
            if cache is None:
                cache = InstrumentedModelCache(
                    settings.MODEL_CACHE_SIZE, artifact_dir=settings.artifact_dir
                )
                app.state.model_cache = cache
    return cache


def _options(fields: dict[str, Any]) -> PredictOptions:
    try:
        options = PredictOptions.model_validate(fields)
    except ValidationError as exc:
        # Rendered by the app's handler as 422 validation_error naming each field.
        raise RequestValidationError(exc.errors(include_input=False)) from None
    if options.version is not None and options.alias is not None:
        raise RequestInvalid("give either 'version' or 'alias' (or neither for the latest)")
    return options


def _resolve(session: Session, options: PredictOptions) -> ModelVersion:
    return registry.resolve(session, options.model, version=options.version, alias=options.alias)


def _serve(
    session: Session, cache: ModelCache, options: PredictOptions, batch: np.ndarray
) -> dict[str, Any]:
    """Resolve the model and answer for a validated batch: the part both routes share."""
    row = _resolve(session, options)
    # The version is resolved on every request, so a moved alias is seen by the next one.
    name, version = row.name, row.version
    note_predict(model=name)
    session.close()  # release the connection before the (possibly long) load and forward pass
    try:
        predictor = cache.get(row)
    except ModelIntegrityError as exc:
        log.error("refusing to serve %s v%s: %s", name, version, exc)
        raise ModelUnavailable(
            f"model {name!r} version {version} cannot be served: its artifact does not match "
            "the registered sha256"
        ) from None
    except ModelArtifactError as exc:
        log.error("cannot serve %s v%s: %s", name, version, exc)
        raise ModelUnavailable(
            f"model {name!r} version {version} cannot be served: its artifact is missing or "
            "cannot be loaded"
        ) from None
    return {
        "model": {"name": name, "version": version},
        "classes": list(CLASS_NAMES),
        "predictions": predict_probabilities(predictor, batch),
    }


def _images_batch(images: Any, resize: bool, max_instances: int) -> np.ndarray:
    if not isinstance(images, list):
        raise RequestInvalid(
            '\'images\' must be a list of {"b64": "<standard base64 PNG or JPEG>"} objects'
        )
    if not images:
        raise InputError("empty_batch", "'images' is empty; send at least one image")
    if len(images) > max_instances:
        raise InputError(
            "too_many_instances",
            f"at most {max_instances} images per request; got {len(images)}. Split the batch.",
        )
    decoded = []
    for i, item in enumerate(images):
        if not isinstance(item, dict) or set(item) != {"b64"}:
            raise RequestInvalid(
                f'images[{i}] must be an object {{"b64": "<standard base64 PNG or JPEG>"}}'
            )
        try:
            decoded.append(decode_b64(item["b64"], resize=resize))
        except InputError as exc:
            raise InputError(exc.code, f"images[{i}]: {exc.message}") from None
    return images_to_batch(decoded)


def _predict_json(
    body: bytes, session: Session, settings: Settings, cache: ModelCache
) -> dict[str, Any]:
    # The pixel lists live only inside the GC pause: see app.ml.inference._GcPause.
    with gc_paused():
        data = parse_json(body)
        if not isinstance(data, dict):
            raise RequestInvalid(
                "the body must be a JSON object with 'model' and either 'instances' or 'images'"
            )
        instances = data.pop("instances", None)
        images = data.pop("images", None)
        options = _options(data)
        if (instances is None) == (images is None):
            raise RequestInvalid(
                "give exactly one of 'instances' (nested lists of pixel values) or 'images' "
                '([{"b64": ...}])'
            )
        note_predict(input_form="b64" if images is not None else "instances")
        if images is not None:
            batch = _images_batch(images, options.resize, settings.PREDICT_MAX_INSTANCES)
        else:
            batch = instances_to_batch(instances, settings.PREDICT_MAX_INSTANCES)
        del data, instances, images
    return _serve(session, cache, options, batch)


def _dumps(result: dict[str, Any]) -> Response:
    return Response(orjson.dumps(result), media_type="application/json")


@router.post(
    "/predict",
    dependencies=[JsonBody],
    responses=_ERRORS,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": PredictBody.model_json_schema()}},
        }
    },
    summary="Class probabilities for images sent as pixel arrays or base64 PNG/JPEG",
)
async def predict(request: Request, session: SessionDep, settings: SettingsDep) -> Response:
    """Without version or alias the latest version serves."""
    body = await request.body()
    cache = model_cache(request.app, settings)
    return _dumps(await run_in_threadpool(_predict_json, body, session, settings, cache))


def require_multipart(request: Request) -> None:
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "multipart/form-data":
        raise UnsupportedMediaType(
            "POST /predict/image takes a multipart/form-data upload with a 'file' field "
            f"(got {media[:100] or 'no content type'}); send JSON to POST /predict"
        )


@router.post(
    "/predict/image",
    dependencies=[Depends(require_multipart)],
    responses=_ERRORS,
    summary="Class probabilities for one uploaded PNG or JPEG",
)
async def predict_image(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    file: Annotated[UploadFile, File(description="A PNG or JPEG, 32x32 unless resize is set.")],
    model: Annotated[str, Form()],
    version: Annotated[int | None, Form()] = None,
    alias: Annotated[str | None, Form()] = None,
    resize: Annotated[bool, Form()] = False,
) -> Response:
    options = _options({"model": model, "version": version, "alias": alias, "resize": resize})
    data = await file.read(MAX_UPLOAD_BYTES + 1)
    if len(data) > MAX_UPLOAD_BYTES:
        raise PayloadTooLarge(
            f"the upload is larger than {MAX_UPLOAD_BYTES} bytes; send a 32x32 image"
        )

    cache = model_cache(request.app, settings)
    return _dumps(await run_in_threadpool(_predict_upload, data, session, cache, options))


def _predict_upload(
    data: bytes, session: Session, cache: ModelCache, options: PredictOptions
) -> dict[str, Any]:
    batch = images_to_batch([decode_image(data, resize=options.resize)])
    return _serve(session, cache, options, batch)
