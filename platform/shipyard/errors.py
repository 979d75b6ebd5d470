"""User-facing errors.

A :class:`UserError` is a mistake the user can fix (a bad spec field, a missing file or URI). The
CLI prints its message on one line and exits with status 2, without a traceback; the API (later)
maps it to HTTP 4xx. Anything else is an internal error and keeps its traceback.

:func:`chain` and :func:`first_line` are the helpers every place that explains a failure uses.
"""

from __future__ import annotations

from collections.abc import Iterator


class UserError(Exception):
    """A mistake in the user's input; the message names the field or file and the fix."""


class SpecError(UserError):
    """A job spec that does not validate."""


class DataError(UserError):
    """A dataset URI, manifest or shard that cannot be used."""


class CheckpointError(UserError):
    """A checkpoint URI or checkpoint that cannot be used."""


class HorovodNotInstalled(UserError):
    """``strategy: horovod`` where ``horovod.torch`` does not import (deploy/horovod.sh builds it)."""


def chain(error: BaseException) -> Iterator[BaseException]:
    """``error`` and every exception it carries, each once, depth first.

    What an exception carries: ``__cause__``, ``__context__``, a ``cause`` attribute (Ray's task
    errors), ``controller_failure`` (Ray Train's ``ControllerError``), and the per-rank failures that Ray Train (``worker_failures``: rank -> exception) and
    DCP's ``CheckpointException`` (``failures``: rank -> exception or (exception, traceback))
    attach. The one walk over them: callers ask what kind of failure this is without knowing
    which library wrapped it how.
    """
    seen: set[int] = set()
    stack: list[object] = [error]
    while stack:
        e = stack.pop()
        if isinstance(e, tuple) and e:  # DCP: (exception, traceback)
            e = e[0]
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        carried: list[object] = [e.__cause__, e.__context__, getattr(e, "cause", None),
                                 getattr(e, "controller_failure", None)]
        for attr in ("worker_failures", "failures"):
            failures = getattr(e, attr, None)
            if isinstance(failures, dict):
                carried.extend(failures.values())
        stack.extend(reversed(carried))


def first_line(e: BaseException) -> str:
    """The first line of ``e``'s message, or its type's name when the message is empty."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def typed_line(e: BaseException) -> str:
    """``Type: first line`` (``Type`` alone when the exception has no message)."""
    line = first_line(e)
    return line if line == type(e).__name__ else f"{type(e).__name__}: {line}"
