"""Where admitted jobs run. ``base`` holds the Backend protocol every backend implements; each
backend is one module (``kuberay``; ``ray`` on the Ray Jobs API), imported only when chosen, so
the server does not need the ``kubernetes`` client to run jobs on Ray."""

from shipyard.backends.base import (SPEC_ENV, Backend, BackendError, BackendStatus, Capacity, Handle, State,
                                    entrypoint_command, spec_json)

__all__ = ["SPEC_ENV", "Backend", "BackendError", "BackendStatus", "Capacity", "Handle", "State",
           "entrypoint_command", "spec_json"]
