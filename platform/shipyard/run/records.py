"""The typed records a run's life is carried in, from a rank to the dashboard.

Every process boundary a run crosses passes one of these, never a dict read by string key:

- ranks -> Board actor: progress calls; the Board answers a rank's rendezvous with a
  :class:`RendezvousAnswer` and keeps the attempts (:class:`AttemptRecord`, kept by the
  :class:`~shipyard.run.ledger.Ledger`) and events (:class:`RunEvent`);
- Board -> driver (``shipyard run``): a :class:`RunSnapshot` once a second (the CLI draws it);
- driver -> server (``POST /v1/jobs/{id}/report``): a :class:`DriverReport` with a schema version,
  its last one carrying the run's :class:`OutcomeReport`;
- server -> store -> scheduler, API and dashboard: the store's records (``shipyard.store.records``)
  whose attempt kind and run outcome are these enums.

Pydantic models, so each one round-trips through JSON (the report) and pickling (Ray) alike, and
a malformed report is refused at the edge with the field named.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field

REPORT_SCHEMA = 2  # 1: the untyped dict reports before shipyard.run existed (no "schema" field)
MAX_CAUSE_CHARS = 300
MAX_MESSAGE_CHARS = 2000

NonNegative = Annotated[int, Field(ge=0)]


class AttemptKind(str, Enum):
    """How an attempt (one start of the worker group) ended."""

    FINISHED = "finished"  # rank 0's training function returned
    FAILED = "failed"  # a rank failed, died or stalled: counts against max_failures
    PREEMPTED = "preempted"  # SIGTERM -> checkpoint -> restart: loses nothing, not counted
    USER_ERROR = "user_error"  # a mistake in the spec or the user's code found on a worker: not retried
    LOST = "lost"  # the run vanished (its driver or head died) before saying how it ended

    @property
    def counts_as_failure(self) -> bool:
        return self in (AttemptKind.FAILED, AttemptKind.USER_ERROR)


class RunOutcome(str, Enum):
    """How one run (one submission to a backend) ended, in the driver's own word."""

    FINISHED = "finished"  # trained to the end (or the user's function returned with no stop requested)
    PREEMPTED = "preempted"  # stopped on request after committing a checkpoint: resume from it
    STOPPED = "stopped"  # stopped on request without reaching the end (and maybe without a checkpoint)
    FAILED = "failed"
    USER_ERROR = "user_error"


class GenerationState(str, Enum):
    """A process group's life on the Board (see ``runtime/regroup.py``)."""

    FORMING = "forming"  # waiting for every rank to join
    FORMED = "formed"  # every rank joined; an attempt is open
    BROKEN = "broken"  # a rank was lost; the next join starts the next generation
    REFUSED = "refused"  # no attempt may start (max_failures spent, or a user error)


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AttemptRecord(_Record):
    """One start of the worker group, as the Board's ledger keeps it (times are UNIX seconds)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=False)

    number: int = Field(ge=1)
    start: float
    world: int | None = Field(None, ge=1)  # ranks in this attempt (an elastic job changes size)
    start_step: NonNegative | None = None  # the step it resumed from (None until restored)
    entered: float | None = None  # when rank 0 entered the train loop (process group up)
    restored_at: float | None = None  # when rank 0 had loaded the checkpoint (or found none)
    first_step_at: float | None = None  # when its first training step finished
    last_step: NonNegative = 0  # the furthest step reported
    last_step_at: float | None = None
    committed_step: NonNegative | None = None  # last checkpoint committed during this attempt
    end: float | None = None
    kind: AttemptKind | None = None  # None while running
    cause: str | None = Field(None, max_length=MAX_CAUSE_CHARS)  # None when it finished normally
    # the Python exception that failed it, ``Type: first line`` (None for a dead process, a stall,
    # a preemption): two attempts in a row with the same one at the same step are not retried
    error: str | None = Field(None, max_length=MAX_CAUSE_CHARS)
    steps_lost: NonNegative | None = None  # known once the next attempt has restored

    @computed_field  # type: ignore[prop-decorator]
    @property
    def recovery_s(self) -> float | None:
        """Seconds from the start of this attempt to its first step (for a restart: time to recover)."""
        return None if self.first_step_at is None else self.first_step_at - self.start

    @property
    def open(self) -> bool:
        return self.end is None


class RunEvent(_Record):
    """Something a person should read in the run's history (a commit, a preemption, a stall)."""

    at: float
    message: str = Field(max_length=MAX_MESSAGE_CHARS)


