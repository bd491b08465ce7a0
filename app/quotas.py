"""Per-key limits: queued-or-running jobs (in the database) and /predict images per second.

/predict counts images, not requests, and shares the fleet fairly (docs/security.md):

- **A key alone may use the whole fleet.** Nothing limits it but the machines.
- **Under contention** (two or more keys predicted in the last PREDICT_FAIR_WINDOW_S), each
  active key may use an equal share of the fleet's images/s: PREDICT_CAPACITY_IMAGES_PER_S /
  active keys. A key over its share gets 429 `rate_limited` with Retry-After; a key within it
  is never refused.
- **A hard cap** per key (PREDICT_RATE_PER_S images/s, PREDICT_BURST at once) applies on top
  when set.

Both are token buckets that may go into debt: a request is admitted before its body is read
while its key's buckets hold at least one image (which it takes), and once the body is parsed
the rest of its images are charged (`charge_admitted`), so a 256-image request costs 256
images without admission having to read a byte first.

The counters are shared by every API process: in Redis when one is configured
(`RedisCounters`, one Lua script per batch of operations), else in the database
(`DatabaseCounters`, one transaction per batch). Both run the same rules (`settle`). Each
process batches the operations of concurrent requests into one call, and, while its last
look at the counters (at most STALE_S old) says its caller is the only active key and no
hard cap is set, admits without a call and sends the charges within SYNC_S: a key alone
costs the shared store about twenty calls a second per process, not one per request.
No HTTP here.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from sqlalchemy import Connection as SqlConnection
from sqlalchemy import (
    Engine,
    Table,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.orm import Session

from app.auth import Principal
from app.config import Settings
from app.errors import QuotaExceeded, RateLimited
from app.models import Job, RateBucket
from app.states import JobStatus

log = logging.getLogger(__name__)

ACTIVE = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)


def check_job_quota(session: Session, principal: Principal, limit: int) -> None:
    """QuotaExceeded (429, Retry-After) when the key already has `limit` queued-or-running jobs.

    A count, then the caller's INSERT: atomic only inside the submission's serialisation
    (app.db.serialize, taken by app.jobs.service.create_job before it calls this), so that
    concurrent submissions of one key, through any API process, are counted one by one.
    """
    if principal.id is None:
        return  # AUTH=off: there is no key to count for
    active = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(Job.owner_id == principal.id, Job.status.in_(ACTIVE))
    )
    if (active or 0) >= limit:
        raise QuotaExceeded(
            f"this key has {active} queued or running jobs, the most allowed "
            f"(MAX_ACTIVE_JOBS_PER_KEY={limit}); wait for one to finish or cancel one"
        )


# ----------------------------------------------------------------------------- the rules
# A fair bucket holds this many seconds of its share: a key's share may arrive in bursts.
DEPTH_S = 1.0
# How often a process sends its charges and reads the counters while it serves /predict,
# and how old its last read may be for it to admit a lone key without asking.
SYNC_S = 0.05
STALE_S = 0.25
# After the shared store failed, admit without asking it for this long (then try again).
OUTAGE_S = 1.0
ADMIT, CHARGE = "admit", "charge"
Op = tuple[str, str, int]  # (ADMIT or CHARGE, caller, images)


@dataclass(frozen=True)
class Rules:
    """The limits of /predict, from the settings."""

    rate: float  # hard cap, images/s per caller; 0: none
    burst: float  # images a caller may use at once above `rate`
    fair: bool  # share the capacity equally among active callers
    window_s: float  # a caller is active this long after its last request
    capacity: float  # the fleet's images/s that active callers share

    @classmethod
    def from_settings(cls, settings: Settings) -> Rules:
        return cls(
            rate=settings.PREDICT_RATE_PER_S,
            burst=float(settings.PREDICT_BURST),
            fair=settings.PREDICT_FAIR_SHARE,
            window_s=settings.PREDICT_FAIR_WINDOW_S,
            capacity=settings.PREDICT_CAPACITY_IMAGES_PER_S,
        )

    @property
    def on(self) -> bool:
        return self.rate > 0 or self.fair


@dataclass
class Bucket:
    """A caller's two buckets: images left (negative: in debt) and when they were refilled."""

    hard: float
    hard_at: float
    fair: float
    fair_at: float


