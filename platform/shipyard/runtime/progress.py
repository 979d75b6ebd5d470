"""The driver-side record of a run, kept in one zero-CPU Ray actor (:data:`ProgressBoard`).

Two parts with one job each, behind the :class:`Board` the ranks and the driver call:

- :class:`RunLog`: what the run reports: which worker process runs which rank (so the driver can
  prefix each process's output with its rank), progress (rank 0 pushes at most once a second,
  fire-and-forget, so it costs the training loop nothing), events (the newest :data:`MAX_EVENTS`
  kept, with a running count so readers know what they missed), the attempts
  (:class:`~shipyard.run.ledger.Ledger`) and the latest committed checkpoint. The driver reads it
  as a :class:`~shipyard.run.records.RunSnapshot`.
- :class:`Rendezvous`: the process-group generations (``regroup.py``): which ranks joined, where
  they meet, when a group broke; and the ranks' heartbeats (``watchdog.py``). Forming a group
  opens an attempt in the run log; a group that may not form (max_failures spent) is refused.

Every method is quick: the actor serves one call at a time.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import ray

from shipyard.run.ledger import Ledger
from shipyard.run.records import AttemptKind, GenerationState, RankProcess, RendezvousAnswer, RunEvent, RunSnapshot
from shipyard.runtime.watchdog import Beat, Stall, beat, find_stall

# A rank whose process group broke has this long to leave it before its process is made to exit.
LEAVE_GRACE_S = 10.0
MAX_EVENTS = 1000  # a run's newest events kept on the board (the server keeps them all)
MAX_PROCESSES = 1000  # worker processes remembered (a rank's replacements each add one)

G = GenerationState


class RunLog:
    """Progress, events, attempts and the latest checkpoint of one run."""

    def __init__(self, max_failures: int, retry_repeated: bool = False) -> None:
        self.ledger = Ledger(max_failures, retry_repeated)
        self.progress: dict[str, Any] = {"step": 0, "total": 0, "epoch": 0, "samples_per_step": 0, "updated": None}
        self.metrics: dict[str, Any] = {}  # rank 0's latest values, as reported (numbers; lists for tensors)
        self.events: deque[RunEvent] = deque(maxlen=MAX_EVENTS)
        self.events_total = 0
        self.checkpoint: str | None = None
        self.processes: dict[tuple[str, int], RankProcess] = {}

    def process(self, p: RankProcess) -> None:
        """A worker process started rank ``p.rank`` (a process that ran another rank before: now this one)."""
        self.processes.pop((p.node_ip, p.pid), None)
        self.processes[(p.node_ip, p.pid)] = p
        while len(self.processes) > MAX_PROCESSES:
            del self.processes[next(iter(self.processes))]

    def event(self, message: str, now: float | None = None) -> None:
        self.events.append(RunEvent(at=time.time() if now is None else now, message=message[:2000]))
        self.events_total += 1

    def update(self, *, step: int, total: int, epoch: int, samples_per_step: int, metrics: dict,
               event: str | None = None, checkpoint: str | None = None, committed_step: int | None = None) -> None:
        now = time.time()
        self.progress.update(step=step, total=total, epoch=epoch, samples_per_step=samples_per_step, updated=now)
        self.metrics.update(metrics)
        if checkpoint:
            self.checkpoint = checkpoint
        if event == "started":
            self.ledger.restored(step, now)
        self.ledger.progress(step, now, committed_step)
        if event == "finished":
            self.ledger.end(now, AttemptKind.FINISHED)
        elif event and event != "started":
            self.event(event, now)

    def attempt_failed(self, cause: str, kind: AttemptKind, error: str | None = None) -> None:
        current = self.ledger.current
        if current is None:
            return
        self.ledger.end(time.time(), kind, cause, error)
        self.event(f"attempt {current.number} ended: {cause}")

    def snapshot(self) -> RunSnapshot:
        return RunSnapshot(**self.progress, metrics=dict(self.metrics), checkpoint=self.checkpoint,
                           events=list(self.events), events_total=self.events_total,
                           attempts=[a.model_copy() for a in self.ledger.attempts],
                           exhausted=self.ledger.exhausted, user_error=self.ledger.user_error,
                           processes=list(self.processes.values()))


@dataclass
class Generation:
    """One process group of the run: formed once every rank joined, broken when one is lost."""

    number: int = -1
    state: GenerationState = G.BROKEN
    world: int = 0
    members: dict = field(default_factory=dict)  # rank -> None, or rank 0's (address, port)
    forming_since: float = 0.0
    cause: str | None = None  # why the last formed generation broke, as a rank saw it
    broken_at: float | None = None  # when the last formed generation broke

    def start_forming(self, world: int, now: float) -> None:
        self.number += 1
        self.state, self.world, self.members, self.forming_since = G.FORMING, world, {}, now


class Rendezvous:
    """Process-group generations and heartbeats; opens and refuses attempts in ``log``'s ledger."""

    def __init__(self, log: RunLog, world: int, stall_timeout_s: float | None) -> None:
        self.log = log
        self.world, self.stall_timeout_s = world, stall_timeout_s
        self.generation = Generation()
        self.beats: dict[int, Beat] = {}
        self.stall: Stall | None = None
        self.done: set[int] = set()  # ranks whose train(ctx) returned (in-place recovery only)

    def finished(self, rank: int) -> None:
        """Rank ``rank``'s training function returned and its process leaves the run."""
        self.done.add(rank)

    def cannot_regroup(self) -> str | None:
        """Why a lost rank cannot be replaced in place: a peer already finished and will not join
        the next process group (a failure at the very end). Sets the ledger's refusal."""
        if not self.done:
            return None
        ledger = self.log.ledger
        if ledger.exhausted is None:
            ranks = ", ".join(str(r) for r in sorted(self.done))
            last = ledger.attempts[-1].cause if ledger.attempts else None
            ledger.exhausted = (f"rank {ranks} had already finished training when the attempt failed"
                                f"{f' ({last})' if last else ''}, so its process group cannot form again; "
                                "run the job again to resume from its last checkpoint")
        return ledger.exhausted

    def join(self, rank: int, world: int, master: tuple[str, int] | None) -> int:
        """A rank is ready for a process group of ``world`` ranks (rank 0 brings the address the
        group meets at). Returns the generation it joined; poll :meth:`formed` with it."""
        g = self.generation
        if g.state is G.FORMED:  # a rank back from a generation that looked healthy: it broke
            self.break_(f"rank {rank} left the process group")
        if g.state is G.BROKEN:
            g.start_forming(world, time.time())
        if g.state is G.FORMING and self.cannot_regroup():
            g.state = G.REFUSED  # a finished rank would never join: do not wait for it
        if g.state is G.FORMING:
            g.members[rank] = master
            if len(g.members) >= g.world:
                self._form()
        return g.number

    def formed(self, number: int) -> RendezvousAnswer | None:
        """None while generation ``number`` is forming; else where its ranks meet, or why they don't."""
        g = self.generation
        if number != g.number or g.state is G.BROKEN:
            return RendezvousAnswer(state=G.BROKEN)
        if g.state is G.REFUSED:
            return RendezvousAnswer(state=G.REFUSED, refused=self.log.ledger.exhausted)
        if g.state is G.FORMED:
            return RendezvousAnswer(state=G.FORMED, master=g.members[0])
        return None

    def broken(self, number: int, rank: int, cause: str) -> None:
        """From a rank that lost a peer in generation ``number`` and stays to form the next one."""
        if number == self.generation.number and self.generation.state is G.FORMED:
            self.break_(f"rank {rank}: {cause}")

    def break_(self, cause: str) -> None:
        g = self.generation
        if g.state is G.FORMED:
            g.state, g.cause, g.broken_at = G.BROKEN, cause, time.time()

    def _form(self) -> None:
        """Every rank joined: the attempt before ends (if no one said why: a broken process group),
        and this one is admitted, or refused once max_failures is spent."""
        g, ledger = self.generation, self.log.ledger
        if ledger.current is not None:
            ledger.end(g.forming_since, AttemptKind.FAILED, g.cause or "the process group broke")
        if ledger.admit(g.forming_since, g.world):
            g.state = G.REFUSED
            return
        g.state = G.FORMED
        ledger.entered(time.time())
        self.beats, self.stall = {}, None
        self.world = g.world

    def heartbeat(self, rank: int, step: int, busy: bool, generation: int | None = None) -> Stall | None:
        now = time.time()
        g = self.generation
        left_behind = generation is not None and (generation < g.number or g.state is G.BROKEN)
        if left_behind and g.broken_at is not None:
            # This rank's process group broke, but its loop has not left it: it waits in a collective
            # for the lost peer (NCCL does not fail one). Its process exits, so it is replaced too.
            if now - g.broken_at < LEAVE_GRACE_S:
                return None
            message = (f"rank {rank} was still in process group {generation} {now - g.broken_at:.0f}s after it "
                       f"broke (waiting for a lost peer); its process exits so that it is replaced")
            self.log.event(message, now)
            return Stall((rank,), False, message)
        if self.log.ledger.current is None or not self.stall_timeout_s:
            return None
        self.beats[rank] = beat(self.beats.get(rank), step, busy, now)
        if self.stall is None:
            self.stall = find_stall(self.beats, self.world, now, self.stall_timeout_s)
            if self.stall is not None:
                self.log.event(self.stall.message, now)
        return self.stall


