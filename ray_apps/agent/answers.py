"""Plain-English answers from tool results, for the router path (a model writes its own)."""

from __future__ import annotations

import re
import time
from typing import Any, Callable


def _usd(x: float | None) -> str:
    return "n/a" if x is None else f"${x:.4f}"


def _job(r: dict) -> str:
    params = ", ".join(f"{k}={v}" for k, v in (r.get("params") or {}).items()) or "defaults"
    return f"{r['id']} ({r['trainer']}, {params})"


def _submitted(r: dict) -> str:
    if r["state"] == "REJECTED":
        return f"Job {_job(r)} was rejected: {r['message']}"
    return (f"Queued job {_job(r)} at {r['priority']} priority for tenant {r['tenant']}; it starts as soon as its "
            "resources are free.")


def _status(r: dict) -> str:
    text = f"Job {r['id']} ({r['trainer']}) is {r['state']}"
    if r.get("attempt", 0) > 1:
        text += f" (attempt {r['attempt']})"
    m = r.get("latest_metrics") or {}
    bits = [f"{k.replace('_', ' ')} {v:.4g}" for k, v in m.items() if k != "cost_usd"]
    if "cost_usd" in m:
        bits.append(f"training cost {_usd(m['cost_usd'])}")
    if bits:
        text += ": " + ", ".join(bits)
    return text + (f". {r['message']}" if r.get("message") else ".")


def _queue(r: dict) -> str:
    if not r["total"]:
        return "You have no jobs waiting or running."
    states = ", ".join(f"{n} {s}" for s, n in sorted(r["by_state"].items()))
    jobs = "; ".join(f"{j['id']} {j['state']} ({j['priority']})" for j in r["jobs"][:5])
    return f"You have {r['total']} job(s) in flight: {states}. {jobs}."


def _why(r: dict) -> str:
    from ray_apps.scheduler.why import start_text

    if r["state"] != "QUEUED":
        return f"Job {r['id']} is not waiting: it is {r['state']} ({r['reason']})."
    where = f" It is number {r['position']} of {r['of']} queued {r['priority']} jobs." if r.get("position") else ""
    est = r.get("start_in_s")
    when = start_text(None if est is None else (est["low"], est["mid"], est["high"]))
    return f"Job {r['id']} waits ({r['kind']}): {r['reason']}.{where} Estimated start: {when}."


def _cancel(r: dict) -> str:
    parts = [f"Cancelled {len(r['cancelled'])} job(s)" + (f": {', '.join(r['cancelled'])}" if r["cancelled"] else "")]
    if r["refused"]:
        parts.append("not cancelled: " + "; ".join(f"{x['job_id']} ({x['reason']})" for x in r["refused"]))
    return ". ".join(parts) + "."


def _cost(r: dict) -> str:
    live = " so far (it is still running)" if r["live"] else ""
    return (f"Job {r['job_id']} cost {_usd(r['total_usd'])}{live}: CPU {_usd(r['cpu_usd'])}, GPU {_usd(r['gpu_usd'])} "
            f"for {r['seconds']:.0f} s on {r['cpus']:g} CPU / {r['gpus']:g} GPU at ${r['usd_per_hour']:.4f}/h.")


def _report(r: dict) -> str:
    rows = "; ".join(f"{'/'.join(row['group'].values())}: {_usd(row['total_usd'])} ({row['jobs']} jobs)"
                     for row in r["rows"][:5])
    t = r["total"]
    return f"Spend: {_usd(t['total_usd'])} over {t['jobs']} job(s), {t['gpu_hours']:.3f} GPU-h." + \
        (f" {rows}." if rows else "")


def _budget(r: dict) -> str:
    text = (f"Budget {r['status'].upper().replace('_', ' ')}: spent {_usd(r['spent_usd'])}, running jobs will add "
            f"about {_usd(r['committed_usd'])} and queued ones {_usd(r['queued_usd'])}, of {_usd(r['budget_usd'])}; "
            f"{_usd(r['remaining_usd'])} left.")
    return text + (" " + " ".join(r["notes"]) if r.get("notes") else "")


def _forecast(r: dict) -> str:
    what = f"job {r['job_id']}" if r.get("job_id") else f"a {r.get('trainer')} run"
    if r.get("total_usd") is None:
        return f"No forecast for {what}: " + " ".join(r.get("notes") or [])
    text = (f"Forecast for {what}: about {_usd(r['total_usd'])} in total (90%: {_usd(r['total_usd_low'])} to "
            f"{_usd(r['total_usd_high'])}), {r['remaining_s']:.0f} s of running left.")
    return text + (" Note: " + " ".join(r["notes"]) if r.get("notes") else "")


