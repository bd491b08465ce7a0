"""SQLAlchemy 2.0 ORM models: jobs, their epochs and evaluation, the model registry, sweeps.

Schema changes go through Alembic (migrations/); the application never calls create_all.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    Uuid,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from app.states import JobStatus

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime | None) -> datetime | None:
    """A timestamp with its zone: SQLite hands them back naive; they were written in UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Job(Base):
    """One training run of one net with one set of parameters."""

    __tablename__ = "jobs"
    # An Idempotency-Key names a job within its owner's submissions only (0006).
    __table_args__ = (
        UniqueConstraint("owner_id", "idempotency_key", name="uq_jobs_owner_id_idempotency_key"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    net: Mapped[str] = mapped_column(String(64), index=True)
    # Training parameters (the seed's defaults live in app.ml.params.TrainConfig).
    epochs: Mapped[int] = mapped_column(Integer)
    batch_size: Mapped[int] = mapped_column(Integer)
    validation_split: Mapped[float] = mapped_column(Float)
    optimizer: Mapped[str] = mapped_column(String(16))
    learning_rate: Mapped[float] = mapped_column(Float)
    seed: Mapped[int] = mapped_column(Integer)
    train_limit: Mapped[int | None] = mapped_column(Integer, nullable=True)
    precision: Mapped[str | None] = mapped_column(String(16), nullable=True)
    model_name: Mapped[str] = mapped_column(String(128))
    # Devices the job asks for (0 = any one device): its queue, and DataParallel when > 1 (0012).
    gpus: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # The levers (issue 11, migration 0005_training_levers); defaults = the course's setup.
    augment_crop: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    augment_flip: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    cutout: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    label_smoothing: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    weight_decay: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    clipnorm: Mapped[float | None] = mapped_column(Float, nullable=True)
    lr_schedule: Mapped[str] = mapped_column(
        String(16), default="constant", server_default="constant"
    )
    warmup_epochs: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    early_stopping_patience: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # NET V's recipe (issue 21, migration 0014_net5_blocks); defaults = runs as before.
    momentum: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    nesterov: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    bias_lr_scale: Mapped[float] = mapped_column(Float, default=1.0, server_default="1")
    lookahead_steps: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    whiten: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    whiten_bias_epochs: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    augment_translate: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    augment_flip_mode: Mapped[str] = mapped_column(
        String(16), default="random", server_default="random"
    )
    tta: Mapped[str] = mapped_column(String(16), default="none", server_default="none")

    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED, index=True)
    current_epoch: Mapped[int] = mapped_column(Integer, default=0)
    # Claims that used up an attempt (a graceful hand-back gives its attempt back).
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # The fencing token: +1 on every claim, never lowered (docs/reliability.md).
    claims: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Hand-backs caused by the infrastructure (store, database), bounded by MAX_INFRA_FAILURES.
    infra_failures: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)

    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, index=True
    )
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # The time the job was last handed to the broker; the sweep re-sends lost queued jobs.
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    worker: Mapped[str | None] = mapped_column(String(255), nullable=True)
    device: Mapped[str | None] = mapped_column(String(255), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), nullable=True)
    model_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_versions.id", use_alter=True), nullable=True
    )
    # The API key that submitted the job; NULL for jobs made with AUTH=off or before keys.
    owner_id: Mapped[int | None] = mapped_column(
        ForeignKey("api_keys.id", ondelete="SET NULL"), nullable=True, index=True
    )

    epoch_rows: Mapped[list[EpochMetric]] = relationship(
        back_populates="job", order_by="EpochMetric.epoch", cascade="all, delete-orphan"
    )
    evaluation: Mapped[Evaluation | None] = relationship(
        back_populates="job", cascade="all, delete-orphan"
    )
    model_version: Mapped[ModelVersion | None] = relationship(foreign_keys=[model_version_id])

    # Read by JobPublic.model_validate (from_attributes), so the response is built from the row.
    @property
    def progress(self) -> dict[str, int]:
        return {"epoch": self.current_epoch, "epochs": self.epochs}

    @property
    def waiting_for(self) -> str | None:
        """While queued: the worker the job needs (its queue is served only by such workers)."""
        if self.status != JobStatus.QUEUED:
            return None
        if not self.gpus:
            return "any worker"
        return f"a worker with at least {self.gpus} GPUs (WORKER_GPUS >= {self.gpus})"

    @property
    def parameters(self) -> Job:
        """The training parameters are this row's own columns (JobParameters reads them)."""
        return self


