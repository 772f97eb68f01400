"""`oppen`: the platform's command line, a thin adapter over the Python API."""

from __future__ import annotations

import argparse
import logging
import sys

from ray_apps.cluster import PlatformError
from ray_apps.config import SettingsError, load_settings
from trainers.pricing import CatalogError
from trainers.specs import TRAINERS, SpecError, add_arguments


def cmd_up(args, settings) -> int:
    from ray_apps import cluster

    cluster.up(settings, timeout=args.timeout)
    return cmd_status(args, settings)


def cmd_down(args, settings) -> int:
    from ray_apps import cluster

    cluster.down(settings)
    return 0


def cmd_status(args, settings) -> int:
    from ray_apps import cluster

    rows = cluster.status(settings)
    for row in rows:
        health = "healthy" if row.healthy else "DOWN"
        owner = f"pid {row.pid}, {row.rss_mb:.0f} MB" if row.managed else "external" if row.healthy else "not running"
        print(f"{row.name:7} {health:8} {row.url:28} ({owner})")
    ray_row = rows[0]
    if ray_row.healthy:
        res = cluster.cluster_resources(settings.dashboard_url)
        for name in ("CPU", "GPU"):
            print(f"{'':7} {name}: {res.free(name):g} free / {res.total.get(name, 0):g} total")
    print(f"{'':7} data dir: {settings.data_dir}")
    return 0 if all(r.healthy for r in rows) else 1


def _quiet_ray_client_logs() -> None:
    """Ray logs each working-dir upload step at INFO/WARNING; the CLI shows its own progress."""
    import ray.job_submission  # noqa: F401 - configures Ray's loggers, which we then quiet

    for name in ("ray._private.runtime_env", "ray.dashboard.modules.dashboard_sdk"):
        logging.getLogger(name).setLevel(logging.ERROR)


def cmd_train(args, settings) -> int:
    from ray_apps.training import follow, submit_training

    _quiet_ray_client_logs()
    params = {k: v for k, v in vars(args).items() if k in args.spec_fields}
    sub = submit_training(settings, args.trainer, params)
    print(f"submitted {sub.submission_id}: {sub.entrypoint}")
    print(f"  Ray job: {settings.dashboard_url}/#/jobs/{sub.submission_id}")
    print(f"  MLflow run: {sub.mlflow_run_url}")
    if args.no_follow:
        return 0
    try:
        outcome = follow(settings, sub.submission_id, poll_s=2.0,
                         on_progress=lambda line: print(f"  {line}", flush=True))
    except KeyboardInterrupt:
        print(f"\nstopped following; the job goes on. Stop it with: ray job stop {sub.submission_id}")
        return 130
    if not outcome.ok:
        print(f"job {sub.submission_id} {outcome.status}. Last log lines:", file=sys.stderr)
        print("\n".join(f"  | {line}" for line in outcome.log_tail), file=sys.stderr)
        return 1
    r = outcome.result
    acc, cost = r.get("test_accuracy"), r.get("cost_usd")
    print(f"done in {outcome.seconds:.0f} s: test accuracy {acc:.4f}, cost ${cost:.5f}"
          if acc is not None and cost is not None else f"done in {outcome.seconds:.0f} s")
    print(f"  MLflow run: {sub.mlflow_run_url}")
    if r.get("tracking_lost"):
        print(f"  WARNING: {r['tracking_lost']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oppen", description="ML training on Ray: queue, cost, agent.")
    parser.add_argument("--config", default=None, help="settings file (default: configs/platform.yaml)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("up", help="start the local Ray head and MLflow server")
    p.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for health")
    p.set_defaults(func=cmd_up)
    sub.add_parser("down", help="stop what `oppen up` started").set_defaults(func=cmd_down)
    sub.add_parser("status", help="URLs, health and cluster resources").set_defaults(func=cmd_status)

    p = sub.add_parser("train", help="run a catalogued trainer as a Ray job and follow it")
    trainers = p.add_subparsers(dest="trainer", required=True, metavar="TRAINER")
    for name, spec in TRAINERS.items():
        tp = trainers.add_parser(name, help=f"train {name}")
        add_arguments(tp, spec, with_defaults=False)
        tp.add_argument("--no-follow", action="store_true", default=False, help="submit and return")
        tp.set_defaults(func=cmd_train, spec_fields={f for f in spec.__dataclass_fields__})
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
        return args.func(args, settings)
    except (SettingsError, SpecError, CatalogError, PlatformError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
