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
(both backends set ``RAY_JOB_STOP_SIGNAL=SIGINT``: a Ray driver's core worker installs a C++
SIGTERM handler that exits at once), SIGINT from the kuberay head pod's preStop hook (below),
SIGTERM from anything else. The handler (which only notes the time and starts a thread) is installed at
the first progress callback, i.e. after ``ray.init``. The workers are other processes, started by
Ray, so the driver sends SIGTERM to every training worker of its Ray job (:func:`signal_workers`); each turns it into a
checkpoint (:mod:`shipyard.runtime.preemption`). Once an attempt has ended ``preempted`` after the
notice (the checkpoint is committed), or ``preemption_grace_s`` has passed, the driver exits with
status 143, as SIGTERM would have made it. A spec without a checkpoint has nothing to save: the
driver exits at once.

A user's own ``shipyard run`` (no server) handles the same two signals the same way: Ctrl-C
(SIGINT) or SIGTERM asks the workers to checkpoint at their next step; once that checkpoint is
committed (or there is nothing to save, or the grace period is over) the launcher's main thread
raises :class:`Interrupted`, so a private Ray is shut down on the way out, and the CLI exits 130
(SIGINT) or 143. A second Ctrl-C exits at once, without waiting for the checkpoint.

On Kubernetes the kubelet never signals the driver itself (only the head container's PID 1,
``ray start --block``): the head's preStop hook does, with the same SIGINT, finding the driver
through the pid file it writes when ``SHIPYARD_DRIVER_PIDFILE`` is set (see
:mod:`shipyard.backends.kuberay_manifest`).

Outcome: the last report carries how the run ended as a :class:`~shipyard.run.records.RunOutcome`,
decided here from what the driver saw (:func:`shipyard.run.decide.outcome_of`), so that the server
never has to infer it from attempts or text. Reports are :class:`~shipyard.run.records.DriverReport`
records with a schema version; a server that refuses them (4xx) is told once, and not again.
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
from typing import Iterator

from shipyard.backends.base import DRIVER_PIDFILE_ENV
from shipyard.run.decide import outcome_of
from shipyard.run.records import REPORT_SCHEMA, AttemptKind, DriverReport, MetricPoint, OutcomeReport, RunOutcome, RunSnapshot
from shipyard.runtime.ray_adapter import TRAIN_WORKER_CLASS
from shipyard.spec import JobSpec

log = logging.getLogger(__name__)

REPORT_S = 10.0
MAX_BUFFERED_POINTS = 2000
EXIT_PREEMPTED = 128 + signal.SIGTERM