class EpochMetric(Base):
    """One finished epoch of one job; (job_id, epoch) is unique so a retried write is a no-op."""

    __tablename__ = "epochs"
    __table_args__ = (UniqueConstraint("job_id", "epoch", name="uq_epochs_job_id_epoch"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    epoch: Mapped[int] = mapped_column(Integer)  # 1-based, as users count epochs
    loss: Mapped[float] = mapped_column(Float)
    accuracy: Mapped[float] = mapped_column(Float)
    val_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    val_accuracy: Mapped[float | None] = mapped_column(Float, nullable=True)
    seconds: Mapped[float] = mapped_column(Float)
    images_per_second: Mapped[float | None] = mapped_column(Float, nullable=True)
    # The optimizer's rate at the epoch's end (issue 11); null for rows older than 0005.
    learning_rate: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Plain cross-entropy on the validation images, whatever the training loss (issue 20):
    # the validation loss that compares across jobs. Null for rows older than 0011.
    val_ce_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    job: Mapped[Job] = relationship(back_populates="epoch_rows")


class Evaluation(Base):
    """Test-set results of a finished job (exercises 7 and 8)."""

    __tablename__ = "evaluations"

    job_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    test_loss: Mapped[float] = mapped_column(Float)
    test_accuracy: Mapped[float] = mapped_column(Float)
    # {"probabilities": [...10], "predicted_class": int, "true_class": int, "match": bool}
    first_image: Mapped[dict[str, Any]] = mapped_column(JSON)
    per_class_accuracy: Mapped[list[float]] = mapped_column(JSON)
    confusion_matrix: Mapped[list[list[int]]] = mapped_column(JSON)
    # Issue 20 (migration 0011); null for older rows. The plain cross-entropy on the test set
    # (test_loss holds L2 penalties too), and which data the job used:
    # {"archive", "sha256", "first_test_image", "train_images", "test_images"}.
    test_ce_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # Issue 21 (migration 0014): the test-time augmentation's views ({"name", "weight"} each)
    # and the accuracy of their weighted mean; null without TTA (test_accuracy is plain).
    tta_views: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, nullable=True)
    tta_accuracy: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    job: Mapped[Job] = relationship(back_populates="evaluation")


class ModelVersion(Base):
    """A registered, ready-to-serve model: versions count 1, 2, 3... per name."""

    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_model_versions_name_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128), index=True)
    version: Mapped[int] = mapped_column(Integer)
    net: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="SET NULL", use_alter=True), nullable=True
    )
    artifact_path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ModelAlias(Base):
    """A movable label (e.g. `production`) pointing at one version of a registered name."""

    __tablename__ = "model_aliases"
    __table_args__ = (
        ForeignKeyConstraint(
            ["name", "version"],
            ["model_versions.name", "model_versions.version"],
            name="fk_model_aliases_name_version_model_versions",
            ondelete="CASCADE",
        ),
    )

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    alias: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )


