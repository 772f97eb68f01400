"""Spend over a period, grouped by tenant, trainer and day; budgets against it."""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field

from ray_apps.costs.meter import JobCost
from trainers.errors import Refused

GROUPS = ("tenant", "trainer", "day", "state")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class ReportError(Refused):
    pass


def parse_since(text: str | float | None, now: float | None = None) -> float | None:
    """'7d', '12h', '30m', '2w', an ISO date ('2026-11-01') or epoch seconds -> epoch seconds."""
    now = time.time() if now is None else now
    if text is None or text == "":
        return None
    if isinstance(text, (int, float)):
        if not math.isfinite(text):
            raise ReportError(f"since={text!r}: expected a finite time")
        return float(text)
    if len(text) > 40:
        raise ReportError(f"since: expected a duration like 7d or an ISO date, got {len(text)} characters")
    match = _DURATION.match(text)
    if match:
        seconds = float(match.group(1)) * _UNIT_S[match.group(2)]
        if not seconds <= 100 * 365 * 86400:
            raise ReportError(f"since={text!r}: at most 100 years back")
        return now - seconds
    try:
        from datetime import datetime, timezone

        parsed = datetime.fromisoformat(text)
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=timezone.utc)
        return parsed.timestamp()
    except ValueError:
        raise ReportError(f"since={text!r}: expected a duration like 7d, 12h, 30m, 2w or an ISO date like "
                          "2026-11-01") from None


def parse_groups(text: str | list[str] | None) -> tuple[str, ...]:
    names = [g.strip() for g in (text.split(",") if isinstance(text, str) else text or []) if g.strip()]
    unknown = [g for g in names if g not in GROUPS]
    if unknown:
        raise ReportError(f"cannot group by {', '.join(unknown)}; choose from {', '.join(GROUPS)}")
    return tuple(names) or ("tenant", "trainer")


@dataclass
class ReportRow:
    group: dict[str, str]
    jobs: int = 0
    seconds: float = 0.0
    cpu_core_hours: float = 0.0
    gpu_hours: float = 0.0
    cpu_usd: float = 0.0
    gpu_usd: float = 0.0
    memory_usd: float = 0.0
    total_usd: float = 0.0
    live_jobs: int = 0

    def add(self, cost: JobCost) -> None:
        self.jobs += 1
        self.live_jobs += int(cost.live)
        self.seconds += cost.seconds
        self.cpu_core_hours += cost.cpu_core_hours
        self.gpu_hours += cost.gpu_hours
        self.cpu_usd += cost.cpu_usd
        self.gpu_usd += cost.gpu_usd
        self.memory_usd += cost.memory_usd
        self.total_usd += cost.total_usd


@dataclass
class CostReport:
    since: float | None
    until: float
    group_by: tuple[str, ...]
    rows: list[ReportRow] = field(default_factory=list)
    total: ReportRow = field(default_factory=lambda: ReportRow({}))
    # What the worker groups ran in the period against what the jobs used (empty: no groups).
    nodes: list[dict] = field(default_factory=list)
    cpu_utilisation: float | None = None
    gpu_utilisation: float | None = None

    def set_node_usage(self, usage: list) -> None:
        """`usage`: the store's NodeUsage per group; utilisation = the jobs' CPU-/GPU-hours over the
        groups' (whoever's jobs they were: idle nodes are the cluster's cost)."""
        self.nodes = [{"group": u.group, "node_hours": u.node_seconds / 3600, "cpu_hours": u.cpu_seconds / 3600,
                       "gpu_hours": u.gpu_seconds / 3600} for u in usage]
        cpu = sum(n["cpu_hours"] for n in self.nodes)
        gpu = sum(n["gpu_hours"] for n in self.nodes)
        self.cpu_utilisation = self.total.cpu_core_hours / cpu if cpu else None
        self.gpu_utilisation = self.total.gpu_hours / gpu if gpu else None

    def as_dict(self) -> dict:
        return {"since": self.since, "until": self.until, "group_by": list(self.group_by),
                "rows": [vars(r) for r in self.rows], "total": vars(self.total), "nodes": self.nodes,
                "cpu_utilisation": self.cpu_utilisation, "gpu_utilisation": self.gpu_utilisation}


def _key(cost: JobCost, name: str) -> str:
    if name == "day":
        return time.strftime("%Y-%m-%d", time.gmtime(cost.ended_at)) if cost.ended_at else "running"
    return str(getattr(cost, name))


def build_report(costs: list[JobCost], *, since: float | None, until: float,
                 group_by: tuple[str, ...]) -> CostReport:
    """Rows by group, biggest spend first; jobs that never ran (no cost) are left out."""
    report = CostReport(since=since, until=until, group_by=group_by)
    rows: dict[tuple, ReportRow] = {}
    for cost in costs:
        if cost.seconds <= 0:
            continue
        key = tuple(_key(cost, g) for g in group_by)
        rows.setdefault(key, ReportRow(dict(zip(group_by, key)))).add(cost)
        report.total.add(cost)
    report.rows = sorted(rows.values(), key=lambda r: (-r.total_usd, tuple(r.group.values())))
    return report


@dataclass
class BudgetStatus:
    tenant: str | None
    budget_usd: float
    since: float | None
    spent_usd: float            # finished jobs + running jobs so far
    committed_usd: float        # forecast remaining spend of running jobs
    queued_usd: float           # forecast of queued jobs, where history allows
    unforecast_jobs: int        # queued/running jobs with no forecast
    notes: list[str] = field(default_factory=list)

    @property
    def remaining_usd(self) -> float:
        return self.budget_usd - self.spent_usd - self.committed_usd - self.queued_usd

    @property
    def status(self) -> str:
        if self.spent_usd > self.budget_usd:
            return "over"
        return "at_risk" if self.remaining_usd < 0 else "ok"

    def as_dict(self) -> dict:
        return {**vars(self), "remaining_usd": self.remaining_usd, "status": self.status}
