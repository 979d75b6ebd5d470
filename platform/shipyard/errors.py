"""User-facing errors.

A :class:`UserError` is a mistake the user can fix (a bad spec field, a missing file or URI). The
CLI prints its message on one line and exits with status 2, without a traceback; the API (later)
maps it to HTTP 4xx. Anything else is an internal error and keeps its traceback.
"""

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
    """``error`` and every exception it carries, each once, depth first: its cause and context,
    a ``cause`` attribute, and the per-rank failures Ray Train (``worker_failures``) and DCP
    (``failures``: rank -> exception or (exception, traceback)) attach."""
    seen: set[int] = set()
    stack: list = [error]
    while stack:
        e = stack.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        for attr in ("worker_failures", "failures"):
            failures = getattr(e, attr, None)
            if isinstance(failures, dict):
                stack.extend(f[0] if isinstance(f, tuple) else f for f in failures.values())
        stack.extend([getattr(e, "cause", None), e.__cause__, e.__context__])
