"""`configs/queue.yaml`: priority classes, tenants' quotas, cohorts, fair share and budgets (capacity comes from
Ray and the topology)."""

from __future__ import annotations

import math
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ray_apps.config import CONFIG_DIR, SettingsError
from ray_apps.scheduler.policy import Budget, FairShare, PolicyConfig, PriorityClass, Quota


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClassSpec(_Strict):
    rank: int
    preempt_after_s: float | None = Field(None, ge=0)
    preempts_other_tenants: bool = False  # else only the same tenant's lower-class jobs are stopped
    min_runtime_s: float = Field(0, ge=0)  # a job of this class is never preempted sooner after it starts


class Limit(_Strict):
    cpus: float = Field(math.inf, ge=0)
    gpus: float = Field(math.inf, ge=0)


class QuotaSpec(_Strict):
    cpus: float = Field(math.inf, ge=0)
    gpus: float = Field(math.inf, ge=0)
    cohort: str | None = Field(None, min_length=1, max_length=64)
    borrow: Limit = Limit()   # how far past cpus/gpus it may go on its cohort's unused quota
    lend: Limit = Limit()     # how much of its unused quota others of its cohort may use
    weight: float = Field(1.0, gt=0)  # fair share relative to other tenants
    budget_usd: float | None = Field(None, gt=0)   # per calendar month, enforced at admission
    gpu_hours: float | None = Field(None, gt=0)    # per `budget_window_days`, enforced at admission
    priorities: list[str] | None = None  # the classes this tenant may use; None: all

    def quota(self) -> Quota:
        return Quota(self.cpus, self.gpus, self.cohort, self.borrow.cpus, self.borrow.gpus, self.lend.cpus,
                     self.lend.gpus, self.weight)


class FairShareSpec(_Strict):
    half_life_s: float = Field(7 * 86400, gt=0)   # past usage counts half after this long
    gpu_weight: float = Field(8.0, ge=0)          # a GPU-second counts as this many CPU-seconds


class PreemptionSpec(_Strict):
    drain_grace_s: float = Field(60, ge=0)   # after a drain request, the victim is stopped this much later
    reclaim_after_s: float = Field(30, ge=0)  # a job within its nominal quota waits this long to reclaim


class QueueConfig(_Strict):
    priorities: dict[str, ClassSpec] = {"high": ClassSpec(rank=2, preempt_after_s=30),
                                        "normal": ClassSpec(rank=1), "low": ClassSpec(rank=0)}
    default_priority: str = "normal"
    aging_s: float = Field(1800, gt=0)
    tenants: dict[str, QuotaSpec] = {}
    default_quota: QuotaSpec = QuotaSpec()
    default_tenant: str = "default"
    poll_s: float = Field(1.0, gt=0, le=60)
    # Submissions a tenant may make per minute (None: no limit); more answer 429 with Retry-After.
    submit_rate_per_minute: int | None = Field(None, ge=1)
    # How long a REJECTED request (it never ran, costs nothing) is kept for `queue show`.
    rejected_retention_s: float = Field(7 * 86400, gt=0)
    fair_share: FairShareSpec = FairShareSpec()
    preemption: PreemptionSpec = PreemptionSpec()
    # Jobs in Ray at once on this cluster (each holds a driver and a supervisor on the head); None: no cap.
    max_running_jobs: int | None = Field(None, ge=1)
    budget_window_days: float = Field(30, gt=0)  # the window of tenants' `gpu_hours`
    # A job of a budgeted tenant with no past runs to forecast from is counted as running this long.
    unforecast_run_s: float = Field(3600, gt=0)

    @model_validator(mode="after")
    def _default_priority_exists(self) -> QueueConfig:
        if self.default_priority not in self.priorities:
            raise ValueError(f"default_priority {self.default_priority!r} is not one of the priorities "
                             f"({', '.join(self.priorities)})")
        for tenant, quota in [*self.tenants.items(), ("default_quota", self.default_quota)]:
            unknown = sorted(set(quota.priorities or []) - set(self.priorities))
            if unknown:
                raise ValueError(f"{tenant}: unknown priorities {', '.join(unknown)} "
                                 f"(known: {', '.join(self.priorities)})")
        return self

    def allowed_priorities(self, tenant: str) -> list[str]:
        quota = self.tenants.get(tenant, self.default_quota)
        return list(self.priorities) if quota.priorities is None else quota.priorities

    def policy(self) -> PolicyConfig:
        return PolicyConfig(
            classes={n: PriorityClass(n, c.rank, c.preempt_after_s, c.preempts_other_tenants, c.min_runtime_s)
                     for n, c in self.priorities.items()},
            quotas={t: q.quota() for t, q in self.tenants.items()},
            default_quota=self.default_quota.quota(), aging_s=self.aging_s,
            fair=FairShare(self.fair_share.half_life_s, self.fair_share.gpu_weight),
            budgets={t: Budget(q.budget_usd, q.gpu_hours) for t, q in self.tenants.items()
                     if q.budget_usd is not None or q.gpu_hours is not None},
            max_running_jobs=self.max_running_jobs, reclaim_after_s=self.preemption.reclaim_after_s,
            default_budget=(Budget(self.default_quota.budget_usd, self.default_quota.gpu_hours)
                            if self.default_quota.budget_usd or self.default_quota.gpu_hours else None))

    def budget_usd(self, tenant: str | None) -> float | None:
        quota = self.tenants.get(tenant, self.default_quota) if tenant else None
        return quota.budget_usd if quota else None


def load_queue_config(path: str | Path | None = None) -> QueueConfig:
    path = Path(path or CONFIG_DIR / "queue.yaml")
    try:
        raw = yaml.safe_load(path.read_text()) if path.exists() else {}
    except yaml.YAMLError as exc:
        raise SettingsError(f"{path}: not valid YAML ({exc}).") from None
    try:
        return QueueConfig(**(raw or {}))
    except ValidationError as exc:
        lines = [f"invalid queue settings in {path}:"]
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"]) or "(file)"
            lines.append(f"  {field}: {err['msg']}. To fix: correct `{field}` in {path.name}.")
        raise SettingsError("\n".join(lines)) from None
