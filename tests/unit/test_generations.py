"""The progress board's process-group generations (runtime/progress.py, runtime/regroup.py):
who may form a group, when an attempt opens and closes, and when max_failures stops the job."""

from shipyard.run.records import AttemptKind as K
from shipyard.run.records import GenerationState as G
from shipyard.runtime.progress import LEAVE_GRACE_S, Board

MASTER = ("127.0.0.1", 29500)


def formed(board: Board, world: int = 2) -> int:
    number = board.join(1, world, None)
    assert board.formed(number) is None  # rank 0 is not in yet
    assert board.join(0, world, MASTER) == number
    assert board.formed(number).master == MASTER
    return number


def test_a_group_forms_once_every_rank_joined_and_opens_an_attempt():
    board = Board(max_failures=1, world=2)
    number = formed(board)
    assert number == 0
    (attempt,) = board.snapshot().attempts
    assert attempt.number == 1 and attempt.world == 2 and attempt.end is None
    assert attempt.entered is not None


def test_a_survivor_waits_for_the_replacement_and_the_controller_names_the_cause():
    board = Board(max_failures=3, world=2)
    first = formed(board)
    board.broken(first, 0, "RuntimeError: gloo Connection reset by peer")  # the survivor noticed first
    second = board.join(0, 2, MASTER)
    assert second == first + 1 and board.formed(second) is None
    assert board.formed(first).superseded
    board.attempt_failed("rank 1: worker process died", "failed")  # then Ray Train's controller
    board.join(1, 2, None)  # the replacement
    assert board.formed(second).master == MASTER
    one, two = board.snapshot().attempts
    assert one.kind is K.FAILED and one.cause == "rank 1: worker process died"
    assert two.end is None and two.start <= two.entered


def test_a_break_no_process_explains_ends_the_attempt_with_the_survivors_words():
    board = Board(max_failures=3, world=2)
    first = formed(board)
    board.broken(first, 1, "DistNetworkError: timed out")
    board.broken(first, 0, "RuntimeError: gloo read error")  # the same break, seen by the other rank
    formed(board)
    one, _ = board.snapshot().attempts
    assert one.kind is K.FAILED and one.cause == "rank 1: DistNetworkError: timed out"


def test_a_preempted_attempt_is_not_a_failure():
    board = Board(max_failures=0, world=2)
    first = formed(board)
    board.broken(first, 0, "Preempted: preempted: rank 1 received SIGTERM")
    board.attempt_failed("preempted: rank 1 received SIGTERM; checkpoint at step 7 committed", "preempted")
    second = formed(board)
    assert board.formed(second).master == MASTER  # max_failures=0, yet admitted
    assert [a.kind for a in board.snapshot().attempts] == [K.PREEMPTED, None]


def test_max_failures_spent_refuses_the_next_group_to_every_rank():
    board = Board(max_failures=1, world=2)
    for _ in range(2):
        number = formed(board)
        board.attempt_failed("rank 0: RuntimeError: bug", "failed")
    number = board.join(0, 2, MASTER)
    board.join(1, 2, None)
    refused = board.formed(number)
    assert refused.state is G.REFUSED
    assert refused.refused.startswith("max_failures=1 exhausted: 2 failed attempts")
    assert board.join(1, 2, None) == number and board.formed(number) == refused  # a late rank too
    assert len(board.snapshot().attempts) == 2


def test_a_whole_group_restart_at_another_size_forms_with_the_new_world():
    board = Board(max_failures=-1, world=2)
    formed(board)
    board.attempt_failed("rank 1: its node died", "failed")  # elastic: Ray Train restarts with 1 worker
    number = board.join(0, 1, MASTER)
    assert board.formed(number).master == MASTER
    assert [a.world for a in board.snapshot().attempts] == [2, 1]


def test_a_rank_stuck_in_a_broken_group_is_told_to_exit_after_the_grace_period():
    board = Board(max_failures=3, world=2, stall_timeout_s=None)  # stall detection off: this still works
    first = formed(board)
    assert board.heartbeat(0, 5, False, first) is None  # healthy
    board.attempt_failed("rank 1: worker process died", "failed")
    assert board.heartbeat(0, 5, False, first) is None  # just broke: rank 0 may still be leaving
    board.rendezvous.generation.broken_at -= LEAVE_GRACE_S
    verdict = board.heartbeat(0, 5, False, first)
    assert verdict.culprits == (0,) and not verdict.frozen
    assert "rank 0 was still in process group 0" in verdict.message
    second = board.join(1, 2, None)  # the next group forms without the stuck rank's old process
    assert board.heartbeat(1, 0, False, second) is None


def test_a_rank_failing_after_its_peer_finished_is_not_replaced_to_wait_for_it_forever():
    board = Board(max_failures=3, world=2)
    formed(board)
    board.rank_finished(1)  # rank 1's train(ctx) returned; then rank 0 fails at the very end
    refused = board.attempt_failed("rank 0: NonFiniteMetric: loss is nan at step 92", "failed",
                                   "NonFiniteMetric: loss is nan at step 92")
    assert refused.startswith("rank 1 had already finished training when the attempt failed "
                              "(rank 0: NonFiniteMetric: loss is nan at step 92)")
    number = board.join(0, 2, MASTER)  # a replacement that Ray started anyway is refused, not left waiting
    assert board.formed(number).state is G.REFUSED