def _advice(r: dict) -> str:
    recs = r["recommendations"]
    if not recs:
        return f"No recommendation for run {r['run_id']}: nothing measured shows a saving."
    return " ".join(f"[{x['kind']}] {x['message']}" for x in recs)


def _gpus(r: dict) -> str:
    text = f"{r['free']:g} of {r['total']:g} GPUs are free ({r['used']:g} in use)"
    if r["queued_jobs"]:
        text += f"; queued jobs want {r['queued_demand']:g} more"
    gpu_groups = [g for g in r.get("groups", []) if g["gpus"]]
    for g in gpu_groups:  # on an autoscaling cluster, what may still be added counts too
        text += (f"; group {g['name']} has {g['running'] + g['idle']} node(s) of {g['gpus']:g} GPU "
                 f"(up to {g['max_workers']}, {g['pending']} starting)")
    return text + "."


def _validate(r: dict) -> str:
    if r["ok"]:
        return (f"Yes: {r['workers']} worker(s), {r['cpus']:g} CPU and {r['gpus']:g} GPU in all, about "
                f"{r['memory_per_worker_gib']:.1f} GiB per worker, fit this cluster and your quota.")
    return f"No: it {r['reason']}."


def _search(r: dict) -> str:
    search = r["search"]
    budget = f", stopping at {_usd(search['budget_usd'])}" if search.get("budget_usd") else ""
    return (f"Queued search {r['id']} ({r['state']}, {r['priority']}): {search['num_samples']} {r['trainer']} "
            f"trials, {search['max_concurrent']} at a time{budget}.")


def _experiments(r: dict) -> str:
    names = [e["name"] for e in r["experiments"]]
    return "Experiments: " + (", ".join(names) if names else "none yet") + "."


def _metrics(r: dict) -> str:
    if "runs" not in r:
        return f"Run {r['run_id']}: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(r["metrics"].items())[:12])
    metric = r.get("metric")
    rows = "; ".join(f"{x['run_name']} {x['status']}" + (f" {metric} {x[metric]:.4g}" if metric and
                                                         x.get(metric) is not None else "") for x in r["runs"])
    return f"Recent {r['experiment']} runs: {rows or 'none'}."


def _models(r: dict) -> str:
    if not r["models"]:
        return "No model is registered yet: a finished mnist or llm training run registers one."
    parts = []
    for m in r["models"]:
        versions = "; ".join(
            f"v{v['version']}" + (f" [{', '.join(v['aliases'])}]" if v["aliases"] else "")
            + (f" {v['tags']['metric']} {v['tags'][v['tags']['metric']]}" if v["tags"].get("metric") in v["tags"]
               else "") + (f" cost ${v['tags']['cost_usd']}" if "cost_usd" in v["tags"] else "")
            for v in m["versions"])
        parts.append(f"{m['name']}: {versions or 'no versions'} (serving: {m['serve']})")
    return "Registered models: " + " | ".join(parts) + "."


def _deployed(r: dict) -> str:
    return (f"Serving {r['name']} version {r['version']} ({r['selector']}); the replicas roll over within seconds "
            f"without failing requests. Endpoint: POST {r['endpoint']}")


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts)) if ts else "?"


def _runs(item: dict) -> str:
    runs = item.get("run_ids") or []
    return f" (MLflow run{'s' if len(runs) > 1 else ''} {', '.join(runs)})" if runs else ""


def _outcome(o: dict) -> str:
    params = ", ".join(f"{k}={v}" for k, v in (o.get("params") or {}).items()) or "defaults"
    text = f"job {o['id']} ({o['trainer']}, {params}) {o['state']}"
    bits = [f"{o['metric']} {o['value']:.4g}"] if o.get("value") is not None else []
    if o.get("cost_usd") is not None:
        bits.append(f"cost {_usd(o['cost_usd'])}")
    if o["state"] != "SUCCEEDED" and o.get("message"):
        bits.append(o["message"][:120])
    return text + (": " + ", ".join(bits) if bits else "") + _runs(o)


def _failure(f: dict) -> str:
    return (f"{f['trainer']} failed {f['count']} time(s) with \"{f['line']}\" [{f['id']}], last on {_when(f.get('last_at'))}: "
            f"job{'s' if len(f['job_ids']) > 1 else ''} {', '.join(f['job_ids'])}{_runs(f)}")


