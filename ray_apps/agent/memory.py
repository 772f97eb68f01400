"""The agent's long-term memory, per tenant, on LangGraph's store (not the per-thread checkpointer).

Namespaces are ("tenant", <tenant>, <kind>), one per tenant and kind:
- outcomes: one item per finished job (keyed by its id): trainer, params, main metric, cost, how
  it ended; written by the dispatcher when it sees the job end (`OutcomeRecorder`).
- failures: one item per failure fingerprint (trainer, error type, the first distinctive log line
  with numbers, ids, paths and hex replaced), with a count and the jobs that had it.
- notes: what a user told the agent to remember.
Every item carries `job_ids` and `run_ids` (MLflow): the evidence an answer cites. A namespace
keeps at most `max_items` items (setting `agent.memory_items`); past it the least recently used
(written or recalled) go. Reads take a tenant, or None for every tenant (admins, local mode).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any, Iterable

from trainers.driver import result_of
from trainers.errors import NotFound
from trainers.specs import TRAINERS, router_phrases, router_words

log = logging.getLogger("oppen.agent.memory")

KINDS = ("notes", "outcomes", "failures")  # the order a recall of everything answers in
MAX_IDS = 20          # evidence ids a fingerprint keeps: the newest
MAX_LINE = 200        # a fingerprint's normalised line
MAX_SCAN = 1000       # characters of a log line looked at
LOG_LINES = 400       # lines of a finished job's log read for its result and error
EVERY_ITEM = 100_000  # a search limit above any bound (agent.memory_items is at most this)


def namespace(tenant: str, kind: str) -> tuple[str, str, str]:
    # A namespace label may not contain "."; a tenant name may.
    return ("tenant", tenant.replace("%", "%25").replace(".", "%2E"), kind)


# ---------------------------------------------------------------------- failure fingerprints

_PREFIXES = [
    re.compile(r"^\((?:[^()]{0,120})\)\s*"),                                   # Ray's "(RayTrainWorker pid=.., ip=..)"
    re.compile(r"^\d{4}-\d\d-\d\d[ T][\d:.,]+\s*(?:[A-Z]+\s+)?"),              # a timestamp and log level
]
_VARIABLE = [  # most specific first: a job id holds numbers, a path holds hex
    (re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b", re.I), "<id>"),
    (re.compile(r"\b[a-z][\w-]*?-\d{8}-\d{6}-[0-9a-f]{6}(?:-r\d+)?\b"), "<job>"),
    (re.compile(r"\b[a-z][\w+.-]*://[^\s,;)'\"]+", re.I), "<url>"),
    (re.compile(r"(?<![\w.<>-])(?:~|\.{1,2})?/[\w.@+-]+(?:/[\w.@+-]*)*"), "<path>"),
    (re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}(?::\d+)?\b"), "<addr>"),
    (re.compile(r"\b0x[0-9a-f]+\b", re.I), "<hex>"),
    (re.compile(r"\b(?=[0-9a-f]{0,64}\d)(?=[0-9a-f]{0,64}[a-f])[0-9a-f]{6,64}\b"), "<hex>"),
    (re.compile(r"\d+(?:\.\d+)?(?:e[-+]?\d+)?", re.I), "<n>"),
]
_DRIVER = re.compile(r"error: training failed: ([\w.]+): ?(.*)")  # trainers.driver's last word on a failed fit
_EXCEPTION = re.compile(r"^(?:[\w.]+\.)?([A-Z]\w*(?:Error|Exception|Exit|Interrupt|Killed|Failure|Fault))"
                        r"(?:\([\w.]*\))?: ?(.*)$")
_HINT = re.compile(r"\b(?:error|failed|failure|killed|out of memory|oom)\b", re.I)


def _strip(line: str) -> str:
    line = line.strip()[:MAX_SCAN]
    for prefix in _PREFIXES:
        line = prefix.sub("", line, count=1)
    return line


def normalise(line: str) -> str:
    """The line with what differs between two runs of the same error replaced: numbers, ids, paths, hex."""
    line = _strip(line)
    for pattern, token in _VARIABLE:
        line = pattern.sub(token, line)
    return " ".join(line.split())[:MAX_LINE]


def first_error(lines: Iterable[str], message: str = "") -> tuple[str, str]:
    """The error's type and its first distinctive line: the driver's own report of a failed fit, else
    the first exception line, else the first line that says it failed, else Ray's message."""
    lines = [_strip(line) for line in lines if line.strip()]
    for line in lines:
        m = _DRIVER.search(line)
        if m:
            return m.group(1).rsplit(".", 1)[-1], f"{m.group(1)}: {m.group(2)}"
    for line in lines:
        m = _EXCEPTION.match(line)
        if m:
            return m.group(1), line
    for line in lines:
        if _HINT.search(line) and not line.startswith("Traceback"):
            return "Error", line
    text = _strip(message.splitlines()[0]) if message.strip() else "no log line"
    return ("Stopped" if "stopped" in text else "Error"), text