@dataclass(frozen=True)
class Verdict:
    """An admission: wait 0 means admitted; else the seconds until it would be, and which
    limit refused it ("rate": the hard cap, "share": the fair share)."""

    wait: float
    reason: str = ""


ADMITTED = Verdict(0.0)


@dataclass(frozen=True)
class Outcome:
    """What a call to the shared counters answers: a verdict per ADMIT op, in order, and the
    callers active now (how many, and the one by name when there is one)."""

    verdicts: list[Verdict]
    active: int
    members: tuple[str, ...]


def settle(
    rules: Rules, now: float, buckets: dict[str, Bucket], active: int, ops: Sequence[Op]
) -> list[Verdict]:
    """Apply `ops` in order to `buckets` (missing callers start full).

    `active` counts the callers seen in the last window, those of `ops` included. The one
    statement of the rules: RedisCounters' Lua script mirrors it line by line, and a test
    runs both on the same operations.
    """
    share = rules.capacity / active if rules.fair and active >= 2 else None
    depth = max(1.0, (share if share is not None else rules.capacity) * DEPTH_S)
    verdicts: list[Verdict] = []
    for kind, caller, images in ops:
        bucket = buckets.get(caller)
        if bucket is None:
            bucket = buckets[caller] = Bucket(rules.burst, now, depth, now)
        if rules.rate > 0:
            bucket.hard = min(
                rules.burst, bucket.hard + max(0.0, now - bucket.hard_at) * rules.rate
            )
        else:
            bucket.hard = rules.burst
        bucket.hard_at = max(bucket.hard_at, now)
        if share is None:
            bucket.fair = depth  # alone (or sharing is off): nothing to owe
        else:
            bucket.fair = min(depth, bucket.fair + max(0.0, now - bucket.fair_at) * share)
        bucket.fair_at = max(bucket.fair_at, now)
        if kind == ADMIT:
            verdict = ADMITTED
            if rules.rate > 0 and bucket.hard < 1:
                verdict = Verdict((1 - bucket.hard) / rules.rate, "rate")
            if share is not None and bucket.fair < 1:
                wait = (1 - bucket.fair) / share
                if wait > verdict.wait:
                    verdict = Verdict(wait, "share")
            verdicts.append(verdict)
            if verdict.wait > 0:
                continue
        if rules.rate > 0:
            bucket.hard -= images
        bucket.fair -= images
    return verdicts


# ----------------------------------------------------------------------------- the stores
class CounterStore(Protocol):
    """Where the counters live; `apply` is atomic across every API process."""

    async def apply(self, now: float, ops: Sequence[Op]) -> Outcome: ...

    async def close(self) -> None: ...


def namespace(settings: Settings) -> str:
    """One deployment's counters in a shared Redis: the deployment is its database."""
    return hashlib.sha256(settings.database_url.encode()).hexdigest()[:12]


BUCKETS = cast(Table, RateBucket.__table__)
BUCKET_VALUES = ("hard", "hard_at", "fair", "fair_at", "seen_at")
# The PostgreSQL advisory lock that serialises the counters' transactions ("cnn-rl").
ADVISORY_LOCK = 0x636E6E2D726C
# Bucket rows idle this long are deleted (checked every PRUNE_EVERY_S per process).
PRUNE_AFTER_S = 86_400.0
PRUNE_EVERY_S = 600.0


