"""Long jobs (training, evaluation) of the studio: each runs in its own worker thread, at most `capacity` at once,
the rest wait first come first served and know how many jobs are ahead of them. A job's state lives here, keyed
by its id, not in a browser session: a page that reloads finds the running job again (`JobBoard.latest`) and
keeps showing its progress. Stop is cooperative: it sets the job's flag, which its work checks between steps."""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

JOB_STATES = ("queued", "running", "done", "stopped", "failed")
ACTIVE = ("queued", "running")


class JobStopped(Exception):
    """Raised by a job's work where it gives up on a stop request with nothing to keep."""


@dataclass
class Job:
    """One job. `step`/`steps` and `curve` are its progress, `detail` says what it is doing; `result` is what its
    work returned (a stopped training's partial run too), `error` a message for people."""

    id: int
    kind: str
    label: str
    state: str = "queued"
    step: int = 0
    steps: int = 0
    detail: str = ""
    curve: list[dict] = field(default_factory=list)
    training_run_id: int | None = None
    result: Any = None
    error: str | None = None
    ahead: int = 0  # while queued: jobs that go first
    created: float = field(default_factory=time.time)
    finished: float | None = None
    stop_event: threading.Event = field(default_factory=threading.Event, repr=False, compare=False)

    def stop_requested(self) -> bool:
        """The flag the work checks between its steps."""
        return self.stop_event.is_set()

    @property
    def active(self) -> bool:
        return self.state in ACTIVE


class JobBoard:
    """Admission and bookkeeping of jobs. `submit(kind, label, work)` queues `work(job, update)`; `update(**kw)`
    sets progress fields under the board's lock. Readers get copies (`get`, `latest`), never the live job."""

    def __init__(self, capacity: int = 2, keep: int = 100):
        self.capacity = max(1, int(capacity))
        self.keep = keep
        self._jobs: OrderedDict[int, Job] = OrderedDict()
        self._waiting: deque[tuple[Job, Callable]] = deque()
        self._running = 0
        self._ids = itertools.count(1)
        self._cond = threading.Condition()

    # ---- submitting and stopping ---------------------------------------------------------------------
    def submit(self, kind: str, label: str, work: Callable[[Job, Callable[..., None]], Any]) -> Job:
        with self._cond:
            job = Job(next(self._ids), kind, label)
            self._jobs[job.id] = job
            self._waiting.append((job, work))
            self._prune()
            self._admit()
            return replace(job)

    def stop(self, job_id: int) -> Job | None:
        """Ask a job to stop: a waiting one never starts; a running one stops at its next check."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None or not job.active:
                return replace(job) if job else None
            job.stop_event.set()
            if job.state == "queued":
                self._waiting = deque((j, w) for j, w in self._waiting if j is not job)
                job.state, job.finished, job.detail = "stopped", time.time(), "stopped before it started"
                self._positions()
                self._cond.notify_all()
            return replace(job)

    # ---- reading --------------------------------------------------------------------------------------
    def get(self, job_id: int | None) -> Job | None:
        with self._cond:
            job = self._jobs.get(job_id) if job_id is not None else None
            return replace(job) if job else None

    def latest(self, kind: str) -> Job | None:
        """The job of `kind` a page shows: the oldest one running, else the next one waiting, else None."""
        with self._cond:
            jobs = [j for j in self._jobs.values() if j.kind == kind and j.active]
            jobs.sort(key=lambda j: (j.state != "running", j.id))
            return replace(jobs[0]) if jobs else None

    def jobs(self) -> list[Job]:
        with self._cond:
            return [replace(j) for j in self._jobs.values()]

    def wait(self, job_id: int, timeout: float | None = None) -> Job | None:
        """Block until the job has ended (or `timeout`); its state then."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while (job := self._jobs.get(job_id)) is not None and job.active:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._cond.wait(left)
            return replace(job) if job else None

    def snapshot(self) -> dict[str, int]:
        with self._cond:
            return {"capacity": self.capacity, "running": self._running, "waiting": len(self._waiting)}

    # ---- inside ---------------------------------------------------------------------------------------
    def _admit(self) -> None:
        while self._running < self.capacity and self._waiting:
            job, work = self._waiting.popleft()
            job.state = "running"
            self._running += 1
            threading.Thread(
                target=self._run, args=(job, work), name=f"mango-job-{job.id}", daemon=True
            ).start()
        self._positions()

    def _positions(self) -> None:
        free_after = max(
            0, self._running - self.capacity + 1
        )  # running jobs one must end before a turn frees
        for i, (job, _) in enumerate(self._waiting):
            job.ahead = i + free_after

    def _update(self, job: Job, **fields: Any) -> None:
        with self._cond:
            for k, v in fields.items():
                setattr(job, k, list(v) if k == "curve" else v)
            self._cond.notify_all()

    def _run(self, job: Job, work: Callable) -> None:
        state, result, error = "done", None, None
        try:
            result = work(job, lambda **kw: self._update(job, **kw))
            # stopped unless the work says it finished anyway (a stop asked for after a training's last step)
            if job.stop_requested() and getattr(result, "status", "stopped") == "stopped":
                state = "stopped"
        except JobStopped:
            state = "stopped"
        except Exception as exc:  # a user error's own message; a bug's one line with an error id (logged)
            from studio.errors import user_message

            state, error = "failed", user_message(exc, f"the {job.kind} job")
        with self._cond:
            job.state, job.result, job.error, job.finished = state, result, error, time.time()
            self._running -= 1
            self._admit()
            self._cond.notify_all()

    def _prune(self) -> None:
        ended = [i for i, j in self._jobs.items() if not j.active]
        for i in ended[: max(0, len(self._jobs) - self.keep)]:
            del self._jobs[i]


__all__ = ["ACTIVE", "JOB_STATES", "Job", "JobBoard", "JobStopped"]
