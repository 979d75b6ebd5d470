"""Rank 0's publisher (runtime/publisher.py): a commit from the upload thread reaches the board at
once, even while the loop is busy, and its numbers join the loop's next push."""

from __future__ import annotations

import threading

import pytest
import torch

from shipyard.runtime.meter import StepMeter
from shipyard.runtime.publisher import NonFiniteMetric, Position, Publisher


class Board:
    """Records ``update.remote(**progress)`` calls with the thread that made them."""

    def __init__(self):
        self.updates: list[tuple[str, dict]] = []
        board = self

        class Update:
            def remote(self, **kw):
                board.updates.append((threading.current_thread().name, kw))

        self.update = Update()


def publisher(board, step, nan_policy="fail"):
    meter = StepMeter(samples_per_step=4, dp_world=1, device=torch.device("cpu"))
    return Publisher(board, rank=0, position=lambda: Position(step[0], 100, 0), samples_per_step=4, meter=meter,
                     nan_policy=nan_policy)


def test_a_commit_posted_by_the_upload_thread_is_sent_at_once_and_folded_into_the_next_push():
    board, step = Board(), [0]
    pub = publisher(board, step)
    pub.push(force=True, event="started")
    step[0] = 5
    pub.report(5, {"loss": torch.tensor(2.0)})  # within the throttle: not sent
    assert len(board.updates) == 1
    up = threading.Thread(name="upload", target=lambda: pub.post(
        "checkpoint at step 5 committed", step=5, numbers={"checkpoint_blocked_s": 0.25},
        checkpoint="file:///c/5", committed_step=5))
    up.start()
    up.join(5)  # the loop makes no call meanwhile: the commit must not wait for it
    who, commit = board.updates[-1]
    assert who == "upload" and commit["event"] == "checkpoint at step 5 committed"
    assert (commit["committed_step"], commit["metrics"]) == (5, {"checkpoint_blocked_s": 0.25})
    assert commit["step"] == 0  # the position of the last push: the board's step never goes back

    step[0] = 6
    pub.push(force=True)
    _, nxt = board.updates[-1]
    assert nxt["step"] == 6 and nxt["metrics"]["loss"] == 2.0 and nxt["metrics"]["checkpoint_blocked_s"] == 0.25


def test_only_rank_0_publishes():
    board, step = Board(), [3]
    meter = StepMeter(samples_per_step=4, dp_world=1, device=torch.device("cpu"))
    pub = Publisher(board, rank=1, position=lambda: Position(step[0], 100, 0), samples_per_step=4, meter=meter)
    pub.push(force=True, event="started")
    pub.post("x", step=3, numbers={})
    assert board.updates == []


# -- nan_policy ---------------------------------------------------------------------------------

def test_a_nan_loss_fails_the_attempt_naming_the_metric_and_its_step_after_the_board_saw_it():
    board, step = Board(), [12]
    pub = publisher(board, step)
    pub.report(11, {"loss": torch.tensor(0.5), "accuracy": 0.9})
    step[0] = 12
    pub.report(12, {"loss": torch.tensor(float("nan"))})  # within the push throttle: not read yet
    step[0] = 13
    with pytest.raises(NonFiniteMetric, match=r"^loss is nan at step 12 \(nan_policy: fail"):
        pub.push(force=True)  # the step named is the report's, not the push's
    assert board.updates[-1][1]["step"] == 13  # sent before raising: the dashboard shows the nan


def test_warn_announces_each_non_finite_metric_once_and_trains_on():
    board, step = Board(), [3]
    pub = publisher(board, step, nan_policy="warn")
    pub.report(3, {"loss": float("inf"), "grad": [1.0, float("nan")]})
    assert board.updates[-1][1]["event"] == ("loss is inf at step 3 (nan_policy: warn: training on); "
                                             "grad is nan at step 3 (nan_policy: warn: training on)")
    step[0] = 4
    pub.report(4, {"loss": float("inf")})
    pub.push(force=True)
    assert board.updates[-1][1]["event"] is None  # said once


def test_ignore_passes_non_finite_values_through():
    board, step = Board(), [3]
    pub = publisher(board, step, nan_policy="ignore")
    pub.report(3, {"loss": float("nan")})
    assert board.updates[-1][1]["event"] is None
