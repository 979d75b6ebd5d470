"""The driver's side of a submitted job: progress reports to the server, and stop requests.

A submitted job's driver is ``shipyard run`` inside a backend's job (see
:mod:`shipyard.backends.base`). The backend sets ``SHIPYARD_REPORT_URL`` (the server's
``/v1/jobs/{id}/report``), ``SHIPYARD_REPORT_TOKEN`` (a per-job token the server derives from its
key; it authorises reports for that job only) and ``SHIPYARD_SUBMISSION`` (the backend's handle
of this run). Without them (a user's own ``shipyard run``) nothing here does anything.

Reports: the launcher hands every ProgressBoard snapshot (once a second) to :meth:`Session.update`;
a background thread posts the newest one every :data:`REPORT_S` seconds, and :meth:`Session.finish`
posts the last one with the outcome. Metric points (one per new step, or new values at a step) and
events are sent once each; attempts, step and checkpoint are sent whole, so a lost report loses nothing but time.
The server being down never fails the job: a failed post is retried with the next one.

Stop requests: the backend stops a run by signalling the driver: SIGINT from Ray's ``stop_job``
(the ray backend sets ``RAY_JOB_STOP_SIGNAL=SIGINT``: a Ray driver's core worker installs a C++
SIGTERM handler that exits at once), SIGTERM from a pod's deletion. The handler is installed at
the first progress callback, i.e. after ``ray.init``. The workers are other processes, started by
Ray, so the driver sends SIGTERM to every training worker of its Ray job (:func:`signal_workers`); each turns it into a
checkpoint (:mod:`shipyard.runtime.preemption`). Once an attempt has ended ``preempted`` after the
notice (the checkpoint is committed), or ``preemption_grace_s`` has passed, the driver exits with
status 143, as SIGTERM would have made it. A spec without a checkpoint has nothing to save: the
driver exits at once.

Outcome: the last report carries how the run ended as a :class:`RunOutcome`, decided here from
what the driver saw, so that the server never has to infer it from attempts or text. A run is
``finished`` only when the training function returned without a stop request, or when it trained
to the end of its data although one arrived (a stop that reaches a run writing its last step);
a run that returned after a stop request without reaching the end is ``stopped``, and the server
requeues it from its latest checkpoint.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from enum import Enum
from typing import Any, Iterator

from shipyard.runtime.ray_adapter import TRAIN_WORKER_CLASS
from shipyard.spec import JobSpec

log = logging.getLogger(__name__)

REPORT_S = 10.0
MAX_BUFFERED_POINTS = 2000
EXIT_PREEMPTED = 128 + signal.SIGTERM


class RunOutcome(str, Enum):
    """How one run (one submission to a backend) ended, in the driver's own word."""

    FINISHED = "finished"  # trained to the end (or the user's function returned with no stop requested)
    PREEMPTED = "preempted"  # stopped on request after committing a checkpoint: resume from it
    STOPPED = "stopped"  # stopped on request without reaching the end (and maybe without a checkpoint)
    FAILED = "failed"
    USER_ERROR = "user_error"


def trained_to_end(snapshot: dict) -> bool:
    """Whether a board snapshot shows the data exhausted: the newest attempt ended ``finished``
    at the final step (``total`` is the step at which the data runs out, counted across restores)."""
    attempts = snapshot.get("attempts") or []
    step, total = int(snapshot.get("step") or 0), int(snapshot.get("total") or 0)
    return bool(attempts) and attempts[-1].get("kind") == "finished" and total > 0 and step >= total


def outcome_of(snapshot: dict, *, ok: bool, user_error: bool, stop_requested: bool) -> RunOutcome:
    """The outcome of a run the driver saw end by itself (not through its stop handler)."""
    if not ok:
        return RunOutcome.USER_ERROR if user_error else RunOutcome.FAILED
    if stop_requested and not trained_to_end(snapshot):
        # Returned after a stop request without exhausting the data (the attempt Ray Train opened
        # after the preemption, a loop that returned early): not a run that finished.
        return RunOutcome.STOPPED
    return RunOutcome.FINISHED


