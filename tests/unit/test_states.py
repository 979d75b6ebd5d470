"""The job state machine: every edge of the diagram is allowed, everything else is refused."""

import itertools

import pytest

from shipyard.errors import UserError
from shipyard.store.states import (ACTIVE, HOLDING, TERMINAL, IllegalTransition, JobState, StaleTransition,
                                   check_transition, parse_state)

S = JobState
ALLOWED = {
    (S.QUEUED, S.ADMITTED), (S.ADMITTED, S.RUNNING), (S.RUNNING, S.RESTARTING), (S.RESTARTING, S.RUNNING),
    (S.RUNNING, S.SUCCEEDED), (S.RUNNING, S.FAILED), (S.RUNNING, S.CANCELLED),
    (S.RUNNING, S.PREEMPTED), (S.ADMITTED, S.PREEMPTED), (S.PREEMPTED, S.QUEUED),
    (S.QUEUED, S.CANCELLED), (S.ADMITTED, S.CANCELLED), (S.RESTARTING, S.CANCELLED),
    (S.ADMITTED, S.FAILED), (S.RESTARTING, S.FAILED),
    (S.PREEMPTED, S.CANCELLED),  # cancel during the checkpoint grace period: "don't requeue"
    (S.PREEMPTED, S.SUCCEEDED),  # the run finished before the stop reached it
}


@pytest.mark.parametrize("current,target", sorted(itertools.product(S, S)))
def test_exactly_the_diagrams_edges_are_allowed(current, target):
    if (current, target) in ALLOWED:
        check_transition(current, target)
    else:
        with pytest.raises(IllegalTransition):
            check_transition(current, target)


def test_the_happy_path_with_restarts_and_a_preemption_is_legal():
    path = [S.QUEUED, S.ADMITTED, S.RUNNING, S.RESTARTING, S.RUNNING, S.RESTARTING, S.RUNNING,
            S.PREEMPTED, S.QUEUED, S.ADMITTED, S.RUNNING, S.SUCCEEDED]
    for a, b in zip(path, path[1:]):
        check_transition(a, b)


@pytest.mark.parametrize("done", sorted(TERMINAL))
def test_finished_jobs_cannot_move_and_the_message_says_so(done):
    with pytest.raises(IllegalTransition, match=f"job j1 is {done.value} and cannot become CANCELLED.*finished"):
        check_transition(done, S.CANCELLED, "j1")


def test_message_lists_what_is_allowed_next():
    with pytest.raises(IllegalTransition) as e:
        check_transition(S.QUEUED, S.RUNNING, "j7")
    assert "allowed next: ADMITTED, CANCELLED" in str(e.value)
    assert (e.value.current, e.value.target) == (S.QUEUED, S.RUNNING)


def test_illegal_and_stale_transitions_are_user_errors_of_one_family():
    # The API maps the whole family to 409, the CLI to exit status 2.
    assert issubclass(StaleTransition, IllegalTransition) and issubclass(IllegalTransition, UserError)
    err = StaleTransition("j2", S.QUEUED, S.CANCELLED, S.ADMITTED)
    assert "is CANCELLED, not QUEUED" in str(err)


def test_resource_holding_and_active_states():
    assert HOLDING == {S.ADMITTED, S.RUNNING, S.RESTARTING, S.PREEMPTED}
    assert ACTIVE == set(S) - TERMINAL
    assert not S.QUEUED.holds_resources and S.PREEMPTED.holds_resources and S.FAILED.terminal


def test_parse_state_accepts_any_case_and_names_the_choices():
    assert parse_state("running") is S.RUNNING
    with pytest.raises(UserError, match="unknown job state 'runing'; expected one of: QUEUED"):
        parse_state("runing")
