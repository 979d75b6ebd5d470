"""Stopping early: ``ctx.stop(reason)`` or a ``break`` out of ``ctx.batches()``.

A stop ends the run for good: every rank checkpoints at the stop step and the commit record is
marked ``finished`` with the reason, so that running the job again reports that it finished
instead of training on. The rule, as for ``ctx.checkpoint()``: every rank stops at the same step
(decide on values every rank has, e.g. an all-reduced validation loss). The ranks check that they
did with one small all-gather (:func:`gatherer`, judged by :func:`check`) on a gloo group of its own whose timeout is the job's
``stall_timeout_s``: a rank that stops alone, or at another step, fails the run with a UserError
naming the ranks and steps, after at most that long, rather than leaving its peers waiting for it
in a collective forever.

"Extended": a finished run's record keeps its ``dataset.epochs``; a later run with more epochs
(``--set dataset.epochs=N``) goes on from the stop checkpoint to the new end, any other later run
of the same checkpoint line trains nothing (:func:`extends`). ``--fresh`` starts over.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from shipyard.checkpoint import CheckpointStore, CommitRecord
from shipyard.errors import UserError

MAX_REASON = 500  # characters of a stop reason kept in the commit record
DEFAULT_AGREE_TIMEOUT_S = 600.0  # when the job has no stall_timeout_s


@dataclass(frozen=True)
class Stop:
    """One rank's stop: the step it stopped after and why."""

    step: int
    reason: str


def reason_of(reason: object) -> str:
    """The reason as kept: a one-line string of at most :data:`MAX_REASON` characters."""
    text = " ".join(str(reason).split())
    return text[:MAX_REASON] or "stopped"


def check(stops: list[Stop | None]) -> Stop:
    """Every rank's stop (by rank, None: that rank did not stop) -> the run's stop, or a UserError."""
    if all(s is not None for s in stops) and len({s.step for s in stops}) == 1:
        return Stop(stops[0].step, stops[0].reason)
    where = "; ".join(f"rank {r} {'did not stop' if s is None else f'stopped after step {s.step}'}"
                      for r, s in enumerate(stops))
    raise UserError(f"ctx.stop / break out of ctx.batches(): every rank must stop at the same step ({where}); "
                    "decide on values every rank has (e.g. an all-reduced validation loss)")


def gatherer(group, world: int, timeout_s: float) -> Callable[[Stop], list[Stop | None]]:
    """The production ``gather``: every rank's stop step in one all-gather over ``group`` (gloo,
    created with ``timeout_s``); a timeout means some rank never reached its stop. The reason is
    each rank's own (rank 0's is the one recorded)."""
    import torch
    import torch.distributed as dist

    def gather(stop: Stop) -> list[Stop | None]:
        out = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
        try:
            dist.all_gather(out, torch.tensor([stop.step]), group=group)
        except RuntimeError as e:
            if "timed out" not in str(e).lower() and "timeout" not in str(e).lower():
                raise
            raise UserError(f"ctx.stop / break out of ctx.batches(): rank {dist.get_rank()} stopped after step "
                            f"{stop.step}, but not every rank stopped within {timeout_s:g}s (stall_timeout_s); every "
                            "rank must stop at the same step") from None
        return [Stop(int(t.item()), stop.reason) for t in out]

    return gather


def finished_record(stop: Stop, epochs: int) -> dict:
    """The commit record's ``finished`` field."""
    return {"reason": stop.reason, "epochs": epochs}


def extends(record: CommitRecord, epochs: int) -> bool:
    """Whether a run with ``dataset.epochs = epochs`` goes on past a finished ``record``."""
    return record.finished is not None and epochs > record.finished["epochs"]


def finished_line(record: CommitRecord | None, name: str, epochs: int) -> str | None:
    """The line a run of a finished job prints instead of training, or None when it trains."""
    if record is None or record.finished is None or extends(record, epochs):
        return None
    return (f"{name} already finished: stopped at step {record.step} ({record.finished['reason']}); checkpoint "
            f"{record.uri}. Nothing to train: raise dataset.epochs above {record.finished['epochs']} to go on, "
            "or start over with --fresh")


def finished_before(spec) -> str | None:
    """The line a run prints instead of training when the job's latest checkpoint says the run
    stopped for good and ``spec`` does not extend its data; None when it trains (the driver
    asks before any worker starts)."""
    if not spec.checkpoint:
        return None
    record = CheckpointStore(spec.checkpoint.uri, spec.checkpoint.line).latest()
    return finished_line(record, spec.name, spec.dataset.epochs)
