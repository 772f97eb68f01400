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


class QuotaSpec(_Strict):
    cpus: float = Field(math.inf, ge=0)
    gpus: float = Field(math.inf, ge=0)
    budget_usd: float | None = Field(None, gt=0)  # per calendar month; checked, not enforced


class QueueConfig(_Strict):
    priorities: dict[str, ClassSpec] = {"high": ClassSpec(rank=2, preempt_after_s=30),
                                        "normal": ClassSpec(rank=1), "low": ClassSpec(rank=0)}
    default_priority: str = "normal"
    aging_s: float = Field(1800, gt=0)
    tenants: dict[str, QuotaSpec] = {}
    default_quota: QuotaSpec = QuotaSpec()
    default_tenant: str = "default"
    poll_s: float = Field(1.0, gt=0, le=60)

    @model_validator(mode="after")
    def _default_priority_exists(self) -> QueueConfig:
        if self.default_priority not in self.priorities:
            raise ValueError(f"default_priority {self.default_priority!r} is not one of the priorities "
                             f"({', '.join(self.priorities)})")
        return self

    def policy(self) -> PolicyConfig:
        return PolicyConfig(
            classes={n: PriorityClass(n, c.rank, c.preempt_after_s) for n, c in self.priorities.items()},
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