def fingerprint(trainer: str, lines: Iterable[str], message: str = "") -> dict[str, str]:
    error_type, line = first_error(lines, message)
    normal = normalise(line)
    digest = hashlib.sha256(f"{trainer}|{error_type}|{normal}".encode()).hexdigest()[:12]
    return {"id": f"fail-{digest}", "error_type": error_type, "line": normal, "example": line[:300]}


def trainer_named(text: str) -> str | None:
    """The one user trainer a note names ("mnist", "digits", "the language model"), if any."""
    low = text.lower()
    words, phrases = router_words(), router_phrases()
    named = {words[w] for w in re.findall(r"[a-z0-9]+", low) if w in words}
    named |= {name for phrase, name in phrases.items() if phrase in low}
    return named.pop() if len(named) == 1 else None


# ---------------------------------------------------------------------- the memory

def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z0-9_.]+", text.lower()) if len(w) >= 3}


def _searchable(item: dict) -> str:
    return " ".join(str(item.get(k, "")) for k in ("text", "line", "example", "error_type", "trainer", "message",
                                                   "state")) + " " + json.dumps(item.get("params") or {})


def _better(trainer: str, a: float, b: float) -> bool:
    higher = getattr(TRAINERS.get(trainer), "val_higher_is_better", True)
    return a > b if higher else a < b