class Session:
    """One submitted run's reporting and stop handling (a no-op one when ``url`` is None)."""

    def __init__(self, spec: JobSpec, url: str | None, token: str | None, submission: str | None,
                 interval_s: float = REPORT_S):
        self.spec, self.url, self.token, self.submission = spec, url, token, submission
        self.interval_s = interval_s
        self._lock = threading.RLock()  # re-entered when the stop handler finishes on the main thread
        self._latest: dict = {}
        self._points: list[tuple[int, float, dict]] = []
        self._last_point_step: int | None = None
        self._last_point_values: dict = {}
        self._events_sent = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.notice_at: float | None = None
        self._warned = False
        self._armed_after_init = False
        # One post at a time (the reporting thread and finish() would send the same events twice),
        # and one finish: the first outcome decided is the one reported.
        self._post_lock = threading.RLock()
        self._finish_lock = threading.RLock()
        self.outcome: RunOutcome | None = None

    @property
    def active(self) -> bool:
        return self.url is not None

    # -- progress --------------------------------------------------------------------------------

    def update(self, snapshot: dict) -> None:
        """Called by the launcher with each board snapshot (on the driver's main thread)."""
        if not self.active:
            return
        if not self._armed_after_init:
            # Here too, not only before launch(): ray.init installs Ray's own C++ SIGTERM handler
            # in the driver (it logs "SIGTERM received" and exits), replacing any set earlier. The
            # launcher calls back on the main thread, after ray.init.
            self.install_stop_handler()
            self._armed_after_init = True
        with self._lock:
            self._latest = snapshot
            step = int(snapshot.get("step") or 0)
            # A diverged loss is NaN or inf, which JSON cannot carry: sent as null (a gap in the chart).
            metrics = {k: (v if math.isfinite(v) else None) for k, v in (snapshot.get("metrics") or {}).items()
                       if isinstance(v, (int, float))}
            # A new point per new step, and one more at the same step when the values changed
            # there (what the loop measured up to its last step, an evaluation after it).
            if metrics and (step != self._last_point_step or metrics != self._last_point_values):
                self._points.append((step, time.time(), metrics))
                self._last_point_step, self._last_point_values = step, metrics
                if len(self._points) > MAX_BUFFERED_POINTS:  # the server is away: thin, keep the shape
                    del self._points[1:-1:2]
        if self.notice_at is not None:
            self._exit_if_stopped(snapshot)

    def start(self) -> None:
        if not self.active:
            return
        self._thread = threading.Thread(target=self._run, name="shipyard-report", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.post()

    def post(self, outcome: dict | None = None) -> bool:
        """Send what is new since the last successful post; returns whether it was delivered."""
        with self._post_lock:
            return self._post(outcome)

    def _post(self, outcome: dict | None) -> bool:
        import httpx

        with self._lock:
            snap = dict(self._latest)
            points = list(self._points)
            events = list(snap.get("events") or [])[self._events_sent:]
        attempts = snap.get("attempts") or []
        if self.notice_at is not None:  # attempts Ray Train opened after the preemption do not count
            attempts = [a for a in attempts if a.get("start", 0) < self.notice_at or a.get("kind")]
        body: dict[str, Any] = {
            "submission": self.submission, "step": snap.get("step"), "total": snap.get("total"),
            "checkpoint": snap.get("checkpoint"), "attempts": attempts, "events": events,
            "metrics": points, "outcome": outcome,
        }
        try:
            r = httpx.post(self.url, json=body, headers={"Authorization": f"Bearer {self.token}"}, timeout=10)
            r.raise_for_status()
        except httpx.HTTPError as e:
            if not self._warned:
                log.warning("cannot report progress to %s: %s (will retry)", self.url, e)
                self._warned = True
            return False
        with self._lock:
            del self._points[:len(points)]
            self._events_sent += len(events)
        return True

    def finish(self, ok: bool, error: str | None = None, user_error: bool = False, preempted: bool = False,
               kind: RunOutcome | None = None) -> None:
        """Post the last report with the run's outcome. ``kind`` is given by the stop paths; the
        caller that saw the run end by itself (the CLI) leaves it to :func:`outcome_of`. Only the
        first call reports; a concurrent one waits until that report is sent (or given up)."""
        if not self.active:
            return
        with self._finish_lock:
            if self.outcome is not None:
                return
            self._stop.set()
            with self._lock:
                snap = dict(self._latest)
            if kind is None:
                kind = outcome_of(snap, ok=ok, user_error=user_error, stop_requested=self.notice_at is not None)
            self.outcome = kind
            outcome = {"kind": kind.value, "ok": ok, "error": error, "user_error": user_error,
                       "preempted": preempted, "step": snap.get("step"), "total": snap.get("total")}
            for delay in (0, 1, 2, 4):
                time.sleep(delay)
                if self.post(outcome):
                    return

    # -- stop requests ---------------------------------------------------------------------------

    def install_stop_handler(self) -> None:
        """SIGTERM to the driver -> SIGTERM to the workers -> checkpoint -> exit 143."""
        if not self.active or threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: self._on_sigterm())

    def _on_sigterm(self) -> None:
        if self.notice_at is not None:
            return
        self.notice_at = time.time()
        if self._done_training():
            print("stop requested, but training has already finished: reporting it", flush=True)
            return  # the launcher is returning: the CLI reports the run FINISHED and exits
        if self.spec.checkpoint is None:
            self.finish(False, "stopped (SIGTERM); the spec has no checkpoint section, so nothing was saved",
                        preempted=True, kind=RunOutcome.STOPPED)
            os._exit(EXIT_PREEMPTED)
        print(f"stop requested (SIGTERM): workers checkpoint, then the job exits "
              f"(grace period {self.spec.checkpoint.preemption_grace_s:g}s)", flush=True)
        threading.Thread(target=self._forward, name="shipyard-stop", daemon=True).start()

    def _forward(self) -> None:
        try:
            n = signal_workers()
            print(f"stop: SIGTERM sent to {n} worker process{'es' * (n != 1)}", flush=True)
            if n == 0 and self._done_training():  # the workers are gone because training ended
                return
            if n == 0:  # training has not started: nothing to save
                self.finish(False, "stopped before training started", preempted=True, kind=RunOutcome.STOPPED)
                os._exit(EXIT_PREEMPTED)
        except Exception as e:  # noqa: BLE001 - the grace timer below still ends the run
            print(f"stop: could not signal the workers ({e}); exiting after the grace period", flush=True)
        assert self.spec.checkpoint is not None
        deadline = time.time() + self.spec.checkpoint.preemption_grace_s + 5
        while time.time() < deadline:
            time.sleep(1)
        self.finish(False, "stopped: no checkpoint was committed within the grace period", preempted=True,
                    kind=RunOutcome.STOPPED)
        os._exit(EXIT_PREEMPTED)

    def _done_training(self) -> bool:
        # No lock: this runs in the signal handler, which may interrupt the main thread inside
        # update(); ``_latest`` is only ever replaced whole, so reading the reference is safe.
        return trained_to_end(self._latest)

    def _exit_if_stopped(self, snapshot: dict) -> None:
        done = [a for a in snapshot.get("attempts") or []
                if a.get("kind") == "preempted" and (a.get("end") or 0) >= self.notice_at]
        if done:
            print(f"stop: checkpoint committed ({snapshot.get('checkpoint')}); exiting", flush=True)
            self.finish(False, "preempted: checkpoint committed", preempted=True, kind=RunOutcome.PREEMPTED)
            os._exit(EXIT_PREEMPTED)