def counter_engine(url: str) -> Engine:
    """An engine for the counters' short transactions.

    SQLite: BEGIN IMMEDIATE (the read-modify-write holds the write lock from its first read,
    so two processes never interleave) and synchronous=NORMAL (a commit does not wait for the
    disk: counters need no durability, and WAL keeps the file consistent). PostgreSQL: the
    commit does not wait for the WAL flush either (SET LOCAL in each transaction)."""
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True, pool_size=2, max_overflow=2)
    engine = create_engine(
        url, connect_args={"check_same_thread": False, "timeout": 30, "isolation_level": None}
    )

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: SqlConnection) -> None:
        read_only = conn.get_execution_options().get("read_only", False)
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

    return engine


class DatabaseCounters:
    """The counters in `rate_buckets`: one transaction per batch of ops, on one thread of their
    own per process (so a batch never waits for a /predict thread)."""

    def __init__(self, engine: Engine, rules: Rules) -> None:
        self.engine = engine
        self.rules = rules
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rate-counters")
        self._pruned_at = 0.0

    async def apply(self, now: float, ops: Sequence[Op]) -> Outcome:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.apply_now, now, list(ops))

    def apply_now(self, now: float, ops: Sequence[Op]) -> Outcome:
        """`apply`, blocking (one transaction)."""
        if not ops:
            with self.engine.execution_options(read_only=True).connect() as conn:
                return self._outcome(conn, now, [], self._active(conn, now, ()))
        callers = sorted({caller for _, caller, _ in ops})
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")
                # Every batch of the fleet one after the other, as SQLite's BEGIN IMMEDIATE
                # does: the count of active callers and the decisions are one consistent step.
                conn.execute(select(func.pg_advisory_xact_lock(ADVISORY_LOCK)))
            rows = conn.execute(select(BUCKETS).where(BUCKETS.c.caller.in_(callers))).all()
            buckets = {
                row.caller: Bucket(row.hard, row.hard_at, row.fair, row.fair_at) for row in rows
            }
            known = set(buckets)
            active = self._active(conn, now, callers)
            verdicts = settle(self.rules, now, buckets, active, ops)
            rows_now = [
                {
                    "caller": caller,
                    "hard": b.hard,
                    "hard_at": b.hard_at,
                    "fair": b.fair,
                    "fair_at": b.fair_at,
                    "seen_at": now,
                }
                for caller, b in buckets.items()
            ]
            old = [
                {f"b_{k}": v for k, v in row.items()} for row in rows_now if row["caller"] in known
            ]
            new = [row for row in rows_now if row["caller"] not in known]
            if old:
                conn.execute(
                    update(BUCKETS)
                    .where(BUCKETS.c.caller == bindparam("b_caller"))
                    .values({name: bindparam(f"b_{name}") for name in BUCKET_VALUES}),
                    old,
                )
            if new:
                conn.execute(insert(BUCKETS), new)
            if now - self._pruned_at > PRUNE_EVERY_S:
                self._pruned_at = now
                conn.execute(delete(BUCKETS).where(BUCKETS.c.seen_at < now - PRUNE_AFTER_S))
            return self._outcome(conn, now, verdicts, active)

    def _active(self, conn: SqlConnection, now: float, callers: Sequence[str]) -> int:
        """Callers seen in the window: the others, plus `callers` (seen now)."""
        others = conn.scalar(
            select(func.count())
            .select_from(BUCKETS)
            .where(BUCKETS.c.seen_at >= now - self.rules.window_s, BUCKETS.c.caller.not_in(callers))
        )
        return int(others or 0) + len(callers)

    def _outcome(
        self, conn: SqlConnection, now: float, verdicts: list[Verdict], active: int
    ) -> Outcome:
        members: Sequence[str] = ()
        if active == 1:
            members = conn.scalars(
                select(BUCKETS.c.caller).where(BUCKETS.c.seen_at >= now - self.rules.window_s)
            ).all()
        return Outcome(verdicts, active, tuple(members))

    async def close(self) -> None:
        self._executor.shutdown(wait=True)
        self.engine.dispose()