class Board:
    """The run's actor: a :class:`RunLog` and a :class:`Rendezvous` (see the module docstring)."""

    def __init__(self, max_failures: int = 0, world: int = 1, stall_timeout_s: float | None = None,
                 retry_repeated: bool = False) -> None:
        self.log = RunLog(max_failures, retry_repeated)
        self.rendezvous = Rendezvous(self.log, world, stall_timeout_s)

    # -- ranks: process groups and heartbeats --------------------------------------------------
    def process(self, p: RankProcess) -> None:
        """From a rank's worker process as it starts: which process runs which rank."""
        self.log.process(p)

    def witness(self, p: RankProcess):
        """What this node's kernel recorded of a dead rank's process (``deaths.py``); None when
        the process ran on another node."""
        from shipyard.runtime import deaths

        return deaths.witness(p) if p.node_ip == ray.util.get_node_ip_address() else None

    def join(self, rank: int, world: int, master: tuple[str, int] | None) -> int:
        return self.rendezvous.join(rank, world, master)

    def formed(self, number: int) -> RendezvousAnswer | None:
        return self.rendezvous.formed(number)

    def broken(self, number: int, rank: int, cause: str) -> None:
        self.rendezvous.broken(number, rank, cause)

    def heartbeat(self, rank: int, step: int, busy: bool, generation: int | None = None) -> Stall | None:
        return self.rendezvous.heartbeat(rank, step, busy, generation)

    # -- rank 0 and Ray Train's controller: progress and attempts -----------------------------
    def update(self, **progress: Any) -> None:
        self.log.update(**progress)

    def rank_finished(self, rank: int) -> None:
        """From a rank whose ``train(ctx)`` returned, when failed ranks are replaced in place."""
        self.rendezvous.finished(rank)

    def reached(self, step: int) -> None:
        """From a rank whose attempt is failing: the step it got to (for steps lost)."""
        self.log.ledger.progress(step, time.time())

    def step_reached(self) -> int:
        """The furthest step of the current (or just failed) attempt, for the failure's cause."""
        attempts = self.log.ledger.attempts
        return attempts[-1].last_step if attempts else self.log.progress["step"]

    def attempt_failed(self, cause: str, kind: AttemptKind, error: str | None = None) -> str | None:
        """From Ray Train's controller (``AttemptsCallback``), before it replaces workers. Returns
        why no further attempt may start (then the controller starts none), or None."""
        self.rendezvous.break_(cause)
        stall = self.rendezvous.stall
        if stall is not None and self.log.ledger.current is not None:
            # a rank exited because it stalled: say so, not just "process died"
            cause, kind, error = stall.message, AttemptKind.FAILED, None
        self.log.attempt_failed(cause, AttemptKind(kind), error)
        return self.log.ledger.refusal() or self.rendezvous.cannot_regroup()

    # -- the driver -----------------------------------------------------------------------------
    def snapshot(self) -> RunSnapshot:
        return self.log.snapshot()


ProgressBoard = ray.remote(num_cpus=0)(Board)
