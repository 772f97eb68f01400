"""The queue's durable state: SQLAlchemy tables for jobs and their events.

The store is the only source of truth. Every state change is one transaction that
updates the job row *only if it is still in the state the caller saw* and
appends an event with its time, so two dispatchers (or a dispatcher and a user
cancelling) can never both win a transition. SQLite by default (WAL, writes
under BEGIN IMMEDIATE, so concurrent writers queue instead of failing); any
SQLAlchemy URL, e.g. PostgreSQL, works too.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

from sqlalchemy import (JSON, Column, Float, ForeignKey, Integer, MetaData, String, Table, Text, create_engine, event,
                        and_, delete, insert, inspect, or_, select, update)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError

from trainers.errors import Conflict, NotFound
from trainers.phases import Phases
from ray_apps.scheduler.states import ALLOWED, TERMINAL, JobState

metadata = MetaData()

jobs = Table(
    "jobs", metadata,
    Column("id", String(64), primary_key=True),
    Column("trainer", String(32), nullable=False),
    Column("params", JSON, nullable=False),
    Column("tenant", String(64), nullable=False, index=True),
    Column("priority", String(32), nullable=False),
    Column("state", String(16), nullable=False, index=True),
    Column("workers", Integer, nullable=False),
    Column("cpus_per_worker", Float, nullable=False),
    Column("gpus_per_worker", Float, nullable=False),
    Column("submitted_at", Float, nullable=False),
    Column("started_at", Float),
    Column("ended_at", Float),
    Column("attempt", Integer, nullable=False, default=0),
    Column("ray_submission_id", String(80)),
    Column("mlflow_run_id", String(64)),
    Column("message", Text, nullable=False, default=""),
    Column("updated_at", Float, nullable=False),
    # A Ray Tune search's settings (trainers.tune.SEARCH_DEFAULTS); null for a plain training job.
    Column("search", JSON(none_as_null=True)),
    Column("over_budget", Integer),  # 1: an admin let it past its tenant's budget
)

# An `Idempotency-Key` per tenant: a retried submit returns the job the first one made.
submit_keys = Table(
    "submit_keys", metadata,
    Column("tenant", String(64), primary_key=True),
    Column("key", String(128), primary_key=True),
    Column("job_id", String(64), ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    Column("request_sha256", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
)

# Model versions an admin allowed to be served although no job of the queue made their run.
served_allowances = Table(
    "served_allowances", metadata,
    Column("model", String(64), primary_key=True),
    Column("version", String(32), primary_key=True),
    Column("at", Float, nullable=False),
)

job_events = Table(
    "job_events", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("job_id", String(64), ForeignKey("jobs.id"), nullable=False, index=True),
    Column("at", Float, nullable=False),
    Column("from_state", String(16)),
    Column("to_state", String(16), nullable=False),
    Column("message", Text, nullable=False, default=""),
)


# One row per attempt that Ray ran: start and end as Ray measured them. A job's
# running time (what it is charged for) is the sum over its attempts.
job_attempts = Table(
    "job_attempts", metadata,
    Column("job_id", String(64), ForeignKey("jobs.id"), primary_key=True),
    Column("attempt", Integer, primary_key=True),
    Column("started_at", Float, nullable=False),
    Column("ended_at", Float),
)

# The metered cost of a finished job, frozen at the prices of the day it ended.
job_costs = Table(
    "job_costs", metadata,
    Column("job_id", String(64), ForeignKey("jobs.id"), primary_key=True),
    Column("seconds", Float, nullable=False),
    Column("cpu_usd", Float, nullable=False),
    Column("gpu_usd", Float, nullable=False),
    Column("memory_usd", Float, nullable=False),
    Column("usd_per_hour", Float, nullable=False),
    Column("metered_at", Float, nullable=False),
    Column("logged", Integer, nullable=False, default=0),  # written to the job's MLflow run yet?
)


# Where a finished job's last attempt spent its time (trainers.phases), for the status page.
job_phases = Table(
    "job_phases", metadata,
    Column("job_id", String(64), ForeignKey("jobs.id"), primary_key=True),
    Column("queued_s", Float, nullable=False),
    Column("starting_s", Float),
    Column("first_step_s", Float),
    Column("training_s", Float),
    Column("finishing_s", Float),
)


# A job's cost as forecast from past runs when it was admitted, kept to measure forecasts against
# the metered cost once the job ends (the forecast-error metric).
job_forecasts = Table(
    "job_forecasts", metadata,
    Column("job_id", String(64), ForeignKey("jobs.id"), primary_key=True),
    Column("at", Float, nullable=False),
    Column("total_usd", Float, nullable=False),
    Column("low_usd", Float),
    Column("high_usd", Float),
    Column("run_s_low", Float),     # its forecast run time: reservations and backfill
    Column("run_s_high", Float),
    Column("basis", String(16)),    # "history", or "price" (no past runs: its price x an assumed run time)
)


# Why each queued job waits, as the dispatcher's last plan said: what `queue why` answers. Rewritten
# only where it changed, and a job's row goes when it leaves the queue.
job_waits = Table(
    "job_waits", metadata,
    Column("job_id", String(64), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    Column("at", Float, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("reason", Text, nullable=False),
    Column("position", Integer, nullable=False),   # 1-based, among queued jobs of its class
    Column("of", Integer, nullable=False),
    Column("start_low", Float),                    # estimated start (epoch seconds); null: not known
    Column("start_mid", Float),
    Column("start_high", Float),
)


# Each preemption and the work it threw away: CPU- and GPU-seconds since the victim's last checkpoint.
job_preemptions = Table(
    "job_preemptions", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("job_id", String(64), ForeignKey("jobs.id"), nullable=False, index=True),
    Column("attempt", Integer, nullable=False),
    Column("at", Float, nullable=False),
    Column("cpu_s_lost", Float, nullable=False),
    Column("gpu_s_lost", Float, nullable=False),
    Column("drained", Integer, nullable=False),  # 1: it checkpointed on the drain request before it stopped
)


# What the worker groups ran, per hour: node-, CPU- and GPU-seconds, sampled by the dispatcher. On an
# autoscaling cluster idle nodes cost money too; the cost report sets this against what jobs used.
node_usage = Table(
    "node_usage", metadata,
    Column("group_name", String(64), primary_key=True),
    Column("hour", Float, primary_key=True),      # epoch seconds at the start of the hour
    Column("node_seconds", Float, nullable=False),
    Column("cpu_seconds", Float, nullable=False),
    Column("gpu_seconds", Float, nullable=False),
)


@dataclass(frozen=True)
class NodeUsage:
    group: str
    node_seconds: float
    cpu_seconds: float
    gpu_seconds: float


class UnknownJob(NotFound):
    pass


class InvalidTransition(Conflict):
    pass


class KeyReused(Conflict):
    """An idempotency key came back with a different request."""


@dataclass(frozen=True)
class JobRecord:
    id: str
    trainer: str
    params: dict[str, Any]
    tenant: str
    priority: str
    state: JobState
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    submitted_at: float
    started_at: float | None
    ended_at: float | None
    attempt: int
    ray_submission_id: str | None
    mlflow_run_id: str | None
    message: str
    updated_at: float
    search: dict[str, Any] | None = None  # a Ray Tune search's settings; None for a training job
    over_budget: int | None = None        # 1: an admin let it past its tenant's budget

    def waited_s(self, now: float) -> float:
        """Seconds from submission to its start; a job that ended without starting (rejected,
        cancelled while queued) stopped waiting when it ended."""
        if self.started_at is not None:
            end = self.started_at
        elif self.state.is_terminal():
            end = self.ended_at or self.updated_at
        else:
            end = now
        return max(0.0, end - self.submitted_at)

    @classmethod
    def from_row(cls, row) -> JobRecord:
        data = dict(row._mapping)
        data["state"] = JobState(data["state"])
        for key in ("params", "search"):
            if isinstance(data.get(key), str):
                data[key] = json.loads(data[key])
        return cls(**data)


@dataclass(frozen=True)
class Attempt:
    job_id: str
    attempt: int
    started_at: float
    ended_at: float | None


@dataclass(frozen=True)
class StoredCost:
    job_id: str
    seconds: float
    cpu_usd: float
    gpu_usd: float
    memory_usd: float
    usd_per_hour: float
    metered_at: float
    logged: bool


@dataclass(frozen=True)
class StoredForecast:
    usd: float
    usd_high: float | None
    run_s_low: float | None
    run_s_high: float | None
    basis: str | None


@dataclass(frozen=True)
class WaitRow:
    kind: str
    reason: str
    position: int
    of: int
    start_low: float | None
    start_mid: float | None
    start_high: float | None
    at: float = 0.0

    def same(self, other: WaitRow | None) -> bool:
        return other is not None and (self.kind, self.reason, self.position, self.of, self.start_low,
                                      self.start_mid, self.start_high) == \
            (other.kind, other.reason, other.position, other.of, other.start_low, other.start_mid, other.start_high)


@dataclass(frozen=True)
class JobEvent:
    job_id: str
    at: float
    from_state: str | None
    to_state: str
    message: str


def make_engine(url: str) -> Engine:
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    engine = create_engine(url, connect_args={"timeout": 30})

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_conn, _record):
        dbapi_conn.isolation_level = None  # let SQLAlchemy's BEGIN below open transactions
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin_immediate(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE")  # take the write lock up front: no upgrade deadlocks

    return engine


def add_missing_columns(engine: Engine) -> None:
    """Columns added to a table after a database was created (`create_all` makes only missing tables):
    added as nullable, so the rows already there read as before."""
    for table in metadata.sorted_tables:
        have = {c["name"] for c in inspect(engine).get_columns(table.name)}
        for column in table.columns:
            if column.name not in have:
                if not column.nullable:
                    raise RuntimeError(f"cannot add the non-null column {table.name}.{column.name} to an existing "
                                       "database")
                kind = column.type.compile(dialect=engine.dialect)
                try:
                    with engine.begin() as conn:
                        conn.exec_driver_sql(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}')
                except DBAPIError:  # another process opening the store added it first
                    if column.name not in {c["name"] for c in inspect(engine).get_columns(table.name)}:
                        raise


class ChangeWatch:
    """Tells when another connection has committed to a SQLite store (a submit, a cancel), from the
    database's own change counter (PRAGMA data_version): a cheap read, no polling of the tables."""

    def __init__(self, path: str):
        import sqlite3

        self._conn = sqlite3.connect(path, check_same_thread=False)
        self._seen = self._version()

    def _version(self) -> int:
        return self._conn.execute("PRAGMA data_version").fetchone()[0]

    def mark(self) -> None:
        """Take what was committed so far as seen (the watcher's own process's writes included)."""
        self._seen = self._version()

    def changed(self) -> bool:
        return self._version() != self._seen


