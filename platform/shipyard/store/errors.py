"""Typed errors of the store. Each is a :class:`~shipyard.errors.UserError`: the API maps
``NotFound`` to 404, ``Conflict`` (and the state machine's ``IllegalTransition``) to 409, and the
rest to 400; the CLI prints the message and exits with status 2."""

from shipyard.errors import UserError
from shipyard.store.states import IllegalTransition, StaleTransition

__all__ = ["StoreError", "NotFound", "JobNotFound", "TenantNotFound", "Conflict", "TenantExists",
           "TenantInUse", "IllegalTransition", "StaleTransition"]


class StoreError(UserError):
    """A database URL that cannot be used (bad scheme, unreachable server, bad credentials)."""


class NotFound(UserError):
    pass


class JobNotFound(NotFound):
    def __init__(self, job_id: str):
        self.job_id = job_id
        super().__init__(f"no job {job_id!r}")


class TenantNotFound(NotFound):
    def __init__(self, name: str):
        self.name = name
        super().__init__(f"no tenant {name!r}; create it first (shipyard admin create-tenant {name})")


class Conflict(UserError):
    pass


class TenantExists(Conflict):
    def __init__(self, name: str):
        super().__init__(f"tenant {name!r} already exists")


class TenantInUse(Conflict):
    def __init__(self, name: str):
        super().__init__(f"tenant {name!r} still has jobs; it cannot be deleted")
