"""shipyard.run: the typed records a run is carried in, and the decisions over them.

Like Ray Train's failure-policy tests: hand-built inputs, enum outputs, no cluster."""

from __future__ import annotations

import pickle

import pytest
from pydantic import ValidationError

from shipyard.run.decide import outcome_of, run_state
from shipyard.run.ledger import Ledger
from shipyard.run.records import (AttemptKind as K, AttemptRecord, DriverReport, GenerationState, MetricPoint,
                                  OutcomeReport, RendezvousAnswer, RunEvent, RunOutcome, RunSnapshot)
from shipyard.store.states import JobState as S

T0 = 1_800_000_000.0


def attempt(n: int, kind: K | None = None, last: int = 0, start_step: int | None = 0, **kw) -> AttemptRecord:
    return AttemptRecord(number=n, start=T0 + n, end=T0 + n + 0.5 if kind else None, kind=kind,
                         start_step=start_step, last_step=last, **kw)


RECORDS = [
    attempt(1, K.FAILED, 40, cause="rank 1: worker process died", steps_lost=3, committed_step=30, world=2,
            first_step_at=T0 + 1.2),
    RunEvent(at=T0, message="checkpoint at step 30 committed"),
    MetricPoint(step=7, at=T0, values={"loss": 0.5, "accuracy": None}),
    RunSnapshot(step=40, total=100, metrics={"loss": 0.5}, events=[RunEvent(at=T0, message="x")], events_total=9,
                attempts=[attempt(1, K.PREEMPTED, 40), attempt(2, None, 41, start_step=40)], checkpoint="s3://b/ck"),
    OutcomeReport(kind=RunOutcome.PREEMPTED, ok=False, error="preempted: checkpoint committed", step=40, total=100),
    DriverReport(schema=2, submission="run-1", step=40, total=100, attempts=[attempt(1, K.FINISHED, 100)],
                 events=[RunEvent(at=T0, message="m")], metrics=[MetricPoint(step=1, at=T0, values={"l": 1.0})],
                 outcome=OutcomeReport(kind=RunOutcome.FINISHED, ok=True)),
    RendezvousAnswer(state=GenerationState.FORMED, master=("10.0.0.1", 29500)),
    RendezvousAnswer(state=GenerationState.REFUSED, refused="max_failures=0 exhausted"),
]


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: type(r).__name__)
def test_every_record_round_trips_json_and_pickle(record):
    wire = record.to_json() if isinstance(record, DriverReport) else record.model_dump(mode="json")
    exclude = {"recovery_s"}  # computed from the times, never read back
    if isinstance(record, AttemptRecord):
        wire = {k: v for k, v in wire.items() if k not in exclude}
    elif "attempts" in wire:
        wire["attempts"] = [{k: v for k, v in a.items() if k not in exclude} for a in wire["attempts"]]
    assert type(record).model_validate(wire) == record
    assert pickle.loads(pickle.dumps(record)) == record  # what Ray does between the Board and the driver


def test_an_attempts_recovery_time_is_derived_not_sent():
    a = attempt(2, None, 50, start_step=40, first_step_at=T0 + 2 + 7.5)
    assert a.recovery_s == pytest.approx(7.5)
    with pytest.raises(ValidationError, match="recovery_s"):
        AttemptRecord.model_validate({"number": 1, "start": T0, "recovery_s": 1.0})


@pytest.mark.parametrize("body, field", [
    ({"submission": "r"}, "schema"),  # schema 1: the untyped reports
    ({"schema": 3}, "schema"),
    ({"schema": 2, "attempts": [{"number": 0, "start": T0}]}, "number"),
    ({"schema": 2, "attempts": [{"number": 1, "start": T0, "kind": "exploded"}]}, "kind"),
    ({"schema": 2, "step": -1}, "step"),
    ({"schema": 2, "outcome": {"ok": True}}, "kind"),  # an outcome always says which
    ({"schema": 2, "events": [[T0, "tuple events were schema 1"]]}, "events"),
    ({"schema": 2, "surprise": 1}, "surprise"),
])
def test_a_malformed_or_older_report_is_refused_naming_the_field(body, field):
    with pytest.raises(ValidationError) as e:
        DriverReport.model_validate(body)
    assert field in str(e.value)


# -- the ledger -------------------------------------------------------------------------------

def test_preemptions_do_not_spend_max_failures_but_failures_do():
    ledger = Ledger(max_failures=1)
    assert ledger.admit(T0) is None
    ledger.end(T0 + 1, K.PREEMPTED, "preempted: rank 0 received SIGTERM")
    assert ledger.admit(T0 + 2) is None
    ledger.end(T0 + 3, K.FAILED, "rank 1: worker process died")
    assert ledger.admit(T0 + 4) is None  # one failure: still within max_failures=1
    ledger.end(T0 + 5, K.FAILED, "rank 1: worker process died")
    refused = ledger.admit(T0 + 6)
    assert refused.startswith("max_failures=1 exhausted: 2 failed attempts (preemptions not counted)")
    assert [a.kind for a in ledger.attempts] == [K.PREEMPTED, K.FAILED, K.FAILED]
    assert ledger.admit(T0 + 7) == refused  # every later rank hears the same


