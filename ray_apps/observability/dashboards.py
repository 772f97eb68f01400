"""Grafana dashboards for the platform, as code: `python -m ray_apps.observability.dashboards`
writes configs/grafana/*.json. Tests keep the files equal to this and check every panel's PromQL
with promtool, so a dashboard never ships a query Prometheus would refuse.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from ray_apps.config import CONFIG_DIR

OUT = CONFIG_DIR / "grafana"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RAY_METRICS = {"ray_resources", "ray_node_gpus_utilization"}  # Ray's own exporter (ray.metrics_export_port)


@dataclass(frozen=True)
class Panel:
    title: str
    expr: str
    legend: str = ""
    unit: str = "short"
    kind: str = "timeseries"     # or "stat"
    description: str = ""


DASHBOARDS: dict[str, tuple[str, list[Panel]]] = {
    "oppen-queue": ("Oppen: queue", [
        Panel("Waiting jobs by priority", "sum by (priority) (oppen_queue_depth)", "{{priority}}"),
        Panel("Waiting jobs by tenant", "sum by (tenant) (oppen_queue_depth)", "{{tenant}}"),
        Panel("Oldest wait", "max by (priority, tenant) (oppen_queue_oldest_wait_seconds)", "{{tenant}} {{priority}}",
              unit="s"),
        Panel("Queue wait p50 (submit to first admission)",
              "histogram_quantile(0.5, sum by (le) (rate(oppen_queue_wait_seconds_bucket[15m])))", "p50", unit="s"),
        Panel("Queue wait p90", "histogram_quantile(0.9, sum by (le) (rate(oppen_queue_wait_seconds_bucket[15m])))",
              "p90", unit="s"),
        Panel("Admissions / hour", "sum by (tenant) (increase(oppen_admissions_total[1h]))", "{{tenant}}"),
        Panel("Preemptions / hour", "sum by (tenant) (increase(oppen_preemptions_total[1h]))", "{{tenant}}"),
        Panel("Rejections / hour by reason", "sum by (reason) (increase(oppen_rejections_total[1h]))", "{{reason}}"),
        Panel("Jobs ended / hour by state", "sum by (state) (increase(oppen_jobs_finished_total[1h]))", "{{state}}"),
        Panel("Running jobs", 'sum(oppen_jobs{state="RUNNING"})', kind="stat"),
        Panel("Dispatcher last cycle", "time() - oppen_dispatcher_last_cycle_timestamp_seconds", unit="s",
              kind="stat", description="Seconds since the dispatcher last cycled; it cycles about once a second."),
    ]),
    "oppen-cost": ("Oppen: cost", [
        Panel("Spend / hour by tenant", "sum by (tenant) (increase(oppen_cost_usd_total[1h]))", "{{tenant}}",
              unit="currencyUSD"),
        Panel("Spend / hour by trainer", "sum by (trainer) (increase(oppen_cost_usd_total[1h]))", "{{trainer}}",
              unit="currencyUSD"),
        Panel("Spend this month vs budget", "oppen_tenant_spend_month_usd / on(tenant) oppen_tenant_budget_usd",
              "{{tenant}}", unit="percentunit"),
        Panel("Spend this month", "sum by (tenant) (oppen_tenant_spend_month_usd)", "{{tenant}}",
              unit="currencyUSD", kind="stat"),
        Panel("Total metered spend", "sum(oppen_cost_usd_total)", unit="currencyUSD", kind="stat"),
        Panel("Pre-start forecast error, finished jobs (median, 7 days)",
              "histogram_quantile(0.5, sum by (le, trainer) (increase(oppen_forecast_error_ratio_bucket[7d])))",
              "{{trainer}}", unit="percentunit",
              description="|forecast from past runs at admission - metered cost| / metered cost."),
    ]),
    "oppen-gpus": ("Oppen: GPU use", [
        Panel("GPUs in use (Ray)", 'sum(ray_resources{Name="GPU", State="USED"})', "used"),
        Panel("GPUs in the cluster (Ray)", 'sum(ray_resources{Name="GPU"})', "total"),
        Panel("GPU utilisation by device", "avg by (instance, GpuIndex) (ray_node_gpus_utilization)",
              "{{instance}} GPU {{GpuIndex}}", unit="percent",
              description="Physical GPUs only: logical GPUs (configs/cluster.yaml on a CPU machine) report none."),
        Panel("GPU-hours / day by tenant", "sum by (tenant) (increase(oppen_gpu_hours_total[1d]))", "{{tenant}}"),
        Panel("GPU-hours / day by trainer", "sum by (trainer) (increase(oppen_gpu_hours_total[1d]))", "{{trainer}}"),
    ]),
}


def dashboard(uid: str, title: str, panels: list[Panel]) -> dict:
    out = []
    for i, p in enumerate(panels):
        width = 6 if p.kind == "stat" else 12
        out.append({
            "id": i + 1, "type": p.kind, "title": p.title, "description": p.description, "datasource": DATASOURCE,
            "gridPos": {"h": 8, "w": width, "x": (i % 2) * 12, "y": (i // 2) * 8},
            "fieldConfig": {"defaults": {"unit": p.unit}, "overrides": []},
            "targets": [{"refId": "A", "datasource": DATASOURCE, "expr": p.expr, "legendFormat": p.legend}],
        })
    return {
        "uid": uid, "title": title, "tags": ["oppen"], "schemaVersion": 39, "version": 1, "editable": True,
        "time": {"from": "now-6h", "to": "now"}, "refresh": "30s",
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus",
                                 "label": "Prometheus"}]},
        "panels": out,
    }


def all_dashboards() -> dict[str, dict]:
    return {uid: dashboard(uid, title, panels) for uid, (title, panels) in DASHBOARDS.items()}


def write(out: Path = OUT) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for uid, model in all_dashboards().items():
        path = out / f"{uid}.json"
        path.write_text(json.dumps(model, indent=2) + "\n")
        paths.append(path)
    return paths


if __name__ == "__main__":
    for written in write():
        print(written, file=sys.stderr)