class Interrupted(Exception):
    """A user's own run was stopped by a signal (Ctrl-C, SIGTERM): raised in the launcher's main
    thread once the stop is done. ``exit_code`` is 128 + the signal; ``message`` says what was saved."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def known_step(snap: RunSnapshot) -> int | None:
    """The step to report: None until rank 0 has pushed once (after its restore). A new run's
    board starts at step 0, and a requeued or resumed job must keep showing the step it had
    reached, not 0, until its workers say where they are."""
    return snap.step if snap.updated is not None else None


class Session:
    """One submitted run's reporting and stop handling (a no-op one when ``url`` is None)."""

    def __init__(self, spec: JobSpec, url: str | None, token: str | None, submission: str | None,
                 interval_s: float = REPORT_S):
        self.spec, self.url, self.token, self.submission = spec, url, token, submission
        self.interval_s = interval_s
        self._lock = threading.Lock()  # never taken by the signal handler (it only starts a thread)
        self._latest = RunSnapshot()
        self._points: list[MetricPoint] = []
        self._last_point: tuple[int, dict] | None = None
        self._events_sent = 0  # counted over the run (RunSnapshot.events_total), not the board's window
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.notice_at: float | None = None
        self.signal_name = "SIGTERM"  # the first stop signal's (SIGINT: Ctrl-C, Ray's stop_job)
        self._exit_code = EXIT_PREEMPTED
        self._interrupted: str | None = None  # a local run's stop is done: the main thread raises this
        self._warned = False
        self._refused = False  # the server refused our reports for good (4xx): stop sending
        self._armed_after_init = False
        # One post at a time (the reporting thread and finish() would send the same events twice),
        # and one finish: the first outcome decided is the one reported.
        self._post_lock = threading.Lock()
        self._finish_lock = threading.Lock()
        self.outcome: RunOutcome | None = None

    @property
    def active(self) -> bool:
        return self.url is not None

    # -- progress --------------------------------------------------------------------------------

    def update(self, snapshot: RunSnapshot) -> None:
        """Called by the launcher with each board snapshot (on the driver's main thread)."""
        if not self._armed_after_init:
            # Here too, not only before launch(): ray.init installs Ray's own C++ SIGTERM handler
            # in the driver (it logs "SIGTERM received" and exits), replacing any set earlier. The
            # launcher calls back on the main thread, after ray.init.
            self.install_stop_handler()
            self._armed_after_init = True
        if not self.active:
            self._latest = snapshot  # one reference, read by the stop thread
            if self.notice_at is not None:
                self._exit_if_stopped(snapshot)
            return
        with self._lock:
            self._latest = snapshot
            # A diverged loss is NaN or inf, which JSON cannot carry: sent as null (a gap in the chart).
            values = {k: (float(v) if math.isfinite(v) else None) for k, v in snapshot.metrics.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool)}
            # A new point per new step, and one more at the same step when the values changed
            # there (what the loop measured up to its last step, an evaluation after it).
            if values and (snapshot.step, values) != self._last_point:
                self._points.append(MetricPoint(step=snapshot.step, at=time.time(), values=values))
                self._last_point = (snapshot.step, values)
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

    def post(self, outcome: OutcomeReport | None = None) -> bool:
        """Send what is new since the last successful post; returns whether it was delivered."""
        with self._post_lock:
            return self._post(outcome)

    def _post(self, outcome: OutcomeReport | None) -> bool:
        import httpx

        if self._refused:
            return True
        with self._lock:
            snap = self._latest
            points = list(self._points)
        unsent = snap.events_total - self._events_sent
        events = snap.events[len(snap.events) - min(unsent, len(snap.events)):] if unsent > 0 else []
        attempts = snap.attempts
        if self.notice_at is not None:  # attempts Ray Train opened after the preemption do not count
            attempts = [a for a in attempts if a.start < self.notice_at or a.kind is not None]
        report = DriverReport(schema_version=REPORT_SCHEMA, submission=self.submission, step=known_step(snap),
                              total=snap.total, checkpoint=snap.checkpoint, attempts=attempts, events=events, metrics=points,
                              outcome=outcome)
        try:
            r = httpx.post(self.url, json=report.to_json(), headers={"Authorization": f"Bearer {self.token}"},
                           timeout=10)
            if r.status_code in (400, 401, 403, 404, 413, 422):
                # Resending the same report cannot help (an expired token, a server of another
                # schema): say so once, with the server's reason, and stop reporting.
                self._refused = True
                log.warning("the server refused this run's progress reports (%s): %s; the run goes on unreported",
                            r.status_code, r.text[:300])
                return True
            r.raise_for_status()
        except httpx.HTTPError as e:
            if not self._warned:
                log.warning("cannot report progress to %s: %s (will retry)", self.url, e)
                self._warned = True
            return False
        with self._lock:
            del self._points[:len(points)]
        self._events_sent = snap.events_total
        return True

    def finish(self, ok: bool, error: str | None = None, user_error: bool = False,
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
                snap = self._latest
            if kind is None:
                kind = outcome_of(snap, ok=ok, user_error=user_error, stop_requested=self.notice_at is not None)
            self.outcome = kind
            outcome = OutcomeReport(kind=kind, ok=ok, error=error[:8000] if error else None, step=snap.step,
                                    total=snap.total)
            for delay in (0, 1, 2, 4):
                time.sleep(delay)
                if self.post(outcome):
                    return

    # -- stop requests ---------------------------------------------------------------------------

    def install_stop_handler(self) -> None:
        """SIGTERM or SIGINT to the driver -> SIGTERM to the workers -> checkpoint -> exit."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: self._on_sigterm(signum))

    def _on_sigterm(self, signum: int = signal.SIGTERM) -> threading.Thread | None:
        """The signal handler: note the time and hand the rest to a thread. It may interrupt the
        main thread anywhere (inside a print, holding a lock), so it takes no lock and prints nothing.
        A second signal is ignored by a submitted run (its backend kills it when it must); a
        user's own run leaves at once (KeyboardInterrupt: the launcher still shuts its Ray down)."""
        if self.notice_at is not None:
            if not self.active:
                os.write(2, b"interrupted again: exiting without waiting for the checkpoint\n")
                raise KeyboardInterrupt
            return None
        self.notice_at = time.time()
        self.signal_name, self._exit_code = signal.Signals(signum).name, 128 + signum
        thread = threading.Thread(target=self._handle_stop, name="shipyard-stop", daemon=True)
        thread.start()
        return thread

    def _handle_stop(self) -> None:
        if self._latest.trained_to_end():
            print("stop requested, but training has already finished: reporting it", flush=True)
            return  # the launcher is returning: the CLI reports the run FINISHED and exits
        if self.spec.checkpoint is None:
            self._end(f"stopped ({self.signal_name}); the spec has no checkpoint section, so nothing was saved")
            return
        grace = self.spec.checkpoint.preemption_grace_s
        if self.active:
            print(f"stop requested ({self.signal_name}): workers checkpoint, then the job exits "
                  f"(grace period {grace:g}s)", flush=True)
        else:
            print(f"interrupted ({self.signal_name}): the workers checkpoint at their next step, then the run exits "
                  f"(at most {grace:g}s; Ctrl-C again exits now, without the checkpoint)", flush=True)
        self._forward()

    def _forward(self) -> None:
        try:
            n = signal_workers(processes=self._latest.processes)
            print(f"stop: SIGTERM sent to {n} worker process{'es' * (n != 1)}", flush=True)
            if n == 0 and self._latest.trained_to_end():  # the workers are gone because training ended
                return
            if n == 0:  # training has not started: nothing to save
                self._end("stopped before training started")
                return
        except Exception as e:  # noqa: BLE001 - the grace timer below still ends the run
            print(f"stop: could not signal the workers ({e}); exiting after the grace period", flush=True)
        assert self.spec.checkpoint is not None
        deadline = time.time() + self.spec.checkpoint.preemption_grace_s + 5
        while time.time() < deadline and self._interrupted is None:
            time.sleep(1)
        if self._interrupted is None:
            self._end("stopped: no checkpoint was committed within the grace period")

    def _end(self, message: str) -> None:
        """End a stopped run from the stop thread: a submitted one reports and exits here; a
        user's own one is ended by the main thread at its next progress callback (a private
        Ray is shut down on the way)."""
        if self.active:
            self.finish(False, message, kind=RunOutcome.STOPPED)
            os._exit(self._exit_code)
        self._interrupted = message

    def _exit_if_stopped(self, snapshot: RunSnapshot) -> None:
        committed = any(a.kind is AttemptKind.PREEMPTED and (a.end or 0) >= self.notice_at for a in snapshot.attempts)
        if not self.active:
            if committed:
                raise Interrupted(f"interrupted at step {snapshot.step}: checkpoint committed ({snapshot.checkpoint}); "
                                  "run the job again to resume from it", self._exit_code)
            if self._interrupted is not None:
                raise Interrupted(self._interrupted, self._exit_code)
            return
        if committed:
            print(f"stop: checkpoint committed ({snapshot.checkpoint}); exiting", flush=True)
            self.finish(False, "preempted: checkpoint committed", kind=RunOutcome.PREEMPTED)
            os._exit(EXIT_PREEMPTED)


def signal_workers(sig: int = signal.SIGTERM, processes=()) -> int:
    """Send ``sig`` to every alive training worker of this driver's Ray job, on whatever node it
    runs (a zero-CPU task pinned to each remote node sends it there). Returns how many.

    The workers are the processes the ranks registered on the board (``processes``:
    :class:`~shipyard.run.records.RankProcess`). Before any has registered, Ray's State API
    lists the job's worker actors. (A terminal's Ctrl-C reaches every process of its group, the
    dashboard that serves the State API of a Ray that ``shipyard run`` started among them: after
    it, that API does not answer.)"""
    if processes:
        return signal_processes(processes, sig)
    return _signal_actors(sig)


def signal_processes(processes, sig: int) -> int:
    """Send ``sig`` to those of ``processes`` (RankProcess records) still alive, each on its node;
    returns how many were signalled. A pid is signalled only if its process started before the
    rank registered it (a dead rank's pid reused by a newer process is left alone)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.util.get_node_ip_address()
    sent = sum(_signal_if_same(p.pid, p.started, sig) for p in processes if p.node_ip == here)
    remote = [p for p in processes if p.node_ip != here]
    if remote:
        nodes = {n["NodeManagerAddress"]: n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        task = ray.remote(num_cpus=0, max_retries=0)(_signal_if_same)
        refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(nodes[p.node_ip], soft=False)).remote(
                    p.pid, p.started, sig) for p in remote if p.node_ip in nodes]
        sent += sum(ray.get(refs, timeout=30))
    return sent


def _signal_if_same(pid: int, registered: float, sig: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        if start_ticks / os.sysconf("SC_CLK_TCK") > registered + 1.0:
            return False  # a newer process under a dead rank's pid
        os.kill(pid, sig)
        return True
    except (OSError, ValueError, IndexError):
        return False


def _signal_actors(sig: int) -> int:
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
    if s.active:  # a user's own run arms it after ray.init (first progress callback): before, Ctrl-C just quits
        s.install_stop_handler()
        write_pidfile(env.get(DRIVER_PIDFILE_ENV))
    s.start()
    yield s


def write_pidfile(path: str | None) -> None:
    """``<pid> <start time>`` of this process in ``path`` (the start time, field 22 of
    /proc/<pid>/stat, tells the reader a reused pid from ours); replaced whole, so a reader
    never sees half of it. A failure is logged, not raised: only the preStop stop path needs it."""
    if not path:
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open("/proc/self/stat") as f:
            start = f.read().rsplit(")", 1)[1].split()[19]
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()} {start}\n")
        os.replace(tmp, path)
    except (OSError, IndexError) as e:
        log.warning("cannot write the driver's pid file %s (%s): a pod deletion will not stop the run cleanly", path, e)


def chain(*callbacks: Callable[[RunSnapshot], None]) -> Callable[[RunSnapshot], None]:
    def call(snapshot: RunSnapshot) -> None:
        for cb in callbacks:
            cb(snapshot)
    return call
