"""Draining a running trainer: checkpoint at the next step boundary, exit, resume from that step.

The platform preempts a Ray job by asking it to drain first, waiting a grace period, and
only then stopping it. The channel is Ray's GCS key-value store (namespace `oppen`), which
works alike on a local head and on KubeRay: no shared filesystem is needed.

Contract (one Ray job submission id = one attempt; every key and value is bytes):

- Drain key `oppen/drain/<submission_id>`, written by the platform (`request_drain`):
  JSON `{"at": <wall-clock time of the request, seconds>}`. Its presence is the request.
- Checkpoint key `oppen/checkpoint/<submission_id>`, written by the trainer's rank 0
  after every checkpoint it reports (`DrainWatch.checkpointed`): JSON
  `{"at": t, "epoch": e, "step": s, "drained": bool, "drain_requested_at": a | null}` where
  `at` is the wall-clock time the checkpoint was saved, (`epoch`, `step`) is where the
  next attempt resumes (0-based epoch index and optimizer steps already done inside it,
  so the end of the 1st epoch is epoch 1 step 0), `drained` says this checkpoint was the
  answer to a drain request, and `drain_requested_at` echoes the request's `at` (so an
  answer is matched to its request without comparing two machines' clocks).
- A drained job then exits with `DRAINED_EXIT` (75): Ray reports it FAILED, and the
  driver prints `[oppen] drained at epoch E step S: resumes from this checkpoint`
  (E 1-based, the epoch in progress; S the steps of it done). No model is logged.
- Platform side, by GCS address (`host:port`, no `ray.init`; set up Ray's token auth
  first as for any Ray client): `request_drain`, `last_checkpoints` (wall-clock time of
  each job's latest checkpoint: the work a preemption would lose), `checkpoint_records`
  (the whole records), `drain_acknowledged` (the drained record answering the current
  request, or None) and `clear` (deletes both keys once an attempt is over).
- Worker side: `DrainWatch(submission_id, ...)`, asked `should_stop(step)` at every
  optimizer step boundary. Rank 0 reads the drain key at most every `poll_s` seconds;
  with several workers the ranks agree on the stopping step through one small
  all-reduce every ~`poll_s` seconds of training. Without a submission id (a trainer
  run outside a Ray job, or a Tune trial) it never stops and never touches the store.

Module-level imports are light (no torch, no ray): the dispatcher imports this module.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

NAMESPACE = "oppen"
DRAINED_EXIT = 75          # EX_TEMPFAIL: "try again later"; Ray reports the job FAILED
DRAINED_METRIC = "drained"  # reported as 1 with the drained checkpoint; the driver reads it
KV_TIMEOUT_S = 5.0
log = logging.getLogger("trainers.drain")


def drain_key(submission_id: str) -> bytes:
    return f"{NAMESPACE}/drain/{submission_id}".encode()


def checkpoint_key(submission_id: str) -> bytes:
    return f"{NAMESPACE}/checkpoint/{submission_id}".encode()


@dataclass(frozen=True)
class CheckpointRecord:
    """What the checkpoint key holds: when the latest checkpoint was saved and where it resumes."""

    at: float
    epoch: int
    step: int
    drained: bool = False
    drain_requested_at: float | None = None

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_bytes(cls, raw: bytes | None) -> CheckpointRecord | None:
        """None for a missing or unreadable value (never raises on what another process wrote)."""
        if not raw:
            return None
        try:
            d = json.loads(raw)
            requested = d.get("drain_requested_at")
            return cls(at=float(d["at"]), epoch=int(d["epoch"]), step=int(d["step"]),
                       drained=bool(d.get("drained", False)),
                       drain_requested_at=None if requested is None else float(requested))
        except (ValueError, TypeError, KeyError, AttributeError):
            return None


def _request_at(raw: bytes | None) -> float | None:
    """The `at` of a drain key's value; a value that is not our JSON still counts as a request."""
    if raw is None:
        return None
    try:
        return float(json.loads(raw)["at"])
    except (ValueError, TypeError, KeyError):
        return math.nan


