"""The scheduler loop: store + backend -> snapshot -> :func:`decide` -> apply; then poll runs.

Thin on purpose: every policy is in :func:`shipyard.scheduler.decide` (pure), every state rule
in :mod:`shipyard.store.states`. Each transition here is a compare-and-set, so a user's cancel
racing the loop simply wins or loses (``StaleTransition``), and the loop re-reads next tick.

Restart safety (the server may be ``kill -9``-ed between any two lines): everything the loop
knows is in the store, and :meth:`SchedulerLoop.reconcile` (at start) compares it with the
backend's ``list_jobs``:

- an ADMITTED job without a handle (died between admit and submit) is submitted again; submit is
  idempotent per job id, so a run that did start is re-attached, not duplicated;
- a job holding a handle is simply polled again (re-attached); a run the backend no longer knows
  is *lost*: its attempts are closed, and the job is requeued (``PREEMPTED -> QUEUED``, cause
  ``lost``) up to ``max_requeues`` times, then FAILED;
- a backend run whose job is finished (or unknown) in the store is cancelled.

Whether a run finished is the driver's explicit word (:class:`RunOutcome`, sent with its last
report), never inferred from Ray's state alone: Ray says STOPPED for a run it was asked to stop
even when the driver exited 0, and an attempt that ended ``finished`` after a stop request may be
one Ray Train started after the preemption. See :func:`run_finished`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from functools import partial

from shipyard.backends.base import Backend, BackendError, JobEnv, State, no_env
from shipyard.run.records import AttemptKind, RunOutcome
from shipyard.scheduler.decide import Admission, Decisions, Policy, decide
from shipyard.scheduler.leader import RETRY_S as LEADER_RETRY_S, Leadership, Sole
from shipyard.scheduler.snapshot import Holding, JobRequest, Node, Quota, Resources, RunningJob, Snapshot
from shipyard.store import Attempt, Job, JobState, Store
from shipyard.store.records import PREEMPTED_BY
from shipyard.store.states import IllegalTransition

log = logging.getLogger(__name__)
S = JobState
POLLED = (S.ADMITTED, S.RUNNING, S.RESTARTING, S.PREEMPTED)
SUBMIT_GIVE_UP_S = 300.0  # a backend refusing a submit this long fails the job
SUBMIT_RETRY_S = 5.0
STARTING_MAX_S = 120.0  # a run without a reported attempt counts as unplaced this long at most


def run_finished(outcome: RunOutcome | None, attempts: list[Attempt], total_steps: int | None,
                 backend: State | None = None) -> bool:
    """Whether a run trained to the end, from what its driver reported (``attempts`` are this
    run's). The driver's outcome decides when it sent one. Without it (its last report was lost,
    or a driver older than the typed outcome): Ray's SUCCEEDED (the driver exited 0 before any
    stop reached Ray's supervisor), or the run's last attempt ended ``finished`` *at the final
    step*; a ``finished`` attempt short of ``total_steps`` is not taken as proof."""
    if outcome is not None:
        return outcome is RunOutcome.FINISHED
    if backend is State.SUCCEEDED:
        return True
    last = attempts[-1] if attempts else None
    return (last is not None and last.ended_at is not None and last.kind is AttemptKind.FINISHED
            and bool(total_steps) and (last.last_step or 0) >= total_steps)


def settle_finished(store: Store, job: Job, why: str = "the run finished before the stop reached it") -> Job:
    """Record SUCCEEDED for an active job whose current run's driver reported it finished; returns
    the job as it is now (unchanged when its run has not finished). Used by the cancel route, so
    that a cancel arriving after the run finished leaves it SUCCEEDED (and is refused, 409)."""
    if job.state.terminal or not job.backend_handle:
        return job
    attempts = [a for a in store.attempts(job.id) if a.submission == job.backend_handle]
    if not run_finished(store.run_outcome(job.id, job.backend_handle), attempts, job.total_steps):
        return job
    state = job.state
    try:
        if state in (S.ADMITTED, S.RESTARTING):  # no edge from these to SUCCEEDED
            state = store.transition(job.id, state, S.RUNNING).state
        store.close_run(job.id, job.backend_handle, kind=AttemptKind.FINISHED, cause="finished")
        store.transition(job.id, state, S.SUCCEEDED, cause="finished", message=why)
    except IllegalTransition as e:  # the loop (or another cancel) moved it first
        log.info("%s", e)
    return store.get_job(job.id)


def request_of(job: Job) -> JobRequest:
    from shipyard.spec import JobSpec

    spec = JobSpec.model_validate(job.spec)
    return JobRequest.from_spec(job.id, job.tenant, job.priority, job.submitted_at, job.spec, job.seq,
                                memory_per_worker=float(spec.workers.memory_bytes))


class SchedulerLoop:
    def __init__(self, store: Store, backend: Backend, *, interval_s: float = 2.0, policy: Policy = Policy(),
                 max_requeues: int = 3, on_tick: Callable[[float, Decisions | None], None] = lambda s, d: None,
                 leadership: Leadership | None = None, job_env: Callable[[str, str], JobEnv] | None = None):
        """``job_env(job_id, submission)``: the server's variables for a run's driver (report URL
        and token, roots; ``api.serve.make_job_env``), handed to the backend at each submit."""
        self.store, self.backend = store, backend
        self.job_env = job_env
        self.leadership: Leadership = leadership if leadership is not None else Sole()
        self.interval_s, self.policy, self.max_requeues = interval_s, policy, max_requeues
        self.on_tick = on_tick
        self.reasons: dict[str, str] = {}  # waiting jobs -> why (shown by the API)
        self._held: dict[str, str] = {}  # submitted jobs the backend reports PENDING -> its message
        self._submit_failures: dict[str, tuple[float, float]] = {}  # job -> (first, last) failure
        self._first_seen: dict[str, float] = {}  # run handle -> when snapshot first saw it RUNNING
        self._wake = threading.Event()

    # -- running -----------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Tick until ``stop`` is set, while this process holds the scheduler lock
        (:mod:`shipyard.scheduler.leader`); a standby retries the lock every ``leader.RETRY_S``.
        Each time the lock is taken the loop reconciles first: the store may have moved on while
        another process scheduled. A failing tick is logged and retried."""
        reconciled, standing_by = False, False
        while not stop.is_set():
            t0 = time.monotonic()
            decisions, leading = None, False
            try:
                leading = self.leadership.try_acquire()
                if not leading and not standing_by:
                    log.warning("scheduler lock (%s) held elsewhere: this server serves the API and stands by "
                                "to take over scheduling", self.leadership.describe())
                    reconciled, standing_by = False, True
                if leading and not reconciled:
                    log.info("scheduler lock taken (%s): this server schedules", self.leadership.describe())
                    standing_by = False
                    self.reconcile()
                    reconciled = True
                if leading:
                    decisions = self.tick()
            except Exception:  # noqa: BLE001 - a database or backend hiccup must not end the loop
                log.exception("scheduler tick failed; retrying in %.0fs", self.interval_s)
            if leading:
                self.on_tick(time.monotonic() - t0, decisions)
            self._wake.wait(self.interval_s if leading else LEADER_RETRY_S)
            self._wake.clear()

    def wake(self) -> None:
        """Tick now (a job was submitted or cancelled)."""
        self._wake.set()

    def tick(self) -> Decisions:
        self.poll()
        queue = getattr(self.backend, "external_queue", None)  # Kueue admits for the kuberay backend
        if isinstance(queue, str) and queue:
            decisions = self._hand_over(queue)
        else:
            decisions = decide(self.snapshot(), self.policy)
        self.apply(decisions)
        return decisions

    # -- snapshot and decisions -----------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        jobs = self.store.active_jobs()
        queued = tuple(request_of(j) for j in jobs if j.state is S.QUEUED)
        starting = self._starting([j for j in jobs if j.state is S.RUNNING and j.backend_handle])
        running = tuple(RunningJob(request_of(j), Holding.STARTING if j.id in starting else Holding(j.state.value),
                                   j.started_at)
                        for j in jobs if j.state.holds_resources)
        tenants = self.store.list_tenants()
        quotas = {t.name: Quota(t.max_gpus, t.max_cpus, t.max_running_jobs) for t in tenants}
        ranks = {t.name: t.priority for t in tenants if t.priority}
        nodes_of = getattr(self.backend, "nodes", None)
        if nodes_of is not None:
            nodes = tuple(Node(n.name, Resources(n.free_cpus, n.free_gpus, n.free_memory),
                               Resources(n.cpus, n.gpus, n.memory)) for n in nodes_of())
            # A job admitted moments ago holds nothing on the cluster yet; RUNNING ones already do.
            return Snapshot(queued=queued, running=running, nodes=nodes, quotas=quotas, tenant_priority=ranks)
        c = self.backend.capacity()
        return Snapshot.aggregate(Resources(c.free_cpus, c.free_gpus, c.free_memory),
                                  Resources(c.cpus, c.gpus, c.memory), queued=queued, running=running, quotas=quotas,
                                  tenant_priority=ranks)

    def _hand_over(self, queue: str) -> Decisions:
        """With an external queue (Kueue) as the authority, every queued job is submitted at once,
        in submission order: Kueue applies its quotas, admits whole gangs and preempts; shipyard's
        own capacity, quota and gang checks would only second-guess it with a partial view."""
        jobs = sorted((j for j in self.store.active_jobs() if j.state is S.QUEUED), key=lambda j: (j.submitted_at, j.seq))
        return Decisions(admit=[Admission(j.id, {}) for j in jobs],
                         reasons={j.id: f"handed to Kueue queue {queue}" for j in jobs})

    def _starting(self, running: list[Job]) -> set[str]:
        """RUNNING jobs whose run has reported no attempt yet: the backend says the driver runs
        (Ray's RUNNING), but its workers may still be waiting for resources, invisible in the
        free capacity. Counted as unplaced for at most STARTING_MAX_S after the loop first saw
        the run, so a driver that cannot reach the server does not hold capacity twice forever."""
        now = time.monotonic()
        started = self.store.started_runs(j.backend_handle for j in running)
        seen = {j.backend_handle: self._first_seen.get(j.backend_handle, now) for j in running}
        self._first_seen = seen
        return {j.id for j in running
                if j.backend_handle not in started and now - seen[j.backend_handle] < STARTING_MAX_S}

    def apply(self, d: Decisions) -> None:
        # A submitted job the backend still holds back (Kueue has not admitted it) says why too.
        self.reasons = {**self._held, **d.reasons}
        for victim in d.preempt:  # only the head preempts (decide.py)
            self._preempt(victim, d.reasons.get(victim, "preempted"), d.head)
        for a in d.admit:
            try:
                where = ', '.join(f'{n}x{k}' for n, k in a.placement.items())
                self.store.transition(a.job_id, S.QUEUED, S.ADMITTED,
                                      message=f"placed on {where}" if where else d.reasons.get(a.job_id))
            except IllegalTransition:
                continue  # cancelled meanwhile
            self._submit(self.store.get_job(a.job_id))

    def _preempt(self, job_id: str, why: str, by: str | None) -> None:
        job = self.store.get_job(job_id)
        try:
            job = self.store.transition(job_id, job.state, S.PREEMPTED, cause="preempted", message=why)
        except IllegalTransition:
            return
        if by is not None:  # for `status`: "preempted by <job>"
            self.store.add_event(job_id, PREEMPTED_BY, by)
        if job.backend_handle:
            self._cancel(job.backend_handle)
        else:
            self._requeue(job, "preempted before it was submitted")

    def _submit(self, job: Job) -> None:
        """Submit an ADMITTED job. A refused submit (a head still starting, an API hiccup) is
        retried every SUBMIT_RETRY_S while the job stays ADMITTED; after SUBMIT_GIVE_UP_S of
        refusals the job fails with the backend's last answer."""
        from shipyard.spec import JobSpec

        now = time.monotonic()
        first, last = self._submit_failures.get(job.id, (now, 0.0))
        if now - last < SUBMIT_RETRY_S:
            return
        try:
            env = partial(self.job_env, job.id) if self.job_env is not None else no_env
            handle = self.backend.submit(job.id, JobSpec.model_validate(job.spec), job.tenant, run=job.runs + 1, env=env)
        except BackendError as e:
            self._submit_failures[job.id] = (first, time.monotonic())
            log.warning("submit %s failed (retrying for %.0fs more): %s", job.id,
                        max(0.0, SUBMIT_GIVE_UP_S - (now - first)), e)
            if now - first >= SUBMIT_GIVE_UP_S:
                self._submit_failures.pop(job.id, None)
                self._finish(job, S.FAILED, "submit_failed", str(e))
            return
        self._submit_failures.pop(job.id, None)
        self.store.update_job(job.id, backend_handle=handle, runs=job.runs + 1)
        self.store.add_event(job.id, "backend", f"submitted to {self.backend.name} as {handle}")

    def _cancel(self, handle: str) -> None:
        try:
            self.backend.cancel(handle)
        except BackendError as e:
            log.warning("cancel %s failed (will retry): %s", handle, e)

    # -- polling runs ---------------------------------------------------------------------------

    def poll(self) -> None:
        self._held = {}
        for job in self.store.active_jobs():
            if job.state not in POLLED:
                continue
            if job.backend_handle is None:
                if job.state is S.ADMITTED:
                    self._submit(job)  # admitted, then the submit failed or the server died
                elif job.state is S.PREEMPTED:
                    self._requeue(job, "preempted")
                continue
            try:
                status = self.backend.status(job.backend_handle)
            except BackendError as e:
                log.warning("status of %s: %s", job.id, e)
                continue
            self._follow(job, status)

    def _follow(self, job: Job, status) -> None:
        st = status.state
        if st is State.PENDING:
            if status.message and job.state is S.ADMITTED:
                self._held[job.id] = status.message
            return
        if st is State.RUNNING:
            if job.state is S.ADMITTED:
                self._move(job, S.ADMITTED, S.RUNNING, message=f"running as {job.backend_handle}")
            return
        if job.state is S.PREEMPTED:  # the run stopped (or ended) after the preemption notice
            if self._finished(job, st):
                self.store.close_run(job.id, job.backend_handle, kind=AttemptKind.FINISHED, cause="finished")
                self._move(job, S.PREEMPTED, S.SUCCEEDED, cause="finished",
                           message="the run finished before the preemption stopped it")
                return
            self.store.close_run(job.id, job.backend_handle, kind=AttemptKind.PREEMPTED, cause="preempted")
            self._requeue(job, "preempted")
            return
        if self._finished(job, st):  # also a driver that said it finished, then died on its way out
            self.store.close_run(job.id, job.backend_handle, kind=AttemptKind.FINISHED, cause="finished")
            self._finish(job, S.SUCCEEDED, None, None)
        elif st is State.FAILED and status.reason == "NotFound":
            self._lost(job, status.message)
        else:
            cause, message = self._failure(job, status)
            self.store.close_run(job.id, job.backend_handle, kind=AttemptKind.FAILED, cause=cause)
            self._finish(job, S.FAILED, cause, message)

    def _finished(self, job: Job, state: State) -> bool:
        """Whether the job's current run trained to the end (:func:`run_finished`); the driver's
        final report arrives before it exits, so it is in the store when Ray says the run ended."""
        runs = [a for a in self.store.attempts(job.id) if a.submission == job.backend_handle]
        return run_finished(self.store.run_outcome(job.id, job.backend_handle), runs, job.total_steps, state)

    def _failure(self, job: Job, status) -> tuple[str, str]:
        """Why a run failed: the driver's own last word (its typed outcome) if it sent one; the
        error text of its outcome event is only the message shown to people."""
        outcome = self.store.run_outcome(job.id, job.backend_handle)
        if status.state is State.STOPPED or outcome in (RunOutcome.STOPPED, RunOutcome.PREEMPTED):
            return "stopped", status.message or "the run was stopped outside shipyard before it finished"
        if outcome in (RunOutcome.FAILED, RunOutcome.USER_ERROR):
            text = next((e.message for e in reversed(self.store.events(job.id, kind="outcome"))), "")
            return outcome.value, text.partition(": ")[2] or status.message or "the run failed"
        return "failed", status.message or status.reason or "the run failed"

    def _lost(self, job: Job, message: str) -> None:
        last = max((a.last_step or 0 for a in self.store.attempts(job.id) if a.submission == job.backend_handle),
                   default=job.last_step or 0)
        self.store.close_run(job.id, job.backend_handle, kind=AttemptKind.LOST,
                             cause=f"lost at step {last}: the run vanished with its head")
        requeues = job.requeues
        if requeues >= self.max_requeues:
            self._finish(job, S.FAILED, "lost", f"{message}; requeued {requeues} times already")
            return
        job = self._move(job, job.state, S.PREEMPTED, cause="lost", message=message)
        if job is not None:
            self._requeue(job, "lost")

    def _requeue(self, job: Job, why: str) -> None:
        if self._move(job, S.PREEMPTED, S.QUEUED, cause=why, message="requeued; it resumes from its latest "
                      "checkpoint" if job.spec.get("checkpoint") else "requeued") is not None:
            self.store.update_job(job.id, requeues=job.requeues + 1)

    def _finish(self, job: Job, target: JobState, cause: str | None, message: str | None) -> None:
        state = job.state
        if target is S.SUCCEEDED and state in (S.ADMITTED, S.RESTARTING):  # ended between two polls
            if self._move(job, state, S.RUNNING) is None:
                return
            state = S.RUNNING
        self._move(job, state, target, cause=cause, message=message)

    def _move(self, job: Job, a: JobState, b: JobState, **kw) -> Job | None:
        try:
            return self.store.transition(job.id, a, b, **kw)
        except IllegalTransition as e:
            log.info("%s", e)
            return None

    # -- restart ---------------------------------------------------------------------------------

    def reconcile(self) -> None:
        """Compare the store with the backend after a (re)start; see the module docstring."""
        try:
            running = self.backend.list_jobs()
        except BackendError as e:
            log.warning("reconcile: cannot list the backend's jobs (%s); polling will catch up", e)
            return
        active = {j.id: j for j in self.store.active_jobs()}
        for job in active.values():
            if job.state in POLLED and job.backend_handle is None and job.id in running:
                self.store.update_job(job.id, backend_handle=running[job.id])
                self.store.add_event(job.id, "backend", f"re-attached to {running[job.id]} after a server restart")
        for job_id, handle in running.items():
            job = active.get(job_id)
            if job is None or (job.backend_handle not in (None, handle)):
                log.warning("reconcile: cancelling %s (%s): its job is finished or unknown", handle, job_id)
                self._cancel(handle)
