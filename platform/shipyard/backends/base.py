"""The Backend protocol: what the scheduler's reconcile loop asks of wherever jobs run.

A backend turns one admitted job into one running thing (a Ray job on a Ray head, a RayJob on
Kubernetes) and answers questions about it. Every method is synchronous and safe to call again:
the loop polls ``status`` and calls ``cancel`` twice without harm.

How a job reaches the machine that runs it
------------------------------------------
Every backend starts the *same* launcher as ``shipyard run`` (:func:`entrypoint_command`). The
validated spec travels as JSON in one environment variable, :data:`SPEC_ENV`; the command writes
it to a file and runs ``shipyard run <file>``. JSON is YAML, so ``load_spec`` reads it unchanged,
and the spec was resolved (absolute paths, URIs) by the server, so nothing is re-resolved against
the pod's directory. One variable and no extra Kubernetes object (a ConfigMap would need its own
lifecycle and RBAC) keeps both backends alike: the ``kuberay`` backend sets it on the head pod's
container (the Ray job driver inherits the raylet's environment), the ``ray`` backend passes it in
the job's ``runtime_env["env_vars"]``. A spec is a few KiB; Kubernetes objects may be 1.5 MiB.
The command runs as a Ray job's driver, for which Ray's job supervisor always sets RAY_ADDRESS
(ray/dashboard/modules/job/job_supervisor.py), so the launcher joins that cluster and never
starts a private one.

What the server adds to a run's environment
-------------------------------------------
The server computes it once, for every backend (:class:`JobEnv`, built by
``api.serve.make_job_env``): the report URL and the run's report token, the tenant's storage roots
and the tenant's own variables. The token is bound to the run's submission (the handle the
server stores and ``routes_report`` compares with), which only the backend knows when it submits,
so ``submit`` is handed a function of the submission (:data:`EnvFor`) and calls it once. The
``kuberay`` backend puts ``plain`` as container env values and ``secret`` (the token, the
tenant's variables: its S3 credentials, say) in a Kubernetes Secret owned by the RayJob, never in
the RayJob itself; the ``ray`` backend passes both parts in the job's ``env_vars`` (a Ray cluster
is one trust domain: see ``api.serve.check_trust``).
"""

from __future__ import annotations

import enum
import re
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from shipyard.spec import JobSpec

SPEC_ENV = "SHIPYARD_JOB_SPEC"
"""Environment variable holding the job's spec as JSON, read by :func:`entrypoint_command`."""

Handle = str
"""A backend's name for one submitted job: opaque, short, and stored as is by the server (for
the kuberay backend ``namespace/rayjob-name``)."""


class State(str, enum.Enum):
    PENDING = "PENDING"      # accepted; resources or the driver are not up yet
    RUNNING = "RUNNING"      # the launcher is running
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    STOPPED = "STOPPED"      # cancelled (by shipyard or an operator)

    @property
    def terminal(self) -> bool:
        return self in (State.SUCCEEDED, State.FAILED, State.STOPPED)


@dataclass(frozen=True)
class BackendStatus:
    state: State
    reason: str = ""    # one CamelCase word a program may branch on: ImagePullBackOff, Unschedulable, NotFound
    message: str = ""   # one human sentence saying what happened and, where known, what to fix


@dataclass(frozen=True)
class Capacity:
    """What the backend can place jobs on, in total and free now. Memory in bytes."""

    cpus: float
    gpus: float
    memory: int
    free_cpus: float
    free_gpus: float
    free_memory: int


@dataclass(frozen=True)
class JobEnv:
    """The variables the server gives one run's driver: ``plain`` may be shown (the report URL,
    the storage roots), ``secret`` may not (the report token, the tenant's own variables). The
    two never share a name."""

    plain: Mapping[str, str] = field(default_factory=dict)
    secret: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        both = sorted(set(self.plain) & set(self.secret))
        if both:
            raise ValueError(f"JobEnv: {', '.join(both)} is both plain and secret")

    def merged(self) -> dict[str, str]:
        return {**self.plain, **self.secret}


EnvFor = Callable[[str], JobEnv]
"""What ``submit`` is given: the run's :class:`JobEnv` for its submission (the handle it returns)."""


