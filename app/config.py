"""All settings of the service, read once from the environment and an optional `.env`.

Names have no prefix because the issues and the compose file use the plain names
(`DATABASE_URL`, `CELERY_BROKER_URL`, `CIFAR10_SOURCE`, ...).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.ml.params import MAX_GPUS, Precision


class Settings(BaseSettings):
    """One place for every knob; pass an instance around instead of reading os.environ."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", case_sensitive=False)

    # Where the embedded default keeps its state (SQLite file, broker folder, artifacts, caches).
    STATE_DIR: Path = Path("var")
    # Empty means the embedded SQLite database under STATE_DIR.
    DATABASE_URL: str = ""
    # Empty means the embedded, server-less broker under STATE_DIR.
    CELERY_BROKER_URL: str = ""
    # The prefix of the training queues (app/jobs/queue.py): a job asking for N GPUs goes to
    # `<prefix>.gpu<N>`, one asking for any device (gpus 0) to `<prefix>.any`.
    TRAINING_QUEUE: str = Field(default="train", min_length=1, max_length=200)
    MAINTENANCE_QUEUE: str = Field(default="maintenance", min_length=1, max_length=200)
    # The GPUs this worker owns: it serves train.gpu1 .. train.gpu<N> and train.any. Unset
    # means the GPUs it can see (CUDA_VISIBLE_DEVICES when set, else `nvidia-smi -L`; 0 on a
    # CPU host), the count app/serve.py's `visible_gpus` finds (worker/run.py).
    WORKER_GPUS: int | None = Field(default=None, ge=0, le=MAX_GPUS)
    # Redis redelivers a message not acknowledged this long after a worker took it. Workers
    # acknowledge after the fit (acks_late), so it must outlast the longest job; a redelivery
    # before that is refused by the job's claim in the database (docs/jobs.md, "Celery's traps").
    CELERY_VISIBILITY_TIMEOUT_S: int = Field(default=6 * 3600, ge=1, le=30 * 86_400)

    # Artifacts (.keras models, checkpoints). Empty means STATE_DIR/artifacts.
    ARTIFACT_DIR: Path | None = None
    # Where models and checkpoints live (app/registry/store.py): `file://<folder>` or
    # `s3://<bucket>/<prefix>`. Empty means file://ARTIFACT_DIR, a folder every process sees.
    # With S3, credentials and region come from the standard AWS variables
    # (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, ...).
    ARTIFACT_STORE: str = Field(default="", max_length=1024)
    # An S3-compatible server (SeaweedFS, Garage, moto...); empty means AWS itself.
    S3_ENDPOINT_URL: str = Field(default="", max_length=1024)
    # This process's own disposable folder: checkpoints on their way to an object store, the
    # staged model, the local copies of served models. Empty means STATE_DIR/scratch.
    SCRATCH_DIR: Path | None = None
    # Local copies of models from an object store kept on disk (least recently used go first).
    MODEL_CACHE_DISK_BYTES: int = Field(default=4 * 1024**3, ge=0, le=2**50)
    # Decoded CIFAR-10 arrays. Empty means STATE_DIR/cache.
    CACHE_DIR: Path | None = None
    # "keras" downloads through keras.datasets; anything else is a local path.
    CIFAR10_SOURCE: str = "keras"

    PRECISION: Precision = "auto"
    WORKER_NAME: str = ""
    # `cnn serve` keeps a second worker with TensorFlow loaded, waiting, so that a worker
    # crash does not wait for TensorFlow to load (docs/reliability.md). Costs its memory.
    SERVE_STANDBY_WORKER: bool = True
    # Set by `cnn serve` on its standby worker: wait for this file before taking messages.
    WORKER_STANDBY_FILE: str = ""

    # Job robustness (docs/jobs.md, docs/reliability.md). The heartbeat is a thread, so its
    # timeout does not depend on how long an epoch takes.
    MAX_ATTEMPTS: int = Field(default=3, ge=1)
    HEARTBEAT_INTERVAL_S: float = Field(default=5.0, gt=0)
    HEARTBEAT_TIMEOUT_S: float = Field(default=30.0, gt=0)
    SWEEP_INTERVAL_S: float = Field(default=5.0, gt=0)
    # Workers report themselves in the `workers` table (GET /workers) on the same clock: a beat
    # every HEARTBEAT_INTERVAL_S, lost after HEARTBEAT_TIMEOUT_S without one. The sweep deletes
    # the rows of workers silent (lost or stopped) for this long.
    WORKER_FORGET_S: float = Field(default=3600.0, ge=60, le=30 * 86_400)
    # A queued job not picked up this long after it was sent is sent again (the broker may
    # have lost it); duplicates are harmless because only one claim in the database wins.
    QUEUED_RESEND_S: float = Field(default=300.0, gt=0)
    # Checkpoints and staged files of a job that ended this long ago are removed by the sweep,
    # and so are model files published this long ago that no registry row points at.
    CLEANUP_GRACE_S: float = Field(default=600.0, ge=0)
    # How often a worker's sweep looks for such unregistered model files (a listing of models/).
    ORPHAN_SCAN_S: float = Field(default=60.0, gt=0, le=86_400)
    # Infrastructure faults (artifact store unwritable or full, database unreachable): the
    # worker retries in place with back-off (1 s doubling up to INFRA_BACKOFF_MAX_S) for up
    # to INFRA_RETRY_S, then hands the job back without using an attempt; after
    # MAX_INFRA_FAILURES hand-backs the job fails with the operator's message.
    INFRA_BACKOFF_MAX_S: float = Field(default=30.0, gt=0)
    INFRA_RETRY_S: float = Field(default=300.0, ge=0)
    MAX_INFRA_FAILURES: int = Field(default=5, ge=1)

    # Serving.
    PREDICT_MAX_INSTANCES: int = Field(default=256, ge=1)
    MODEL_CACHE_SIZE: int = Field(default=4, ge=1)
    # Micro-batching (app/serving/batching.py): rows per forward pass, and how long a pass
    # may wait for requests already being decoded (a lone request never waits).
    PREDICT_MAX_BATCH: int = Field(default=64, ge=1, le=4096)
    PREDICT_BATCH_WINDOW_US: int = Field(default=1000, ge=0, le=1_000_000)
    # /predict's own thread pool (model loads, large bodies, image decoding) and how many
    # /predict requests one API process admits at once (past it: 503 overloaded).
    PREDICT_THREADS: int = Field(default=2, ge=1, le=64)
    PREDICT_MAX_PENDING: int = Field(default=1024, ge=1)
    # Of those, how many are worked on at once (the rest wait without costing the event loop).
    PREDICT_CONCURRENCY: int = Field(default=16, ge=1, le=4096)
    # Source pixels one request may ask to resize, all its images together (so any one image
    # too); `cnn predict` takes the same bound for its image.
    PREDICT_RESIZE_MAX_PIXELS: int = Field(default=4096 * 4096, ge=1024)
    # How often an API process checks whether another process changed the registry (the
    # safety net: on PostgreSQL a change is pushed to every API process at once).
    REGISTRY_POLL_S: float = Field(default=1.0, gt=0, le=60)
    # API worker processes of `cnn serve` (each has its own model cache and batchers).
    API_WORKERS: int = Field(default=1, ge=1, le=64)
    # Models an API process loads and warms at start, comma-separated `name`, `name@alias` or
    # `name:version`; GET /ready answers 503 until they are warm (docs/serving.md).
    PREDICT_PRELOAD: str = Field(default="", max_length=2048)

    # Live events: how often a `GET /jobs/{id}/events` stream looks for new events, and how
    # many streams one key may hold open in one API process (429 with Retry-After past it).
    EVENTS_POLL_S: float = Field(default=0.5, gt=0)
    EVENT_STREAMS_PER_KEY: int = Field(default=16, ge=1, le=10_000)
    # /metrics answers without a key when true (for a Prometheus on a private network);
    # otherwise it needs a key with the `read` scope.
    METRICS_PUBLIC: bool = False

    API_HOST: str = "127.0.0.1"
    API_PORT: int = 8000
    # Addresses (or networks) of the reverse proxies whose X-Forwarded-For/-Proto uvicorn
    # believes, comma-separated; empty (the default) believes nobody, so a caller cannot
    # choose its own address. "*" believes anyone: only where nothing but the proxy connects.
    TRUSTED_PROXIES: str = Field(default="", max_length=4096)

    # Access control (docs/security.md). AUTH=off lets every request act as an admin.
    AUTH: Literal["on", "off"] = "on"
    # Open reads (jobs, models, nets, summary) or /predict to callers without a key.
    ANONYMOUS_READ: bool = False
    ANONYMOUS_PREDICT: bool = False
    # Where `cnn serve` writes the admin key on first start. Empty means STATE_DIR/admin.key.
    ADMIN_KEY_FILE: Path | None = None
    # Host header values served, comma-separated, ports ignored; "*" serves any (only behind
    # a proxy that checks it). Loopback names by default: DNS rebinding cannot reach us.
    ALLOWED_HOSTS: str = "localhost,127.0.0.1,::1"

    # Request bodies, enforced while they are read (413 past them).
    MAX_JSON_BODY_BYTES: int = Field(default=64 * 1024, ge=1024, le=2**30)
    PREDICT_MAX_BODY_BYTES: int = Field(default=8 * 1024 * 1024, ge=1024, le=2**30)
    # The file of POST /predict/image (its body may hold MULTIPART_OVERHEAD more for the form).
    UPLOAD_MAX_FILE_BYTES: int = Field(default=1024 * 1024, ge=1024, le=2**30)
    # A request's whole body must arrive within this many seconds of its headers (408
    # request_timeout after it, and the connection is closed): a slow body holds nothing long.
    BODY_TIMEOUT_S: float = Field(default=30.0, gt=0, le=3600)
    # /predict bodies being received at once, in bytes, per key (429 past it) and for the
    # whole API process (503 past it); admitted from Content-Length before a byte is read,
    # and a chunked body counts as it arrives (docs/security.md).
    PREDICT_INFLIGHT_BYTES_PER_KEY: int = Field(default=32 * 1024 * 1024, ge=1024, le=2**36)
    PREDICT_INFLIGHT_BYTES: int = Field(default=128 * 1024 * 1024, ge=1024, le=2**38)

    # Quotas: queued-or-running jobs per key.
    MAX_ACTIVE_JOBS_PER_KEY: int = Field(default=4, ge=1)
    # Model names one key may own (a name is claimed by the first job accepted under it).
    MAX_MODEL_NAMES_PER_KEY: int = Field(default=100, ge=1, le=1_000_000)
    # /predict counts images (docs/security.md, "Fair sharing"). A key alone may use the whole
    # fleet; while two or more keys have predicted in the last PREDICT_FAIR_WINDOW_S, each may
    # use an equal share of PREDICT_CAPACITY_IMAGES_PER_S, the fleet's images/s.
    PREDICT_FAIR_SHARE: bool = True
    PREDICT_FAIR_WINDOW_S: float = Field(default=2.0, gt=0, le=60)
    PREDICT_CAPACITY_IMAGES_PER_S: float = Field(default=1000.0, gt=0, le=10_000_000)
    # An optional hard cap per key on top: images per second (0 = none) and how many images a
    # key may use at once above that rate.
    PREDICT_RATE_PER_S: float = Field(default=0.0, ge=0, le=10_000_000)
    PREDICT_BURST: int = Field(default=256, ge=1, le=10_000_000)
    # Where the counters of those limits live, shared by every API process: a redis:// URL.
    # Empty: the broker's Redis when CELERY_BROKER_URL is redis://, else the database.
    REDIS_URL: str = Field(default="", max_length=1024)
    # /predict remembers a key's principal this long (no database query per request): a key
    # revoked through this process stops at once, one revoked elsewhere within this time (at
    # once on PostgreSQL, which tells every API process).
    AUTH_CACHE_S: float = Field(default=5.0, ge=0, le=300)

    # Job size: one job must not hold a worker for days or exhaust its memory.
    JOB_MAX_EPOCHS: int = Field(default=200, ge=1)
    JOB_MAX_BATCH_SIZE: int = Field(default=2048, ge=1)
    # epochs x training images (50,000 for all of CIFAR-10): 200 full epochs by default.
    JOB_MAX_IMAGE_EPOCHS: int = Field(default=10_000_000, ge=1)

    # Sweeps (docs/sweeps.md): the trials one sweep may ask, how many of its trials may be
    # queued or running at once, and the sweeps one key may have running. A sweep's trials
    # are the key's jobs, so MAX_ACTIVE_JOBS_PER_KEY bounds them too.
    SWEEP_MAX_TRIALS: int = Field(default=100, ge=1, le=10_000)
    SWEEP_MAX_PARALLEL: int = Field(default=4, ge=1, le=64)
    MAX_ACTIVE_SWEEPS_PER_KEY: int = Field(default=2, ge=1)

    @model_validator(mode="after")
    def _budgets_fit_a_body(self) -> Settings:
        """A budget smaller than one allowed body would refuse every large body."""
        if not (
            self.PREDICT_MAX_BODY_BYTES
            <= self.PREDICT_INFLIGHT_BYTES_PER_KEY
            <= self.PREDICT_INFLIGHT_BYTES
        ):
            raise ValueError(
                "expected PREDICT_MAX_BODY_BYTES <= PREDICT_INFLIGHT_BYTES_PER_KEY <= "
                f"PREDICT_INFLIGHT_BYTES. Received: {self.PREDICT_MAX_BODY_BYTES}, "
                f"{self.PREDICT_INFLIGHT_BYTES_PER_KEY}, {self.PREDICT_INFLIGHT_BYTES}"
            )
        return self

    @property
    def trusted_proxies(self) -> list[str]:
        return [p.strip() for p in self.TRUSTED_PROXIES.split(",") if p.strip()]

    @property
    def database_url(self) -> str:
        """The configured URL, or the embedded SQLite file."""
        if self.DATABASE_URL:
            return self.DATABASE_URL
        return f"sqlite:///{(self.STATE_DIR / 'cnn.db').resolve()}"

    @property
    def embedded_broker(self) -> bool:
        return not self.CELERY_BROKER_URL

    @property
    def broker_url(self) -> str:
        return self.CELERY_BROKER_URL or "filesystem://"

    @property
    def redis_url(self) -> str | None:
        """The Redis of the shared counters, or None: they live in the database."""
        if self.REDIS_URL:
            return self.REDIS_URL
        if self.CELERY_BROKER_URL.startswith(("redis://", "rediss://")):
            return self.CELERY_BROKER_URL
        return None

    @property
    def broker_dir(self) -> Path:
        return (self.STATE_DIR / "broker").resolve()

    @property
    def admin_key_file(self) -> Path:
        return (self.ADMIN_KEY_FILE or self.STATE_DIR / "admin.key").resolve()

    @property
    def allowed_hosts(self) -> frozenset[str]:
        return frozenset(
            h.strip().lower().strip("[]") for h in self.ALLOWED_HOSTS.split(",") if h.strip()
        )

    @property
    def artifact_dir(self) -> Path:
        return (self.ARTIFACT_DIR or self.STATE_DIR / "artifacts").resolve()

    @property
    def artifact_store(self) -> str:
        """The store's URL: ARTIFACT_STORE, or the artifact folder as a file:// URL."""
        return self.ARTIFACT_STORE or f"file://{self.artifact_dir}"

    @property
    def scratch_dir(self) -> Path:
        return (self.SCRATCH_DIR or self.STATE_DIR / "scratch").resolve()

    @property
    def cache_dir(self) -> Path:
        return (self.CACHE_DIR or self.STATE_DIR / "cache").resolve()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