# --------------------------------------------------------------------------- platform side


def _gcs(gcs_address: str):
    """A GCS client, after a quick check that something listens there (Ray's own client would
    retry for tens of seconds first)."""
    host, _, port = gcs_address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=1.0).close()
    except (OSError, ValueError) as exc:
        raise ConnectionError(f"nothing answers at {gcs_address} ({exc})") from None
    from ray._raylet import GcsClient

    return GcsClient(address=gcs_address)


def request_drain(gcs_address: str, submission_id: str, at: float) -> None:
    """Ask the job to checkpoint at its next step boundary and exit with DRAINED_EXIT."""
    _gcs(gcs_address).internal_kv_put(drain_key(submission_id), json.dumps({"at": at}).encode(), True,
                                      NAMESPACE.encode(), timeout=KV_TIMEOUT_S)


def checkpoint_records(gcs_address: str, submission_ids: list[str]) -> dict[str, CheckpointRecord]:
    """The latest checkpoint record of each job that has one (one multi-get)."""
    if not submission_ids:
        return {}
    keys = {checkpoint_key(s): s for s in submission_ids}
    found = _gcs(gcs_address).internal_kv_multi_get(list(keys), NAMESPACE.encode(), timeout=KV_TIMEOUT_S)
    records = {keys[k]: CheckpointRecord.from_bytes(v) for k, v in found.items() if k in keys}
    return {s: r for s, r in records.items() if r is not None}


def last_checkpoints(gcs_address: str, submission_ids: list[str]) -> dict[str, float]:
    """Wall-clock time of each job's latest saved checkpoint; a job with none yet is missing."""
    return {s: r.at for s, r in checkpoint_records(gcs_address, submission_ids).items()}


def drain_acknowledged(gcs_address: str, submission_id: str) -> CheckpointRecord | None:
    """The drained checkpoint that answers the job's drain request, or None while there is none.
    A drained record whose request has since been cleared still counts."""
    dk, ck = drain_key(submission_id), checkpoint_key(submission_id)
    found = _gcs(gcs_address).internal_kv_multi_get([dk, ck], NAMESPACE.encode(), timeout=KV_TIMEOUT_S)
    record = CheckpointRecord.from_bytes(found.get(ck))
    if record is None or not record.drained:
        return None
    requested = _request_at(found.get(dk))
    if requested is not None and not math.isnan(requested) and record.drain_requested_at != requested:
        return None  # an answer to an earlier request; the current one is still pending
    return record


def clear(gcs_address: str, submission_id: str) -> None:
    """Delete the job's drain and checkpoint keys (when an attempt is over)."""
    client = _gcs(gcs_address)
    for key in (drain_key(submission_id), checkpoint_key(submission_id)):
        client.internal_kv_del(key, False, NAMESPACE.encode(), timeout=KV_TIMEOUT_S)


# --------------------------------------------------------------------------- worker side


class KV(Protocol):
    def get(self, key: bytes) -> bytes | None: ...

    def put(self, key: bytes, value: bytes) -> None: ...


class RayWorkerKV:
    """The GCS store as seen from inside a Ray worker (connected by `ray.init`)."""

    def get(self, key: bytes) -> bytes | None:
        from ray.experimental.internal_kv import _internal_kv_get

        return _internal_kv_get(key, namespace=NAMESPACE)

    def put(self, key: bytes, value: bytes) -> None:
        from ray.experimental.internal_kv import _internal_kv_put

        _internal_kv_put(key, value, overwrite=True, namespace=NAMESPACE)