class MetricPoint(_Record):
    """Rank 0's metric values at one step (None: not finite, a gap in the chart)."""

    step: NonNegative
    at: float
    values: dict[str, float | None] = Field(max_length=1000)


class RankProcess(_Record):
    """A training worker process and the rank it runs, as the rank registered it on the Board:
    how the driver knows whose output a line of a Ray worker process is (``runtime/output.py``),
    and what tells, after it died without a Python error, what killed it (``runtime/deaths.py``):
    when it started on its kernel's clock, and its memory cgroup's OOM-kill count then."""

    rank: NonNegative
    pid: int
    node_ip: str
    started: float = 0.0  # seconds since its node booted (deaths.boot_clock)
    memory_cgroup: str | None = Field(default=None, max_length=4096)
    oom_kills: int | None = None  # the cgroup's OOM kills when the process started


class RunSnapshot(_Record):
    """The Board's whole view of a run, as the driver reads it once a second."""

    step: NonNegative = 0
    total: NonNegative = 0  # the step at which the data runs out
    epoch: NonNegative = 0
    samples_per_step: NonNegative = 0
    updated: float | None = None  # when rank 0 last pushed
    # rank 0's latest values as reported: numbers (maybe non-finite), lists for multi-element tensors
    metrics: dict[str, Any] = Field(default_factory=dict)
    checkpoint: str | None = None  # the latest committed checkpoint's URI
    events: list[RunEvent] = Field(default_factory=list)  # the newest MAX_EVENTS of the run
    events_total: NonNegative = 0  # how many events the run has had (events holds the newest)
    attempts: list[AttemptRecord] = Field(default_factory=list)
    exhausted: str | None = None  # why no further attempt may start
    user_error: bool = False  # the last attempt ended in a user error
    processes: list[RankProcess] = Field(default_factory=list)  # every rank's worker processes, oldest first

    @property
    def last_attempt(self) -> AttemptRecord | None:
        return self.attempts[-1] if self.attempts else None

    def trained_to_end(self) -> bool:
        """Whether the newest attempt ended ``finished`` at the final step (data exhausted)."""
        last = self.last_attempt
        return last is not None and last.kind is AttemptKind.FINISHED and self.total > 0 and self.step >= self.total


class OutcomeReport(_Record):
    """The last report's word on how the run ended (the outcome decides; the rest is for people)."""

    kind: RunOutcome
    ok: bool
    error: str | None = Field(None, max_length=4 * MAX_MESSAGE_CHARS)
    step: NonNegative | None = None
    total: NonNegative | None = None


class DriverReport(_Record):
    """``POST /v1/jobs/{id}/report``: what is new since the driver's last delivered report.

    Attempts, step and checkpoint are sent whole (a lost report loses nothing but time); events
    and metric points once each."""

    schema_version: Literal[2] = Field(alias="schema")  # required: a report without one is schema 1
    submission: str | None = Field(None, max_length=256)
    step: NonNegative | None = None
    total: NonNegative | None = None
    checkpoint: str | None = Field(None, max_length=2000)
    attempts: list[AttemptRecord] = Field(default_factory=list, max_length=10_000)
    events: list[RunEvent] = Field(default_factory=list, max_length=10_000)
    metrics: list[MetricPoint] = Field(default_factory=list, max_length=100_000)
    outcome: OutcomeReport | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    def to_json(self) -> dict:
        return self.model_dump(mode="json", by_alias=True, exclude={"attempts": {"__all__": {"recovery_s"}}})


class RendezvousAnswer(_Record):
    """The Board's answer to a rank polling generation ``number`` (None while it still forms)."""

    state: GenerationState
    master: tuple[str, int] | None = None  # where a FORMED generation's ranks meet (rank 0's address)
    refused: str | None = None  # why, for REFUSED

    @property
    def superseded(self) -> bool:
        """The generation broke (or a newer one started) before it formed: join the next one."""
        return self.state is GenerationState.BROKEN
