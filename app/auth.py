"""API keys, principals and ownership: who may call what (no HTTP in here).

A key is `cnn_` + 43 random URL-safe characters (256 bits). Only its sha256 is stored: the
key is high-entropy, so a fast hash is enough (unlike passwords, there is nothing to guess),
and a lookup is one indexed equality. The key itself is shown once, when it is created.

Scopes: `read` (jobs, history, models, nets, summary), `predict`, `train` (submit, cancel
its own jobs, move the aliases of its own model names) and `admin` (everything, keys
included). A model name belongs to the principal that first submitted a job under it;
owner NULL means the administrators (AUTH=off, or names older than keys).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.errors import (
    Forbidden,
    KeyInUse,
    KeyNameTaken,
    KeyNotFound,
    TooManyModelNames,
    Unauthorized,
)
from app.models import ApiKey, Job, ModelOwner, ModelVersion

log = logging.getLogger(__name__)

SCOPES: tuple[str, ...] = ("read", "predict", "train", "admin")
KEY_PREFIX = "cnn_"
# Characters of the key kept in clear for `cnn keys list` ("cnn_" + 6).
SHOWN_PREFIX = 10
# last_used_at is written at most this often per key (a write per request would be a
# hot row on a busy key).
LAST_USED_RESOLUTION = timedelta(seconds=60)
KEY_NAME_PATTERN = r"^[A-Za-z0-9_.@-]{1,64}$"


@dataclass(frozen=True)
class Principal:
    """The caller of one request: an API key, the anonymous caller, or everyone (AUTH=off)."""

    id: int | None
    name: str
    scopes: frozenset[str] = field(default_factory=frozenset)

    @property
    def is_admin(self) -> bool:
        return "admin" in self.scopes

    def allows(self, scope: str) -> bool:
        return self.is_admin or scope in self.scopes

    def owns(self, owner_id: int | None) -> bool:
        """Whether a row owned by `owner_id` is this principal's (admins own everything)."""
        return self.is_admin or (self.id is not None and owner_id == self.id)


def anonymous(scopes: Iterable[str]) -> Principal:
    return Principal(id=None, name="anonymous", scopes=frozenset(scopes))


AUTH_OFF = Principal(id=None, name="auth-off", scopes=frozenset({"admin"}))


def parse_scopes(value: str | Iterable[str]) -> list[str]:
    """'read,predict' or ['read', 'predict'] -> sorted, known scopes; ValueError otherwise."""
    items = value.replace(",", " ").split() if isinstance(value, str) else list(value)
    unknown = sorted({s for s in items if s not in SCOPES})
    if unknown:
        raise ValueError(f"unknown scope(s) {', '.join(unknown)}; expected {', '.join(SCOPES)}")
    if not items:
        raise ValueError(f"give at least one scope of {', '.join(SCOPES)}")
    return sorted(set(items), key=SCOPES.index)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class CreatedKey:
    """A new key: the row, and the key itself (shown once, never stored)."""

    row: ApiKey
    key: str


def create_key(session: Session, name: str, scopes: str | Iterable[str]) -> CreatedKey:
    """Insert a key and commit. Names are unique (KeyNameTaken); scopes are validated."""
    if not re.fullmatch(KEY_NAME_PATTERN, name):
        raise ValueError("a key name is 1-64 characters from A-Z, a-z, 0-9, '_', '.', '@', '-'")
    scope_list = parse_scopes(scopes)
    key = new_key()
    row = ApiKey(
        name=name,
        prefix=key[:SHOWN_PREFIX],
        key_hash=hash_key(key),
        scopes=" ".join(scope_list),
        created_at=datetime.now(UTC),
    )
    session.add(row)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise KeyNameTaken(
            f"a key named {name!r} exists already; revoke it or choose another name"
        ) from None
    log.info("API key %r created (id %s, scopes %s)", name, row.id, row.scopes)
    return CreatedKey(row=row, key=key)


def list_keys(session: Session, include_revoked: bool = True) -> Sequence[ApiKey]:
    query = select(ApiKey).order_by(ApiKey.id)
    if not include_revoked:
        query = query.where(ApiKey.revoked_at.is_(None))
    return list(session.scalars(query))


def find_key(session: Session, id_or_name: int | str) -> ApiKey:
    """A key by id (int or digits) or name; KeyNotFound otherwise."""
    row: ApiKey | None = None
    if isinstance(id_or_name, int) or id_or_name.isdigit():
        row = session.get(ApiKey, int(id_or_name))
    if row is None and isinstance(id_or_name, str):
        row = session.scalar(select(ApiKey).where(ApiKey.name == id_or_name))
    if row is None:
        raise KeyNotFound(f"no API key {id_or_name!r}")
    return row


def revoke_key(session: Session, id_or_name: int | str, by: Principal | None = None) -> ApiKey:
    """Mark a key revoked (idempotent). The row stays: jobs and model names keep their owner.

    A key cannot revoke itself over the API (KeyInUse): an admin would lock itself out."""
    row = find_key(session, id_or_name)
    if by is not None and by.id == row.id:
        raise KeyInUse("a key cannot revoke itself; revoke it with another admin key or the CLI")
    if row.revoked_at is None:
        row.revoked_at = datetime.now(UTC)
        session.commit()
        log.info("API key %r revoked (id %s)", row.name, row.id)
    return row


