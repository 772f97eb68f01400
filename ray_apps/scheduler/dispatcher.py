"""The dispatcher: moves queued jobs into Ray when they fit, and follows them out.

Invariants (see also `store` and `policy`):
- Stateless: every cycle reads the store and Ray afresh, so it can be killed at
  any point and restarted, by hand or by its supervisor.
- A job reaches Ray only through QUEUED -> STARTING (an atomic store transition
  that records the attempt's Ray submission id) followed by `submit_job` with that
  id. A crash between the two is repaired next cycle: a STARTING job unknown to
  Ray is submitted again under the same id; Ray refuses a second job with an id it
  knows, so no job runs twice.
- Admission only when the whole gang fits the free resources (policy.plan), with
  resources of admitted jobs that Ray does not show as used yet counted as taken,
  so nothing waits PENDING inside Ray longer than a node start.
- Autoscaling: a gang that fits only once the worker groups grow is asked of Ray's
  autoscaler (the bundles of every active gang plus the waiting ones, since Ray
  sizes the cluster for the whole ask) and admitted when the nodes have joined;
  the ask is withdrawn when no job waits for nodes, so idle nodes scale down.
- Preemption: RUNNING -> PREEMPTING and a drain request (`trainers.drain`, in Ray's
  GCS): the trainer checkpoints at its next step and exits; a victim still running
  `drain_grace_s` later (or a search, which does not drain) gets `stop_job`. Once
  Ray reports it ended the job is QUEUED again, the work it lost since its last
  checkpoint is recorded, and its next attempt resumes from that checkpoint (a
  search's next attempt restarts the search under the same parent run).
- Policy inputs (`inputs`): forecasts of queued jobs (computed off the cycle's path
  when a job is first seen), decayed usage, budgets' spend, checkpoint times.
- Visibility: every queued job's wait (kind, reason, position in its class and an
  estimated start with an interval) is published to the store for `queue why`.
- Searches: a job with `search` settings runs as `python -m trainers.tune` over its
  trainer, holding `max_concurrent` trials' gangs from admission to its end.
- Adoption: every ADOPT_S, a catalogued trainer job in Ray's job list that the
  store does not know (submitted around the queue) is recorded (`adoption`), so
  it is metered and shown like the rest.
- Metering: each attempt's start and end as Ray timed them go to the store; a
  finished job's cost is frozen there and written to its MLflow run
  (`ray_apps.costs`), retried each cycle until MLflow takes it.
- Audit: each decision (admit, preempt, requeue) is a record of the audit log by
  `system` through the front-end `dispatcher`, for the job's tenant.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from queue import SimpleQueue

from ray_apps.agent.memory import OutcomeRecorder
from ray_apps.audit import SYSTEM
from ray_apps.autoscaler import ResourceRequester
from ray_apps.costs.forecast import ForecastError
from ray_apps.ray_client import PlatformError, mlflow_healthy, use_ray_token
from ray_apps.scheduler import policy
from ray_apps.scheduler.adoption import ADOPTED_PRIORITY, adopt_unknown
from ray_apps.scheduler.api import Queue, ray_submission_id
from ray_apps.scheduler.capacity import Capacity
from ray_apps.scheduler.inputs import PolicyInputs, checkpoints_of
from ray_apps.scheduler.states import ACTIVE, JobState
from ray_apps.scheduler.store import InvalidTransition, JobRecord, WaitRow
from ray_apps.scheduler.why import wait_rows
from ray_apps.training import create_run, entrypoint_for, submit_entrypoint
from trainers import drain
from trainers.specs import spec_for

log = logging.getLogger("oppen.dispatcher")
HEARTBEAT_FILE = "dispatcher.heartbeat"  # in the settings' state dir, rewritten after every cycle
NODE_SAMPLE_S = 10.0  # how often the worker groups' nodes are counted into node-hours
ADOPT_S = 5.0         # how often Ray's job list is read for jobs submitted around the queue
MLFLOW_CHECK_S = 1.0  # a stalled MLflow must not stall the cycle
WAKE_CHECK_S = 0.05   # between cycles, how often the store is asked whether another process wrote to it
FREEING_S = 3.0       # after a job ends, Ray frees its placement group and actors within about this long,
FREEING_CHECK_S = 0.1  # and jobs left waiting are planned again this often meanwhile, not every poll_s
COST_LOG_S = 2.0      # how often unlogged costs are retried when no job has ended meanwhile
PRUNE_S = 60.0        # how often REJECTED requests past their retention are forgotten


@dataclass
class CycleReport:
    admitted: list[str] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    requeued: list[str] = field(default_factory=list)
    metered: list[str] = field(default_factory=list)
    adopted: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)


def _gang(job: JobRecord) -> policy.Gang:
    return policy.Gang(job.workers, job.cpus_per_worker, job.gpus_per_worker)


def worker_bundles(gang: policy.Gang) -> list[dict[str, float]]:
    """One bundle per worker, as Ray Train's placement group asks for them."""
    bundle = {k: v for k, v in (("CPU", gang.cpus_per_worker), ("GPU", gang.gpus_per_worker)) if v}
    return [dict(bundle) for _ in range(gang.workers)]