def no_env(submission: str) -> JobEnv:
    """No server: a backend used on its own (tests, tools) reports nowhere."""
    return JobEnv()


class BackendError(RuntimeError):
    """The backend's service refused or failed (not the user's spec): keeps its traceback."""


@runtime_checkable
class Backend(Protocol):
    name: str

    def submit(self, job_id: str, spec: JobSpec, tenant: str, run: int = 1, env: EnvFor = no_env) -> Handle:
        """Start the job. Idempotent per ``job_id``: submitting a job that already exists (the
        server died after submit, before storing the handle) returns the existing handle.
        ``run`` is the number of this run as the store counts them (1 + runs so far): a backend
        that names runs uses at least that number, whatever it still remembers itself.
        ``env(handle)`` is the server's part of the driver's environment for the run it starts."""

    def status(self, handle: Handle) -> BackendStatus:
        """The job's state now. A job the backend no longer knows is FAILED with reason NotFound,
        unless this backend instance cancelled it (STOPPED)."""

    def cancel(self, handle: Handle) -> None:
        """Stop the job and release what it holds; a no-op for a job already gone."""

    def logs(self, handle: Handle, tail: int | None = 200) -> str:
        """The launcher's output (last ``tail`` lines; None: all). Empty before it starts."""

    def capacity(self) -> Capacity:
        """Total and free resources, for the scheduler's gang fit."""

    def list_jobs(self) -> dict[str, Handle]:
        """Every job this backend runs for shipyard, ``{job_id: handle}``: on restart the server
        re-attaches to these instead of submitting again."""


STOP_MARGIN_S = 30
"""Ray's job supervisor SIGKILLs a driver still there this long after ``preemption_grace_s``."""
DRIVER_ENV_NAMES = ("SHIPYARD_JOB_ID", "SHIPYARD_SUBMISSION", "RAY_JOB_STOP_WAIT_TIME_S", "RAY_JOB_STOP_SIGNAL")
"""What :func:`driver_env` sets."""
DRIVER_PIDFILE_ENV = "SHIPYARD_DRIVER_PIDFILE"
"""Where a submitted run's driver writes its pid, when set (the kuberay head's preStop hook reads it)."""


def driver_env(job_id: str, submission: Handle, spec: JobSpec) -> dict[str, str]:
    """What every backend sets for a run's driver besides the server's :class:`JobEnv`: who it is,
    and how Ray's job supervisor stops it (``ray job stop``, KubeRay deleting a RayJob).

    SIGINT, not Ray's default SIGTERM: a Ray driver's core worker installs a C++ SIGTERM handler
    that exits at once, over any Python handler; SIGINT reaches ours (the supervisor unblocks it
    in the driver only when this variable says SIGINT, so it must be in the supervisor's own
    environment: the job's ``env_vars`` for the ray backend, the head container's for kuberay).
    The supervisor SIGKILLs a driver that has not exited ``RAY_JOB_STOP_WAIT_TIME_S`` after the
    signal (default 3 s), so each job gets its checkpoint grace period plus a margin."""
    grace = spec.checkpoint.preemption_grace_s if spec.checkpoint else 0
    values = (job_id, submission, str(int(grace + STOP_MARGIN_S)), "SIGINT")
    return dict(zip(DRIVER_ENV_NAMES, values, strict=True))


def spec_json(spec: JobSpec) -> str:
    """The value of :data:`SPEC_ENV` for ``spec``."""
    return spec.model_dump_json(exclude_none=False)


def entrypoint_command(job_id: str, overrides: list[str] | tuple[str, ...] = ()) -> str:
    """The shell command that runs a submitted job: ``shipyard run`` on the spec in :data:`SPEC_ENV`.

    POSIX sh (Ray runs job entrypoints through the shell). ``overrides`` are ``--set FIELD=VALUE``
    pairs applied on top, as on the command line.
    """
    path = f"${{TMPDIR:-/tmp}}/shipyard-job-{re.sub(r'[^A-Za-z0-9_.-]', '_', job_id)}.json"
    sets = "".join(f" --set {shlex.quote(o)}" for o in overrides)
    return f'printf \'%s\' "${SPEC_ENV}" > "{path}" && exec shipyard run "{path}"{sets}'