# The same rules as `settle`, in Lua, atomic in Redis. Numbers are stored as text with 17
# significant digits, so a float survives the round trip exactly.
SETTLE_LUA = """
local now, rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local fair, window, capacity = ARGV[4] == '1', tonumber(ARGV[5]), tonumber(ARGV[6])
local depth_s, prefix = tonumber(ARGV[7]), ARGV[8]
local active_key = KEYS[1]
local FIRST = 9
local function num(x) return string.format('%.17g', x) end

redis.call('ZREMRANGEBYSCORE', active_key, '-inf', '(' .. num(now - window))
for i = FIRST, #ARGV, 3 do
  redis.call('ZADD', active_key, num(now), ARGV[i + 1])
end
redis.call('EXPIRE', active_key, math.ceil(window) + 1)
local active = redis.call('ZCARD', active_key)

local share = false
if fair and active >= 2 then share = capacity / active end
local depth = math.max(1, (share or capacity) * depth_s)

local out = {}
for i = FIRST, #ARGV, 3 do
  local kind, caller, n = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  local key = prefix .. 'b:' .. caller
  local b = redis.call('HMGET', key, 'hard', 'hard_at', 'fair', 'fair_at')
  local hard, hard_at = tonumber(b[1]), tonumber(b[2])
  local fb, fair_at = tonumber(b[3]), tonumber(b[4])
  if hard == nil then hard, hard_at, fb, fair_at = burst, now, depth, now end
  if rate > 0 then
    hard = math.min(burst, hard + math.max(0, now - hard_at) * rate)
  else
    hard = burst
  end
  hard_at = math.max(hard_at, now)
  if share then
    fb = math.min(depth, fb + math.max(0, now - fair_at) * share)
  else
    fb = depth
  end
  fair_at = math.max(fair_at, now)
  local spend = true
  if kind == 'admit' then
    local wait, reason = 0, ''
    if rate > 0 and hard < 1 then wait, reason = (1 - hard) / rate, 'rate' end
    if share and fb < 1 then
      local w = (1 - fb) / share
      if w > wait then wait, reason = w, 'share' end
    end
    out[#out + 1] = num(wait)
    out[#out + 1] = reason
    spend = wait <= 0
  end
  if spend then
    if rate > 0 then hard = hard - n end
    fb = fb - n
  end
  redis.call('HSET', key, 'hard', num(hard), 'hard_at', num(hard_at),
             'fair', num(fb), 'fair_at', num(fair_at))
  -- A bucket that is full again by the time it expires is the same as no bucket.
  local ttl = window
  if rate > 0 then ttl = math.max(ttl, (burst - hard) / rate) end
  if share then ttl = math.max(ttl, (depth - fb) / share) end
  redis.call('EXPIRE', key, math.ceil(ttl) + 1)
end
local members = {}
if active == 1 then members = redis.call('ZRANGE', active_key, 0, 0) end
return {active, members, out}
"""


class RedisCounters:
    """The counters in Redis under `cnn:{<namespace>}:rl:` (one hash slot, so a Redis Cluster
    runs the script too): one script call per batch of ops."""

    def __init__(self, url: str, rules: Rules, space: str) -> None:
        import redis.asyncio

        self.rules = rules
        self.prefix = f"cnn:{{{space}}}:rl:"
        self.client = redis.asyncio.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        self._script = self.client.register_script(SETTLE_LUA)

    async def apply(self, now: float, ops: Sequence[Op]) -> Outcome:
        r = self.rules
        args: list[Any] = [
            repr(now),
            repr(r.rate),
            repr(r.burst),
            "1" if r.fair else "0",
            repr(r.window_s),
            repr(r.capacity),
            repr(DEPTH_S),
            self.prefix,
        ]
        for kind, caller, images in ops:
            args += [kind, caller, str(images)]
        active, members, out = await self._script(keys=[self.prefix + "active"], args=args)
        verdicts = [
            Verdict(float(out[i]), out[i + 1].decode()) if float(out[i]) > 0 else ADMITTED
            for i in range(0, len(out), 2)
        ]
        return Outcome(verdicts, int(active), tuple(m.decode() for m in members))

    async def close(self) -> None:
        await self.client.aclose()