class JobStore:
    def __init__(self, url: str):
        self.engine = make_engine(url)
        metadata.create_all(self.engine)
        add_missing_columns(self.engine)

    def change_watch(self) -> ChangeWatch | None:
        """A watch on other processes' commits; None where the database has no cheap counter (PostgreSQL)."""
        url = self.engine.url
        if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
            return None
        return ChangeWatch(url.database)

    def add(self, *, id: str, trainer: str, params: dict, tenant: str, priority: str, workers: int,
            cpus_per_worker: float, gpus_per_worker: float, state: JobState = JobState.QUEUED,
            message: str = "", now: float | None = None, idempotency: tuple[str, str] | None = None,
            search: dict | None = None) -> JobRecord:
        """Store a new job (a search: with its `search` settings). With `idempotency` (key, request hash),
        a key the tenant used before returns that job instead (KeyReused if it came with a different request)."""
        now = time.time() if now is None else now
        row = dict(id=id, trainer=trainer, params=params, tenant=tenant, priority=priority, state=state.value,
                   workers=workers, cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker,
                   submitted_at=now, attempt=0, message=message, updated_at=now,
                   ended_at=now if state.is_terminal() else None, search=search)
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(jobs).values(**row))
                conn.execute(insert(job_events).values(job_id=id, at=now, from_state=None, to_state=state.value,
                                                       message=message))
                if idempotency:
                    conn.execute(insert(submit_keys).values(tenant=tenant, key=idempotency[0], job_id=id,
                                                            request_sha256=idempotency[1], created_at=now))
        except IntegrityError:
            if idempotency and (first := self.job_for_key(tenant, *idempotency)):
                return first  # the key was used before (or by a concurrent retry)
            raise
        return self.get(id)

    def job_for_key(self, tenant: str, key: str, request_sha256: str) -> JobRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(submit_keys).where(submit_keys.c.tenant == tenant,
                                                         submit_keys.c.key == key)).first()
        if row is None:
            return None
        if row.request_sha256 != request_sha256:
            raise KeyReused(f"Idempotency-Key {key!r} was used for a different request (job {row.job_id})")
        return self.get(row.job_id)

    def submitted_since(self, tenant: str, since: float) -> list[float]:
        """Submission times of the tenant's jobs since `since` (its submit rate)."""
        with self.engine.connect() as conn:
            return [r.submitted_at for r in conn.execute(select(jobs.c.submitted_at).where(
                jobs.c.tenant == tenant, jobs.c.submitted_at >= since))]

    def prune_rejected(self, before: float) -> int:
        """Forget REJECTED requests that ended before `before` (they never ran and cost nothing)."""
        with self.engine.begin() as conn:
            ids = [r.id for r in conn.execute(select(jobs.c.id).where(
                jobs.c.state == JobState.REJECTED.value, jobs.c.ended_at < before))]
            if ids:
                conn.execute(delete(submit_keys).where(submit_keys.c.job_id.in_(ids)))
                conn.execute(delete(job_events).where(job_events.c.job_id.in_(ids)))
                conn.execute(delete(jobs).where(jobs.c.id.in_(ids)))
        return len(ids)

    def adopt(self, *, id: str, trainer: str, params: dict, tenant: str, priority: str, workers: int,
              cpus_per_worker: float, gpus_per_worker: float, ray_status: str, started_at: float | None,
              ended_at: float | None, mlflow_run_id: str | None, message: str, now: float | None = None) -> bool:
        """Record a job Ray runs (or ran) that the queue did not start, as its attempt 1 under Ray's own
        submission id. False if the id is known already (a concurrent dispatcher adopted it first)."""
        now = time.time() if now is None else now
        state = {"PENDING": JobState.STARTING, "RUNNING": JobState.RUNNING, "SUCCEEDED": JobState.SUCCEEDED,
                 "STOPPED": JobState.CANCELLED}.get(ray_status, JobState.FAILED)
        submitted = started_at or now
        row = dict(id=id, trainer=trainer, params=params, tenant=tenant, priority=priority, state=state.value,
                   workers=workers, cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker,
                   submitted_at=submitted, started_at=started_at, attempt=1, ray_submission_id=id,
                   mlflow_run_id=mlflow_run_id, message=message, updated_at=now,
                   ended_at=(ended_at or now) if state.is_terminal() else None)
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(jobs).values(**row))
                conn.execute(insert(job_events).values(job_id=id, at=now, from_state=None, to_state=state.value,
                                                       message=message))
                if started_at is not None:
                    conn.execute(insert(job_attempts).values(job_id=id, attempt=1, started_at=started_at,
                                                             ended_at=row["ended_at"] if state.is_terminal()
                                                             else None))
        except IntegrityError:
            return False
        return True

    def known_ids(self, ids: Iterable[str]) -> set[str]:
        """Which of `ids` the store knows, as a job id or an attempt's Ray submission id."""
        ids = list(ids)
        if not ids:
            return set()
        with self.engine.connect() as conn:
            rows = conn.execute(select(jobs.c.id, jobs.c.ray_submission_id).where(
                or_(jobs.c.id.in_(ids), jobs.c.ray_submission_id.in_(ids)))).all()
        return {v for row in rows for v in row if v in ids}

    def cancelled_submissions(self, submission_ids: Iterable[str]) -> set[str]:
        """Which of these Ray submissions belong to jobs the queue has cancelled."""
        ids = list(submission_ids)
        if not ids:
            return set()
        with self.engine.connect() as conn:
            rows = conn.execute(select(jobs.c.ray_submission_id).where(
                jobs.c.state == JobState.CANCELLED.value, jobs.c.ray_submission_id.in_(ids))).all()
        return {row.ray_submission_id for row in rows}

    def platform_run(self, mlflow_run_id: str) -> bool:
        """Whether a job of this queue (started or adopted by it) made this MLflow run."""
        with self.engine.connect() as conn:
            return conn.execute(select(jobs.c.id).where(jobs.c.mlflow_run_id == mlflow_run_id).limit(1)).first() \
                is not None

    def allow_serving(self, model: str, version: str, now: float | None = None) -> None:
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(served_allowances).values(model=model, version=version,
                                                              at=time.time() if now is None else now))
        except IntegrityError:
            pass  # allowed already

    def serving_allowed(self, model: str, version: str) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(select(served_allowances.c.at).where(
                served_allowances.c.model == model, served_allowances.c.version == version)).first() is not None

    def get(self, job_id: str) -> JobRecord:
        with self.engine.connect() as conn:
            row = conn.execute(select(jobs).where(jobs.c.id == job_id)).first()
        if row is None:
            raise UnknownJob(f"no job {job_id!r}", "job_id")
        return JobRecord.from_row(row)

    def list(self, *, states: Iterable[JobState] | None = None, tenant: str | None = None,
             limit: int | None = None, ended_after: float | None = None, newest_first: bool = False,
             before: JobRecord | None = None) -> list[JobRecord]:
        """Jobs in submission order (or newest first); `ended_after` keeps those still open or ended since
        then; `before` (newest first) continues a listing after that job."""
        if newest_first:
            query = select(jobs).order_by(jobs.c.submitted_at.desc(), jobs.c.id.desc())
            if before is not None:
                query = query.where(or_(jobs.c.submitted_at < before.submitted_at,
                                        and_(jobs.c.submitted_at == before.submitted_at, jobs.c.id < before.id)))
        else:
            query = select(jobs).order_by(jobs.c.submitted_at, jobs.c.id)
        if ended_after is not None:
            query = query.where(or_(jobs.c.ended_at.is_(None), jobs.c.ended_at >= ended_after))
        if states is not None:
            query = query.where(jobs.c.state.in_([s.value for s in states]))
        if tenant is not None:
            query = query.where(jobs.c.tenant == tenant)
        if limit is not None:
            query = query.limit(limit)
        with self.engine.connect() as conn:
            return [JobRecord.from_row(r) for r in conn.execute(query)]

    def transition(self, job_id: str, to: JobState, *, expect: JobState | None = None, message: str = "",
                   now: float | None = None, **fields: Any) -> JobRecord:
        """Move `job_id` to `to` (from `expect`, if given) and record the event, atomically.

        Raises UnknownJob, or InvalidTransition if the job is terminal, the move is
        not allowed, or the job is no longer in the state the caller expected.
        """
        now = time.time() if now is None else now
        with self.engine.begin() as conn:
            row = conn.execute(select(jobs.c.state).where(jobs.c.id == job_id)).first()
            if row is None:
                raise UnknownJob(f"no job {job_id!r}", "job_id")
            current = JobState(row.state)
            if expect is not None and current != expect:
                raise InvalidTransition(f"job {job_id} is {current.value}, not {expect.value}")
            if to not in ALLOWED.get(current, frozenset()):
                raise InvalidTransition(f"job {job_id} cannot go from {current.value} to {to.value}")
            values = {"state": to.value, "updated_at": now, "message": message, **fields}
            if to.is_terminal():
                values.setdefault("ended_at", now)
            done = conn.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.state == current.value)
                                .values(**values))
            if done.rowcount != 1:  # lost a race (only possible without BEGIN IMMEDIATE, e.g. PostgreSQL)
                raise InvalidTransition(f"job {job_id} changed state concurrently")
            conn.execute(insert(job_events).values(job_id=job_id, at=now, from_state=current.value,
                                                   to_state=to.value, message=message))
        return self.get(job_id)

    def events_into(self, state: JobState, since: float) -> list[JobEvent]:
        """Every change of any job into `state` since then, oldest first: one query for a report
        over many jobs."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(job_events).where(job_events.c.to_state == state.value,
                                                         job_events.c.at >= since).order_by(job_events.c.seq))
            return [JobEvent(r.job_id, r.at, r.from_state, r.to_state, r.message) for r in rows]

    def events(self, job_id: str) -> list[JobEvent]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(job_events).where(job_events.c.job_id == job_id)
                                .order_by(job_events.c.seq))
            return [JobEvent(r.job_id, r.at, r.from_state, r.to_state, r.message) for r in rows]

    # ------------------------------------------------------------------ attempts and costs

    def attempt_started(self, job_id: str, attempt: int, started_at: float) -> None:
        """Record when Ray started an attempt (idempotent: the first report stands)."""
        with self.engine.begin() as conn:
            if not conn.execute(select(job_attempts.c.attempt).where(
                    job_attempts.c.job_id == job_id, job_attempts.c.attempt == attempt)).first():
                conn.execute(insert(job_attempts).values(job_id=job_id, attempt=attempt, started_at=started_at))

    def attempt_ended(self, job_id: str, attempt: int, ended_at: float, started_at: float | None = None) -> None:
        """Close an attempt; opens it first if its start was never seen (a job shorter than a cycle)."""
        with self.engine.begin() as conn:
            row = conn.execute(select(job_attempts).where(
                job_attempts.c.job_id == job_id, job_attempts.c.attempt == attempt)).first()
            if row is None:
                conn.execute(insert(job_attempts).values(job_id=job_id, attempt=attempt,
                                                         started_at=min(started_at or ended_at, ended_at),
                                                         ended_at=ended_at))
            elif row.ended_at is None:
                conn.execute(update(job_attempts).where(job_attempts.c.job_id == job_id,
                                                        job_attempts.c.attempt == attempt)
                             .values(ended_at=max(ended_at, row.started_at)))

    def attempts(self, job_ids: Iterable[str]) -> dict[str, list[Attempt]]:
        ids = list(job_ids)
        out: dict[str, list[Attempt]] = {i: [] for i in ids}
        with self.engine.connect() as conn:
            for start in range(0, len(ids), 500):  # bounded IN lists
                rows = conn.execute(select(job_attempts).where(job_attempts.c.job_id.in_(ids[start:start + 500]))
                                    .order_by(job_attempts.c.job_id, job_attempts.c.attempt))
                for r in rows:
                    out[r.job_id].append(Attempt(r.job_id, r.attempt, r.started_at, r.ended_at))
        return out

    def save_cost(self, cost: StoredCost) -> None:
        with self.engine.begin() as conn:
            if conn.execute(select(job_costs.c.job_id).where(job_costs.c.job_id == cost.job_id)).first():
                return  # metered once; a second dispatcher's copy is the same figure
            conn.execute(insert(job_costs).values(**{**vars(cost), "logged": int(cost.logged)}))

    def save_forecast(self, job_id: str, at: float, total_usd: float, low_usd: float | None,
                      high_usd: float | None, *, run_s_low: float | None = None, run_s_high: float | None = None,
                      basis: str = "history") -> None:
        """The job's forecast before it starts (the first one stands)."""
        with self.engine.begin() as conn:
            if not conn.execute(select(job_forecasts.c.job_id).where(job_forecasts.c.job_id == job_id)).first():
                conn.execute(insert(job_forecasts).values(job_id=job_id, at=at, total_usd=total_usd, low_usd=low_usd,
                                                          high_usd=high_usd, run_s_low=run_s_low,
                                                          run_s_high=run_s_high, basis=basis))

    def forecasts(self, job_ids: Iterable[str]) -> dict[str, StoredForecast]:
        ids, out = list(job_ids), {}
        f = job_forecasts.c
        with self.engine.connect() as conn:
            for start in range(0, len(ids), 500):
                for r in conn.execute(select(job_forecasts).where(f.job_id.in_(ids[start:start + 500]))):
                    out[r.job_id] = StoredForecast(r.total_usd, r.high_usd, r.run_s_low, r.run_s_high, r.basis)
        return out

    # ------------------------------------------------------------------ scheduling visibility

    def publish_waits(self, waits: dict[str, WaitRow], previous: dict[str, WaitRow], now: float) -> None:
        """Write the rows that changed since `previous` (what the last call wrote); drop jobs gone."""
        changed = {i: w for i, w in waits.items() if not w.same(previous.get(i))}
        gone = [i for i in previous if i not in waits]
        if not changed and not gone:
            return
        with self.engine.begin() as conn:
            for start in range(0, len(gone), 500):
                conn.execute(delete(job_waits).where(job_waits.c.job_id.in_(gone[start:start + 500])))
            if changed:
                conn.execute(delete(job_waits).where(job_waits.c.job_id.in_(list(changed))))
                conn.execute(insert(job_waits), [{"job_id": i, **{**vars(w), "at": now}}
                                                 for i, w in changed.items()])

    def clear_waits(self) -> None:
        with self.engine.begin() as conn:
            conn.execute(delete(job_waits))

    def wait_of(self, job_id: str) -> WaitRow | None:
        with self.engine.connect() as conn:
            r = conn.execute(select(job_waits).where(job_waits.c.job_id == job_id)).first()
        if r is None:
            return None
        return WaitRow(r.kind, r.reason, r.position, r.of, r.start_low, r.start_mid, r.start_high, r.at)

    def record_preemption(self, job_id: str, attempt: int, at: float, cpu_s: float, gpu_s: float,
                          drained: bool) -> None:
        with self.engine.begin() as conn:
            conn.execute(insert(job_preemptions).values(job_id=job_id, attempt=attempt, at=at, cpu_s_lost=cpu_s,
                                                        gpu_s_lost=gpu_s, drained=int(drained)))

    def preemptions(self, since: float = 0.0) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(job_preemptions).where(job_preemptions.c.at >= since)
                                .order_by(job_preemptions.c.seq))
            return [dict(r._mapping) for r in rows]

    def usage_intervals(self, since: float, now: float) -> list[tuple[str, float, float, float, float]]:
        """(tenant, start, end, cpus, gpus) of every attempt that ran after `since` (an open one ends now)."""
        a, j = job_attempts.c, jobs.c
        query = (select(j.tenant, a.started_at, a.ended_at, j.workers, j.cpus_per_worker, j.gpus_per_worker)
                 .select_from(job_attempts.join(jobs, jobs.c.id == a.job_id))
                 .where(or_(a.ended_at.is_(None), a.ended_at >= since)))
        with self.engine.connect() as conn:
            return [(t, max(s, since), now if e is None else e, w * c, w * g)
                    for t, s, e, w, c, g in conn.execute(query)]

    def allow_over_budget(self, job_id: str) -> JobRecord:
        with self.engine.begin() as conn:
            done = conn.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.state == JobState.QUEUED.value)
                                .values(over_budget=1))
        if done.rowcount != 1:
            job = self.get(job_id)  # raises UnknownJob
            raise InvalidTransition(f"job {job_id} is {job.state.value}: only a queued job waits for budget")
        return self.get(job_id)

    def add_node_usage(self, group: str, at: float, nodes: int, cpus: float, gpus: float, seconds: float) -> None:
        """`nodes` of `group` (each with `cpus` and `gpus`) ran for `seconds` ending at `at`."""
        hour = at - at % 3600
        key = (node_usage.c.group_name == group) & (node_usage.c.hour == hour)
        add = {"node_seconds": nodes * seconds, "cpu_seconds": nodes * cpus * seconds,
               "gpu_seconds": nodes * gpus * seconds}
        with self.engine.begin() as conn:
            row = conn.execute(select(node_usage).where(key)).first()
            if row is None:
                conn.execute(insert(node_usage).values(group_name=group, hour=hour, **add))
            else:
                conn.execute(update(node_usage).where(key).values(
                    **{k: getattr(row, k) + v for k, v in add.items()}))

    def node_usage(self, since: float | None = None, until: float | None = None) -> list[NodeUsage]:
        """Per group, summed over the hours that start within [since, until)."""
        query = select(node_usage)
        if since is not None:
            query = query.where(node_usage.c.hour >= since - since % 3600)
        if until is not None:
            query = query.where(node_usage.c.hour < until)
        totals: dict[str, list[float]] = {}
        with self.engine.connect() as conn:
            for row in conn.execute(query):
                t = totals.setdefault(row.group_name, [0.0, 0.0, 0.0])
                t[0] += row.node_seconds
                t[1] += row.cpu_seconds
                t[2] += row.gpu_seconds
        return [NodeUsage(g, *t) for g, t in sorted(totals.items())]

    def mark_cost_logged(self, job_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(job_costs).where(job_costs.c.job_id == job_id).values(logged=1))

    def costs(self, job_ids: Iterable[str] | None = None, *, unlogged: bool = False) -> dict[str, StoredCost]:
        query = select(job_costs)
        if job_ids is not None:
            query = query.where(job_costs.c.job_id.in_(list(job_ids)))
        if unlogged:
            query = query.where(job_costs.c.logged == 0)
        with self.engine.connect() as conn:
            return {r.job_id: StoredCost(**{**dict(r._mapping), "logged": bool(r.logged)})
                    for r in conn.execute(query)}

    def save_phases(self, job_id: str, phases: Phases) -> None:
        with self.engine.begin() as conn:
            if not conn.execute(select(job_phases.c.job_id).where(job_phases.c.job_id == job_id)).first():
                conn.execute(insert(job_phases).values(job_id=job_id, **{f"{k}_s": v for k, v in vars(phases).items()}))

    def phases(self, job_ids: Iterable[str]) -> dict[str, Phases]:
        ids = list(job_ids)
        with self.engine.connect() as conn:
            rows = conn.execute(select(job_phases).where(job_phases.c.job_id.in_(ids))) if ids else []
            return {r.job_id: Phases(r.queued_s, r.starting_s, r.first_step_s, r.training_s, r.finishing_s)
                    for r in rows}

    def cost_generation(self) -> int:
        """Changes whenever a cost reaches MLflow: readers' caches of past runs key on it."""
        from sqlalchemy import func

        with self.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(job_costs).where(job_costs.c.logged == 1)).scalar()

    def unmetered(self, limit: int = 50) -> list[JobRecord]:
        """Finished jobs that ran (have an attempt) but carry no metered cost yet."""
        ran = select(job_attempts.c.job_id)
        metered = select(job_costs.c.job_id)
        query = (select(jobs).where(jobs.c.state.in_([s.value for s in TERMINAL]), jobs.c.id.in_(ran),
                                    jobs.c.id.not_in(metered)).order_by(jobs.c.ended_at).limit(limit))
        with self.engine.connect() as conn:
            return [JobRecord.from_row(r) for r in conn.execute(query)]

    # ------------------------------------------------------------------ aggregates for metrics

    def stats(self, month_start: float) -> StoreStats:
        """Aggregates for the platform's metrics, straight from the durable tables: counters built
        from them survive a restart of whatever exports them and never count a job twice."""
        from sqlalchemy import func

        j, e, c = jobs.c, job_events.c, job_costs.c
        with self.engine.connect() as conn:
            by_state = conn.execute(select(j.state, j.tenant, j.trainer, func.count())
                                    .group_by(j.state, j.tenant, j.trainer)).all()
            queued = conn.execute(select(j.priority, j.tenant, func.count(), func.min(j.submitted_at))
                                  .where(j.state == JobState.QUEUED.value).group_by(j.priority, j.tenant)).all()
            moves = conn.execute(select(e.to_state, j.tenant, j.priority, func.count())
                                 .select_from(job_events.join(jobs, jobs.c.id == e.job_id))
                                 .where(e.to_state.in_([JobState.STARTING.value, JobState.PREEMPTING.value]))
                                 .group_by(e.to_state, j.tenant, j.priority)).all()
            first_start = (select(e.job_id, func.min(e.at).label("at")).where(e.to_state == JobState.STARTING.value)
                           .group_by(e.job_id).subquery())
            waits = conn.execute(select(first_start.c.at - j.submitted_at)
                                 .select_from(first_start.join(jobs, jobs.c.id == first_start.c.job_id))).scalars()
            rejected = conn.execute(select(j.message, j.tenant, func.count()).where(j.state == JobState.REJECTED.value)
                                    .group_by(j.message, j.tenant)).all()
            spend = (c.cpu_usd + c.gpu_usd + c.memory_usd)
            gpu_hours = c.seconds * j.workers * j.gpus_per_worker / 3600.0
            costs = conn.execute(select(j.tenant, j.trainer, func.sum(spend), func.sum(gpu_hours))
                                 .select_from(job_costs.join(jobs, jobs.c.id == c.job_id))
                                 .group_by(j.tenant, j.trainer)).all()
            f = job_forecasts.c
            forecasts = conn.execute(select(j.trainer, f.total_usd, spend)
                                     .select_from(job_forecasts.join(job_costs, c.job_id == f.job_id)
                                                  .join(jobs, jobs.c.id == f.job_id))).all()
            month = conn.execute(select(j.tenant, func.sum(spend)).select_from(job_costs.join(jobs, jobs.c.id == c.job_id))
                                 .where(c.metered_at >= month_start).group_by(j.tenant)).all()
            p = job_preemptions.c
            lost = conn.execute(select(j.tenant, func.sum(p.cpu_s_lost), func.sum(p.gpu_s_lost))
                                .select_from(job_preemptions.join(jobs, jobs.c.id == p.job_id))
                                .group_by(j.tenant)).all()
            waits_by_kind = conn.execute(select(job_waits.c.kind, func.count()).group_by(job_waits.c.kind)).all()
        return StoreStats(
            by_state=[(s, t, tr, n) for s, t, tr, n in by_state],
            queued=[(p, t, n, oldest) for p, t, n, oldest in queued],
            admissions=[(t, p, n) for s, t, p, n in moves if s == JobState.STARTING.value],
            preemptions=[(t, p, n) for s, t, p, n in moves if s == JobState.PREEMPTING.value],
            waits=[max(0.0, w) for w in waits],
            rejected=[(m, t, n) for m, t, n in rejected],
            costs=[(t, tr, usd or 0.0, gh or 0.0) for t, tr, usd, gh in costs],
            month_spend={t: usd or 0.0 for t, usd in month},
            forecasts=[(tr, fc, actual) for tr, fc, actual in forecasts],
            preemption_lost=[(t, cpu or 0.0, gpu or 0.0) for t, cpu, gpu in lost],
            waiting_by_kind={k: n for k, n in waits_by_kind})


@dataclass(frozen=True)
class StoreStats:
    by_state: list[tuple[str, str, str, int]]           # state, tenant, trainer, jobs
    queued: list[tuple[str, str, int, float]]           # priority, tenant, jobs, oldest submitted_at
    admissions: list[tuple[str, str, int]]              # tenant, priority, admissions (one per attempt)
    preemptions: list[tuple[str, str, int]]             # tenant, priority, preemptions
    waits: list[float]                                  # submit -> first admission, per admitted job
    rejected: list[tuple[str, str, int]]                # message, tenant, jobs
    costs: list[tuple[str, str, float, float]]          # tenant, trainer, metered $, GPU-hours
    month_spend: dict[str, float]                       # tenant -> metered $ since month_start
    forecasts: list[tuple[str, float, float]] = ()      # trainer, forecast at admission, metered $
    preemption_lost: list[tuple[str, float, float]] = ()  # tenant, CPU-seconds, GPU-seconds preemptions threw away
    waiting_by_kind: dict[str, int] = field(default_factory=dict)  # queued jobs by why they wait