class DrainWatch:
    """Asked at every optimizer step boundary whether to checkpoint and stop.

    `should_stop(step)` takes a number that grows by one per optimizer step and is the same
    on every rank. With one worker, rank 0 reads the drain key when `poll_s` has passed
    since its last read. With several, the ranks meet in one all-reduce (MAX) of
    [stop, next interval] at agreed steps: rank 0 reads the key just before and proposes
    how many steps to the next meeting so that meetings come about every `poll_s` seconds
    (1 to `max_interval` steps); all ranks therefore stop at the same step. Reading the store
    never fails training: an error is logged once and counts as "no request".
    """

    def __init__(self, submission_id: str | None, *, poll_s: float = 1.0, rank: int = 0, world: int = 1,
                 device: Any = "cpu", max_interval: int = 64, kv: KV | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.submission_id = submission_id or None
        self.poll_s, self.rank, self.world, self.device = poll_s, rank, world, device
        self.max_interval = max(1, max_interval)
        self.clock = clock
        self.kv = kv if kv is not None or self.submission_id is None else RayWorkerKV()
        self.requested_at: float | None = None  # the request's `at` once rank 0 has seen one
        self.polls = 0
        self._stop = False
        self._last_poll = -math.inf
        self._next_sync: int | None = None      # world > 1: the step of the next meeting
        self._sync_step, self._sync_time = 0, 0.0
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.submission_id is not None

    def should_stop(self, step: int) -> bool:
        if self.submission_id is None:
            return False
        if self.world <= 1:
            if not self._stop and self.clock() - self._last_poll >= self.poll_s:
                self._poll()
            return self._stop
        if self._next_sync is None:
            self._next_sync, self._sync_step, self._sync_time = step, step, self.clock()
        if step < self._next_sync:
            return False
        return self._meet(step)

    def _meet(self, step: int) -> bool:
        import torch
        import torch.distributed as dist

        proposal = 0.0
        if self.rank == 0:
            now = self.clock()
            if not self._stop and now - self._last_poll >= self.poll_s:
                self._poll()
            proposal = 1.0  # the first meeting has no step time to go by yet
            if step > self._sync_step and now > self._sync_time:
                per_step = (now - self._sync_time) / (step - self._sync_step)
                proposal = float(min(self.max_interval, max(1, int(self.poll_s / per_step))))
            self._sync_time = now
        flags = torch.tensor([1.0 if self._stop else 0.0, proposal], device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        stop, interval = flags.tolist()
        self._sync_step = step
        self._next_sync = step + max(1, int(interval))
        self._stop = stop > 0
        return self._stop

    def _poll(self) -> None:
        self._last_poll = self.clock()
        self.polls += 1
        try:
            raw = self.kv.get(drain_key(self.submission_id))
        except Exception as exc:  # noqa: BLE001 - the store being away must not stop training
            if not self._warned:
                log.warning("cannot read the drain key of %s (%s); training goes on", self.submission_id, exc)
                self._warned = True
            return
        requested = _request_at(raw)
        if requested is not None:
            self.requested_at = None if math.isnan(requested) else requested
            self._stop = True

    def checkpointed(self, at: float, epoch: int, step: int, drained: bool = False) -> None:
        """Rank 0, after reporting a checkpoint: tell the platform when it was saved and where the next
        attempt resumes (0-based epoch index, steps done inside it)."""
        if self.submission_id is None or self.rank != 0:
            return
        record = CheckpointRecord(at=at, epoch=epoch, step=step, drained=drained,
                                  drain_requested_at=self.requested_at if drained else None)
        try:
            self.kv.put(checkpoint_key(self.submission_id), record.to_bytes())
        except Exception as exc:  # noqa: BLE001 - tracking the checkpoint is advisory
            log.warning("cannot record the checkpoint of %s (%s)", self.submission_id, exc)


def drained_position(metrics: dict | None) -> tuple[int, int] | None:
    """(0-based epoch, steps done in it) of a final result that drained, else None."""
    metrics = metrics or {}
    if not metrics.get(DRAINED_METRIC):
        return None
    return int(metrics.get("drained_epoch", 0)), int(metrics.get("drained_step", 0))
