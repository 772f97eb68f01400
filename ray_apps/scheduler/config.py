"""`configs/queue.yaml`: priority classes and tenants' quotas (capacity comes from Ray and the topology)."""

from __future__ import annotations

import math
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ray_apps.config import CONFIG_DIR, SettingsError
from ray_apps.scheduler.policy import PolicyConfig, PriorityClass, Quota


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClassSpec(_Strict):
    rank: int
    preempt_after_s: float | None = Field(None, ge=0)
    preempts_other_tenants: bool = False  # else only the same tenant's lower-class jobs are stopped


class QuotaSpec(_Strict):
    cpus: float = Field(math.inf, ge=0)
    gpus: float = Field(math.inf, ge=0)
    budget_usd: float | None = Field(None, gt=0)  # per calendar month; checked, not enforced
    priorities: list[str] | None = None  # the classes this tenant may use; None: all


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
            classes={n: PriorityClass(n, c.rank, c.preempt_after_s, c.preempts_other_tenants)
                     for n, c in self.priorities.items()},
            quotas={t: Quota(q.cpus, q.gpus) for t, q in self.tenants.items()},
            default_quota=Quota(self.default_quota.cpus, self.default_quota.gpus), aging_s=self.aging_s)

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
