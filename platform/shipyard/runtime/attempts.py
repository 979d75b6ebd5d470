"""What ended an attempt, as Ray Train's controller sees it, and the callback that records it.

The attempts themselves are kept by the Board's :class:`~shipyard.run.ledger.Ledger`.
:class:`AttemptsCallback` runs in Ray Train's controller and closes the current attempt with its
cause (:func:`describe_failure`) before the controller restarts the group; when the ledger says
no further attempt may start, it ends the run there (:class:`RetryRefused`), so that Ray Train
does not start a worker group only to have it refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ray.train.v2.api.callback import UserCallback

from shipyard.errors import first_line, typed_line
from shipyard.run.ledger import clip
from shipyard.run.records import AttemptKind

_CUDA_ALLOC = re.compile(r"Tried to allocate ([\d.]+ [KMGT]?i?B)")
_CPU_ALLOC = re.compile(r"(?:you tried to allocate|tried to allocate) (\d+) bytes")


class RetryRefused(RuntimeError):
    """Raised in Ray Train's controller to end a run that may not start another attempt (the
    ledger's refusal is the run's error; see ``launcher.launch``)."""


def out_of_memory(e: BaseException) -> str | None:
    """``"CUDA out of memory (tried to allocate 2.00 GiB)"`` and the like when ``e`` is an
    allocation failure (torch's CUDA or CPU allocator, Python's MemoryError), else None."""
    text = str(e)
    if "CUDA out of memory" in text or (type(e).__name__ == "OutOfMemoryError" and "CUDA" in text):
        m = _CUDA_ALLOC.search(text)
        return "CUDA out of memory" + (f" (tried to allocate {m.group(1)})" if m else "")
    if "DefaultCPUAllocator: can't allocate memory" in text:
        m = _CPU_ALLOC.search(text)
        return "out of CPU memory" + (f" (tried to allocate {_bytes(int(m.group(1)))})" if m else "")
    if isinstance(e, MemoryError):
        return "out of CPU memory"
    return None


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


@dataclass(frozen=True)
class Failure:
    """What ended an attempt: the cause people read, its kind, and the exception (``Type: first
    line``) when a rank raised one of its own (the ledger compares it with the previous attempt's)."""

    cause: str
    kind: AttemptKind
    error: str | None = None


def describe_failure(worker_exceptions: dict[int, BaseException], step: int | None = None,
                     deaths: dict[int, str] | None = None) -> Failure:
    """What ended an attempt.

    When one rank dies the others fail too (a collective's peer is gone), so the cause is chosen:
    a preemption first, then a user error (a bad spec value found on a worker), then an
    allocation failure (named as one, with ``step``, the furthest step the attempt reached, and
    the size asked for when known), then a dead worker process (in the words of ``deaths``, what
    its node's kernel told, when given: ``runtime/deaths.py``), then the lowest rank's own exception.
    """
    from ray.exceptions import RayActorError

    from shipyard.errors import UserError
    from shipyard.runtime.preemption import Preempted
    from shipyard.runtime.ray_adapter import unwrap_worker_error

    errors = {rank: unwrap_worker_error(e) for rank, e in sorted(worker_exceptions.items())}
    for rank, e in errors.items():
        if isinstance(e, Preempted):
            return Failure(clip(str(e)), AttemptKind.PREEMPTED)
    for rank, e in errors.items():
        if isinstance(e, UserError):
            return Failure(clip(str(e)), AttemptKind.USER_ERROR)
    for rank, e in errors.items():
        oom = out_of_memory(e)
        if oom is not None:
            at = f" at step {step}" if step is not None else ""
            return Failure(clip(f"rank {rank}: {oom}{at}: {typed_line(e)}"), AttemptKind.FAILED, clip(typed_line(e)))
    for rank, e in errors.items():
        if type(e).__name__ == "OutOfMemoryError" and type(e).__module__.startswith("ray"):
            return Failure(clip(f"rank {rank}: killed by Ray's memory monitor (its node ran low on memory)"),
                           AttemptKind.FAILED)
        if isinstance(e, RayActorError):
            if "its node has died" in str(e):
                return Failure(clip(f"rank {rank}: its node died ({_node_death(e)})"), AttemptKind.FAILED)
            if deaths and rank in deaths:
                return Failure(clip(f"rank {rank}: {deaths[rank]}"), AttemptKind.FAILED)
            return Failure(clip(f"rank {rank}: worker process died ({_death(e)})"), AttemptKind.FAILED)
    rank, e = next(iter(errors.items()))
    return Failure(clip(f"rank {rank}: {typed_line(e)}"), AttemptKind.FAILED, clip(typed_line(e)))


def died_without_error(e: BaseException) -> bool:
    """Whether Ray saw only a worker process's connection drop (SIGKILL, a crash), its node alive."""
    from ray.exceptions import RayActorError

    text = str(e)
    return (isinstance(e, RayActorError) and "its node has died" not in text
            and ("connection error code" in text or "SYSTEM_ERROR" in text or "unexpectedly" in text))


def _death(e: BaseException) -> str:
    """What Ray knows of a worker process's death without a Python error: its exit detail, or
    (when Ray only saw the connection drop) that it was killed by a signal or crashed."""
    if died_without_error(e):
        return ("no Python error: killed by a signal (SIGKILL, the kernel's OOM killer) or crashed; "
                "Ray does not know which")
    return first_line(e)


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

        from shipyard.runtime.ray_adapter import quiet_controller_log

        step = ray.get(self.board.step_reached.remote())
        failure = describe_failure(worker_exceptions, step, self._deaths(worker_exceptions))
        # Waited on, so that the next attempt's ranks find this one closed when they ask admit().
        refused = ray.get(self.board.attempt_failed.remote(failure.cause, failure.kind, failure.error))
        if refused:
            quiet_controller_log(RetryRefused)
            raise RetryRefused(refused)  # the controller ends the run: no worker group is started

    def _deaths(self, worker_exceptions) -> dict[int, str]:
        """For ranks whose process died without a Python error: what killed it (``deaths.py``)."""
        import ray

        from shipyard.runtime import deaths
        from shipyard.runtime.ray_adapter import unwrap_worker_error

        dead = [rank for rank, e in worker_exceptions.items() if died_without_error(unwrap_worker_error(e))]
        if not dead:
            return {}
        latest = {p.rank: p for p in ray.get(self.board.snapshot.remote()).processes}  # registration order
        return deaths.ask([latest[r] for r in dead if r in latest], self.board)