class ApiKey(Base):
    """A caller of the API. Only the key's sha256 is stored; the key itself is shown once."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    # The first characters of the key ("cnn_AbCd"), so a person can tell keys apart.
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # Space-separated subset of read, predict, train, admin.
    scopes: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # Revoked keys stay as rows: jobs and model names still name their owner.
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class ModelOwner(Base):
    """Who may register versions under a model name and move its aliases.

    The first principal to submit a job under a name claims it. owner_id NULL means the
    name belongs to the administrators (names claimed with AUTH=off or before keys existed).
    """

    __tablename__ = "model_owners"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    owner_id: Mapped[int | None] = mapped_column(
        ForeignKey("api_keys.id", ondelete="SET NULL"), nullable=True
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class JobEvent(Base):
    """One entry of a job's event log: a status change or a stored epoch.

    Written only by database triggers (migration 0002_job_events), never by the application,
    so no code path that changes a job can forget it. `id` only grows; per job it follows
    commit order, which is what `GET /jobs/{id}/events` and its Last-Event-ID rely on.
    """

    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_id_id", "job_id", "id"),)

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))  # "status" or "epoch"
    status: Mapped[str | None] = mapped_column(String(16), nullable=True)
    previous_status: Mapped[str | None] = mapped_column(String(16), nullable=True)
    epoch: Mapped[int | None] = mapped_column(Integer, nullable=True)
    epoch_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Sweep(Base):
    """A hyperparameter search or an ablation: a request that becomes trials, each a job.

    `spec` is the validated request (app.sweeps.spec.SweepSpec), the one declaration of what
    the sweep runs; the columns beside it are what queries filter and the advancers fence on.
    """

    __tablename__ = "sweeps"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    kind: Mapped[str] = mapped_column(String(16))  # "search" or "ablation"
    status: Mapped[str] = mapped_column(String(16), index=True)  # running, finished, cancelled
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    max_trials: Mapped[int] = mapped_column(Integer)
    parallelism: Mapped[int] = mapped_column(Integer)
    # The key that created the sweep; its trials are that key's jobs (ownership, quotas).
    owner_id: Mapped[int | None] = mapped_column(
        ForeignKey("api_keys.id", ondelete="SET NULL"), nullable=True, index=True
    )
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, index=True
    )
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    trials: Mapped[list[SweepTrial]] = relationship(
        back_populates="sweep", order_by="SweepTrial.number", cascade="all, delete-orphan"
    )


class SweepTrial(Base):
    """One trial of a sweep: the options it asked for, the job that runs them, the outcome.

    (sweep_id, number) is unique: it is where concurrent advancers meet, so a trial number is
    asked once. `state` uses Optuna's names (running, complete, pruned, fail); `system_attrs`
    keeps what Optuna's sampler and pruner wrote about the trial, so the study can be
    rebuilt from these rows at any time (app/sweeps/study.py).
    """

    __tablename__ = "sweep_trials"
    __table_args__ = (
        UniqueConstraint("sweep_id", "number", name="uq_sweep_trials_sweep_id_number"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sweep_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("sweeps.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)  # 0-based, as Optuna counts trials
    job_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="SET NULL"), nullable=True, unique=True
    )
    # Ablations: the trial's role in the plan ("baseline", "target-label_smoothing", ...).
    role: Mapped[str | None] = mapped_column(String(64), nullable=True)
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    # Optuna's distribution of each parameter (distribution_to_json), for the rebuilt study.
    distributions: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    system_attrs: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    state: Mapped[str] = mapped_column(String(16), default="running")
    value: Mapped[float | None] = mapped_column(Float, nullable=True)
    value_epoch: Mapped[int | None] = mapped_column(Integer, nullable=True)
    pruned_epoch: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    sweep: Mapped[Sweep] = relationship(back_populates="trials")
    job: Mapped[Job | None] = relationship()


class RateBucket(Base):
    """One /predict caller's counters, shared by every API process (app/quotas.py).

    Used where no Redis is configured. Times are Unix seconds: every API process of one
    database runs on hosts whose clocks agree (NTP) to far better than a second.
    """

    __tablename__ = "rate_buckets"
    __table_args__ = (Index("ix_rate_buckets_seen_at", "seen_at"),)

    caller: Mapped[str] = mapped_column(String(160), primary_key=True)
    # The hard cap (PREDICT_RATE_PER_S) and the fair share: images left, negative in debt,
    # and when each was last refilled.
    hard: Mapped[float] = mapped_column(Float)
    hard_at: Mapped[float] = mapped_column(Float)
    fair: Mapped[float] = mapped_column(Float)
    fair_at: Mapped[float] = mapped_column(Float)
    seen_at: Mapped[float] = mapped_column(Float)


class Worker(Base):
    """One training worker process, as it reported itself (app/fleet/presence.py).

    A worker registers when it starts, beats every WORKER_HEARTBEAT_S, records the job it
    runs, and sets stopped_at on a clean shutdown. A row whose beat is older than
    WORKER_LOST_AFTER_S is lost (a killed process or an unreachable host); the sweep deletes
    rows gone longer than WORKER_FORGET_S, so the table stays as small as the fleet.
    """

    __tablename__ = "workers"
    __table_args__ = (Index("ix_workers_last_heartbeat_at", "last_heartbeat_at"),)

    # Celery's node name (worker.run.worker_hostname), which jobs.worker also records.
    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    # "cpu" or "gpu", and the label of the device it trains on ("CPU", "GPU:0 <name>").
    device_kind: Mapped[str] = mapped_column(String(8))
    device: Mapped[str] = mapped_column(String(255))
    gpu_count: Mapped[int] = mapped_column(Integer, default=0)
    queues: Mapped[list[str]] = mapped_column(JSON, default=list)
    keras_backend: Mapped[str] = mapped_column(String(32))
    # No foreign key: a worker's row must never hold up deleting a job, nor fail its beat.
    current_job_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, nullable=True)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_heartbeat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    stopped_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