class Dispatcher:
    def __init__(self, queue: Queue):
        from ray_apps.costs.service import CostService
        from trainers.pricing import load_catalog

        self.queue = queue
        self.costs = CostService(queue, load_catalog(queue.settings.costs_file))  # meters finished jobs
        self.memory = OutcomeRecorder(queue, self.costs.meter)  # finished jobs to the agent's memory; never raises
        self.inputs = PolicyInputs(queue, self.costs.meter, self.costs.catalog)
        self._client = None
        self._requester = (ResourceRequester(queue.settings.gcs_address) if queue.topology.autoscaling
                           else None)
        self.waiting: dict[str, policy.Wait] = {}  # why each queued job waited, as of the last cycle
        self._published: dict[str, WaitRow] = {}   # what the store holds of it
        self._nodes_sampled_at: float | None = None
        self._adopted_at: float | None = None
        self._pruned_at = 0.0
        self._alive_at: dict[str, float] = {}  # when Ray last reported each active job alive
        self._to_forecast: SimpleQueue[str] | None = None  # queued jobs whose pre-start forecast to record
        self._forecast_asked: set[str] = set()
        self._costs_due: threading.Event | None = None  # set when `run` logs costs to MLflow off the cycle

    @property
    def client(self):
        """Made on first use, inside a cycle: Ray being down at start is a retried cycle, not a crash."""
        if self._client is None:
            self._client = self.queue.ray_client()
        return self._client

    # ------------------------------------------------------------------ one cycle

    def cycle(self, now: float | None = None) -> CycleReport:
        now = time.time() if now is None else now
        report = CycleReport()
        active = self.queue.store.list(states=ACTIVE)
        adopt = self._adopted_at is None or now - self._adopted_at >= ADOPT_S
        # An idle queue costs a few SQLite queries a cycle, and Ray's job list every ADOPT_S.
        if active or adopt:
            try:
                listed = self.client.list_jobs()
            except Exception:  # noqa: BLE001 - Ray away: fatal to this cycle only if it has jobs to follow
                if active:
                    raise
                self._adopted_at, listed = now, []
                log.debug("Ray's job list unavailable; adoption retried in %.0f s", ADOPT_S)
            ray_jobs = {j.submission_id: j for j in listed if j.submission_id}
            for job in active:
                self._reconcile(job, ray_jobs.get(job.ray_submission_id), report)
            self._stop_cancelled(ray_jobs)
            if adopt:
                self._adopted_at = now
                report.adopted = adopt_unknown(self.queue.store, listed, self.queue.store.known_ids(ray_jobs))
        report.metered = self.costs.meter_finished(self._ray_end_time)
        if self._costs_due is None:  # no cost logger running (a cycle called on its own): log them here
            self.costs.log_costs()
        elif report.metered:
            self._costs_due.set()
        if now - self._pruned_at >= PRUNE_S:
            self._pruned_at = now
            self.queue.store.prune_rejected(now - self.queue.config.rejected_retention_s)

        active = self.queue.store.list(states=ACTIVE)
        queued = self.queue.store.list(states=[JobState.QUEUED])
        if not queued:
            self.waiting = {}
            self._publish({}, now)
            if self._requester is not None and self._requester.current:  # an idle queue never calls Ray
                self._requester.withdraw()
            self._sample_nodes(now)
            return report
        capacity = self.queue.capacity()
        self._sample_nodes(now, capacity)
        self._forecast_later([j.id for j in queued])
        held = self._waiting_for_mlflow(queued)
        considered = [j for j in queued if j.id not in held]
        store, cfg = self.queue.store, self.queue.config.policy()
        running = [j for j in active if j.state is not JobState.PREEMPTING]
        forecasts = store.forecasts([j.id for j in considered + running])
        queued_jobs = self.inputs.queued(considered, forecasts)
        running_jobs = self.inputs.running(running, forecasts, checkpoints_of(self.queue.settings.gcs_address,
                                                                              running), self._policy_class)
        free = self._free_nodes(active, capacity.resources)
        plan = policy.plan(queued_jobs, running_jobs, free, cfg, now, addable=capacity.addable,
                           usage=self.inputs.usage(now), spend=self.inputs.spend(now, store.forecasts),
                           active_jobs=len(active))
        self.waiting = {**plan.waiting, **{i: policy.Wait("mlflow", why) for i, why in held.items()}}
        for job_id, why in plan.reject.items():
            if self._reject(job_id, why):
                report.rejected.append(job_id)
        for job_id in plan.preempt:
            if self._preempt(job_id, plan.lost.get(job_id)):
                report.preempted.append(job_id)
        for job_id in plan.admit:
            if self._admit(job_id):
                report.admitted.append(job_id)
        if report.admitted or report.preempted:
            self.inputs.invalidate()
        self._ask_autoscaler(plan, active, queued)
        self._publish_plan(plan, queued_jobs, running_jobs, forecasts, free, queued, now)
        return report

    # ------------------------------------------------------------------ why pending

    def _publish_plan(self, plan: policy.Plan, queued_jobs: list[policy.QueuedJob],
                      running_jobs: list[policy.RunningJob], forecasts, free, queued: list[JobRecord],
                      now: float) -> None:
        considered = {j.id for j in queued_jobs}
        held = [policy.QueuedJob(j.id, j.tenant, j.priority, j.submitted_at, _gang(j)) for j in queued
                if j.id not in considered]  # waiting for MLflow, out of the plan
        self._publish(wait_rows(plan, queued_jobs, held, running_jobs, forecasts, free, self.waiting, now), now)

    def _publish(self, rows: dict[str, WaitRow], now: float) -> None:
        try:
            self.queue.store.publish_waits(rows, self._published, now)
            self._published = rows
        except Exception as exc:  # noqa: BLE001 - visibility must not stop scheduling; next cycle rewrites
            log.warning("could not publish why jobs wait: %s", exc)
            self._published = {}

    def _waiting_for_mlflow(self, queued: list[JobRecord]) -> dict[str, str]:
        """Jobs that log to MLflow wait while it is unreachable, out of the plan: what they would have
        taken goes to jobs that do not need it, instead of being held for a start that cannot happen."""
        tracked = [j for j in queued if spec_for(j.trainer).tracked and not j.mlflow_run_id]
        if not tracked:
            return {}
        uri = self.queue.settings.tracking_uri
        if mlflow_healthy(uri, timeout=MLFLOW_CHECK_S):
            return {}
        return {j.id: f"waiting for MLflow at {uri} (unreachable); jobs that need no MLflow go first"
                for j in tracked}

    def _policy_class(self, job: JobRecord) -> str:
        """An adopted job counts in its tenant's usage but is never a victim: the queue did not start it."""
        if job.priority in self.queue.config.priorities:
            return job.priority
        return max(self.queue.config.priorities, key=lambda name: self.queue.config.priorities[name].rank)

    def _sample_nodes(self, now: float, capacity: Capacity | None = None) -> None:
        """Count the worker groups' joined nodes into node-hours (every NODE_SAMPLE_S; idle nodes too),
        from this cycle's capacity when it read one."""
        if not self.queue.topology.autoscaling:
            return
        if self._nodes_sampled_at is not None and now - self._nodes_sampled_at < NODE_SAMPLE_S:
            return
        last, self._nodes_sampled_at = self._nodes_sampled_at, now
        try:
            groups = (capacity or self.queue.capacity()).groups
        except PlatformError as exc:  # Ray away: no sample (the gap is not counted)
            log.debug("no node sample: %s", exc)
            self._nodes_sampled_at = None
            return
        if last is None:
            return  # the first sample only starts the clock
        seconds = min(now - last, 3 * NODE_SAMPLE_S)  # a long gap (Ray away) is not guessed at
        for g in groups.values():
            if g.joined:
                self.queue.store.add_node_usage(g.name, now, g.joined, g.cpus, g.gpus, seconds)

    def _ask_autoscaler(self, plan: policy.Plan, active: list[JobRecord], queued: list[JobRecord]) -> None:
        if self._requester is None:
            return
        if not plan.scale_up:
            self._requester.withdraw()
            return
        by_id = {j.id: j for j in queued}
        gangs = [_gang(j) for j in active] + [_gang(by_id[i]) for i in plan.admit + plan.scale_up]
        self._requester.request([bundle for g in gangs for bundle in worker_bundles(g)])

    def _forecast_later(self, job_ids: list[str]) -> None:
        """Forecast each queued job once, off the cycle's path (MLflow is slower than SQLite): budgets
        and backfill read it at admission, the forecast-error metric compares it with the metered cost."""
        new = [i for i in job_ids if i not in self._forecast_asked]
        if not new:
            return
        if self._to_forecast is None:
            self._to_forecast = SimpleQueue()
            threading.Thread(target=self._forecaster, name="admission-forecasts", daemon=True).start()
        known = self.queue.store.forecasts(new)
        for job_id in new:
            self._forecast_asked.add(job_id)
            if job_id not in known:
                self._to_forecast.put(job_id)

    def _forecaster(self) -> None:
        while True:
            job_id = self._to_forecast.get()
            try:
                job = self.queue.store.get(job_id)
                try:
                    f = None if job.search else self.costs.forecast_new(job.trainer, job.params)
                except ForecastError:  # a trainer that reports no progress: nothing to scale from
                    f = None
                if f is not None and f.total_usd is not None:
                    self.queue.store.save_forecast(job.id, time.time(), f.total_usd, f.total_usd_low,
                                                   f.total_usd_high, run_s_low=f.remaining_s_low,
                                                   run_s_high=f.remaining_s_high)
                else:  # no past run (or a search): its price for the assumed run time, run time unknown
                    usd = self.inputs.fallback_usd(job)
                    self.queue.store.save_forecast(job.id, time.time(), usd, usd, usd, basis="price")
            except Exception as exc:  # noqa: BLE001 - untracked trainer, MLflow away: asked again next time
                self._forecast_asked.discard(job_id)
                log.debug("no admission forecast for %s: %s", job_id, exc)

    def _free_nodes(self, active: list[JobRecord], res) -> list[policy.Node]:
        nodes = res.node_free()
        # Admitted jobs reserve their workers seconds after they start: count the gap as taken.
        owed_cpu = sum(_gang(j).cpus for j in active) - res.used.get("CPU", 0.0)
        owed_gpu = sum(_gang(j).gpus for j in active) - res.used.get("GPU", 0.0)
        if owed_cpu > 0 or owed_gpu > 0:
            nodes = policy.hold(policy.Gang(1, max(owed_cpu, 0.0), max(owed_gpu, 0.0)), nodes)
        return nodes

    # ------------------------------------------------------------------ transitions

    def _reconcile(self, job: JobRecord, info, report: CycleReport) -> None:
        status = info.status.value if info else None
        try:
            if info is None:
                if job.priority == ADOPTED_PRIORITY:  # not ours to submit or start again
                    self.queue.store.transition(job.id, JobState.FAILED, expect=job.state,
                                                message="no longer known to Ray (head restarted?)")
                    self.queue.store.attempt_ended(job.id, job.attempt, time.time())
                    report.finished.append(job.id)
                elif job.state is JobState.STARTING:  # crashed between STARTING and submit: submit now
                    self._submit(job)
                elif job.state in (JobState.RUNNING, JobState.PREEMPTING):  # lost with a restarted head
                    self.queue.store.transition(job.id, JobState.QUEUED, expect=job.state,
                                                message="not known to Ray (head restarted?); requeued to resume")
                    self._audit("job.requeue", job, "not known to Ray (head restarted?); requeued to resume")
                    # Billed to the last moment it was seen running, not to when its loss was noticed.
                    self.queue.store.attempt_ended(job.id, job.attempt, self._alive_at.pop(job.id, time.time()))
                    report.requeued.append(job.id)
                return
            started = (info.start_time or time.time() * 1000) / 1000
            if status in ("PENDING", "RUNNING"):
                self._alive_at[job.id] = time.time()
            else:
                self._alive_at.pop(job.id, None)
            if job.state is JobState.PREEMPTING and status in ("PENDING", "RUNNING") and (
                    job.search or time.time() - job.updated_at >= self.queue.config.preemption.drain_grace_s):
                self._stop(job.ray_submission_id)  # past its grace (or a stop Ray has not acted on yet)
            if status == "RUNNING" and job.state is JobState.STARTING:
                self.queue.store.transition(job.id, JobState.RUNNING, expect=job.state, started_at=started)
                self.queue.store.attempt_started(job.id, job.attempt, started)
            elif status in ("SUCCEEDED", "FAILED", "STOPPED"):
                ended = (info.end_time or time.time() * 1000) / 1000
                # The attempt's Ray run time is what the job is charged for, whatever comes next.
                self.queue.store.attempt_ended(job.id, job.attempt, ended, started_at=started)
                if job.state is JobState.PREEMPTING and status != "SUCCEEDED":
                    self.queue.store.transition(job.id, JobState.QUEUED, expect=job.state,
                                                message="preempted; resumes from its last checkpoint")
                    self._audit("job.requeue", job, "preempted; resumes from its last checkpoint")
                    self._preemption_ended(job, ended)
                    report.requeued.append(job.id)
                    return
                final = JobState.SUCCEEDED if status == "SUCCEEDED" else JobState.FAILED
                message = (info.message or "")[:500] if final is JobState.FAILED else ""
                if status == "STOPPED":
                    message = "stopped outside the queue"
                self.queue.store.transition(job.id, final, expect=job.state, message=message, ended_at=ended,
                                            started_at=job.started_at or (info.start_time or 0) / 1000 or None)
                self._clear_drain(job)
                report.finished.append(job.id)
                self.memory.job_ended(job.id, self.client)
        except InvalidTransition:
            pass  # someone else (a cancel, another dispatcher) moved it first: theirs stands

    def _stop_cancelled(self, ray_jobs: dict) -> None:
        """A job the queue has cancelled stops in Ray, however the two raced (a cancel while it was being
        admitted, a stop that failed): asked again every cycle until Ray says it is over."""
        live = [sid for sid, info in ray_jobs.items() if info.status.value in ("PENDING", "RUNNING")]
        for sid in self.queue.store.cancelled_submissions(live):
            self._stop(sid)

    def _stop(self, submission_id: str) -> None:
        try:
            self.client.stop_job(submission_id)
            log.info("stopping %s in Ray", submission_id)
        except Exception as exc:  # noqa: BLE001 - Ray not ready or away: the next cycle asks again
            log.warning("could not stop %s yet: %s", submission_id, exc)

    def _ray_end_time(self, job: JobRecord) -> float | None:
        """When Ray ended a job the queue finished on its own (a cancel): closes its open attempt."""
        try:
            info = self.client.get_job_info(job.ray_submission_id)
        except Exception:  # noqa: BLE001 - unknown to Ray or Ray down: the job's own end time stands
            return None
        return info.end_time / 1000 if info.end_time else None

    def _preempt(self, job_id: str, lost: tuple[float, float] | None = None) -> bool:
        """Ask the victim to drain (checkpoint at its next step and exit); `_reconcile` stops it if it
        is still running after the grace period. A search does not drain: it is stopped now."""
        grace = self.queue.config.preemption.drain_grace_s
        try:
            job = self.queue.store.transition(
                job_id, JobState.PREEMPTING, expect=JobState.RUNNING,
                message=f"preempted: asked to checkpoint at its next step and exit (stopped after {grace:g} s)")
        except InvalidTransition:
            return False
        cpu_s, gpu_s = lost or (0.0, 0.0)
        self._audit("job.preempt", job, job.message, cpu_s_at_risk=round(cpu_s, 1), gpu_s_at_risk=round(gpu_s, 1))
        if job.search or not self._request_drain(job):
            self._stop(job.ray_submission_id)  # retried by _reconcile while Ray still runs it
        log.info("preempting %s", job_id)
        return True

    def _request_drain(self, job: JobRecord) -> bool:
        use_ray_token()  # as for every GCS client of this process
        try:
            drain.request_drain(self.queue.settings.gcs_address, job.ray_submission_id, time.time())
            return True
        except Exception as exc:  # noqa: BLE001 - GCS away: no drain, a plain stop
            log.warning("could not ask %s to drain (%s): stopping it", job.id, exc)
            return False

    def _preemption_ended(self, job: JobRecord, ended: float) -> None:
        """Record the work the preemption threw away: from the victim's last checkpoint (a drained one
        saved just before it exited) to its end, x its resources."""
        sid = job.ray_submission_id or ""
        try:
            ckpt = drain.checkpoint_records(self.queue.settings.gcs_address, [sid]).get(sid)
        except Exception as exc:  # noqa: BLE001 - GCS away: counted from its start
            log.debug("no checkpoint time for %s: %s", job.id, exc)
            ckpt = None
        started = job.started_at or job.submitted_at
        since = max(started, ckpt.at) if ckpt is not None else started
        seconds = max(0.0, ended - since)
        gang = _gang(job)
        self.queue.store.record_preemption(job.id, job.attempt, ended, seconds * gang.cpus, seconds * gang.gpus,
                                           drained=bool(ckpt is not None and ckpt.drained))
        self._clear_drain(job)

    def _clear_drain(self, job: JobRecord) -> None:
        if not job.ray_submission_id:
            return
        try:
            drain.clear(self.queue.settings.gcs_address, job.ray_submission_id)
        except Exception as exc:  # noqa: BLE001 - keys of an ended attempt are small; left for later
            log.debug("could not clear drain keys of %s: %s", job.id, exc)

    def _reject(self, job_id: str, why: str) -> bool:
        try:
            job = self.queue.store.transition(job_id, JobState.REJECTED, expect=JobState.QUEUED, message=why)
        except InvalidTransition:
            return False
        self._audit("job.reject", job, why)
        log.info("rejected %s: %s", job_id, why)
        return True

    def _admit(self, job_id: str) -> bool:
        job = self.queue.store.get(job_id)
        attempt = job.attempt + 1
        fields = {"attempt": attempt, "ray_submission_id": ray_submission_id(job, attempt)}
        if spec_for(job.trainer).tracked and not job.mlflow_run_id:
            tags = {"oppen.tenant": job.tenant, "oppen.priority": job.priority,
                    **({"oppen.tune": "true"} if job.search else {})}  # a search's run is its trials' parent
            try:
                # This cycle's _waiting_for_mlflow found MLflow healthy, or the job would not be planned.
                fields["mlflow_run_id"] = create_run(self.queue.settings, job.trainer, job.id, tags=tags,
                                                     checked=True)[0]
            except Exception as exc:  # noqa: BLE001 - MLflow down: keep the job queued, say why
                log.warning("cannot create the MLflow run for %s: %s", job_id, exc)
                return False
        try:
            job = self.queue.store.transition(job_id, JobState.STARTING, expect=JobState.QUEUED,
                                              message=f"admitted (attempt {attempt})", **fields)
        except InvalidTransition:
            return False
        self._audit("job.admit", job, job.message, ray_submission_id=job.ray_submission_id)
        self._submit(job)
        log.info("admitted %s as %s", job_id, job.ray_submission_id)
        return True

    def _audit(self, action: str, job: JobRecord, reason: str, **params) -> None:
        """The dispatcher's own decision, for the job's tenant to read."""
        if self.queue.audit is not None:
            self.queue.audit.record(SYSTEM, action, job.id, {"attempt": job.attempt, **params}, reason=reason,
                                    tenant=job.tenant)

    def _submit(self, job: JobRecord) -> None:
        if self.queue.store.get(job.id).state is not JobState.STARTING:
            return  # cancelled while being admitted: never handed to Ray (a later cancel is swept)
        extra = ["--run-name", job.id]
        if job.mlflow_run_id:
            extra += ["--mlflow-run-id", job.mlflow_run_id]
        if job.attempt > 1:
            extra.append("--resume")
        meta = {"queue_job_id": job.id, "trainer": job.trainer, "tenant": job.tenant, "priority": job.priority,
                "attempt": str(job.attempt), **({"mlflow_run_id": job.mlflow_run_id} if job.mlflow_run_id else {}),
                **({"kind": "tune"} if job.search else {})}
        try:
            submit_entrypoint(self.queue.settings, job.ray_submission_id,
                              entrypoint_for(job.trainer, job.params, extra, search=job.search), meta,
                              topology=self.queue.topology, client=self._client)
        except RuntimeError as exc:
            if "already exists" not in str(exc):
                raise

    # ------------------------------------------------------------------ loop

    def run(self, stop: threading.Event | None = None) -> None:
        """Cycle until `stop` is set; a failing cycle is logged and retried, never fatal."""
        stop = stop or threading.Event()
        log.info("dispatcher running against %s", self.queue.settings.dashboard_url)
        watch = self.queue.store.change_watch()
        self._costs_due = threading.Event()
        threading.Thread(target=self._cost_logger, args=(stop,), name="cost-logger", daemon=True).start()
        freeing_until = 0.0
        while not stop.is_set():
            ok, started = False, time.time()
            if watch is not None:
                watch.mark()
            try:
                report = self.cycle()
                ok = True
                if any(vars(report).values()):
                    log.info("cycle: %s", report)
                if report.finished or report.preempted or report.requeued:
                    freeing_until = time.monotonic() + FREEING_S
            except Exception:  # noqa: BLE001 - a cycle is retried; the store is the state
                log.exception("dispatcher cycle failed; retrying")
            self._beat(ok)
            # A job submitted while the cycle ran may have come after it read the queue; the jobs are
            # read again only when someone wrote to the store meanwhile (an idle cycle writes nothing).
            if ok and watch is not None and watch.changed() and self._submitted_since(started):
                continue
            # A job that waits for what an ended job held gets it as soon as Ray has freed it.
            soon = bool(self.waiting) and time.monotonic() < freeing_until
            self._wait(stop, watch, FREEING_CHECK_S if soon else self.queue.config.poll_s)

    def _cost_logger(self, stop: threading.Event) -> None:
        """Metered costs and phases go to the jobs' MLflow runs here, off the cycle: several MLflow
        requests per job, which a cycle admitting a job just submitted must not wait for."""
        while not stop.is_set():
            self._costs_due.wait(COST_LOG_S)
            self._costs_due.clear()
            try:
                self.costs.log_costs()
            except Exception:  # noqa: BLE001 - retried on the next round; the store keeps them unlogged
                log.exception("logging costs to MLflow failed; retrying")

    def _submitted_since(self, since: float) -> bool:
        return any(j.submitted_at >= since for j in self.queue.store.list(states=[JobState.QUEUED]))

    def _wait(self, stop: threading.Event, watch, seconds: float) -> None:
        """Until the next cycle: `seconds`, or less once another process has written to the store (a
        job submitted or cancelled is acted on at once, not at the next poll). A job submitted while
        the cycle ran is caught by `_submitted_since` before this."""
        if watch is None:
            stop.wait(seconds)
            return
        watch.mark()  # this cycle's own writes are not news
        deadline = time.monotonic() + seconds
        while not stop.wait(min(WAKE_CHECK_S, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline or watch.changed():
                return

    @property
    def heartbeat_path(self) -> Path:
        return self.queue.settings.state_dir / HEARTBEAT_FILE

    def _beat(self, ok: bool) -> None:
        """Touch the heartbeat after every cycle, failed or not: a loop that hangs stops beating
        (the Kubernetes liveness probe and `oppen status` read its age)."""
        try:
            self.heartbeat_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.heartbeat_path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"time": time.time(), "last_cycle_ok": ok, "pid": os.getpid()}))
            tmp.replace(self.heartbeat_path)
        except OSError as exc:
            log.warning("cannot write the heartbeat %s: %s", self.heartbeat_path, exc)
