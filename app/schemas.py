"""Request and response bodies of the REST API (pydantic v2), named by role.

Requests forbid unknown fields and explain every rejected value with the allowed range,
without echoing the value back. Responses are built from ORM rows (from_attributes).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    WrapValidator,
    computed_field,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from app.errors import public_message
from app.ml.nets import CLASS_NAMES, NETS
from app.ml.options import Option, options_of
from app.ml.params import INT32_MAX, TrainConfig
from app.models import as_utc
from app.states import JobStatus

# A name is a folder of the artifact store (models/<name>/<version>/): it starts with a
# letter or digit, so ".", ".." and hidden names cannot step out of it.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
ALIAS_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


def _expected(description: str) -> WrapValidator:
    """Replace pydantic's generic message with one stating the whole allowed range."""

    def validate(value: Any, handler: Any) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError(
                "out_of_range", "expected {expected}", {"expected": description}
            ) from None

    return WrapValidator(validate)


UtcDatetime = Annotated[datetime, AfterValidator(as_utc)]


def _json_typed(kind: type) -> BeforeValidator:
    """Take only the JSON type the schema states: lax pydantic reads `true` as 1 and "3" as 3.

    Integral floats (3.0) stay integers, as in JSON Schema. Query and form fields are text,
    so their validation passes context={"form": True} to let pydantic parse the strings.
    """

    def check(value: Any, info: ValidationInfo) -> Any:
        if value is None or (isinstance(value, str) and (info.context or {}).get("form")):
            return value
        if kind is bool:
            ok = isinstance(value, bool)
        else:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok:
            expected = "a boolean" if kind is bool else "a number"
            raise PydanticCustomError("json_type", "expected {expected}", {"expected": expected})
        return value

    return BeforeValidator(check)


JsonNumber = _json_typed(float)
JsonBool = Annotated[bool, _json_typed(bool)]

ModelName = Annotated[
    str | None,
    Field(pattern=MODEL_NAME_PATTERN),
    _expected(
        "null or 1-128 characters from A-Z, a-z, 0-9, '_', '.', '-', starting with a letter or digit"
    ),
]


# ----------------------------------------------------------------------------- job parameters
# The training options' fields are derived from their one declaration (app/ml/params.py):
# the bound, the default, the description and the message that states the allowed values.
def _public_type(o: Option) -> Any:
    return o.type | None if o.optional else o.type


def _request_type(o: Option) -> Any:
    """The JSON field of one option: strictly typed, bounded, and refused with its range."""
    if o.choices:
        # pydantic's own message names the choices: "Input should be 'adam', 'sgd' or ...".
        choice: Any = Literal[o.choices]
        return choice | None if o.optional else choice
    kind = _public_type(o)
    if o.type is bool:
        return Annotated[kind, _json_typed(bool)]
    finite = False if o.type is float else None
    bounds = Field(ge=o.ge, gt=o.gt, le=o.le, lt=o.lt, allow_inf_nan=finite)
    return Annotated[kind, bounds, JsonNumber, _expected(o.allowed())]


def _description(o: Option) -> str:
    return f"{o.help} Null means {o.null_means}." if o.null_means else o.help


class JobRequest(BaseModel):
    """What a POST /jobs body holds besides the training options: the net and its checks."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"net": "net1", "epochs": 20, "batch_size": 128}]},
    )
    train_config: ClassVar[type[TrainConfig]] = TrainConfig

    net: str = Field(
        description="A registered architecture, see GET /nets.",
        json_schema_extra={"enum": list(NETS)},
    )

    @model_validator(mode="after")
    def _options_fit_together(self) -> JobRequest:
        """The rules between options (weight decay needs AdamW, warm-up < epochs...)."""
        values = self.model_dump(exclude={"model_name"})
        for o in options_of(self.train_config):
            if o.null_means and values[o.name] is None:
                del values[o.name]  # decided at run time; the declared default stands in
        try:
            self.train_config(**values)
        except ValueError as exc:
            raise PydanticCustomError(
                "invalid_combination", "{reason}", {"reason": str(exc)}
            ) from None
        return self

    @field_validator("net")
    @classmethod
    def _known_net(cls, value: str) -> str:
        if value not in NETS:
            raise PydanticCustomError(
                "unknown_net", "unknown net; expected one of: {known}", {"known": ", ".join(NETS)}
            )
        return value

    def parameters(self) -> dict[str, Any]:
        """The job's columns, with the registry name defaulted to the net."""
        values = self.model_dump()
        values["model_name"] = values["model_name"] or self.net
        return values