def _about(r: dict) -> str:
    kind = {"notes": "notes", "outcomes": "finished jobs", "failures": "failures"}.get(r.get("kind"), "")
    what = " ".join(x for x in (r.get("trainer"), kind) if x)
    if r.get("job_id"):
        return f"no {what or 'memory'} drawn from job {r['job_id']}"
    return f"no {what}" if what else "nothing"


def _preemptions(r: dict) -> str:
    whose = f"{r['team']}'s" if r.get("team") else "the"
    period = f"in the last {r['since']}" if re.fullmatch(r"\d+[a-z]", r["since"]) else f"since {r['since']}"
    if not r["count"]:
        return f"No preemptions of {whose} jobs {period}."
    jobs = "; ".join(f"{j['job_id']} ({j['trainer']}, {j['priority']} priority, {j['times']}x){_runs(j)}"
                     for j in r["jobs"])
    reasons = sorted({reason for j in r["jobs"] for reason in j["reasons"]})
    priorities = ", ".join(f"{p} {n}" for p, n in sorted(r["by_priority"].items(), key=lambda x: -x[1]))
    return (f"{whose.capitalize()} jobs were preempted {r['count']} time(s) {period}, {r['job_total']} job(s): {jobs}."
            + (f" The queue's reason: {'; '.join(reasons)}." if reasons else "")
            + f" Preemptions by the job's priority: {priorities}. The queue stops a running job when a higher-priority"
              " one needs its resources; it resumes from its last checkpoint.")


def _recall(r: dict) -> str:
    if r.get("kind") == "preemptions":
        return _preemptions(r)
    items = r["items"]
    if not items:
        return f"I remember {_about(r)} yet." if not r.get("text") else f"I remember {_about(r)} matching that."
    notes = [i for i in items if i["kind"] == "note"]
    outcomes = [i for i in items if i["kind"] == "outcome"]
    failures = [i for i in items if i["kind"] == "failure"]
    parts = []
    if notes:
        parts.append("You told me: " + "; ".join(
            f"\"{n['text']}\" [{n['id']}, {_when(n.get('at'))}]" + (f" about job {', '.join(n['job_ids'])}"
                                                                   if n.get("job_ids") else "") + _runs(n)
            for n in notes) + ".")
    best = r.get("best")
    if best:
        parts.append(f"Best {best['trainer']} run by {best['metric']}: {_outcome(best)}.")
    elif outcomes and r.get("trainer"):
        parts.append(f"No {r['trainer']} run I remember succeeded with a {outcomes[0]['metric']}.")
    if outcomes:
        parts.append("Latest: " + "; ".join(_outcome(o) for o in outcomes) + ".")
    if failures:
        repeated = sum(f["count"] for f in failures)
        lead = "Yes: " if r.get("kind") == "failures" and repeated > 1 else ""
        parts.append(lead + "; ".join(_failure(f) for f in failures) + ".")
    return " ".join(parts)


def _remembered(r: dict) -> str:
    about = f" about {r['trainer']}" if r.get("trainer") else ""
    evidence = f", from job {', '.join(r['job_ids'])}" if r.get("job_ids") else ""
    return (f"I'll remember{about} for tenant {r['tenant']}: \"{r['text']}\" [{r['id']}{evidence}]. "
            "Say 'forget that' to drop it.")


def _forgotten(r: dict) -> str:
    item = r["forgotten"]
    what = {"note": lambda: f"the note \"{item['text']}\"",
            "failure": lambda: f"the {item['trainer']} failure \"{item['line']}\"",
            "outcome": lambda: f"the outcome of job {item['id']}"}[item["kind"]]()
    return f"Forgotten: {what} [{item['id']}]."


ANSWERS: dict[str, Callable[[dict], str]] = {
    "trigger_training_job": _submitted, "queue_training_job": _submitted, "get_training_status": _status,
    "get_job_queue_status": _queue, "why_is_job_waiting": _why, "cancel_job": _cancel, "list_mlflow_experiments": _experiments,
    "get_experiment_metrics": _metrics, "calculate_training_cost": _cost, "get_cost_report": _report,
    "check_training_budget": _budget, "forecast_training_cost": _forecast,
    "recommend_cost_optimization": _advice, "get_gpu_availability": _gpus, "validate_job_resources": _validate,
    "start_hyperparameter_search": _search, "list_models": _models, "deploy_model": _deployed,
    "recall": _recall, "remember": _remembered, "forget": _forgotten,
}


def answer(tool: str, result: Any) -> str:
    try:
        return ANSWERS[tool](result)
    except (KeyError, TypeError, ValueError):  # an answer template must never hide a result
        return f"{tool}: {result}"
