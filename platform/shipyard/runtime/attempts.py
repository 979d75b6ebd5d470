"""What ended an attempt, as Ray Train's controller sees it, and the callback that records it.

The attempts themselves are kept by the Board's :class:`~shipyard.run.ledger.Ledger`.
:class:`AttemptsCallback` runs in Ray Train's controller and closes the current attempt with its
cause (:func:`describe_failure`) before the controller restarts the group.
"""

from __future__ import annotations

from ray.train.v2.api.callback import UserCallback

from shipyard.errors import first_line
from shipyard.run.ledger import clip
from shipyard.run.records import AttemptKind


def describe_failure(worker_exceptions: dict[int, BaseException]) -> tuple[str, AttemptKind]:
    """What ended an attempt: ``(cause, kind)``, kind one of preempted, user_error, failed.

    When one rank dies the others fail too (a collective's peer is gone), so the cause is chosen:
    a preemption first, then a user error (a bad spec value found on a worker), then a dead worker
    process, then the lowest rank's own exception.
    """
    from ray.exceptions import RayActorError

    from shipyard.errors import UserError
    from shipyard.runtime.preemption import Preempted
    from shipyard.runtime.ray_adapter import unwrap_worker_error

    errors = {rank: unwrap_worker_error(e) for rank, e in sorted(worker_exceptions.items())}
    for rank, e in errors.items():
        if isinstance(e, Preempted):
            return clip(str(e)), AttemptKind.PREEMPTED
    for rank, e in errors.items():
        if isinstance(e, UserError):
            return clip(str(e)), AttemptKind.USER_ERROR
    for rank, e in errors.items():
        if isinstance(e, RayActorError):
            if "its node has died" in str(e):
                return clip(f"rank {rank}: its node died ({_node_death(e)})"), AttemptKind.FAILED
            return clip(f"rank {rank}: worker process died ({first_line(e)})"), AttemptKind.FAILED
    rank, e = next(iter(errors.items()))
    return clip(f"rank {rank}: {type(e).__name__}: {first_line(e)}"), AttemptKind.FAILED


def _node_death(e: BaseException) -> str:
    """Ray's reason for a node's death (e.g. missed heartbeats), from the actor error's text."""
    lines = [line.strip() for line in str(e).splitlines()]
    for line in lines:
        if "node was terminated" in line:
            return line.removeprefix("the actor's ")
    return next((line.split(". Node Id")[0] for line in lines if "node has died" in line), first_line(e))


class AttemptsCallback(UserCallback):
    """Runs in Ray Train's controller: closes the attempt with its cause before the group restarts."""

    def __init__(self, board):
        self.board = board

    def after_exception(self, run_context, worker_exceptions) -> None:
        import ray

        cause, kind = describe_failure(worker_exceptions)
        # Waited on, so that the next attempt's ranks find this one closed when they ask admit().
        ray.get(self.board.attempt_failed.remote(cause, kind))
