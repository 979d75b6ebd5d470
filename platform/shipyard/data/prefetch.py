"""Items produced ahead of their consumer, by one background thread, into a bounded queue.

The producer is a generator run in its own thread; it owns everything it touches (here: the
shard reads and the batches it assembles) and hands finished items over through the queue,
which holds at most ``depth`` of them, so memory stays bounded however slow the consumer is.
An exception in the producer reaches the consumer at the point where the failed item would
have come, with its own type and traceback.

The thread is a daemon (a consumer that never closes its iterator must not keep the process
alive), and no producer outlives its consumer's ``close`` or the interpreter's exit: both stop
it and wait for it. That wait matters: a daemon thread still inside torch's or Arrow's C++ code
while the interpreter finalizes is killed there, and the process aborts ("terminate called
without an active exception"). So every wait of the producer's must end when it is told to
stop (:func:`wait`), including waits on reads the interpreter's exit has already cancelled.
"""

from __future__ import annotations

import atexit
import queue
import threading
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Generic, TypeVar

T = TypeVar("T")

_ITEM, _END, _ERROR = range(3)
_POLL_S = 0.1  # how soon a waiting producer notices that it was told to stop
_JOIN_S = 5.0  # how long close() waits for the producer to finish what it is doing

_live: weakref.WeakSet[Ahead] = weakref.WeakSet()
_atexit_installed = False


class Stopped(Exception):
    """The producer was told to stop (its consumer left); raised out of :func:`wait`."""


def wait(fut: Future, stop: threading.Event):
    """``fut.result()``, or :class:`Stopped` once ``stop`` is set."""
    while True:
        try:
            return fut.result(timeout=_POLL_S)
        except FutureTimeout:
            if stop.is_set():
                raise Stopped from None


def _stop_all() -> None:
    """At exit (after the interpreter joined its non-daemon threads, before it finalizes)."""
    for ahead in list(_live):
        ahead.close()


class Ahead(Generic[T]):
    """Iterate the items of ``produce(stop)``, computed up to ``depth`` ahead in a daemon thread
    (``depth`` in the queue, one more in the producer's hands while it waits for room).

    ``produce`` gets the :class:`threading.Event` that :meth:`close` sets, for its own waits
    (:func:`wait`). Call :meth:`close` when done (the consumer may stop early).
    """

    def __init__(self, produce: Callable[[threading.Event], Iterator[T]], depth: int, name: str):
        global _atexit_installed
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._queue: queue.Queue = queue.Queue(depth)
        self._stop = threading.Event()
        self._made = self._taken = 0  # items put / items taken (each written by one thread)
        self._thread = threading.Thread(target=self._run, args=(produce,), name=name, daemon=True)
        if not _atexit_installed:
            atexit.register(_stop_all)
            _atexit_installed = True
        _live.add(self)
        self._thread.start()

    @property
    def ready(self) -> int:
        """Items waiting in the queue (the consumer may count one before the producer does)."""
        return max(0, self._made - self._taken)

    def _run(self, produce: Callable[[threading.Event], Iterator[T]]) -> None:
        try:
            items = produce(self._stop)
            try:
                for item in items:
                    if not self._put((_ITEM, item)):
                        return
                    self._made += 1
            finally:
                close = getattr(items, "close", None)
                if close is not None:
                    close()
            self._put((_END, None))
        except Stopped:
            pass
        except BaseException as e:  # handed to the consumer, who raises it
            self._put((_ERROR, e))

    def _put(self, message: tuple) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(message, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[T]:
        while True:
            kind, value = self._queue.get()
            if kind == _ITEM:
                self._taken += 1
                yield value
            elif kind == _END:
                return
            else:
                raise value

    def _drain(self) -> None:
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return

    def close(self) -> None:
        """Stop the producer, drop what it made, and wait (up to 5 s) for its thread to end."""
        self._stop.set()
        self._drain()  # frees a producer blocked on a full queue
        if threading.current_thread() is not self._thread:
            self._thread.join(_JOIN_S)
        self._drain()
        _live.discard(self)
