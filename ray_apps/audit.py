"""Who did what: an append-only, hash-chained audit log in the platform's database.

    log = AuditLog.from_settings(settings)
    log.record(Actor("ana", "team-a", "rest", "10.0.0.7"), "job.cancel", "mnist-1a2b", {})
    log.verify()          # Verification(ok, records, bad_seq, reason, head_hash)

Every mutating action, from every front-end (cli, rest, agent, mcp, dispatcher), is one record:
time, actor (user, tenant, front-end, source address), action (`job.submit`, `job.cancel`,
`model.serve`, `model.promote`, `model.register`, `user.add`, `user.remove`, `memory.remember`,
`memory.forget`, `job.admit`, `job.preempt`, `job.requeue`), target,
parameters (secrets redacted), outcome (`ok` or `refused`) and the refusal's reason. A record's
`tenant` is the tenant the action was for (a job's tenant; the dispatcher's decisions carry the
job's), else the actor's: tenants read their own records, admins all.

Each record holds the hash of the one before: sha256 over the canonical JSON of its fields and
that hash, its `seq` included (assigned here: tail + 1), so `verify` names the first record that
was changed, removed or reordered. Appends read the tail and insert in one write transaction
(SQLite: BEGIN IMMEDIATE, see `store.make_engine`); elsewhere the primary key on `seq` refuses a
second writer's twin, which is retried. Removing records at the very end leaves no trace inside the
chain: `verify` reports the head's hash, which an operator may keep elsewhere to check later.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

from sqlalchemy import Column, Float, Integer, MetaData, String, Table, Text, insert, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

FRONT_ENDS = ("cli", "rest", "agent", "mcp", "dispatcher", "api")
GENESIS = "0" * 64  # the "previous hash" of the first record
REDACTED = "[redacted]"
SECRET_WORDS = ("token", "secret", "password", "authorization", "api_key", "apikey")
HASHED = ("seq", "at", "user", "tenant", "front_end", "source", "action", "target", "params", "outcome", "reason",
          "prev_hash")

metadata = MetaData()

audit_log = Table(
    "audit_log", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("at", Float, nullable=False, index=True),
    Column("user", String(128), nullable=False),
    Column("tenant", String(64), index=True),
    Column("front_end", String(16), nullable=False),
    Column("source", String(64)),
    Column("action", String(32), nullable=False),
    Column("target", String(128)),
    Column("params", Text, nullable=False),   # canonical JSON, hashed as stored
    Column("outcome", String(8), nullable=False),
    Column("reason", Text, nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
)


@dataclass(frozen=True)
class Actor:
    """Who acts: a user (or `system`), the tenant they act as, through which front-end, from where."""

    user: str
    tenant: str | None = None
    front_end: str = "cli"
    source: str | None = None  # the HTTP client's address, where there is one

    @classmethod
    def local(cls, front_end: str = "cli", tenant: str | None = None) -> Actor:
        """Someone at this machine: the OS user (the CLI, an MCP server a client launched)."""
        return cls(_os_user(), tenant, front_end)


SYSTEM = Actor("system", None, "dispatcher")


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        return "unknown"


def redact(value: Any) -> Any:
    """`value` with every entry whose key names a secret (token, password, Authorization...) hidden."""
    if isinstance(value, dict):
        return {k: REDACTED if any(w in str(k).lower() for w in SECRET_WORDS) else redact(v)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    return value


def canonical(data: Any) -> str:
    """The one JSON text of `data` that hashes are taken over: sorted keys, no spaces."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def record_hash(fields: dict[str, Any]) -> str:
    return hashlib.sha256(canonical({k: fields[k] for k in HASHED}).encode()).hexdigest()


@dataclass(frozen=True)
class Verification:
    ok: bool
    records: int
    bad_seq: int | None = None   # the first record that does not check out
    reason: str = ""
    head_hash: str = GENESIS     # the last good record's hash: keep it elsewhere to detect a cut tail

    def summary(self) -> str:
        if self.ok:
            return f"ok: {self.records} record(s), chain intact; head hash {self.head_hash}"
        return f"BROKEN at record {self.bad_seq}: {self.reason} ({self.records} record(s) checked before it)"


