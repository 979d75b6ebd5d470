"""The Python SDK: ``shipyard.Client`` over the REST API (httpx).

::

    from shipyard import Client
    c = Client()                                   # SHIPYARD_URL / SHIPYARD_TOKEN, or ~/.shipyard/config.yaml
    job_id = c.submit("jobs/digits/job.yaml")
    c.wait(job_id)["state"]                        # 'SUCCEEDED'

Errors are typed (:class:`NotFound`, :class:`Conflict`, :class:`InvalidSpec`, :class:`Unauthorized`,
:class:`Forbidden`, :class:`ServerError`, :class:`Unreachable`); each is a
:class:`~shipyard.errors.UserError`, so the CLI prints its message and exits 2 without a traceback.
The message is the server's, which names the field for an invalid spec.

``submit`` ships the job's code: the spec's ``workdir`` is packed on this machine
(:mod:`shipyard.package`), uploaded unless the server already has that package for this tenant,
and the spec is sent with ``workdir: "."`` and ``package: sha256:...``; the server never reads
the submitter's directory, which may be deleted as soon as ``submit`` returns. Every submit
carries an ``Idempotency-Key`` (one uuid4 per call) and is retried with the same key after a
transport error, so a retried submit never queues a second job.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml

from shipyard.errors import UserError

TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")
DEFAULT_URL = "http://127.0.0.1:8321"


class ApiError(UserError):
    status = 0

    def __init__(self, message: str, status: int = 0, code: str = ""):
        self.status, self.code = status or self.status, code
        super().__init__(message)


class Unauthorized(ApiError):
    status = 401


class Forbidden(ApiError):
    status = 403


class NotFound(ApiError):
    status = 404


class Conflict(ApiError):
    status = 409


class InvalidSpec(ApiError):
    status = 422


class ServerError(ApiError):
    status = 500


class Unreachable(ApiError):
    pass


_BY_STATUS = {400: InvalidSpec, 401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict, 413: InvalidSpec,
              415: InvalidSpec, 422: InvalidSpec}


def config_file(env: dict[str, str] | None = None) -> Path:
    """The client's config file: ``$SHIPYARD_HOME/config.yaml``, i.e. ``~/.shipyard/config.yaml``
    by default (the CLI's ``--help`` names it)."""
    env = os.environ if env is None else env
    return Path(env.get("SHIPYARD_HOME", "~/.shipyard")).expanduser() / "config.yaml"


def client_config(env: dict[str, str] | None = None) -> tuple[str, str | None]:
    """Server URL and token: SHIPYARD_URL (or SHIPYARD_SERVER) and SHIPYARD_TOKEN, else
    ``$SHIPYARD_HOME/config.yaml`` (``url:``, ``token:``), else the local default URL."""
    env = dict(os.environ if env is None else env)
    file: dict = {}
    path = config_file(env)
    if path.exists():
        try:
            file = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{path}: not valid YAML: {e}") from None
    url = env.get("SHIPYARD_URL") or env.get("SHIPYARD_SERVER") or file.get("url") or DEFAULT_URL
    return url.rstrip("/"), env.get("SHIPYARD_TOKEN") or file.get("token")


SUBMIT_RETRIES = 3         # a POST /v1/jobs is retried this often (same Idempotency-Key) on transport errors
RETRY_BACKOFF_S = (0.5, 1.0, 2.0)
UPLOAD_CHUNK = 1 << 20

Progress = Callable[[int, int], None]  # (bytes sent so far, total bytes) during an upload


class Client:
    """A shipyard server's REST API (``/v1``) as Python calls; use it as a context manager, or
    :meth:`close` it. Jobs come back as the API's JSON, as dicts (the shapes of
    :mod:`shipyard.api.schemas`: ``JobSummary``, ``JobDetail``, ``JobList``)."""

    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 30.0,
                 max_package_mb: float | None = None):
        """``url`` and ``token`` default to :func:`client_config` (SHIPYARD_URL, SHIPYARD_TOKEN,
        else ``~/.shipyard/config.yaml``); ``timeout``: seconds per request; ``max_package_mb``:
        the cap on a job directory's code package (default: ``SHIPYARD_MAX_PACKAGE_MB``, else 100 MiB)."""
        env_url, env_token = client_config()
        self.url = (url or env_url).rstrip("/")
        self.token = token or env_token
        self.max_package_mb = max_package_mb
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        """Close the connection pool (``with Client() as c:`` does it on exit)."""
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- transport -------------------------------------------------------------------------------

    def _request(self, method: str, path: str, *, retries: int = 0, ok: tuple[int, ...] = (), **kw) -> httpx.Response:
        """One call; ``retries`` more after a transport error (only for requests that are safe to
        repeat: idempotent by method, content address or Idempotency-Key). ``ok``: error statuses
        returned instead of raised."""
        for attempt in range(retries + 1):
            try:
                r = self._http.request(method, path, **kw)
                break
            except httpx.TransportError as e:
                if attempt < retries:
                    time.sleep(RETRY_BACKOFF_S[min(attempt, len(RETRY_BACKOFF_S) - 1)])
                    continue
                raise Unreachable(f"cannot reach the shipyard server at {self.url}: {e} "
                                  "(set SHIPYARD_URL, or start one with `shipyard server`)") from None
        if r.status_code >= 400 and r.status_code not in ok:
            raise _error(r)
        return r

    # -- jobs ----------------------------------------------------------------------------------

    def submit(self, spec: Any, overrides: list[str] | None = None,
               on_upload: Callable[[Any], Progress | None] | None = None) -> str:
        """Queue a job; ``spec``: a path to a YAML file (validated and resolved here first, as
        ``shipyard run`` does), a JobSpec, or a dict (sent as is). The workdir of a path or a
        JobSpec is packed and uploaded first (see the module docstring); a JobSpec that already
        names a ``package`` is sent as is. ``on_upload(package)`` is called before an upload and
        may return a ``progress(sent, total)`` callback. Returns the job id."""
        if isinstance(spec, (str, Path)):
            from shipyard.spec import load_spec

            spec = load_spec(spec, overrides)
        if hasattr(spec, "model_dump"):
            if spec.package is None and Path(spec.workdir).is_dir():
                spec = spec.model_copy(update={"workdir": ".", "package": self.upload(spec.workdir, on_upload)})
            body = spec.model_dump(mode="json")
        else:
            body = spec
        key = {"Idempotency-Key": str(uuid.uuid4())}
        return self._request("POST", "/v1/jobs", json=body, headers=key, retries=SUBMIT_RETRIES).json()["id"]

    def has_package(self, digest: str) -> bool:
        """Whether this tenant has uploaded the package (``HEAD /v1/packages/{digest}``)."""
        try:
            r = self._request("HEAD", f"/v1/packages/{digest}", ok=(404,), retries=SUBMIT_RETRIES)
        except ApiError as e:  # a HEAD answer has no body to carry the server's message
            raise type(e)(f"HEAD /v1/packages/{digest}: {e.status} {e} ("
                          + ("check SHIPYARD_TOKEN or --token)" if e.status in (401, 403) else "see the server's log)"),
                          e.status, e.code) from None
        return r.status_code == 200

    def upload(self, directory: str | Path, on_upload: Callable[[Any], Progress | None] | None = None) -> str:
        """Pack ``directory`` and upload it unless this tenant's server already has it; returns
        the package's digest. The local zip is deleted before this returns."""
        import shutil
        import tempfile

        from shipyard.package import max_package_bytes, pack

        tmp = tempfile.mkdtemp(prefix="shipyard-package-")
        try:
            package = pack(directory, tmp, max_package_bytes(self.max_package_mb))
            if not self.has_package(package.digest):
                progress = on_upload(package) if on_upload is not None else None
                self._put_package(package, progress)
            return package.digest
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _put_package(self, package, progress: Progress | None) -> None:
        total = package.bytes

        def chunks() -> Iterator[bytes]:
            sent = 0
            with open(package.path, "rb") as f:
                while chunk := f.read(UPLOAD_CHUNK):
                    sent += len(chunk)
                    yield chunk
                    if progress is not None:
                        progress(sent, total)

        # Content-Length is set, so the body streams from the file without Transfer-Encoding: chunked.
        # A new generator per try: a PUT of a content-addressed package is safe to repeat.
        headers = {"Content-Type": "application/zip", "Content-Length": str(total)}
        for attempt in range(SUBMIT_RETRIES + 1):
            try:
                self._request("PUT", f"/v1/packages/{package.digest}", content=chunks(), headers=headers,
                              timeout=httpx.Timeout(self._http.timeout.connect, write=300.0, read=300.0))
                return
            except Unreachable:
                if attempt == SUBMIT_RETRIES:
                    raise
                time.sleep(RETRY_BACKOFF_S[min(attempt, len(RETRY_BACKOFF_S) - 1)])

    def get(self, job_id: str) -> dict:
        """One job in full (``GET /v1/jobs/{id}``, a ``JobDetail``): state, step, progress, attempts,
        runs, latest metrics, checkpoints, the latest events and ``preempted_by``. ``NotFound`` for
        an unknown id (or another tenant's job)."""
        return self._request("GET", f"/v1/jobs/{job_id}").json()

    def list(self, state: str | list[str] | None = None, name: str | None = None, limit: int = 50,
             cursor: str | None = None) -> dict:
        """One page of jobs, newest first (``GET /v1/jobs``, a ``JobList``): ``{"items": [...],
        "next_cursor": ...}``; ``state``: one state, a comma-separated list or a list; pass
        ``next_cursor`` back as ``cursor`` for the next page (or use :meth:`iter_jobs`)."""
        params: dict[str, Any] = {"limit": limit}
        if state:
            params["state"] = state if isinstance(state, str) else ",".join(state)
        if name:
            params["name"] = name
        if cursor:
            params["cursor"] = cursor
        return self._request("GET", "/v1/jobs", params=params).json()

    def iter_jobs(self, **kw) -> Iterator[dict]:
        """Every job matching ``kw`` (:meth:`list`'s ``state``, ``name``, ``limit`` per page), newest
        first, following ``next_cursor`` page after page."""
        cursor = None
        while True:
            page = self.list(cursor=cursor, **kw)
            yield from page["items"]
            cursor = page.get("next_cursor")
            if not cursor:
                return

    def cancel(self, job_id: str) -> dict:
        """Cancel a queued or running job (a running one checkpoints, then stops); returns its
        summary, now CANCELLED. ``Conflict`` (409) if it has already ended."""
        return self._request("POST", f"/v1/jobs/{job_id}/cancel").json()

    def logs(self, job_id: str, tail: int | None = 1000, rank: int | None = None) -> str:
        """The job's driver output so far: its last ``tail`` lines (None or 0: all the server
        has), of rank ``rank``'s lines only when given (the ``[rank N]`` prefix)."""
        params: dict = {"tail": tail} if tail else {}
        if rank is not None:
            params["rank"] = rank
        return self._request("GET", f"/v1/jobs/{job_id}/logs", params=params).text

    def follow_logs(self, job_id: str, rank: int | None = None) -> Iterator[str]:
        """The job's output as it is written, in chunks of text, until its run ends (rank
        ``rank``'s lines only, when given)."""
        params: dict = {"follow": "true"} if rank is None else {"follow": "true", "rank": rank}
        try:
            with self._http.stream("GET", f"/v1/jobs/{job_id}/logs", params=params, timeout=None) as r:
                if r.status_code >= 400:
                    r.read()
                    raise _error(r)
                yield from r.iter_text()
        except httpx.TransportError as e:
            raise Unreachable(f"lost the log stream from {self.url}: {e}") from None

    def metrics(self, job_id: str, names: list[str] | None = None) -> list[dict]:
        """Reported metric points in step order, ``[{"step", "at", "values": {name: value}}]``
        (only ``names`` if given; older points are averaged, at most ~1,000 per job)."""
        params = {"name": ",".join(names)} if names else {}
        return self._request("GET", f"/v1/jobs/{job_id}/metrics", params=params).json()["points"]

    def wait(self, job_id: str, timeout: float | None = None, poll_s: float = 2.0) -> dict:
        """Poll until the job is SUCCEEDED, FAILED or CANCELLED; returns it. ``TimeoutError`` after ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if job["state"] in TERMINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['state']} after {timeout}s")
            time.sleep(poll_s)


def _error(r: httpx.Response) -> ApiError:
    try:
        err = r.json()["error"]
        message, code = err["message"], err.get("code", "")
    except (ValueError, KeyError, TypeError):
        message, code = r.text.strip()[:500] or r.reason_phrase, ""
    cls = _BY_STATUS.get(r.status_code, ServerError if r.status_code >= 500 else ApiError)
    return cls(message, r.status_code, code)


__all__ = ["Client", "ApiError", "Unauthorized", "Forbidden", "NotFound", "Conflict", "InvalidSpec", "ServerError",
           "Unreachable", "client_config", "config_file"]
