"""Which registered model versions may be served: those whose MLflow run a job of this queue made.

MLflow has no authentication, so anyone who reaches it can register a version or move the serving
tag. Weights-only storage keeps such a version from running code; this keeps it from being served:
a version from a run the queue did not start (or adopt) is served only once an admin allows it.
"""

from __future__ import annotations

from ray_apps.audit import Actor, AuditLog
from ray_apps.scheduler.store import JobStore


def unrecognised(store: JobStore, name: str, version: str, run_id: str | None) -> str | None:
    """Why this version may not be served, or None when it may."""
    if run_id and store.platform_run(run_id):
        return None
    if store.serving_allowed(name, version):
        return None
    return (f"version {version} of {name} comes from run {run_id or '(none)'}, which no job of this platform's "
            "queue made; an admin may serve it anyway: `oppen models serve "
            f"{name} --version {version} --allow-any-run`, or POST /v1/models/{name}/serve with "
            '"allow_any_run": true')


def serve_if_allowed(tracking_uri: str, store: JobStore, name: str, selector, *, allow_any_run: bool = False,
                     actor: Actor | None = None):
    """Point the serving replicas at `selector`, if what it names may be served (RegistryError if not).
    `allow_any_run` (an admin's choice) records the version as allowed whatever made it. Audited as
    `model.serve` by `actor` (every front-end that changes what is served comes through here)."""
    asked = {"selector": str(selector), "allow_any_run": allow_any_run}
    audit = AuditLog(store.engine)
    actor = actor or Actor.local("api")
    try:
        served = _serve(tracking_uri, store, name, selector, allow_any_run)
    except Exception as exc:
        audit.record(actor, "model.serve", name, asked, outcome="refused", reason=str(exc))
        raise
    audit.record(actor, "model.serve", name, {**asked, "version": served.version})
    return served


def _serve(tracking_uri: str, store: JobStore, name: str, selector, allow_any_run: bool):
    from trainers.registry import RegistryError, resolve, set_serving

    mv = resolve(tracking_uri, name, selector)
    why = unrecognised(store, name, mv.version, mv.run_id)
    if why and not allow_any_run:
        raise RegistryError(why, "version")
    served = set_serving(tracking_uri, name, selector)  # refuses what is not stored as weights
    if why:
        store.allow_serving(name, mv.version)
    return served