def job_create_model(config: type[TrainConfig]) -> type[JobRequest]:
    """POST /jobs' body for `config`: `net`, a field per declared option, then `model_name`."""
    fields: dict[str, Any] = {
        o.name: (_request_type(o), Field(default=o.request_default, description=_description(o)))
        for o in options_of(config)
    }
    model = create_model(
        "JobCreateFields",
        __base__=JobRequest,
        __module__=__name__,
        **fields,
        model_name=(
            ModelName,
            Field(
                default=None,
                description="Registry name for the trained model; defaults to the net.",
            ),
        ),
    )
    model.train_config = config
    return model


def job_parameters_model(config: type[TrainConfig]) -> type[BaseModel]:
    """A job's public `parameters` for `config`: every declared option, then `model_name`."""
    fields: dict[str, Any] = {
        o.name: (_public_type(o), Field(description=_description(o))) for o in options_of(config)
    }
    return create_model(
        "JobParametersFields",
        __config__=ConfigDict(from_attributes=True),
        __module__=__name__,
        **fields,
        model_name=(str, Field(description="The registry name the trained model gets.")),
    )


# Subclasses, so that the names are classes for type checkers and the OpenAPI document; mypy
# cannot follow a base built at run time, so it sees their fields as Any.
class JobCreate(job_create_model(TrainConfig)):  # type: ignore[misc]
    """POST /jobs: every field but `net` defaults to the seed's training parameters."""


class JobParameters(job_parameters_model(TrainConfig)):  # type: ignore[misc]
    """The job's training options as stored, and the registry name of its model."""


class Progress(BaseModel):
    epoch: int = Field(description="Epochs finished so far.")
    epochs: int = Field(description="Epochs requested.")


