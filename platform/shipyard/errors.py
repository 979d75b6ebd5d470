"""User-facing errors.

A :class:`UserError` is a mistake the user can fix (a bad spec field, a missing file or URI). The
CLI prints its message on one line and exits with status 2, without a traceback; the API (later)
maps it to HTTP 4xx. Anything else is an internal error and keeps its traceback.
"""


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
