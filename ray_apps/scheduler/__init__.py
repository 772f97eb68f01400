"""The job queue: what Ray lacks in front of its Jobs API.

Pieces, each in its own module:
- `store`: the only source of truth (SQLAlchemy: SQLite file or PostgreSQL). Every
  state change is one atomic, checked transition plus an event with its time.
- `policy`: pure ordering, quota, gang and preemption decisions over plain data.
- `dispatcher`: stateless loop: reconcile with Ray, plan, preempt, admit. Run
  under `supervisor` (started by `oppen up`), which restarts it when it dies.
- `api`: the Python API every interface adapts (CLI, REST on Serve, agent tools).

Invariants:
- A job enters Ray only via QUEUED -> STARTING (recording its Ray submission id)
  and then `submit_job` under that id: no job ever runs twice.
- A job is admitted only when its whole gang fits free resources: nothing waits
  PENDING inside Ray. A request that can never fit is REJECTED at submit.
- Terminal states (SUCCEEDED, FAILED, CANCELLED, REJECTED) are final.

Glossary: gang = all workers of a job, admitted together; attempt = one run of a
job in Ray (a preempted job's next attempt resumes from its checkpoint).
"""