class EvaluationSummary(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    test_loss: float
    test_accuracy: float


class ModelVersionRef(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    name: str
    version: int


class JobPublic(BaseModel):
    """A job as clients see it: state, progress, parameters, where it ran, what it produced."""

    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    net: str
    status: JobStatus
    progress: Progress
    parameters: JobParameters
    created_at: UtcDatetime
    enqueued_at: UtcDatetime | None
    started_at: UtcDatetime | None
    heartbeat_at: UtcDatetime | None
    finished_at: UtcDatetime | None
    worker: str | None
    device: str | None
    waiting_for: str | None = Field(
        description="While queued, the worker the job waits for: any worker, or one with at "
        "least `gpus` GPUs (a job that no live worker can run stays queued); null otherwise."
    )
    attempts: int
    error: str | None
    cancel_requested: bool
    evaluation: EvaluationSummary | None
    model_version: ModelVersionRef | None

    @field_validator("error")
    @classmethod
    def _public_error(cls, value: str | None) -> str | None:
        # Rows written before messages were cleaned may hold paths: clean them here too.
        return public_message(value) if value else value


class JobList(BaseModel):
    jobs: list[JobPublic]
    total: int = Field(description="Jobs matching the filters, over all pages.")
    limit: int
    offset: int


class EpochPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    epoch: int
    loss: float
    accuracy: float
    val_loss: float | None
    val_accuracy: float | None
    seconds: float
    learning_rate: float | None = None
    val_ce_loss: float | None = Field(
        default=None,
        description="Plain cross-entropy on the validation images (no label smoothing, no L2): "
        "the validation loss that compares across jobs; null for epochs recorded before it.",
    )


class HistoryCurves(BaseModel):
    loss: list[float]
    accuracy: list[float]
    val_loss: list[float | None]
    val_accuracy: list[float | None]
    learning_rate: list[float | None] = Field(
        default_factory=list, description="The optimizer's rate at each epoch's end."
    )
    val_ce_loss: list[float | None] = Field(
        default_factory=list, description="Plain cross-entropy on the validation images."
    )


class VerdictPublic(BaseModel):
    """How the run fits (app/ml/analysis.py states the rules), and the numbers it rests on."""

    kind: Literal["underfitting", "overfitting", "still_improving", "plateau"]
    reason: str = Field(description="The rule that decided, with its numbers.")
    epochs: int
    train_at_or_below_val: int = Field(description="Epochs with accuracy <= val_accuracy.")
    best_epoch: int
    lowest_val_loss: float
    last_val_loss: float
    val_loss_rise: float = Field(description="last_val_loss - lowest_val_loss.")
    tolerance: float = Field(
        description="The largest rise that is noise, not overfitting (5% of the lowest)."
    )
    train_loss_at_best: float | None
    last_train_loss: float | None


class AnalysisPublic(BaseModel):
    best_epoch: int | None = Field(description="Epoch with the lowest validation loss.")
    overfitting_after_epoch: int | None = Field(
        description="The best epoch, when the verdict is overfitting; else null."
    )
    final_gap: float | None = Field(description="accuracy - val_accuracy at the last epoch.")
    max_gap: float | None
    max_gap_epoch: int | None = None
    restored_epoch: int | None = Field(
        default=None,
        description=(
            "With early stopping: the epoch whose weights the stored model holds "
            "(the best epoch); null without early stopping."
        ),
    )
    stopped_early: bool = Field(
        default=False, description="Early stopping ended the run before its last epoch."
    )
    verdict: VerdictPublic | None = Field(
        default=None,
        description="underfitting, overfitting, still_improving or plateau, with the numbers "
        "it rests on; null without validation data.",
    )


class HistoryPublic(BaseModel):
    job_id: uuid.UUID
    status: JobStatus
    epochs: list[EpochPublic]
    history: HistoryCurves
    analysis: AnalysisPublic


class FirstImage(BaseModel):
    probabilities: list[float]
    predicted_class: int
    true_class: int
    match: bool


class DataPublic(BaseModel):
    """Which data a job used, recorded by the worker when it loaded it."""

    archive: str = Field(description="The archive (or folder, or download URL) read.")
    sha256: str | None = Field(description="Its sha256 (for a folder: of its files' digests).")
    first_test_image: str = Field(description='How "the first test image" is defined.')
    train_images: int
    test_images: int


class EvaluationPublic(BaseModel):
    """Test-set results: the seed's exercises 7 (test loss and accuracy) and 8 (the first
    test image), plus the accuracy per class and the confusion matrix."""

    model_config = ConfigDict(from_attributes=True)

    job_id: uuid.UUID
    test_loss: float
    test_accuracy: float
    first_image: FirstImage
    per_class_accuracy: list[float]
    confusion_matrix: list[list[int]]
    test_ce_loss: float | None = Field(
        default=None,
        description="Plain cross-entropy on the test set (test_loss also holds L2 penalties); "
        "null for jobs evaluated before it was recorded.",
    )
    data: DataPublic | None = Field(
        default=None, description="Which data the job used; null for older jobs."
    )
    tta_views: list[dict[str, Any]] | None = Field(
        default=None,
        description="Test-time augmentation's views ({name, weight}); null without TTA.",
    )
    tta_accuracy: float | None = Field(
        default=None,
        description="Accuracy of the weighted mean over tta_views (test_accuracy is without "
        "TTA); null without TTA.",
    )
    classes: list[str] = Field(
        default_factory=lambda: list(CLASS_NAMES),
        description="Class names, in the order of the lists above.",
    )
    created_at: UtcDatetime


class ModelVersionPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    name: str
    version: int
    net: str
    job_id: uuid.UUID | None
    sha256: str
    size_bytes: int
    metrics: dict[str, Any]
    created_at: UtcDatetime
    aliases: list[str] = Field(default_factory=list, description="Aliases pointing here.")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def artifact_url(self) -> str:
        return f"/models/{self.name}/versions/{self.version}/artifact"


class ModelSummary(BaseModel):
    name: str
    latest_version: ModelVersionPublic
    versions: int = Field(description="How many versions are registered under this name.")
    aliases: dict[str, int]


class ModelList(BaseModel):
    models: list[ModelSummary]


class RegisteredModelPublic(BaseModel):
    name: str
    latest_version: int
    aliases: dict[str, int]
    versions: list[ModelVersionPublic]


class AliasUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: Annotated[
        int, Field(ge=1, le=INT32_MAX), JsonNumber, _expected("a version number >= 1")
    ]


class AliasPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    name: str
    alias: str
    version: int
    updated_at: UtcDatetime


class NetPublic(BaseModel):
    name: str
    title: str
    description: str
    layout: str
    notes: str
    summary_url: str


class NetList(BaseModel):
    nets: list[NetPublic]


class LayerSummary(BaseModel):
    """One row of the calculation table; shapes are lists without the batch axis."""

    model_config = ConfigDict(extra="allow")

    name: str
    type: str
    input_shape: Any
    output_shape: Any
    kernel: Any = None
    stride: Any = None
    padding: Any = None
    params: int
    formula: str | None = None
    keras_output_shape: Any = None
    keras_params: int | None = None
    agrees: bool | None = None


class SummaryPublic(BaseModel):
    """GET /summary/{net}: the parameter and shape calculation, checked against Keras."""

    model_config = ConfigDict(extra="allow")

    net: str
    layers: list[LayerSummary]
    total_params: int
    keras_total_params: int | None = None
    trainable_params: int | None = None
    macs_per_image: int | None = None
    weight_bytes: int | None = None


class HealthPublic(BaseModel):
    status: Literal["ok"]
    database: Literal["ok"]
    database_backend: str
    version: str


class ReadyModel(BaseModel):
    """A model version this API process holds."""

    name: str
    version: int
    warm: bool = Field(description="Loaded and warmed up; false while it is being loaded.")
    serves: list[str] = Field(description="The labels it answers here: aliases, `latest`.")


class ReadyPublic(BaseModel):
    """GET /ready: one API process (the one that answered)."""

    status: Literal["ready"]
    replica: str = Field(description="host:pid of the API process that answered.")
    pushed: bool = Field(description="Registry changes reach it at once (PostgreSQL).")
    models: list[ReadyModel]
    problems: list[str] = Field(description="What it cannot serve as registered, and why.")


# ----------------------------------------------------------------------------- API keys
Scope = Literal["read", "predict", "train", "admin"]


class ApiKeyCreate(BaseModel):
    """POST /keys: a unique name and at least one scope."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"name": "dashboard", "scopes": ["read", "predict"]}]},
    )

    name: str = Field(
        pattern=r"^[A-Za-z0-9_.@-]{1,64}$",
        description="1-64 characters from A-Z, a-z, 0-9, '_', '.', '@', '-'; unique.",
    )
    scopes: list[Scope] = Field(min_length=1, max_length=4)


class ApiKeyPublic(BaseModel):
    """A key as listed: never the key itself, only its first characters."""

    id: int
    name: str
    prefix: str = Field(description="The key's first characters, to tell keys apart.")
    scopes: list[Scope]
    created_at: UtcDatetime
    last_used_at: UtcDatetime | None
    revoked_at: UtcDatetime | None

    @classmethod
    def from_row(cls, row: Any) -> ApiKeyPublic:
        return cls(
            id=row.id,
            name=row.name,
            prefix=row.prefix,
            scopes=row.scopes.split(),
            created_at=row.created_at,
            last_used_at=row.last_used_at,
            revoked_at=row.revoked_at,
        )


class ApiKeyCreated(ApiKeyPublic):
    key: str = Field(description="The key itself. Shown only in this answer: store it now.")


class ApiKeyList(BaseModel):
    keys: list[ApiKeyPublic]


# ----------------------------------------------------------------------------- prediction
# The pixel data is decoded and validated by app.serving.inputs (pydantic is too slow for
# pixel arrays); these models document the bodies and validate the small fields.

OutputForm = Literal["full", "probabilities"]


class PredictOptions(BaseModel):
    """The small fields of a /predict request (JSON body fields, or query parameters)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(pattern=MODEL_NAME_PATTERN, description="Registered model name.")
    version: Annotated[int | None, Field(ge=1, le=INT32_MAX), JsonNumber] = None
    alias: str | None = Field(default=None, pattern=ALIAS_PATTERN)
    resize: JsonBool = Field(
        default=False, description="Resize images that are not 32x32 instead of refusing them."
    )
    top_k: Annotated[int | None, Field(ge=1, le=10), JsonNumber] = Field(
        default=None,
        description="Answer only the k most probable classes of each image, most probable first.",
    )
    output: OutputForm = Field(
        default="full",
        description="`full`: one object per image with its probabilities, class id and name. "
        "`probabilities`: only a matrix of probabilities (rows in the order of `classes`), "
        "so that large batches do not pay for class names on every row.",
    )


class TensorInput(BaseModel):
    """Raw pixels: standard base64 of the uint8 bytes of an (N, 32, 32, 3) array, row-major."""

    b64: str
    shape: list[int] = Field(min_length=4, max_length=4, description="[N, 32, 32, 3]")
    dtype: Literal["uint8"] = "uint8"


class PredictBody(PredictOptions):
    """The documented JSON body (OpenAPI only: app.serving.inputs parses it by hand).

    Exactly one of `instances`, `images` or `tensor`; `version` or `alias`, not both. Both
    rules are in the schema (oneOf, not), so a request the schema allows is one we accept.
    """

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "oneOf": [
                {"required": ["instances"]},
                {"required": ["images"]},
                {"required": ["tensor"]},
            ],
            "not": {"required": ["version", "alias"]},
        },
    )

    instances: list[list[list[list[float]]]] | None = Field(
        default=None, description="Images as (N, 32, 32, 3) nested lists of pixel values 0-255."
    )
    images: list[dict[str, str]] | None = Field(
        default=None,
        description='Images as [{"b64": "<standard base64 of a PNG or JPEG>"}], TF Serving style.',
    )
    tensor: TensorInput | None = Field(
        default=None, description="Images as one raw uint8 tensor (the most compact JSON form)."
    )