def test_a_user_error_is_never_retried():
    ledger = Ledger(max_failures=-1)
    ledger.admit(T0)
    ledger.end(T0 + 1, K.USER_ERROR, "config.lr: must be positive")
    assert ledger.admit(T0 + 2) == "config.lr: must be positive" and ledger.user_error


def test_steps_lost_are_known_once_the_next_attempt_restored():
    ledger = Ledger(max_failures=3)
    ledger.admit(T0)
    ledger.restored(0, T0 + 0.5)
    ledger.progress(57, T0 + 5, committed_step=50)
    ledger.end(T0 + 6, K.FAILED, "rank 0: RuntimeError: boom")
    ledger.progress(59, T0 + 6.1)  # a surviving rank's last word arrives after the controller's
    ledger.admit(T0 + 7)
    ledger.restored(50, T0 + 8)
    ledger.progress(51, T0 + 9)
    first, second = ledger.attempts
    assert (first.last_step, first.committed_step, first.steps_lost) == (59, 50, 9)
    assert (second.start_step, second.recovery_s) == (50, pytest.approx(2.0))


def failed_at(ledger: Ledger, step: int, error: str | None, now: float, cause: str | None = None) -> str | None:
    """Admit an attempt that resumes from 0, reaches ``step`` and fails with ``error``."""
    refused = ledger.admit(now)
    if refused:
        return refused
    ledger.restored(0, now)
    ledger.progress(step, now + 1)
    ledger.end(now + 2, K.FAILED, cause or f"rank 0: {error}", error)
    return ledger.refusal()


def test_the_same_error_at_the_same_step_twice_is_not_retried_whatever_max_failures_allows():
    ledger = Ledger(max_failures=10)
    assert failed_at(ledger, 15, "RuntimeError: injected bug", T0) is None
    refused = failed_at(ledger, 15, "RuntimeError: injected bug", T0 + 10, cause="rank 1: RuntimeError: injected bug")
    assert refused == ("not retried: attempts 1 and 2 failed the same way at step 15 (rank 1: RuntimeError: "
                       "injected bug); another attempt would too (retry_repeated_errors: true retries it anyway)")
    assert ledger.admit(T0 + 20) == refused and len(ledger.attempts) == 2


@pytest.mark.parametrize("second", [
    (16, "RuntimeError: injected bug"),  # another step
    (15, "RuntimeError: another message"),  # another message
    (15, None),  # a dead process (no exception of the job's own): infrastructure, retried
])
def test_a_failure_unlike_the_previous_one_is_retried(second):
    ledger = Ledger(max_failures=10)
    failed_at(ledger, 15, "RuntimeError: injected bug" if second[1] else None, T0)
    assert failed_at(ledger, second[0], second[1], T0 + 10) is None


def test_retry_repeated_errors_retries_until_max_failures():
    ledger = Ledger(max_failures=2, retry_repeated=True)
    for i in range(3):
        refused = failed_at(ledger, 15, "RuntimeError: injected bug", T0 + 10 * i)
    assert refused.startswith("max_failures=2 exhausted: 3 failed attempts")


def test_a_long_cause_is_clipped_not_refused():
    ledger = Ledger(max_failures=0)
    ledger.admit(T0)
    ledger.end(T0 + 1, K.FAILED, "x" * 5000)
    assert len(ledger.attempts[0].cause) == 300 and ledger.attempts[0].cause.endswith("…")


# -- run state and outcome --------------------------------------------------------------------

@pytest.mark.parametrize("attempts, state", [
    ([], None),
    ([attempt(1, None, 5)], S.RUNNING),
    ([attempt(1, K.FAILED, 5)], S.RESTARTING),  # the group is being restarted
    ([attempt(1, K.FAILED, 5), attempt(2, None, 3, start_step=3)], S.RESTARTING),  # no first step yet
    ([attempt(1, K.FAILED, 5), attempt(2, None, 4, start_step=3, first_step_at=T0 + 9)], S.RUNNING),
    ([attempt(1, K.FINISHED, 100)], None),  # the loop decides the terminal state
])
def test_run_state_from_attempts(attempts, state):
    assert run_state(attempts) is state


@pytest.mark.parametrize("snapshot, ok, user_error, stop, outcome", [
    (RunSnapshot(step=100, total=100, attempts=[attempt(1, K.FINISHED, 100)]), True, False, False, RunOutcome.FINISHED),
    (RunSnapshot(step=100, total=100, attempts=[attempt(1, K.FINISHED, 100)]), True, False, True, RunOutcome.FINISHED),
    (RunSnapshot(step=95, total=460, attempts=[attempt(1, K.PREEMPTED, 81), attempt(2, K.FINISHED, 95, 81)]),
     True, False, True, RunOutcome.STOPPED),  # returned after the stop, short of the end
    (RunSnapshot(step=3), False, True, False, RunOutcome.USER_ERROR),
    (RunSnapshot(step=3), False, False, True, RunOutcome.FAILED),
])
def test_the_drivers_outcome(snapshot, ok, user_error, stop, outcome):
    assert outcome_of(snapshot, ok=ok, user_error=user_error, stop_requested=stop) is outcome