def signal_workers(sig: int = signal.SIGTERM) -> int:
    """Send ``sig`` to every alive training worker actor of this driver's Ray job, on whatever
    node it runs (a zero-CPU task pinned to each remote node sends it there). Returns how many."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    from ray.util.state import list_actors

    job_id = ray.get_runtime_context().get_job_id()
    here = ray.get_runtime_context().get_node_id()
    actors = list_actors(filters=[("job_id", "=", job_id), ("state", "=", "ALIVE"),
                                  ("class_name", "=", TRAIN_WORKER_CLASS)], detail=True, raise_on_missing_output=False)
    remote = []
    for a in actors:
        if a.node_id == here:
            try:
                os.kill(a.pid, sig)
            except ProcessLookupError:
                pass
        else:
            task = ray.remote(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(a.node_id, soft=False))(_kill)
            remote.append(task.remote(a.pid, sig))
    ray.get(remote, timeout=30)
    return len(actors)


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


@contextmanager
def session(spec: JobSpec, env: dict[str, str] | None = None) -> Iterator[Session]:
    """The run's :class:`Session`, reporting and handling stops when the backend asked for it."""
    env = dict(os.environ if env is None else env)
    s = Session(spec, env.get("SHIPYARD_REPORT_URL") or None, env.get("SHIPYARD_REPORT_TOKEN"),
                env.get("SHIPYARD_SUBMISSION"))
    s.install_stop_handler()
    s.start()
    yield s


def chain(*callbacks: Callable[[dict], None]) -> Callable[[dict], None]:
    def call(snapshot: dict) -> None:
        for cb in callbacks:
            cb(snapshot)
    return call