def store_for(settings: Settings, rules: Rules) -> CounterStore:
    """Redis when one is configured (settings.redis_url), else the database."""
    url = settings.redis_url
    if url:
        return RedisCounters(url, rules, namespace(settings))
    return DatabaseCounters(counter_engine(settings.database_url), rules)


# ----------------------------------------------------------------------------- the limiter
@dataclass(frozen=True)
class View:
    """This process's last look at the fleet (monotonic time of the look)."""

    active: int = 0
    members: tuple[str, ...] = ()
    at: float = -math.inf


@dataclass
class _Ticket:
    limiter: PredictLimiter
    caller: str


# The admission of the request running in this context, charged once its images are known.
_TICKET: ContextVar[_Ticket | None] = ContextVar("predict_rate_ticket", default=None)


async def charge_admitted(images: int) -> None:
    """Charge the request admitted in this context (PredictLimiter.admit) for its images
    beyond the one taken at admission; a request charged already, or not admitted by a
    limiter, costs nothing more. With a hard cap the charge reaches the store before this
    returns (so the key's next request, on any process, sees it); the fair share's charges
    go with the next call, within SYNC_S."""
    ticket = _TICKET.get()
    if ticket is None:
        return
    _TICKET.set(None)
    limiter = ticket.limiter
    limiter.charge(ticket.caller, images - 1)
    if limiter.rules.rate > 0 and images > 1:
        await limiter.flush()