class Memory:
    def __init__(self, store, max_items: int = 200):
        self.store = store
        self.max_items = max(1, max_items)

    @classmethod
    def open(cls, path: Path, max_items: int = 200) -> Memory:
        """A SQLite store file, shared by the agent and the dispatcher's processes (WAL)."""
        from langgraph.store.sqlite import SqliteStore

        path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit: the store opens its own transactions; timeout: wait out another process's write.
        conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=10)
        conn.execute("PRAGMA journal_mode=WAL")
        store = SqliteStore(conn)
        store.setup()
        return cls(store, max_items)

    @classmethod
    def from_settings(cls, settings) -> Memory:
        return cls.open(settings.data_dir / "agent" / "memory.db", settings.agent.memory_items)

    # ------------------------------------------------------------------ writes

    def record_outcome(self, job, lines: list[str], cost_usd: float | None = None) -> dict:
        """A finished job's outcome, and for a failure its fingerprint counted; idempotent per job."""
        now = time.time()
        result = result_of(lines)
        metric = getattr(TRAINERS.get(job.trainer), "val_metric", None)
        value = result.get(metric)
        if value is None and isinstance(result.get("best"), dict):  # a search: its best trial
            value = result["best"].get(metric)
        if cost_usd is None and isinstance(result.get("cost_usd"), (int, float)):
            cost_usd = result["cost_usd"]
        run_id = job.mlflow_run_id or result.get("mlflow_run_id")
        outcome = {"kind": "outcome", "tenant": job.tenant, "trainer": job.trainer, "params": job.params,
                   "search": bool(job.search), "state": job.state.value, "message": (job.message or "")[:300],
                   "metric": metric, "value": value if isinstance(value, (int, float)) else None,
                   "cost_usd": cost_usd, "job_ids": [job.id], "run_ids": [run_id] if run_id else [],
                   "at": job.ended_at or now, "used_at": now, "uses": 0}
        self._put(job.tenant, "outcomes", job.id, outcome)
        if job.state.value == "FAILED":
            self._count_failure(job, lines, run_id, outcome["at"], now)
        return {"id": job.id, **outcome}

    def _count_failure(self, job, lines: list[str], run_id: str | None, at: float, now: float) -> None:
        fp = fingerprint(job.trainer, lines, job.message or "")
        ns = namespace(job.tenant, "failures")
        old = self.store.get(ns, fp["id"])
        item = dict(old.value) if old else {
            "kind": "failure", "tenant": job.tenant, "trainer": job.trainer, "error_type": fp["error_type"],
            "line": fp["line"], "example": fp["example"], "count": 0, "job_ids": [], "run_ids": [], "first_at": at}
        if job.id not in item["job_ids"]:  # a job counts once, however often it is recorded
            item["count"] += 1
            item["job_ids"] = [*item["job_ids"], job.id][-MAX_IDS:]
            if run_id:
                item["run_ids"] = [*item["run_ids"], run_id][-MAX_IDS:]
        item.update(last_at=max(at, item.get("last_at", at)), used_at=now, uses=item.get("uses", 0))
        self._put(job.tenant, "failures", fp["id"], item)

    def remember(self, tenant: str, text: str, *, trainer: str | None = None, job_ids: list[str] = (),
                 run_ids: list[str] = ()) -> dict:
        now = time.time()
        key = f"note-{uuid.uuid4().hex[:8]}"
        note = {"kind": "note", "tenant": tenant, "text": text.strip(), "trainer": trainer or trainer_named(text),
                "job_ids": list(job_ids), "run_ids": [r for r in run_ids if r], "at": now, "used_at": now, "uses": 0}
        self._put(tenant, "notes", key, note)
        return {"id": key, **note}

    def forget(self, tenant: str | None, item_id: str) -> dict:
        for kind in KINDS:
            for ns in self._namespaces(tenant, kind):
                item = self.store.get(ns, item_id)
                if item is not None:
                    self.store.delete(ns, item_id)
                    return {"id": item_id, **item.value}
        raise NotFound(f"I remember nothing called {item_id!r}" + (" of yours" if tenant else "") +
                       "; recall shows the ids", "item_id")

    def _put(self, tenant: str, kind: str, key: str, value: dict) -> None:
        ns = namespace(tenant, kind)
        self.store.put(ns, key, value, index=False)
        self._bound(ns)

    def _bound(self, ns: tuple[str, ...]) -> None:
        items = self.store.search(ns, limit=EVERY_ITEM)
        excess = len(items) - self.max_items
        if excess > 0:
            for old in sorted(items, key=lambda i: (i.value.get("used_at", 0), i.key))[:excess]:
                self.store.delete(ns, old.key)

    # ------------------------------------------------------------------ reads

    def _namespaces(self, tenant: str | None, kind: str) -> list[tuple[str, ...]]:
        if tenant is not None:
            return [namespace(tenant, kind)]
        return [ns for ns in self.store.list_namespaces(prefix=("tenant",), max_depth=3, limit=EVERY_ITEM)
                if len(ns) == 3 and ns[2] == kind]

    def items(self, tenant: str | None, kind: str) -> list[dict]:
        """Every item of a kind, of one tenant or (None) of all, each with its id."""
        return [{"id": i.key, **i.value} for ns in self._namespaces(tenant, kind)
                for i in self.store.search(ns, limit=EVERY_ITEM)]

    def recall(self, tenant: str | None, *, kind: str | None = None, trainer: str | None = None,
               text: str | None = None, job_id: str | None = None, limit: int = 5) -> dict:
        """The items that match, per kind: notes newest first, outcomes newest first (with the best
        succeeded one by the trainer's metric), failures most frequent first. Recalled items count
        as used: they are the last to be evicted."""
        out: dict[str, Any] = {"kind": kind, "trainer": trainer, "text": text, "job_id": job_id, "items": [],
                               "best": None}
        query = _words(text or "")
        for k in ([kind] if kind else KINDS):
            found = [i for i in self.items(tenant, k) if trainer in (None, i.get("trainer"))
                     and (job_id is None or job_id in i.get("job_ids", []))]
            if query:
                scored = [(len(query & _words(_searchable(i))), i) for i in found]
                found = [i for score, i in sorted(scored, key=lambda s: -s[0]) if score]
            ranked = _ranked(k, found, by_score=bool(query))
            out["items"] += ranked[:limit]
            if k == "outcomes" and trainer:
                out["best"] = _best(trainer, found)
        self._touch([*out["items"], *([out["best"]] if out["best"] else [])])
        if out["items"]:
            out["memory_id"] = out["items"][0]["id"]  # what "forget that" means next turn
        return out

    def _touch(self, items: list[dict]) -> None:
        now, seen = time.time(), set()
        for item in items:
            if item["id"] in seen:
                continue
            seen.add(item["id"])
            kind = {"note": "notes", "outcome": "outcomes", "failure": "failures"}[item["kind"]]
            ns = namespace(item["tenant"], kind)
            current = self.store.get(ns, item["id"])  # afresh: the dispatcher may have counted meanwhile
            if current is not None:
                value = dict(current.value)
                value.update(used_at=now, uses=value.get("uses", 0) + 1)
                self.store.put(ns, item["id"], value, index=False)


