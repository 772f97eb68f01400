"""The platform's own metrics in Prometheus format: queue, admissions, preemptions, rejections,
final states, waits, cost and GPU-hours, budgets, and the dispatcher's heartbeat.

Computed at scrape time from the queue's durable store (JobStore.stats), not from in-process
counters: a restarted dispatcher exports the same totals, and no job is counted twice. The
dispatcher serves them (`metrics_port` in the settings); Ray exports its own (and Serve's) on
`ray.metrics_export_port`. configs/prometheus/ scrapes both.
"""
from __future__ import annotations

import calendar
import json
import re
import time
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

# Seconds from submission to first admission; a queue's waits run from sub-second to hours.
WAIT_BUCKETS = (1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)
FINAL_STATES = ("SUCCEEDED", "FAILED", "CANCELLED")
# |forecast at admission - metered cost| / metered cost, per finished job.
ERROR_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0)

# Rejection messages (Queue._never_fits, policy.infeasibility) -> a reason label of few values.
REJECTION_REASONS = (("quota", re.compile(r"quota")), ("capacity", re.compile(r"cluster can give at most")),
                     ("packing", re.compile(r"cannot be packed")))


def rejection_reason(message: str) -> str:
    return next((reason for reason, pattern in REJECTION_REASONS if pattern.search(message)), "other")


def month_start(now: float) -> float:
    t = time.gmtime(now)
    return float(calendar.timegm((t.tm_year, t.tm_mon, 1, 0, 0, 0)))