def authenticate(session: Session, key: str) -> Principal:
    """The principal of a presented key; Unauthorized for an unknown or revoked key."""
    if not key.startswith(KEY_PREFIX) or len(key) > 128:
        raise Unauthorized("unknown API key")
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
    if row is None or row.revoked_at is not None:
        raise Unauthorized("unknown or revoked API key")
    now = datetime.now(UTC)
    last = row.last_used_at
    if last is not None and last.tzinfo is None:
        last = last.replace(tzinfo=UTC)
    if last is None or now - last > LAST_USED_RESOLUTION:
        row.last_used_at = now
        session.commit()
    return Principal(id=row.id, name=row.name, scopes=frozenset(row.scopes.split()))


class PrincipalCache:
    """Principals of recently presented keys, for /predict's hot path (no query per request).

    Entries live `ttl` seconds (AUTH_CACHE_S), which bounds how long a key revoked in another
    process keeps working here; `revoked(id)` drops it at once: called for a revocation
    through this process and, on PostgreSQL, for one anywhere (app.notices). Bounded: a full
    cache is emptied rather than grown (only valid keys are stored, so it rarely is).
    """

    def __init__(self, ttl: float, max_entries: int = 10_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: dict[str, tuple[float, Principal]] = {}

    def get(self, key: str) -> Principal | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if time.monotonic() > entry[0]:
            self._entries.pop(key, None)
            return None
        return entry[1]

    def put(self, key: str, principal: Principal) -> None:
        if self.ttl <= 0:
            return
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        self._entries[key] = (time.monotonic() + self.ttl, principal)

    def revoked(self, key_id: int) -> None:
        """Forget the key with this id (its next request asks the database). Safe from a
        route's thread: the snapshot of the entries is taken in one step."""
        for key, (_, principal) in list(self._entries.items()):
            if principal.id == key_id:
                self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()


# ----------------------------------------------------------------------------- ownership
def check_job_access(principal: Principal, job: Job, *, write: bool = False) -> None:
    """Read: any `read` principal, or the job's owner. Write (cancel): the owner or an admin."""
    if principal.owns(job.owner_id):
        return
    if not write and principal.allows("read"):
        return
    raise Forbidden("this job belongs to another API key")


def model_owner(session: Session, name: str) -> ModelOwner | None:
    return session.get(ModelOwner, name)


def check_model_owner(session: Session, principal: Principal, name: str) -> None:
    """Moving aliases of `name`: only its owner or an admin (Forbidden otherwise)."""
    row = model_owner(session, name)
    if row is not None and not principal.owns(row.owner_id):
        raise Forbidden(f"the model name {name!r} belongs to another API key")
    if row is None and not principal.is_admin:
        # A registered name nobody claimed (written outside the API): administrators only.
        raise Forbidden(f"the model name {name!r} is not yours")


def claim_model_name(session: Session, principal: Principal, name: str, max_names: int) -> None:
    """Make `principal` the owner of `name` if nobody is; Forbidden if someone else is.

    Nothing is committed here: the claim is part of the transaction that accepts the job
    (app.jobs.service.create_job), so a refused job claims nothing. A key owns at most
    `max_names` names (TooManyModelNames); admins' names belong to the administrators and
    are not counted. Two keys racing for a new name both INSERT; the primary key lets one
    commit, and the other's IntegrityError makes its caller try again, which then finds the
    name taken.
    """
    row = model_owner(session, name)
    if row is None:
        # Versions registered without a claim (outside the API) belong to the admins.
        registered = session.scalar(
            select(ModelVersion.id).where(ModelVersion.name == name).limit(1)
        )
        owner = None if principal.is_admin or registered is not None else principal.id
        if owner is not None:
            owned = session.scalar(
                select(func.count()).select_from(ModelOwner).where(ModelOwner.owner_id == owner)
            )
            if (owned or 0) >= max_names:
                raise TooManyModelNames(
                    f"this key owns {owned} model names, the most allowed "
                    f"(MAX_MODEL_NAMES_PER_KEY={max_names}); submit under one of them"
                )
        row = ModelOwner(name=name, owner_id=owner, created_at=datetime.now(UTC))
        session.add(row)
        session.flush()
    if not principal.owns(row.owner_id):
        raise Forbidden(
            f"the model name {name!r} belongs to another API key; choose another model_name"
        )


# ----------------------------------------------------------------------------- bootstrap
def ensure_admin_key(session: Session, path: Path) -> str | None:
    """First start of `cnn serve`: create an admin key and write it to `path` (mode 0600).

    Returns the path written, or None when the file exists already or keys exist
    (then nothing is created: a deleted file is not silently replaced by a second admin).
    """
    if path.exists():
        return None
    if session.scalar(select(ApiKey.id).limit(1)) is not None:
        log.warning(
            "%s is missing but API keys exist; no new admin key was created "
            "(create one with `cnn keys create --name NAME --scope admin`)",
            path,
        )
        return None
    created = create_key(session, "admin", ["admin"])
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(created.key + "\n")
    os.chmod(path, 0o600)
    return str(path)