class TopClass(BaseModel):
    class_id: int
    class_name: str
    probability: float


class Prediction(BaseModel):
    probabilities: list[float] | None = Field(
        default=None, description="Ten probabilities summing to 1 (absent with top_k)."
    )
    class_id: int
    class_name: str
    top_k: list[TopClass] | None = Field(
        default=None, description="With top_k: the k most probable classes, most probable first."
    )


class PredictResponse(BaseModel):
    """`predictions` with output=full (the default); `probabilities` (and with top_k,
    `class_ids`) with output=probabilities."""

    model: ModelVersionRef
    classes: list[str]
    predictions: list[Prediction] | None = None
    probabilities: list[list[float]] | None = Field(
        default=None, description="output=probabilities: one row per image."
    )
    class_ids: list[list[int]] | None = Field(
        default=None, description="output=probabilities with top_k: the class of each column."
    )


class WorkerPublic(BaseModel):
    """One training worker process as it last reported itself (GET /workers)."""

    model_config = ConfigDict(from_attributes=True)

    name: str = Field(description="Celery's node name; jobs record it as their `worker`.")
    host: str
    pid: int
    device_kind: Literal["cpu", "gpu"]
    device: str = Field(description="What its jobs train on: 'CPU' or 'GPU:0 <name>'.")
    gpu_count: int = Field(description="GPUs the process sees (0 on a CPU worker).")
    queues: list[str] = Field(description="The Celery queues it consumes.")
    keras_backend: str
    current_job_id: uuid.UUID | None = Field(description="The job it runs, if any.")
    state: Literal["live", "lost", "stopped"] = Field(
        description="live; lost (no heartbeat for HEARTBEAT_TIMEOUT_S); stopped (shut down)."
    )
    started_at: UtcDatetime
    last_heartbeat_at: UtcDatetime
    stopped_at: UtcDatetime | None


class WorkerList(BaseModel):
    workers: list[WorkerPublic]
    total: int = Field(description="Workers matching the filter, beyond `limit` too.")
    limit: int