@dataclass
class PredictLimiter:
    """The /predict limits of one API process over the shared counters (see the module
    docstring). `start` and `stop` belong to the app's lifespan; `admit` is awaited by
    app.api.deps.authorise_predict before the body is read."""

    rules: Rules
    make_store: Callable[[], CounterStore]
    clock: Callable[[], float] = time.time
    view: View = field(default_factory=View)
    store: CounterStore | None = None
    _pending: dict[str, int] = field(default_factory=dict)
    _queue: list[tuple[Op, asyncio.Future[Verdict]]] = field(default_factory=list)
    _drain_task: asyncio.Task[None] | None = None
    _sync_task: asyncio.Task[None] | None = None
    _used_at: float = -math.inf
    _down_until: float = -math.inf
    _warned_at: float = -math.inf

    @classmethod
    def from_settings(cls, settings: Settings) -> PredictLimiter:
        rules = Rules.from_settings(settings)
        return cls(rules, lambda: store_for(settings, rules))

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self.rules.on and self.store is None:
            self.store = self.make_store()
            self._sync_task = asyncio.create_task(self._sync_loop())

    async def stop(self) -> None:
        if self._sync_task is not None:
            self._sync_task.cancel()
            self._sync_task = None
        if self._drain_task is not None:
            await asyncio.gather(self._drain_task, return_exceptions=True)
        if self.store is not None:
            if self._pending:  # the last charges, so other processes still count them
                try:
                    await asyncio.wait_for(self._call([]), timeout=2)
                except Exception as exc:
                    log.warning("could not send the last /predict charges: %s", exc)
            await self.store.close()
            self.store = None

    # ------------------------------------------------------------------ requests
    async def admit(self, caller: str) -> None:
        """Admit one request of `caller` (it takes one image), or raise RateLimited with
        Retry-After. Call before the body is read; its images are charged by charge_admitted."""
        _TICKET.set(None)
        if not self.rules.on:
            return
        if self.store is None:  # served without a lifespan (a TestClient outside `with`)
            await self.start()
        now = time.monotonic()
        self._used_at = now
        if self._alone(caller, now):
            self.charge(caller, 1)
        else:
            verdict = await self._decide(caller)
            if verdict.wait > 0:
                raise self._refusal(verdict)
        _TICKET.set(_Ticket(self, caller))

    async def flush(self) -> None:
        """Send the pending charges now."""
        if self.store is not None:
            await self._call([])

    def charge(self, caller: str, images: int) -> None:
        """Count `images` more for `caller`; sent with the next call to the store."""
        if images > 0:
            self._pending[caller] = self._pending.get(caller, 0) + images

    def _alone(self, caller: str, now: float) -> bool:
        """Whether this caller may be admitted without asking: no hard cap, and the last look
        (recent, or the store is down) saw no other active caller."""
        if now < self._down_until:
            return True  # fail open: the counters are unreachable (logged)
        if self.rules.rate > 0 or now - self.view.at > STALE_S:
            return False
        return self.view.active == 0 or self.view.members == (caller,)

    def _refusal(self, verdict: Verdict) -> RateLimited:
        retry = max(1, math.ceil(verdict.wait))
        if verdict.reason == "rate":
            text = (
                f"this key used its /predict images for now (PREDICT_RATE_PER_S="
                f"{self.rules.rate:g} images/s, PREDICT_BURST={self.rules.burst:g})"
            )
        else:
            keys = max(2, self.view.active)
            text = (
                f"/predict is shared by {keys} active keys and this key is over its equal "
                f"share ({self.rules.capacity / keys:,.0f} images/s)"
            )
        return RateLimited(f"{text}; retry after {verdict.wait:.2f} s", retry_after=retry)

    # ------------------------------------------------------------------ the store
    async def _decide(self, caller: str) -> Verdict:
        future: asyncio.Future[Verdict] = asyncio.get_running_loop().create_future()
        self._queue.append(((ADMIT, caller, 1), future))
        self._kick()
        return await future

    def _kick(self) -> None:
        if self._drain_task is None or self._drain_task.done():
            self._drain_task = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        """Send what is queued, one call per batch, until nothing is (requests that arrive
        during a call go together into the next). No admission is left waiting: whatever
        goes wrong, an unanswered one is admitted."""
        while self._queue:
            batch, self._queue = self._queue, []
            verdicts: list[Verdict] = []
            try:
                verdicts = await self._call([op for op, _ in batch])
            finally:
                for i, (_, future) in enumerate(batch):
                    if not future.done():
                        future.set_result(verdicts[i] if i < len(verdicts) else ADMITTED)

    async def _call(self, admits: list[Op]) -> list[Verdict]:
        """One call: the pending charges, then `admits`. Fails open (and says so in the log):
        a limit is not worth refusing predictions while the counters are unreachable."""
        charges, self._pending = self._pending, {}
        ops = [(CHARGE, caller, n) for caller, n in charges.items()] + admits
        assert self.store is not None
        try:
            outcome = await self.store.apply(self.clock(), ops)
        except Exception as exc:
            for _, caller, n in ops:  # admitted anyway: counted once the store is back
                self.charge(caller, n)
            now = time.monotonic()
            self._down_until = now + OUTAGE_S
            if now - self._warned_at > 30:
                self._warned_at = now
                log.warning("the /predict counters are unreachable; admitting: %r", exc)
            return [ADMITTED] * len(admits)
        self.view = View(outcome.active, outcome.members, time.monotonic())
        return outcome.verdicts

    async def _sync_loop(self) -> None:
        """While /predict is in use here: send the charges and read the fleet every SYNC_S."""
        while True:
            await asyncio.sleep(SYNC_S)
            idle = time.monotonic() - self._used_at > self.rules.window_s + 1
            if (idle and not self._pending) or (
                self._drain_task is not None and not self._drain_task.done()
            ):
                continue
            await self._guarded(self._call([]))

    @staticmethod
    async def _guarded(call: Awaitable[Any]) -> None:
        try:
            await call
        except Exception:  # _call logs and fails open; nothing else may end the loop
            log.exception("the /predict counters' sync failed")