class AuditLog:
    def __init__(self, engine: Engine, *, reads: bool = False):
        self.engine = engine
        self.reads = reads  # audit reads too (Settings.audit.reads)
        metadata.create_all(engine)

    @classmethod
    def from_settings(cls, settings) -> AuditLog:
        from ray_apps.scheduler.api import store_url
        from ray_apps.scheduler.store import make_engine

        settings.data_dir.mkdir(parents=True, exist_ok=True)
        return cls(make_engine(store_url(settings)), reads=settings.audit.reads)

    # ------------------------------------------------------------------ writing

    def record(self, actor: Actor, action: str, target: str | None = None, params: dict | None = None, *,
               outcome: str = "ok", reason: str = "", tenant: str | None = None) -> dict[str, Any]:
        """Append one record; `tenant`: whom the action was for, when not the actor's own tenant."""
        fields = {"at": time.time(), "user": actor.user, "tenant": tenant or actor.tenant,
                  "front_end": actor.front_end, "source": actor.source, "action": action, "target": target,
                  "params": canonical(redact(params or {})), "outcome": outcome, "reason": reason[:2000]}
        for _ in range(20):  # only a writer without BEGIN IMMEDIATE (PostgreSQL) can lose the tail race
            try:
                return self._append(fields)
            except IntegrityError:
                continue
        raise RuntimeError("could not append to the audit log: the tail kept moving")

    def _append(self, fields: dict[str, Any]) -> dict[str, Any]:
        with self.engine.begin() as conn:
            tail = conn.execute(select(audit_log.c.seq, audit_log.c.hash)
                                .order_by(audit_log.c.seq.desc()).limit(1)).first()
            row = {**fields, "seq": tail.seq + 1 if tail else 1, "prev_hash": tail.hash if tail else GENESIS}
            row["hash"] = record_hash(row)
            conn.execute(insert(audit_log).values(**row))
        return _exported(row)

    def record_read(self, actor: Actor, action: str, target: str | None = None, params: dict | None = None) -> None:
        """A read, recorded only when the settings ask for reads to be audited."""
        if self.reads:
            self.record(actor, action, target, params)

    @contextlib.contextmanager
    def refusals(self, actor: Actor, action: str, target: str | None = None, params: dict | None = None, *,
                 tenant: str | None = None) -> Iterator[None]:
        """Record a refusal raised inside the block (a role or tenant check before the action), then
        re-raise it; nothing is recorded when the block passes (the action records itself)."""
        try:
            yield
        except Exception as exc:
            self.record(actor, action, target, params, outcome="refused", reason=str(exc), tenant=tenant)
            raise

    # ------------------------------------------------------------------ reading

    def export(self, since: float | None = None, tenant: str | None = None) -> list[dict[str, Any]]:
        """Records in order (from `since`, epoch seconds); with `tenant`, only that tenant's."""
        query = select(audit_log).order_by(audit_log.c.seq)
        if since is not None:
            query = query.where(audit_log.c.at >= since)
        if tenant is not None:
            query = query.where(audit_log.c.tenant == tenant)
        with self.engine.connect() as conn:
            return [_exported(dict(r._mapping)) for r in conn.execute(query)]

    def export_jsonl(self, since: float | None = None, tenant: str | None = None) -> Iterable[str]:
        for rec in self.export(since, tenant):
            yield json.dumps(rec, sort_keys=True) + "\n"

    def verify(self) -> Verification:
        """Walk the whole chain; the first record whose place or contents do not check out is named."""
        prev_seq, prev_hash, count = 0, GENESIS, 0
        columns = [audit_log.c[name] for name in (*HASHED, "hash")]
        with self.engine.connect() as conn:
            rows = conn.execute(select(*columns).order_by(audit_log.c.seq)).yield_per(5000)
            for row in rows:
                rec = dict(zip((*HASHED, "hash"), row))
                why = _broken(rec, prev_seq, prev_hash)
                if why:
                    return Verification(False, count, rec["seq"], why, prev_hash)
                prev_seq, prev_hash, count = rec["seq"], rec["hash"], count + 1
        return Verification(True, count, head_hash=prev_hash)


def _broken(rec: dict[str, Any], prev_seq: int, prev_hash: str) -> str | None:
    """Why `rec` cannot follow the record (prev_seq, prev_hash), or None when it does."""
    if rec["seq"] != prev_seq + 1:
        missing = f"{prev_seq + 1}" if rec["seq"] == prev_seq + 2 else f"{prev_seq + 1}-{rec['seq'] - 1}"
        return f"record(s) {missing} before it were removed"
    if rec["prev_hash"] != prev_hash:
        return (f"it does not follow record {prev_seq}: a record before it was removed, changed (its hash "
                "rewritten) or reordered")
    if record_hash(rec) != rec["hash"]:
        return "its contents do not match its hash: it was changed"
    return None


def _exported(row: dict[str, Any]) -> dict[str, Any]:
    """A record as export shows it: its parameters as an object."""
    return {**row, "params": json.loads(row["params"])}
