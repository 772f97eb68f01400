"""`oppen`: the platform's command line, a thin adapter over the Python API."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import yaml

from ray_apps.config import load_settings
from trainers.errors import OppenError
from trainers.specs import TRAINERS, add_arguments, entry_for, servable


def cmd_up(args, settings) -> int:
    from ray_apps import cluster

    cluster.up(settings, timeout=args.timeout, serve=not args.no_serve)
    rc = cmd_status(args, settings)
    print(f"{'':10} Ray's and MLflow's own CLIs (ray job submit, ray job list, mlflow): eval \"$(oppen env)\"")
    return rc


def _actor():
    """Whoever runs this command, as the audit log names them."""
    from ray_apps.audit import Actor

    return Actor.local("cli")


def cmd_users(args, settings) -> int:
    from ray_apps.audit import AuditLog
    from ray_apps.auth import Users

    users = Users.from_settings(settings)
    if args.action in ("add", "remove"):  # the one place users change: audited here
        audit = AuditLog.from_settings(settings)
        asked = {"name": args.name, **({"tenant": args.tenant, "role": args.role} if args.action == "add" else {})}
        tenant = args.tenant if args.action == "add" else next(
            (c.tenant for c in users.list() if c.user == args.name), None)
        try:
            done = _change_users(users, args)
        except SystemExit as exc:
            audit.record(_actor(), f"user.{args.action}", args.name, asked, outcome="refused",
                         reason=str(exc.code).split(": ", 1)[-1], tenant=tenant)
            raise
        audit.record(_actor(), f"user.{args.action}", args.name, asked, tenant=tenant)
        print(done)
    else:
        for caller in users.list():
            print(f"{caller.user:20} {caller.role.value:8} {caller.tenant}")
    return 0


def _change_users(users, args) -> str:
    """Add or remove a user; what to print (a new user's token, once). SystemExit if refused."""
    from ray_apps.auth import Role

    if args.action == "add":
        try:
            token = users.add(args.name, args.tenant, Role(args.role))
        except ValueError as exc:
            raise SystemExit(f"oppen users add: {exc}") from None
        return f"user {args.name} ({args.role}, tenant {args.tenant}); its token, shown only now:\n{token}"
    if not users.remove(args.name):
        raise SystemExit(f"oppen users remove: no user {args.name!r}")
    return f"user {args.name} removed; its token no longer works"


def cmd_audit_export(args, settings) -> int:
    from ray_apps.audit import AuditLog
    from ray_apps.costs.report import parse_since

    for line in AuditLog.from_settings(settings).export_jsonl(parse_since(args.since), args.tenant):
        sys.stdout.write(line)
    return 0


def cmd_audit_verify(args, settings) -> int:
    from ray_apps.audit import AuditLog

    result = AuditLog.from_settings(settings).verify()
    print(result.summary(), file=sys.stdout if result.ok else sys.stderr)
    return 0 if result.ok else 1


def cmd_env(args, settings) -> int:
    """Shell exports for Ray's and MLflow's own clients: `eval "$(oppen env)"`."""
    import shlex

    for key, value in settings.client_env().items():
        print(f"export {key}={shlex.quote(value)}")
    return 0


def cmd_down(args, settings) -> int:
    from ray_apps import cluster

    cluster.down(settings)
    return 0


def cmd_status(args, settings) -> int:
    from ray_apps import cluster

    rows = cluster.status(settings)
    for row in rows:
        health = "healthy" if row.healthy else "DOWN"
        owner = (f"pid {row.pid}, {row.rss_mb:.0f} MB" if row.managed else row.note or "external"
                 if row.healthy else "not running")
        print(f"{row.name:10} {health:8} {row.url:28} ({owner})")
    ray_row = next(r for r in rows if r.name == cluster.RAY)
    if ray_row.healthy:
        from ray_apps.scheduler.capacity import read_capacity

        capacity = read_capacity(settings, settings.topology())
        res = capacity.resources
        for name in ("CPU", "GPU"):
            print(f"{'':10} {name}: {res.free(name):g} free / {res.total.get(name, 0):g} total")
        for line in _group_lines([vars(g) for g in capacity.groups.values()]):
            print(f"{'':10} {line}")
    print(f"{'':10} data dir: {settings.data_dir}")
    # The Serve API is optional (`up --no-serve`); the rest is the platform.
    return 0 if all(r.healthy for r in rows if r.name != "serve") else 1


def _quiet_ray_client_logs() -> None:
    """Ray logs each working-dir upload step at INFO/WARNING; the CLI shows its own progress."""
    import ray.job_submission  # noqa: F401 - configures Ray's loggers, which we then quiet

    for name in ("ray._private.runtime_env", "ray.dashboard.modules.dashboard_sdk"):
        logging.getLogger(name).setLevel(logging.ERROR)


def cmd_train(args, settings) -> int:
    """Through the queue like any job (quota, priority, metering), then followed to its end."""
    _quiet_ray_client_logs()
    params = {k: v for k, v in vars(args).items() if k in args.spec_fields}
    queue = _queue(settings)
    job = queue.submit(args.trainer, params, priority=args.priority, tenant=args.tenant, actor=_actor())
    print(f"queued {job.id} ({job.priority}, tenant {job.tenant})")
    outcome = _follow(queue, job, args.no_follow, "job")
    if isinstance(outcome, int):
        return outcome
    job = queue.get(job.id)
    run_url = f"{settings.tracking_uri}/#/runs/{job.mlflow_run_id}" if job.mlflow_run_id else None
    print(f"done in {outcome.seconds:.0f} s: {_result_line(outcome.result)}")
    if run_url:
        print(f"  MLflow run: {run_url}")
    if outcome.result.get("tracking_lost"):
        print(f"  WARNING: {outcome.result['tracking_lost']}")
    return 0


def _follow(queue, job, no_follow: bool, what: str):
    """Follow a queued job to its end: its outcome, or the exit code when not followed, stopped
    following, or it did not succeed (its last log lines shown)."""
    from ray_apps.training import follow_queued

    if no_follow:
        print(f"  follow with: oppen queue show {job.id}")
        return 0
    try:
        outcome = follow_queued(queue, job.id, poll_s=2.0, on_progress=lambda line: print(f"  {line}", flush=True))
    except KeyboardInterrupt:
        print(f"\nstopped following; the {what} goes on. Cancel it with: oppen queue cancel {job.id}")
        return 130
    if not outcome.ok:
        print(f"{what} {job.id} {outcome.status}. Last log lines:", file=sys.stderr)
        print("\n".join(f"  | {line}" for line in outcome.log_tail), file=sys.stderr)
        return 1
    return outcome


def _result_line(r: dict) -> str:
    parts = [f"{label} {r[key]:{fmt}}" for key, label, fmt in (
        ("test_accuracy", "test accuracy", ".4f"), ("eval_loss", "eval loss", ".3f"),
        ("perplexity", "perplexity", ".1f")) if r.get(key) is not None]
    if r.get("cost_usd") is not None:
        parts.append(f"cost ${r['cost_usd']:.5f}")
    return ", ".join(parts) or "no result line"


def cmd_tune(args, settings) -> int:
    """A Ray Tune search through the queue like any job (quota, priority, metering), then followed."""
    from trainers.tune import SEARCH_DEFAULTS

    _quiet_ray_client_logs()
    params = {k: v for k, v in vars(args).items() if k in args.spec_fields}
    search = {k: getattr(args, k) for k in SEARCH_DEFAULTS if getattr(args, k) is not None}
    queue = _queue(settings)
    job = queue.submit(args.trainer, params, search=search, priority=args.priority, tenant=args.tenant,
                       actor=_actor())
    print(f"queued search {job.id} ({job.priority}, tenant {job.tenant}): {job.search['num_samples']} trial(s), "
          f"{job.search['max_concurrent']} at a time, holding {_gang_text(job)}")
    outcome = _follow(queue, job, args.no_follow, "search")
    if isinstance(outcome, int):
        return outcome
    job = queue.get(job.id)
    best = outcome.result.get("best") or {}
    print(f"done in {outcome.seconds:.0f} s: {outcome.result.get('trials')} trial(s), "
          f"spent ${outcome.result.get('spent_usd', 0):.5f}; best {json.dumps(best.get('config'))}")
    if job.mlflow_run_id:
        print(f"  MLflow parent run: {settings.tracking_uri}/#/runs/{job.mlflow_run_id}")
    return 0


def _gang_text(job) -> str:
    gpus = f", {job.workers * job.gpus_per_worker:g} GPU" if job.gpus_per_worker else ""
    return f"{job.workers} worker(s): {job.workers * job.cpus_per_worker:g} CPU{gpus}"


def _queue(settings):
    from ray_apps.scheduler.api import Queue

    return Queue.from_settings(settings)


def _job_line(job) -> str:
    from ray_apps.scheduler.view import job_line, job_view

    return job_line(job_view(job))


def cmd_queue_submit(args, settings) -> int:
    params = {k: v for k, v in vars(args).items() if k in args.spec_fields}
    job = _queue(settings).submit(args.trainer, params, priority=args.priority, tenant=args.tenant, actor=_actor())
    print(f"queued {job.id} ({job.priority}, tenant {job.tenant}); follow with: oppen queue list, or `oppen "
          f"queue why {job.id}` while it waits")
    return 0


def cmd_queue_list(args, settings) -> int:
    from ray_apps.scheduler.states import TERMINAL, JobState

    states = None if args.all else [s for s in JobState if s not in TERMINAL]
    jobs = _queue(settings).list(tenant=args.tenant, states=states)
    for job in jobs:
        print(_job_line(job))
    if not jobs:
        print("no jobs" + ("" if args.all else " waiting or running (--all shows finished ones)"))
    return 0


def cmd_queue_show(args, settings) -> int:
    queue = _queue(settings)
    job = queue.get(args.job_id, tenant=args.tenant)
    print(_job_line(job))
    for ev in queue.store.events(job.id):
        print(f"  {time.strftime('%H:%M:%S', time.localtime(ev.at))} {ev.from_state or '':10} -> "
              f"{ev.to_state:10} {ev.message}")
    return 0


def cmd_queue_why(args, settings) -> int:
    print(_queue(settings).why(args.job_id, tenant=args.tenant).text())
    return 0


def cmd_queue_over_budget(args, settings) -> int:
    job = _queue(settings).allow_over_budget(args.job_id, actor=_actor())
    print(f"{job.id}: may start past tenant {job.tenant}'s budget")
    return 0


def cmd_queue_cancel(args, settings) -> int:
    job = _queue(settings).cancel(args.job_id, tenant=args.tenant, actor=_actor())
    print(f"{job.id}: {job.state.value}")
    return 0


def cmd_queue_logs(args, settings) -> int:
    print(_queue(settings).logs(args.job_id, tenant=args.tenant), end="")
    return 0


def cmd_gpus(args, settings) -> int:
    gpus = _queue(settings).gpu_availability()
    print(f"GPUs: {gpus.free:g} free / {gpus.total:g} total ({gpus.used:g} used); "
          f"queued demand {gpus.queued_demand:g} GPUs in {gpus.queued_jobs} jobs")
    for node, info in gpus.by_node.items():
        print(f"  {node[:12]} {info['type'] or '-':10} {info['free']:g} free / {info['total']:g}")
    for line in _group_lines(gpus.groups):
        print(f"  {line}")
    return 0


def _group_lines(groups: list[dict]) -> list[str]:
    """One line per worker group: nodes running, idle and starting against the group's bounds."""
    return [f"group {g['name']:8} {g['running']} running, {g['idle']} idle, {g['pending']} starting "
            f"(min {g['min_workers']}, max {g['max_workers']}; {g['cpus']:g} CPU, {g['gpus']:g} GPU per node)"
            for g in groups]


def _costs(settings):
    from ray_apps.costs.service import CostService

    return CostService.from_settings(settings)


def _usd(x: float | None) -> str:
    return "   n/a" if x is None else f"${x:.4f}"


def cmd_cost_show(args, settings) -> int:
    c = _costs(settings).job_cost(args.job_id, tenant=args.tenant)
    print(f"{c.job_id}: {_usd(c.total_usd)}{' so far (running)' if c.live else ''} = CPU {_usd(c.cpu_usd)} + "
          f"GPU {_usd(c.gpu_usd)} + memory {_usd(c.memory_usd)}")
    print(f"  {c.cpus:g} CPU, {c.gpus:g} GPU{f' ({c.gpu_type})' if c.gpu_type else ''} at "
          f"${c.usd_per_hour:.4f}/h for {c.seconds:.1f} s over {c.attempts} attempt(s); {c.state}")
    return 0


def cmd_cost_report(args, settings) -> int:
    report = _costs(settings).report(since=args.since, group_by=args.by, tenant=args.tenant)
    print(f"{'  '.join(f'{g:14}' for g in report.group_by)}  jobs  CPU-core-h  GPU-h     USD")
    for row in report.rows:
        live = f"  ({row.live_jobs} running)" if row.live_jobs else ""
        print(f"{'  '.join(f'{v[:14]:14}' for v in row.group.values())}  {row.jobs:4}  {row.cpu_core_hours:10.3f}"
              f"  {row.gpu_hours:5.3f}  {_usd(row.total_usd)}{live}")
    t = report.total
    print(f"total: {t.jobs} job(s), {t.cpu_core_hours:.3f} CPU-core-h, {t.gpu_hours:.3f} GPU-h, {_usd(t.total_usd)}")
    for n in report.nodes:
        print(f"group {n['group']:8} ran {n['node_hours']:.3f} node-h ({n['cpu_hours']:.3f} CPU-h, "
              f"{n['gpu_hours']:.3f} GPU-h)")
    used = [f"{name} {value:.0%}" for name, value in (("CPU", report.cpu_utilisation),
                                                       ("GPU", report.gpu_utilisation)) if value is not None]
    if used:
        print(f"utilisation (jobs' hours over the nodes'): {', '.join(used)}")
    return 0


def cmd_cost_budget(args, settings) -> int:
    b = _costs(settings).budget(args.budget_usd, tenant=args.tenant, since=args.since)
    print(f"{b.status.upper()}: spent {_usd(b.spent_usd)} + running {_usd(b.committed_usd)} + queued "
          f"{_usd(b.queued_usd)} of {_usd(b.budget_usd)}; {_usd(b.remaining_usd)} left")
    for note in b.notes:
        print(f"  note: {note}")
    return 0 if b.status == "ok" else 1


def _print_forecast(fc) -> None:
    if fc.total_usd is None:
        print("no forecast")
    else:
        done = f" at {fc.progress:.0%} progress" if fc.progress is not None else ""
        print(f"final cost {_usd(fc.total_usd)} (90%: {_usd(fc.total_usd_low)} - {_usd(fc.total_usd_high)}), "
              f"{fc.remaining_s:.0f} s left (90%: {fc.remaining_s_low:.0f} - {fc.remaining_s_high:.0f} s){done}; "
              f"spent {_usd(fc.spent_usd)}")
    for note in fc.notes:
        print(f"  note: {note}")


def cmd_cost_forecast(args, settings) -> int:
    _print_forecast(_costs(settings).forecast_job(args.job_id, tenant=args.tenant))
    return 0


def cmd_cost_estimate(args, settings) -> int:
    params = {k: v for k, v in vars(args).items() if k in args.spec_fields}
    _print_forecast(_costs(settings).forecast_new(args.trainer, params))
    return 0


def cmd_cost_advise(args, settings) -> int:
    recs = _costs(settings).recommend(args.run_id, tenant=args.tenant)
    for r in recs:
        print(f"[{r.kind}] save {_usd(r.saving_usd)}: {r.message}")
    if not recs:
        print("no recommendation: nothing in this run or past runs shows a saving")
    return 0


def _print_reply(reply, verbose: bool) -> None:
    print(reply.answer)
    if verbose:
        for call in reply.tool_calls:
            outcome = f"error: {call['error']}" if "error" in call else "ok"
            print(f"  [{call['name']}({json.dumps(call['args'])}) -> {outcome}]")


def cmd_ask(args, settings) -> int:
    from ray_apps.agent.graph import agent_from_settings

    _quiet_ray_client_logs()
    reply = agent_from_settings(settings).ask(args.message, thread_id=args.thread, tenant=args.tenant)
    _print_reply(reply, args.verbose)
    return 1 if any("error" in c for c in reply.tool_calls) else 0


def cmd_agent(args, settings) -> int:
    """A conversation in one thread until EOF or 'quit'."""
    import uuid

    from ray_apps.agent.graph import agent_from_settings

    _quiet_ray_client_logs()
    agent = agent_from_settings(settings)
    thread = args.thread or uuid.uuid4().hex[:12]
    print(f"Oppen agent (thread {thread}). Ask in plain English; 'quit' ends.")
    while True:
        try:
            line = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if line.lower() in ("quit", "exit", "q"):
            return 0
        if line:
            _print_reply(agent.ask(line, thread_id=thread, tenant=args.tenant), args.verbose)


def cmd_mcp(args, settings) -> int:
    from ray_apps.agent.mcp_server import main as serve_mcp

    serve_mcp(settings, tenant=args.tenant)
    return 0


def cmd_dispatcher(args, settings) -> int:
    if args.supervise:
        from ray_apps.scheduler.supervisor import dispatcher_command, supervise

        return supervise(dispatcher_command(args.config))
    from ray_apps.scheduler.dispatcher import Dispatcher

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _quiet_ray_client_logs()
    dispatcher = Dispatcher(_queue(settings))
    try:
        from ray_apps.observability.metrics import serve_metrics

        serve_metrics(dispatcher.queue, dispatcher.heartbeat_path, settings.host, settings.metrics_port)
        logging.getLogger("oppen.dispatcher").info("metrics at http://%s:%d/metrics", settings.host,
                                                   settings.metrics_port)
    except OSError as exc:  # the queue matters more than its metrics: run without them, say so
        logging.getLogger("oppen.dispatcher").warning("no metrics: port %d: %s", settings.metrics_port, exc)
    dispatcher.run()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oppen", description="ML training on Ray: queue, cost, agent.")
    parser.add_argument("--config", default=None, help="settings file (default: configs/platform.yaml)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("up", help="start the local Ray head and MLflow server")
    p.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for health")
    p.add_argument("--no-serve", action="store_true",
                   help="skip the REST API on Ray Serve (~0.6 GB less; the CLI and Python API still work)")
    p.set_defaults(func=cmd_up)
    sub.add_parser("down", help="stop what `oppen up` started").set_defaults(func=cmd_down)
    sub.add_parser("status", help="URLs, health and cluster resources").set_defaults(func=cmd_status)
    p = sub.add_parser("users", help="per-user tokens with a tenant and a role (hashed in the data dir)")
    users = p.add_subparsers(dest="action", required=True)
    q = users.add_parser("add", help="a new user; prints its token once")
    q.add_argument("name")
    q.add_argument("--tenant", required=True)
    q.add_argument("--role", choices=["viewer", "member", "admin"], default="member")
    users.add_parser("remove", help="revoke a user's token").add_argument("name")
    users.add_parser("list", help="users, roles and tenants (never tokens)")
    p.set_defaults(func=cmd_users)

    p = sub.add_parser("audit", help="the tamper-evident audit log: who did what, when, from where")
    audit = p.add_subparsers(dest="action", required=True)
    q = audit.add_parser("export", help="records as JSON lines, oldest first")
    q.add_argument("--since", default=None, help="7d, 12h, 2w or an ISO date (default: all)")
    q.add_argument("--tenant", default=None, help="only this tenant's records")
    q.set_defaults(func=cmd_audit_export)
    audit.add_parser("verify", help="check the hash chain; names the first bad record (exit 1)").set_defaults(
        func=cmd_audit_verify)

    sub.add_parser("env", help='exports for Ray\'s and MLflow\'s own CLIs: eval "$(oppen env)"').set_defaults(
        func=cmd_env)

    p = sub.add_parser("train", help="run a catalogued trainer through the queue and follow it")
    trainers = p.add_subparsers(dest="trainer", required=True, metavar="TRAINER")
    for name, spec in TRAINERS.items():
        tp = trainers.add_parser(name, help=f"train {name}")
        add_arguments(tp, spec, with_defaults=False)
        tp.add_argument("--no-follow", action="store_true", default=False, help="submit and return")
        tp.add_argument("--priority", default="high", help="priority class (configs/queue.yaml; default: high)")
        tp.add_argument("--tenant", default=None, help="tenant that owns the job")
        tp.set_defaults(func=cmd_train, spec_fields={f for f in spec.__dataclass_fields__})

    p = sub.add_parser("queue", help="the priority job queue")
    qsub = p.add_subparsers(dest="queue_command", required=True, metavar="ACTION")
    qs = qsub.add_parser("submit", help="queue a catalogued trainer")
    qtrainers = qs.add_subparsers(dest="trainer", required=True, metavar="TRAINER")
    for name, spec in TRAINERS.items():
        tp = qtrainers.add_parser(name, help=f"queue {name}")
        add_arguments(tp, spec, with_defaults=False)
        tp.add_argument("--priority", default=None, help="priority class (configs/queue.yaml)")
        tp.add_argument("--tenant", default=None, help="tenant that owns the job")
        tp.set_defaults(func=cmd_queue_submit, spec_fields=set(spec.__dataclass_fields__))
    for action, func, helptext in (("list", cmd_queue_list, "jobs waiting or running"),
                                   ("show", cmd_queue_show, "one job and its events"),
                                   ("why", cmd_queue_why, "why a job waits, its place in line and when it "
                                                          "should start"),
                                   ("allow-over-budget", cmd_queue_over_budget,
                                    "(admin) let a queued job start past its tenant's budget"),
                                   ("cancel", cmd_queue_cancel, "cancel a queued or running job"),
                                   ("logs", cmd_queue_logs, "the job's Ray logs")):
        ap = qsub.add_parser(action, help=helptext)
        if action == "list":
            ap.add_argument("--all", action="store_true", help="include finished jobs")
        else:
            ap.add_argument("job_id")
        ap.add_argument("--tenant", default=None, help="act as this tenant only")
        ap.set_defaults(func=func)
    sub.add_parser("gpus", help="GPUs free/used by node, and queued demand").set_defaults(func=cmd_gpus)
    _add_cost_commands(sub)
    _add_models_commands(sub)
    _add_kube_commands(sub)
    _add_data_commands(sub)
    p = sub.add_parser("ask", help="ask the agent in plain English, e.g. oppen ask 'any free GPUs?'")
    p.add_argument("message")
    p.add_argument("--thread", default=None, help="continue this conversation")
    p.add_argument("--tenant", default=None, help="act as this tenant only")
    p.add_argument("-v", "--verbose", action="store_true", help="show the tool calls")
    p.set_defaults(func=cmd_ask)
    p = sub.add_parser("agent", help="a conversation with the agent (REPL)")
    p.add_argument("--thread", default=None)
    p.add_argument("--tenant", default=None)
    p.add_argument("-v", "--verbose", action="store_true", help="show the tool calls")
    p.set_defaults(func=cmd_agent)
    p = sub.add_parser("mcp", help="the agent's tools as an MCP server on stdio (for MCP clients)")
    p.add_argument("--tenant", default=None, help="every call acts as this tenant")
    p.set_defaults(func=cmd_mcp)
    _add_tune_command(sub)
    p = sub.add_parser("dispatcher", help="run the queue's dispatcher in the foreground")
    p.add_argument("--supervise", action="store_true", help="restart it whenever it dies")
    p.set_defaults(func=cmd_dispatcher)
    return parser


def _add_tune_command(sub) -> None:
    from trainers.tune import DEFAULT_SPACES, TUNABLE

    p = sub.add_parser("tune", help="Ray Tune search over a trainer's config, through the queue",
                       description="A search is a job of the queue: it waits for quota and room for "
                                   "--max-concurrent trials, then runs `python -m trainers.tune`. E.g.: oppen tune "
                                   "mnist --num-samples 8 --space lr=loguniform:1e-4:1e-2 --epochs 3 --budget-usd 0.05")
    trainers = p.add_subparsers(dest="trainer", required=True, metavar="TRAINER")
    for name in TUNABLE:
        spec = TRAINERS[name]
        tp = trainers.add_parser(name, help=f"search {name}'s config; trainer flags are fixed for every trial")
        add_arguments(tp, spec, with_defaults=False)
        s = tp.add_argument_group("search (defaults: trainers.tune)")
        s.add_argument("--space", action="append", default=None,
                       help=f"name=kind:args, repeatable (default: {' '.join(DEFAULT_SPACES[name])})")
        s.add_argument("--num-samples", type=int, default=None, help="trials to draw (default: 4)")
        s.add_argument("--max-concurrent", type=int, default=None,
                       help="trials at once; the job holds this many trials' workers (default: 1)")
        s.add_argument("--budget-usd", type=float, default=None, help="stop launching trials at this spend")
        s.add_argument("--grace-period", type=int, default=None, help="ASHA: reports before a trial may stop")
        s.add_argument("--search-seed", type=int, default=None)
        tp.add_argument("--no-follow", action="store_true", default=False, help="submit and return")
        tp.add_argument("--priority", default=None, help="priority class (configs/queue.yaml; default: the queue's)")
        tp.add_argument("--tenant", default=None, help="tenant that owns the search")
        tp.set_defaults(func=cmd_tune, spec_fields=set(spec.__dataclass_fields__))


def _add_cost_commands(sub) -> None:
    p = sub.add_parser("cost", help="metered costs, reports, budgets, forecasts and advice")
    csub = p.add_subparsers(dest="cost_command", required=True, metavar="ACTION")
    cp = csub.add_parser("show", help="a job's cost (live while it runs)")
    cp.add_argument("job_id")
    cp.set_defaults(func=cmd_cost_show)
    cp = csub.add_parser("report", help="spend grouped by tenant, trainer, day or state")
    cp.add_argument("--since", default="30d", help="7d, 12h, 2w or an ISO date")
    cp.add_argument("--by", default="tenant,trainer", help="comma-separated: tenant, trainer, day, state")
    cp.set_defaults(func=cmd_cost_report)
    cp = csub.add_parser("budget", help="spend plus running and queued forecasts against a budget (exit 1 if not ok)")
    cp.add_argument("budget_usd", nargs="?", type=float, default=None,
                    help="USD (default: the tenant's budget_usd in queue.yaml, per calendar month)")
    cp.add_argument("--since", default=None, help="default: the start of this month")
    cp.set_defaults(func=cmd_cost_budget)
    cp = csub.add_parser("forecast", help="remaining time and cost of a queued or running job")
    cp.add_argument("job_id")
    cp.set_defaults(func=cmd_cost_forecast)
    cp = csub.add_parser("estimate", help="time and cost of a run not started, from past runs")
    trainers = cp.add_subparsers(dest="trainer", required=True, metavar="TRAINER")
    for name, spec in TRAINERS.items():
        tp = trainers.add_parser(name, help=f"estimate a {name} run")
        add_arguments(tp, spec, with_defaults=False)
        tp.add_argument("--tenant", default=None, help=argparse.SUPPRESS)
        tp.set_defaults(func=cmd_cost_estimate, spec_fields=set(spec.__dataclass_fields__))
    cp = csub.add_parser("advise", help="savings measured from a finished run and past runs")
    cp.add_argument("run_id", help="the MLflow run id")
    cp.set_defaults(func=cmd_cost_advise)
    for action in csub.choices.values():
        if action.get_default("func") is not cmd_cost_estimate:
            action.add_argument("--tenant", default=None, help="act as this tenant only")


def cmd_models_list(args, settings) -> int:
    from trainers.registry import list_models

    models = list_models(settings.tracking_uri)
    if not models:
        print("no model registered yet: a finished `oppen train mnist` (or llm) run registers one")
    for m in models:
        print(f"{m['name']}  (serving: {m['serve']})")
        for v in m["versions"][:args.limit]:
            tags = v["tags"]
            metric = tags.get("metric")
            score = f"{metric}={tags[metric]}" if metric in tags else ""
            aliases = f" [{', '.join(v['aliases'])}]" if v["aliases"] else ""
            print(f"  v{v['version']:<4}{aliases:14} {score:24} cost ${tags.get('cost_usd', 'n/a'):<10} "
                  f"run {v['run_id']}")
    return 0


def cmd_models_register(args, settings) -> int:
    from ray_apps.audit import AuditLog
    from trainers.registry import register_run

    audit, asked = AuditLog.from_settings(settings), {"run_id": args.run_id}
    with audit.refusals(_actor(), "model.register", args.run_id, asked):
        mv = register_run(settings.tracking_uri, args.run_id)
    audit.record(_actor(), "model.register", mv.name, {**asked, "version": mv.version})
    print(f"{mv.name} version {mv.version} <- run {mv.run_id}")
    return 0


def cmd_models_promote(args, settings) -> int:
    from ray_apps.audit import AuditLog
    from trainers.registry import promote

    audit, asked = AuditLog.from_settings(settings), {"version": args.version, "alias": args.alias}
    with audit.refusals(_actor(), "model.promote", args.name, asked):  # an alias move: what it serves may change
        mv = promote(settings.tracking_uri, args.name, args.version, args.alias)
    audit.record(_actor(), "model.promote", args.name, asked)
    print(f"{args.name}@{args.alias} -> version {mv.version}; replicas serving that alias move within seconds")
    return 0


def cmd_models_serve(args, settings) -> int:
    """Choose the served version, then follow the replica until it serves it (or --no-wait)."""
    import requests

    from ray_apps.cluster import serve_url
    from ray_apps.scheduler.api import store_url
    from ray_apps.scheduler.provenance import serve_if_allowed
    from ray_apps.scheduler.store import JobStore
    from trainers.registry import Selector

    selector = Selector(alias=args.alias, version=args.version)
    mv = serve_if_allowed(settings.tracking_uri, JobStore(store_url(settings)), args.name, selector,
                          allow_any_run=args.allow_any_run, actor=_actor())
    print(f"{args.name}: serving {selector} = version {mv.version}")
    if args.no_wait or not entry_for(args.name).stays_loaded:  # scales to zero: loads on its next request
        return 0
    url, deadline = f"{serve_url(settings)}/v1/models", time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        try:
            token = os.environ.get("OPPEN_TOKEN")  # the models API needs one once tokens exist
            listing = requests.get(url, timeout=10,
                                   headers={"Authorization": f"Bearer {token}"} if token else {}).json()
            replica = next(m for m in listing if m["name"] == args.name)["replica"]
            if replica and replica["version"] == mv.version:
                print(f"{args.name}: replicas now answer with version {mv.version}")
                return 0
        except (requests.RequestException, ValueError, StopIteration, KeyError, TypeError):
            pass  # Serve busy or restarting: ask again
        time.sleep(1)
    print(f"error: the {args.name} replicas did not report version {mv.version} within {args.timeout:.0f} s "
          f"(is the platform up? `oppen status`)", file=sys.stderr)
    return 1


def _add_models_commands(sub) -> None:
    p = sub.add_parser("models", help="the model registry and what Ray Serve serves")
    msub = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    mp = msub.add_parser("list", help="registered versions, aliases, metric and cost")
    mp.add_argument("--limit", type=int, default=5, help="versions per model (default: 5)")
    mp.set_defaults(func=cmd_models_list)
    mp = msub.add_parser("register", help="register a finished run's model (runs register themselves)")
    mp.add_argument("run_id")
    mp.set_defaults(func=cmd_models_register)
    mp = msub.add_parser("promote", help="point an alias at a version, e.g. promote mnist 3 --alias champion")
    mp.add_argument("name", choices=servable())
    mp.add_argument("version")
    mp.add_argument("--alias", default="champion", help="(default: champion)")
    mp.set_defaults(func=cmd_models_promote)
    mp = msub.add_parser("serve", help="serve a version or an alias; replicas roll over without failed requests")
    mp.add_argument("name", choices=servable())
    which = mp.add_mutually_exclusive_group()
    which.add_argument("--alias", default=None, help="follow this alias (moves with `promote`)")
    which.add_argument("--version", default=None, help="pin this version")
    mp.add_argument("--allow-any-run", action="store_true",
                    help="serve it although no job of this platform made its run (an admin's choice)")
    mp.add_argument("--no-wait", action="store_true", help="do not wait for the replicas to roll over")
    mp.add_argument("--timeout", type=float, default=120, help="seconds to wait (default: 120)")
    mp.set_defaults(func=cmd_models_serve)


def _dataset_catalog():
    from trainers.dataset_catalog import load_catalog

    return load_catalog()  # configs/datasets.yaml, or $OPPEN_DATASETS_FILE: what every trainer reads


def _data_dir(settings) -> Path:
    from ray_apps.processes import private_dir

    return private_dir(settings.data_dir)  # hash caches and fetched built-ins live there, as for the trainers


def cmd_data_list(args, settings) -> int:
    catalog = _dataset_catalog()
    print(f"{'NAME':16} {'KIND':7} {'SOURCE':34} DESCRIPTION")
    for ds in catalog.datasets.values():
        source = ds.source.uri if len(ds.source.uri) <= 34 else "..." + ds.source.uri[-31:]
        print(f"{ds.name:16} {ds.kind:7} {source:34} {ds.description}")
    print(f"(catalog: {catalog.path}; details: oppen data show NAME)")
    return 0


def cmd_data_show(args, settings) -> int:
    from trainers.fingerprint import fingerprint

    ds = _dataset_catalog().get(args.name)
    fp = fingerprint(ds, _data_dir(settings))
    if args.json:
        print(json.dumps({**fp.as_dict(), "description": ds.description, "digest": fp.digest}, indent=2))
        return 0
    split = (f"test_source {ds.test_source.uri}" if ds.test_source else
             "built-in split" if ds.builtin else f"{ds.test_fraction:g} held out by row hash")
    print(f"{fp.name}: {ds.description}")
    print(f"  kind      {fp.kind} ({fp.format})")
    print(f"  source    {fp.source}" + (f"  (from {fp.origin})" if fp.origin != fp.source else ""))
    print(f"  rows      {fp.rows:,} {fp.unit}: {fp.train_rows:,} train / {fp.test_rows:,} held out ({split})")
    print(f"  files     {fp.files:,}")
    print("  schema    " + "\n            ".join(f"{name}: {kind}" for name, kind in fp.schema))
    print(f"  sha256    {fp.sha256}  (MLflow input digest: {fp.digest})")
    return 0


def cmd_data_preview(args, settings) -> int:
    from trainers.ingest import preview

    ds = _dataset_catalog().get(args.name)
    for row in preview(ds, _data_dir(settings), args.rows):
        print("  ".join(f"{k}={v}" if k != "text" else f"| {v}" for k, v in row.items()))
    return 0


def _add_data_commands(sub) -> None:
    p = sub.add_parser("data", help="the dataset catalog (configs/datasets.yaml): names, hashes, rows, schema")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    dsub.add_parser("list", help="every dataset: name, kind, source").set_defaults(func=cmd_data_list)
    dp = dsub.add_parser("show", help="one dataset: source, kind, rows, schema and content hash (sha256)")
    dp.add_argument("name")
    dp.add_argument("--json", action="store_true", help="as JSON")
    dp.set_defaults(func=cmd_data_show)
    dp = dsub.add_parser("preview", help="its first rows (images as size and label, text cut short)")
    dp.add_argument("name")
    dp.add_argument("--rows", type=int, default=5, help="how many (default: 5)")
    dp.set_defaults(func=cmd_data_preview)


def _kuberay(args):
    from ray_apps.kube import KubeRayClient, load_api_client

    return KubeRayClient(load_api_client(args.kubeconfig, args.context), namespace=args.namespace)


def _kube_line(obj: dict) -> str:
    status = obj.get("status") or {}
    state = (status.get("jobDeploymentStatus") or status.get("state") or status.get("serviceStatus") or "-")
    job = f" job={status['jobStatus']}" if status.get("jobStatus") else ""
    return f"{obj['kind']:11} {obj['metadata']['name']:24} {state}{job}"


def cmd_kube_list(args, settings) -> int:
    for obj in _kuberay(args).list(args.kind, args.selector):
        print(_kube_line(obj))
    return 0


def cmd_kube_apply(args, settings) -> int:
    """Create every KubeRay object in a manifest file (e.g. kuberay/ray-job.mnist.yaml)."""
    client = _kuberay(args)
    docs = [d for d in yaml.safe_load_all(Path(args.file).read_text()) if d]
    for doc in docs:
        created = client.create(doc)
        print(f"created {_kube_line(created)}")
        if args.wait and doc["kind"] == "RayJob":
            try:
                status = client.wait_rayjob(doc["metadata"]["name"], timeout_s=args.timeout,
                                            on_status=lambda st: print(f"  {st.get('jobDeploymentStatus') or 'New'}"
                                                                       f" {st.get('jobStatus') or ''}", flush=True))
            except TimeoutError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            if status.get("jobStatus") != "SUCCEEDED":
                print(f"RayJob {doc['metadata']['name']} ended {status.get('jobStatus')}: "
                      f"{status.get('message', '')}", file=sys.stderr)
                return 1
    return 0


def cmd_kube_delete(args, settings) -> int:
    _kuberay(args).delete(args.kind, args.name)
    print(f"deleted {args.kind} {args.namespace}/{args.name}")
    return 0


def _add_kube_commands(sub) -> None:
    p = sub.add_parser("kube", help="KubeRay RayJobs/RayClusters/RayServices on Kubernetes (kuberay/)")
    ksub = p.add_subparsers(dest="kube_command", required=True, metavar="ACTION")
    kp = ksub.add_parser("list", help="list RayJobs, RayClusters or RayServices")
    kp.add_argument("kind", choices=["rayjobs", "rayclusters", "rayservices"])
    kp.add_argument("-l", "--selector", default=None, help="label selector, e.g. oppen/trainer=mnist")
    kp.set_defaults(func=cmd_kube_list)
    kp = ksub.add_parser("apply", help="create the KubeRay objects of a manifest file")
    kp.add_argument("file", help="e.g. kuberay/ray-job.mnist.yaml")
    kp.add_argument("--wait", action="store_true", help="follow a RayJob to its end; exit 1 unless it succeeded")
    kp.add_argument("--timeout", type=float, default=3600, help="seconds to wait (default: 3600)")
    kp.set_defaults(func=cmd_kube_apply)
    kp = ksub.add_parser("delete", help="delete one object (a RayJob takes its own cluster with it)")
    kp.add_argument("kind", choices=["rayjob", "raycluster", "rayservice"])
    kp.add_argument("name")
    kp.set_defaults(func=cmd_kube_delete)
    for action in ksub.choices.values():
        action.add_argument("-n", "--namespace", default="oppen", help="namespace (default: oppen)")
        action.add_argument("--kubeconfig", default=None, help="default: $KUBECONFIG or ~/.kube/config")
        action.add_argument("--context", default=None, help="kubeconfig context (default: its current one)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
        return args.func(args, settings)
    except OppenError as exc:  # every refusal of the platform, as the REST API gives it (kind, field)
        where = f"{exc.kind}: {exc.field}" if exc.field else exc.kind
        print(f"error: {exc} [{where}]", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