class PlatformCollector(Collector):
    def __init__(self, queue, heartbeat_path: Path | None = None):
        self.queue = queue
        self.heartbeat_path = heartbeat_path

    def collect(self):
        now = time.time()
        s = self.queue.store.stats(month_start(now))

        depth = GaugeMetricFamily("oppen_queue_depth", "Jobs waiting in the queue.", labels=["priority", "tenant"])
        oldest = GaugeMetricFamily("oppen_queue_oldest_wait_seconds", "Age of the oldest waiting job.",
                                   labels=["priority", "tenant"])
        for priority, tenant, n, first in s.queued:
            depth.add_metric([priority, tenant], n)
            oldest.add_metric([priority, tenant], max(0.0, now - first))
        yield depth
        yield oldest

        states = GaugeMetricFamily("oppen_jobs", "Jobs by current state.", labels=["state", "tenant", "trainer"])
        finished = CounterMetricFamily("oppen_jobs_finished", "Jobs that ended, by final state.",
                                       labels=["state", "tenant", "trainer"])
        for state, tenant, trainer, n in s.by_state:
            states.add_metric([state, tenant, trainer], n)
            if state in FINAL_STATES:
                finished.add_metric([state, tenant, trainer], n)
        yield states
        yield finished

        admissions = CounterMetricFamily("oppen_admissions", "Jobs admitted to Ray (one per attempt).",
                                         labels=["tenant", "priority"])
        for tenant, priority, n in s.admissions:
            admissions.add_metric([tenant, priority], n)
        yield admissions
        preemptions = CounterMetricFamily("oppen_preemptions", "Running jobs preempted for higher priority.",
                                          labels=["tenant", "priority"])
        for tenant, priority, n in s.preemptions:
            preemptions.add_metric([tenant, priority], n)
        yield preemptions

        lost = CounterMetricFamily("oppen_preemption_lost_seconds", "Work preemptions threw away: resource-seconds "
                                   "since each victim's last checkpoint.", labels=["tenant", "resource"])
        for tenant, cpu_s, gpu_s in s.preemption_lost:
            lost.add_metric([tenant, "cpu"], cpu_s)
            lost.add_metric([tenant, "gpu"], gpu_s)
        yield lost
        waiting = GaugeMetricFamily("oppen_queue_waiting", "Queued jobs by why they wait (the dispatcher's last "
                                    "plan: quota, cohort, budget, cap, capacity, packing, nodes, behind...).",
                                    labels=["kind"])
        for kind, n in sorted(s.waiting_by_kind.items()):
            waiting.add_metric([kind], n)
        yield waiting

        by_reason: dict[tuple[str, str], int] = {}
        for message, tenant, n in s.rejected:
            key = (rejection_reason(message), tenant)
            by_reason[key] = by_reason.get(key, 0) + n
        rejections = CounterMetricFamily("oppen_rejections", "Requests refused at once because they can never "
                                         "run (quota, capacity, packing).", labels=["reason", "tenant"])
        for (reason, tenant), n in sorted(by_reason.items()):
            rejections.add_metric([reason, tenant], n)
        yield rejections

        buckets = [(str(float(le)), sum(1 for w in s.waits if w <= le)) for le in WAIT_BUCKETS]
        buckets.append(("+Inf", len(s.waits)))
        yield HistogramMetricFamily("oppen_queue_wait_seconds", "From submission to first admission.",
                                    buckets=buckets, sum_value=sum(s.waits))

        cost = CounterMetricFamily("oppen_cost_usd", "Metered cost of finished jobs.", labels=["tenant", "trainer"])
        gpu_hours = CounterMetricFamily("oppen_gpu_hours", "GPU-hours of finished jobs.", labels=["tenant", "trainer"])
        for tenant, trainer, usd, gh in s.costs:
            cost.add_metric([tenant, trainer], usd)
            gpu_hours.add_metric([tenant, trainer], gh)
        yield cost
        yield gpu_hours

        errors = HistogramMetricFamily("oppen_forecast_error_ratio", "Finished jobs' |pre-start forecast - metered "
                                       "cost| / metered cost.", labels=["trainer"])
        by_trainer: dict[str, list[float]] = {}
        for trainer, forecast, actual in s.forecasts:
            if actual > 0:
                by_trainer.setdefault(trainer, []).append(abs(forecast - actual) / actual)
        for trainer, errs in sorted(by_trainer.items()):
            counts = [(str(b), sum(1 for e in errs if e <= b)) for b in ERROR_BUCKETS] + [("+Inf", len(errs))]
            errors.add_metric([trainer], counts, sum(errs))
        yield errors

        spend = GaugeMetricFamily("oppen_tenant_spend_month_usd", "Metered spend this calendar month (UTC).",
                                  labels=["tenant"])
        budget = GaugeMetricFamily("oppen_tenant_budget_usd", "Monthly budget from configs/queue.yaml.",
                                   labels=["tenant"])
        budgets = {t: q.budget_usd for t, q in self.queue.config.tenants.items() if q.budget_usd is not None}
        for tenant in sorted(set(s.month_spend) | set(budgets)):
            spend.add_metric([tenant], s.month_spend.get(tenant, 0.0))
            if tenant in budgets:
                budget.add_metric([tenant], budgets[tenant])
        yield spend
        yield budget

        beat = self._heartbeat()
        if beat is not None:
            last = GaugeMetricFamily("oppen_dispatcher_last_cycle_timestamp_seconds",
                                     "When the dispatcher last finished a cycle.")
            last.add_metric([], beat["time"])
            yield last
            ok = GaugeMetricFamily("oppen_dispatcher_last_cycle_ok", "1 if the last cycle succeeded.")
            ok.add_metric([], 1.0 if beat.get("last_cycle_ok") else 0.0)
            yield ok

    def _heartbeat(self) -> dict | None:
        try:
            return json.loads(self.heartbeat_path.read_text()) if self.heartbeat_path else None
        except (OSError, ValueError):
            return None


def serve_metrics(queue, heartbeat_path: Path, host: str, port: int):
    """Start the exporter (a daemon thread) on host:port; returns the server."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(PlatformCollector(queue, heartbeat_path))
    server, _ = start_http_server(port, addr=host, registry=registry)
    return server
