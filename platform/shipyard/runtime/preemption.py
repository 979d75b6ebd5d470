"""Preemption notice: SIGTERM to a worker (a Kubernetes eviction, a spot notice) becomes a checkpoint.

Ray Train runs ``train(ctx)`` in a thread of the worker actor, and Python lets only the main
thread install signal handlers; Ray's own handler there exits the process at once. So
shipyard's torch backend (``runtime/regroup.py``) runs :func:`install` on every worker
actor's main thread (``worker_group.execute`` is an ordinary actor call, and a training worker
runs its calls on that thread). The handler only records the notice; the training loop reads it
at the next step boundary, where every rank agrees on it in one tiny collective
(:meth:`TrainContext.batches`), all ranks checkpoint at the same step, wait for the commit and
raise :class:`Preempted`. The rank that got the notice leaves; Ray Train replaces it (or, for
elastic and Horovod jobs, the whole group), and the next generation resumes from that
checkpoint: no step is lost. Ranks without a notice stay for that generation (``regroup.py``). If the checkpoint is not committed within ``grace_s`` of the
notice, the process exits as SIGTERM would have made it (status 143).

Once this rank's ``train(ctx)`` has returned (:func:`finished`), SIGTERM is no longer a preemption
notice: Ray stops every worker with SIGTERM when a run ends, and a finished run has nothing to
checkpoint. The signal then goes, silently, to the handler that was there before :func:`install`
(Ray's, which exits the worker as it would without shipyard).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

log = logging.getLogger(__name__)

_notice = threading.Event()
_finished = threading.Event()
_received_at: float | None = None
_reason: str = "received SIGTERM"
_previous: object = signal.SIG_DFL  # the SIGTERM handler install() replaced


class Preempted(RuntimeError):
    """Raised on every rank once the preemption checkpoint is committed; Ray Train restarts the group."""


def requested() -> bool:
    """Whether this process received SIGTERM (or was asked to stop, see :func:`request`)."""
    return _notice.is_set()


def reason() -> str:
    """Why this process stops: ``received SIGTERM``, or what :func:`request` was told."""
    return _reason


def request(why: str, grace_s: float) -> None:
    """Ask this rank to stop at the next step boundary after a checkpoint, as SIGTERM does; used by
    the platform itself (an elastic job growing, see ``runtime/elastic.py``). Safe from any thread."""
    global _reason
    if not _notice.is_set():
        _reason = why
    _on_sigterm(grace_s)


def finished() -> None:
    """This rank's ``train(ctx)`` returned: a SIGTERM from now on is the end of the run, not a notice."""
    _finished.set()


def _on_signal(grace_s: float) -> None:
    if _finished.is_set():
        _pass_on()
    else:
        _on_sigterm(grace_s)


def _pass_on() -> None:
    """SIGTERM once more, to the handler install() replaced (Ray's: the worker exits quietly)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _previous if _previous is not None else signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


def _on_sigterm(grace_s: float) -> None:
    global _received_at
    if _notice.is_set() or _finished.is_set():
        return
    _received_at = time.monotonic()
    _notice.set()
    # Not shown (debug): Ray also sends SIGTERM when it tears down a worker group whose run failed
    # or may not retry, which is no preemption. A real notice shows up as the run's "preempted: ..."
    # event once its checkpoint is committed (or as the error below when it is not).
    log.debug("SIGTERM: checkpointing at the next step boundary (grace period %.0fs)", grace_s)
    timer = threading.Timer(grace_s, _expire, args=(grace_s,))
    timer.daemon = True
    timer.start()


def _expire(grace_s: float) -> None:
    log.error("SIGTERM: no checkpoint committed within the %.0fs grace period; exiting", grace_s)
    os._exit(128 + signal.SIGTERM)


def install(grace_s: float) -> bool:
    """Handle SIGTERM by recording a notice. Must run on the process's main thread."""
    global _previous
    if threading.current_thread() is not threading.main_thread():
        log.warning("preemption notice not armed: not on the main thread")
        return False
    _previous = signal.signal(signal.SIGTERM, lambda signum, frame: _on_signal(grace_s))
    return True