def _ranked(kind: str, items: list[dict], by_score: bool) -> list[dict]:
    if by_score:  # already ordered by how many of the words they hold
        return items
    if kind == "failures":
        return sorted(items, key=lambda i: (-i.get("count", 0), -i.get("last_at", 0)))
    return sorted(items, key=lambda i: -i.get("at", 0))


def _best(trainer: str, outcomes: list[dict]) -> dict | None:
    best = None
    for item in outcomes:
        if item.get("state") == "SUCCEEDED" and isinstance(item.get("value"), (int, float)):
            if best is None or _better(trainer, item["value"], best["value"]):
                best = item
    return best


class OutcomeRecorder:
    """The dispatcher's hook: a job it saw end goes to its tenant's memory. Never raises: memory
    is an aid, the dispatcher's cycle must not depend on it."""

    def __init__(self, queue, meter=None, memory: Memory | None = None):
        self.queue = queue
        self.meter = meter
        self._memory = memory

    def job_ended(self, job_id: str, client) -> None:
        try:
            job = self.queue.store.get(job_id)
            self.memory.record_outcome(job, self._log_tail(job, client), self._cost(job))
        except Exception as exc:  # noqa: BLE001 - see the class docstring
            log.warning("could not record %s in the agent's memory: %s", job_id, exc)

    @property
    def memory(self) -> Memory:
        if self._memory is None:  # opened on the first job end, not at the dispatcher's start
            self._memory = Memory.from_settings(self.queue.settings)
        return self._memory

    @staticmethod
    def _log_tail(job, client) -> list[str]:
        if not job.ray_submission_id:
            return []
        try:
            return client.get_job_logs(job.ray_submission_id).splitlines()[-LOG_LINES:]
        except Exception as exc:  # noqa: BLE001 - Ray's logs gone: the outcome stands with the job's message
            log.debug("no logs for %s: %s", job.id, exc)
            return []

    def _cost(self, job) -> float | None:
        if self.meter is None:
            return None
        try:
            return self.meter.cost_of(job).total_usd
        except Exception as exc:  # noqa: BLE001 - unpriced: the outcome is still worth keeping
            log.debug("no cost for %s: %s", job.id, exc)
            return None
