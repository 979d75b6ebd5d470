"""Step-boundary agreement (runtime/step_agreement.py) without a process group: each simulated rank
decides on a thread of its own, and the injected all-reduce is an element-wise max across them."""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from shipyard.runtime.step_agreement import MAX_INTERVAL, Decision, StepAgreement, interval


class Clock:
    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class Collective:
    """An all-reduce (MAX) over ``world`` threads; a rank that calls it alone times out."""

    def __init__(self, world: int):
        self.world, self.calls = world, 0
        self._barrier = threading.Barrier(world, timeout=5)
        self._lists: dict[int, list[int]] = {}

    def reduce_for(self, rank: int):
        def reduce(values: list[int]) -> list[int]:
            self._lists[rank] = values
            if self._barrier.wait() == 0:
                self.calls += 1
            out = [max(column) for column in zip(*self._lists.values())]
            self._barrier.wait()  # everyone has read before the next round writes
            return out

        return reduce


def ranks(world: int, *, clocks=None, notices=(), every_steps=None, every_seconds=None):
    collective = Collective(world)
    clocks = clocks or [Clock() for _ in range(world)]
    agreements = [StepAgreement(rank=r, every_steps=every_steps, every_seconds=every_seconds,
                                reduce=collective.reduce_for(r), since=0.0, clock=clocks[r],
                                notice=lambda r=r: r in notices)
                  for r in range(world)]
    return agreements, collective, clocks


def decide(agreements, step: int, saved_step: int | None = None) -> list[Decision]:
    with ThreadPoolExecutor(len(agreements)) as pool:
        return list(pool.map(lambda a: a.decide(step, saved_step=saved_step), agreements))


def test_every_steps_is_due_on_its_multiples_without_a_collective():
    (one,), collective, (clock,) = ranks(1, every_steps=5)
    assert decide([one], 0) == [Decision(checkpoint=False)]  # never at step 0
    clock.t = 0.001
    decide([one], 1)  # 1 step in 1 ms: the next agreement is MAX_INTERVAL steps on
    calls = collective.calls
    due = [s for s in range(2, 21) if decide([one], s)[0].checkpoint]
    assert due == [5, 10, 15, 20] and collective.calls == calls
    assert decide([one], 25, saved_step=25) == [Decision(checkpoint=False)]  # saved there already


def test_every_seconds_due_on_one_rank_only_checkpoints_every_rank():
    agreements, _, _ = ranks(2, clocks=[Clock(59.0), Clock(61.0)], every_seconds=60)
    assert decide(agreements, 3) == [Decision(checkpoint=True)] * 2
    agreements, _, _ = ranks(2, clocks=[Clock(59.0), Clock(59.5)], every_seconds=60)
    assert decide(agreements, 3) == [Decision(checkpoint=False)] * 2


def test_a_save_restarts_the_every_seconds_clock():
    agreements, _, clocks = ranks(2, clocks=[Clock(70.0), Clock(70.0)], every_seconds=60)
    for a in agreements:
        a.saved()
    for c in clocks:
        c.t = 129.0
    assert not any(d.checkpoint for d in decide(agreements, 4))
    for c in clocks:
        c.t = 131.0
    assert all(d.checkpoint for d in decide(agreements, 5))


def test_sigterm_on_rank_1_is_noticed_by_every_rank_which_checkpoint_and_stop():
    agreements, _, _ = ranks(2, notices={1}, every_steps=100)
    assert decide(agreements, 7) == [Decision(checkpoint=True, noticed=1)] * 2
    assert all(d.preempted for d in decide(ranks(2, notices={1})[0], 0))  # at step 0 too, with nothing to save
    agreements, _, _ = ranks(2, notices={1}, every_steps=100)
    assert decide(agreements, 7, saved_step=7) == [Decision(checkpoint=False, noticed=1)] * 2  # saved: stop only
    agreements, _, _ = ranks(3, notices={1, 2}, every_steps=100)
    assert {d.noticed for d in decide(agreements, 7)} == {2}  # the highest rank that got it


def test_interval_is_about_one_second_of_steps_within_bounds():
    assert interval(0, 3.0) == 1 and interval(5, 0.0) == 1  # nothing measured yet: agree at the next step
    assert interval(100, 0.5) == 200
    assert interval(1, 5.0) == 1  # slower than a step a second: every step
    assert interval(1, 1e-9) == MAX_INTERVAL


def test_the_next_agreement_is_the_agreed_interval_on_from_here():
    clocks = [Clock(), Clock()]
    agreements, collective, _ = ranks(2, clocks=clocks)
    decide(agreements, 0)
    clocks[0].t, clocks[1].t = 0.1, 0.2  # 10 steps: rank 0 measured 100 steps/s, rank 1 50
    decide(agreements, 10)
    assert collective.calls == 2
    for step in range(11, 110):  # the larger interval is agreed: 100 steps
        decide(agreements, step)
    assert collective.calls == 2
    decide(agreements, 110)
    assert collective.calls == 3


def test_a_restore_puts_the_next_agreement_at_the_restored_step():
    agreements, collective, _ = ranks(2, notices={0})
    for a in agreements:
        a.restored(40)
    assert decide(agreements, 40, saved_step=40) == [Decision(checkpoint=False, noticed=0)] * 2
    assert collective.calls == 1


@pytest.mark.parametrize("world", [1, 4])
def test_nothing_due_decides_nothing(world):
    agreements, _, _ = ranks(world, every_steps=50, every_seconds=3600)
    assert decide(agreements, 7) == [Decision(checkpoint=False)] * world
