"""The ray backend: one Ray job per run of a shipyard job, through the Ray Jobs API.

The server talks to the Ray head's dashboard over HTTP only (``JobSubmissionClient`` and the
dashboard's cluster-status endpoint); it never joins the cluster as a driver, so a Ray head that
restarts or dies costs the server failed polls, not its process.

Each submission is named ``shipyard-<job id>-<n>``: a requeued job (after a preemption, or a
run that vanished) is submitted again as ``n + 1``, since Ray never reuses a submission id. The
job id and tenant also travel as metadata (``shipyard.io/job-id``), which is what
:meth:`RayBackend.list_jobs` reads on restart.

The driver is ``shipyard run`` on the spec (:func:`~shipyard.backends.base.entrypoint_command`).
The job's code is the package its submitter uploaded (``spec.package``, kept by the server's
:class:`~shipyard.packages.PackageStore`): its zip is the Ray job's ``working_dir``, a local file
that the Jobs client uploads to the cluster's GCS (unpacked as is on every node), or an ``s3://``
URI when the store is object storage (then the Ray nodes need read access to it). A spec without
a package gets no ``working_dir`` at all: nothing of the server's own disk is ever shipped. The
spec's ``workdir`` is rewritten to ``.`` and the spec file is written into the driver's working
directory (``TMPDIR=$PWD`` for the driver only), so ``file.py:function`` entrypoints resolve in
the unpacked package.

Stopping: ``stop_job`` signals the driver (SIGINT, see ``submit``), which sends SIGTERM to the training workers
(they checkpoint, see :mod:`shipyard.runtime.report`) and exits once the checkpoint is committed.
Ray's supervisor SIGKILLs a driver that has not exited ``RAY_JOB_STOP_WAIT_TIME_S`` after the
SIGTERM (default 3 s); it reads that variable from the job's ``env_vars``, so each job gets its
checkpoint grace period plus a margin.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from shipyard.backends.base import (
    SPEC_ENV, BackendError, BackendStatus, Capacity, EnvFor, Handle, State, driver_env, entrypoint_command, no_env,
)
from shipyard.config import forwarded_env
from shipyard.runtime import ray_adapter
from shipyard.spec import JobSpec

JOB_ID_KEY = "shipyard.io/job-id"
TENANT_KEY = "shipyard.io/tenant"
PREFIX = "shipyard-"
TIMEOUT_S = 15

_STATES = {"PENDING": State.PENDING, "RUNNING": State.RUNNING, "SUCCEEDED": State.SUCCEEDED,
           "FAILED": State.FAILED, "STOPPED": State.STOPPED}


@dataclass(frozen=True)
class NodeFree:
    """One Ray node's resources (for the scheduler's per-node gang placement). Memory in bytes."""

    name: str
    cpus: float
    gpus: float
    memory: float
    free_cpus: float
    free_gpus: float
    free_memory: float


def dashboard_url(address: str) -> str:
    """``http(s)://host:port`` of a Ray head's dashboard, from that or from its GCS address
    (``host:port``, as ``ray start`` prints and RAY_ADDRESS holds)."""
    if "://" in address:
        if address.startswith("ray://"):
            raise BackendError(f"--ray-address {address}: Ray Client addresses are not supported; give the "
                               "head's GCS address (host:6379) or its dashboard URL (http://host:8265)")
        return address.rstrip("/")
    try:
        value = ray_adapter.dashboard_address(address, timeout_s=TIMEOUT_S)
    except Exception as e:  # noqa: BLE001 - any failure here means "no usable head at this address"
        raise BackendError(f"cannot reach the Ray head at {address}: {e}") from None
    if not value:
        raise BackendError(f"the Ray head at {address} runs no dashboard (start it with --include-dashboard)")
    return "http://" + value


class RayBackend:
    """:class:`~shipyard.backends.base.Backend` on a Ray head. Handles are submission ids.

    ``packages`` is where uploaded code packages are (None: jobs with a package are refused).
    The server's per-run variables (report URL and token, roots) come with each ``submit``.
    """

    name = "ray"

    def __init__(self, address: str, forward_env: bool = True, packages=None):
        from ray.job_submission import JobSubmissionClient

        self.address = address
        self.url = dashboard_url(address)
        self._forward_env = forward_env
        self._packages = packages
        try:
            self.client = JobSubmissionClient(self.url)
        except Exception as e:  # noqa: BLE001
            raise BackendError(f"cannot reach the Ray Jobs API at {self.url}: {e}") from None
        self._stopped: set[Handle] = set()
        # Appended to the driver's PATH: a head started from this virtualenv (the server's local
        # head, a test cluster) finds `shipyard` there; an image's own `shipyard` comes first.
        bin_dir = str(Path(sys.executable).parent)
        self._bin = "" if set(bin_dir) & set('"$`\\') else bin_dir

    # -- Backend -------------------------------------------------------------------------------

    def submit(self, job_id: str, spec: JobSpec, tenant: str, run: int = 1, env: EnvFor = no_env) -> Handle:
        existing = self._submissions(job_id)
        for details in existing:
            if not _STATES.get(str(details.status), State.FAILED).terminal:
                return details.submission_id  # submitted before the server died: re-attach
        # Numbered from the store's count too: a Ray head that restarted has forgotten earlier runs.
        submission = f"{PREFIX}{job_id}-{max(len(existing) + 1, run)}"
        runtime_env: dict = {"working_dir": self._working_dir(job_id, spec, tenant)} if spec.package else {}
        moved = spec.model_copy(update={"workdir": "."})
        # Both parts of the server's variables: a Ray cluster is one trust domain (check_trust).
        env_vars = {**(forwarded_env() if self._forward_env else {}), **env(submission).merged(),
                    SPEC_ENV: moved.model_dump_json(), **driver_env(job_id, submission, spec)}
        try:
            self.client.submit_job(
                entrypoint=self._driver_exports() + entrypoint_command(job_id),
                submission_id=submission,
                runtime_env={**runtime_env, "env_vars": env_vars},
                metadata={JOB_ID_KEY: job_id, TENANT_KEY: tenant, "name": spec.name},
            )
        except Exception as e:  # noqa: BLE001 - the Jobs client raises RuntimeError for HTTP errors
            raise BackendError(f"cannot submit job {job_id} to the Ray head at {self.url}: {e}") from None
        return submission

    def _working_dir(self, job_id: str, spec: JobSpec, tenant: str) -> str:
        """The stored package of ``spec`` (a zip path or s3:// URI), or BackendError."""
        if self._packages is None:
            raise BackendError(f"job {job_id} names package {spec.package}, but this backend has no package store")
        if not self._packages.exists(tenant, spec.package):
            raise BackendError(f"job {job_id}: package {spec.package} of tenant {tenant} is no longer in the "
                               f"package store ({self._packages.root})")
        return self._packages.path_or_uri(tenant, spec.package)

    def _driver_exports(self) -> str:
        """Variables for the driver process only (``env_vars`` would reach every worker too).

        RAY_ADDRESS: Ray's job supervisor sets it from the newest ``ray_current_cluster`` file in
        the Ray temp directory, which names whichever head started last on that machine; with two
        heads on one machine (two test sessions) the driver would join the wrong one. When the
        GCS address is known, the driver gets it explicitly.
        RAY_OVERRIDE_JOB_RUNTIME_ENV: the launcher's ``ray.init(runtime_env=...)`` repeats the
        job's working_dir and env_vars, which Ray otherwise rejects as a conflict.
        """
        exports = f'export TMPDIR="$PWD" PATH="$PATH:{self._bin}" RAY_OVERRIDE_JOB_RUNTIME_ENV=1'
        if "://" not in self.address and not set(self.address) & set('"$`\\ '):
            exports += f' RAY_ADDRESS="{self.address}"'
        return exports + "; "

    def status(self, handle: Handle) -> BackendStatus:
        try:
            info = self.client.get_job_info(handle)
        except RuntimeError as e:
            if "does not exist" in str(e) or "404" in str(e):
                if handle in self._stopped:
                    return BackendStatus(State.STOPPED, "Cancelled", "cancelled by shipyard")
                return BackendStatus(State.FAILED, "NotFound", f"Ray job {handle} no longer exists "
                                     "(the Ray head restarted or its job record was deleted)")
            raise BackendError(f"cannot read Ray job {handle}: {e}") from None
        except Exception as e:  # noqa: BLE001 - connection refused, timeouts
            raise BackendError(f"cannot read Ray job {handle}: {e}") from None
        state = _STATES.get(str(info.status), State.FAILED)
        reason = {State.FAILED: "DriverFailed", State.STOPPED: "Stopped"}.get(state, "")
        if state is State.FAILED and info.driver_exit_code is not None:
            reason = f"ExitCode{info.driver_exit_code}"
        return BackendStatus(state, reason, info.message or "")

    def cancel(self, handle: Handle) -> None:
        self._stopped.add(handle)
        try:
            self.client.stop_job(handle)
        except RuntimeError as e:
            if "does not exist" not in str(e):
                raise BackendError(f"cannot stop Ray job {handle}: {e}") from None

    def logs(self, handle: Handle, tail: int | None = 200) -> str:
        try:
            text = self.client.get_job_logs(handle)
        except RuntimeError as e:
            if "does not exist" in str(e):
                return ""
            raise BackendError(f"cannot read logs of Ray job {handle}: {e}") from None
        if tail is None:
            return text
        lines = text.splitlines(keepends=True)
        return "".join(lines[-tail:])

    async def follow_logs(self, handle: Handle) -> AsyncIterator[str]:
        """The driver's output as it is written, until the job ends. Asynchronous, on the
        server's event loop: when the client goes away the response task is cancelled, which
        closes the Jobs API websocket at once (no thread is left waiting for the next chunk)."""
        try:
            async for chunk in self.tail_logs(handle):
                yield chunk
        except BackendError as e:
            yield f"\n[shipyard: the log stream of {handle} ended: {e}]\n"

    async def tail_logs(self, handle: Handle) -> AsyncIterator[str]:
        """The run's whole log from its start, then as it is written, until the run ends
        (raises BackendError when the head does not know the run). What the server archives."""
        try:
            async for chunk in self.client.tail_job_logs(handle):
                yield chunk
        except RuntimeError as e:
            raise BackendError(f"cannot tail the log of Ray job {handle}: {e}") from None

    def capacity(self) -> Capacity:
        nodes = self.nodes()
        return Capacity(cpus=sum(n.cpus for n in nodes), gpus=sum(n.gpus for n in nodes),
                        memory=int(sum(n.memory for n in nodes)), free_cpus=sum(n.free_cpus for n in nodes),
                        free_gpus=sum(n.free_gpus for n in nodes), free_memory=int(sum(n.free_memory for n in nodes)))

    def nodes(self) -> list[NodeFree]:
        """Per alive node: total and free (total minus used) CPUs, GPUs and memory, as the
        dashboard's cluster status reports them (the autoscaler's view, refreshed every second)."""
        data = self._get("/api/cluster_status?format=0")
        by_node = (((data.get("data") or {}).get("clusterStatus") or {}).get("loadMetricsReport") or {}).get("usageByNode") or {}
        out = []
        for node_id, usage in sorted(by_node.items()):
            def pair(key: str) -> tuple[float, float]:
                used, total = usage.get(key, [0.0, 0.0])
                return float(total), max(0.0, float(total) - float(used))
            (cpus, fc), (gpus, fg), (mem, fm) = pair("CPU"), pair("GPU"), pair("memory")
            out.append(NodeFree(node_id[:12], cpus, gpus, mem, fc, fg, fm))
        return out

    def list_jobs(self) -> dict[str, Handle]:
        """Unfinished Ray jobs submitted by shipyard, ``{job id: submission id}`` (the newest
        submission when there are several)."""
        out: dict[str, tuple[float, Handle]] = {}
        for details in self._all():
            job_id = (details.metadata or {}).get(JOB_ID_KEY)
            if not job_id or _STATES.get(str(details.status), State.FAILED).terminal:
                continue
            started = float(details.start_time or 0)
            if job_id not in out or started > out[job_id][0]:
                out[job_id] = (started, details.submission_id)
        return {j: h for j, (_, h) in out.items()}

    # -- helpers -------------------------------------------------------------------------------

    def _all(self) -> list:
        try:
            return [d for d in self.client.list_jobs() if (d.submission_id or "").startswith(PREFIX)]
        except Exception as e:  # noqa: BLE001
            raise BackendError(f"cannot list Ray jobs at {self.url}: {e}") from None

    def _submissions(self, job_id: str) -> list:
        return [d for d in self._all() if (d.metadata or {}).get(JOB_ID_KEY) == job_id]

    def _get(self, path: str) -> dict:
        import httpx

        try:
            r = httpx.get(self.url + path, headers=ray_adapter.auth_headers(), timeout=TIMEOUT_S)
            r.raise_for_status()
            return json.loads(r.text)
        except (httpx.HTTPError, ValueError) as e:
            raise BackendError(f"cannot read {self.url}{path}: {e}") from None


def wait_for_head(address: str, timeout_s: float = 60) -> str:
    """The dashboard URL once the head at ``address`` answers (a head just started)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return dashboard_url(address)
        except BackendError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
