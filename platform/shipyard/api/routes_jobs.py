"""``/v1/jobs``: submit, list, read, cancel, logs, metrics.

A spec is validated here, once, by :func:`shipyard.spec.spec_from_dict` (the CLI's validation),
so its 422 names the field exactly as ``shipyard run`` does. ``201`` is answered only after the
job is committed to the store. Priorities above ``max_user_priority`` (default 100) need an admin
token: any tenant may order its own queue, but only an operator may claim the right to preempt
everybody (priority 1000 is the spec's maximum).
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse, StreamingResponse

from shipyard.api import intake, routes_packages
from shipyard.api.auth import Principal, principal
from shipyard.backends.base import BackendError
from shipyard.api.errors import ApiError
from shipyard.api.schemas import (AttemptOut, CheckpointOut, Created, EventOut, JobDetail, JobList, JobSummary,
                                  MetricPointOut, MetricsOut, RunOut)
from shipyard.errors import SpecError, UserError
from shipyard.loglines import acleaned, clean, last_lines, only_rank
from shipyard.spec import JobSpec
from shipyard.store import JobState
from shipyard.store.records import PREEMPTED_BY
from shipyard.store.states import TERMINAL, parse_state

router = APIRouter(tags=["jobs"])
Caller = Annotated[Principal, Depends(principal)]
SPEC_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/JobSpec"}},
    "application/yaml": {"schema": {"type": "string"}}}}}


IDEMPOTENCY_KEY = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
TENANT_CACHE_S = 5.0


@router.post("/jobs", status_code=201, response_model=Created, openapi_extra=SPEC_BODY,
             responses={403: {"description": "a storage URI outside the tenant's roots, or a priority above the cap"},
                        422: {"description": "invalid spec; the message names each field"}})
async def submit(request: Request, who: Caller,
                 idempotency_key: Annotated[str | None, Header(description="a retry with the same key returns "
                                                                           "the job the first request created")] = None
                 ) -> Created:
    """Queue a job. The body is a JobSpec, as JSON or YAML (see :mod:`shipyard.api.intake`)."""
    cfg = request.app.state.config
    if idempotency_key is not None and not IDEMPOTENCY_KEY.match(idempotency_key):
        raise ApiError(400, "Idempotency-Key: must be 1-128 letters, digits or . _ : -", "invalid_header")
    raw = await request.body()  # the caller is authenticated by now; the size is bounded as it arrives
    spec = intake.submitted_spec(raw, request.headers.get("content-type", ""), admin=who.admin,
                                 max_user_priority=cfg.max_user_priority)
    await routes_packages.require_package(request, who.tenant, spec)
    _require_placeable(request, spec)
    if cfg.storage is not None:
        intake.check_storage(spec, cfg.storage, await _tenant(request, who.tenant))
    if cfg.preflight:
        await run_in_threadpool(intake.preflight, spec, request.app.state.packages, who.tenant,
                                own_credentials=_has_own_credentials(request, who.tenant))
    # The store's writer thread commits concurrent submits together; this awaits that commit.
    job = await asyncio.wrap_future(request.app.state.store.submit_job(
        who.tenant, spec, priority=spec.priority, idempotency_key=idempotency_key))
    request.app.state.metrics.submissions.inc()
    if request.app.state.loop is not None:
        request.app.state.loop.wake()
    return Created(id=job.id, state=job.state.value)


def _require_placeable(request: Request, spec) -> None:
    """Refuse (422) a spec the backend could never place (kuberay: a local dataset path, an
    unknown pool, an image outside the allowlist), so it does not wait in the queue to fail."""
    check = getattr(request.app.state.backend, "check_spec", None)
    if check is None:
        return
    try:
        check(spec)
    except UserError as e:
        raise ApiError(422, str(e), "spec_unplaceable") from None


def _has_own_credentials(request: Request, tenant: str) -> bool:
    """Whether the tenant's jobs get S3 credentials of their own (its env file), not the server's."""
    from shipyard.api.serve import tenant_env

    data_dir = getattr(request.app.state, "data_dir", None)
    return data_dir is not None and any(k.startswith("AWS_") for k in tenant_env(data_dir, tenant))


async def _tenant(request: Request, name: str):
    """The tenant's record, re-read at most every TENANT_CACHE_S (a submit must not cost a read)."""
    cache = request.app.state.__dict__.setdefault("tenant_cache", {})
    hit = cache.get(name)
    if hit is not None and time.monotonic() - hit[0] < TENANT_CACHE_S:
        return hit[1]
    record = await run_in_threadpool(request.app.state.store.get_tenant, name)
    cache[name] = (time.monotonic(), record)
    return record


@router.get("/jobs", response_model=JobList)
def list_jobs(request: Request, who: Caller,
              state: Annotated[list[str] | None, Query(description="filter by state (repeat or comma-separate)")] = None,
              name: Annotated[str | None, Query(max_length=63)] = None,
              tenant: Annotated[str | None, Query(max_length=63, description="admins only")] = None,
              limit: Annotated[int, Query(ge=1, le=1000)] = 50,
              cursor: Annotated[str | None, Query(max_length=20)] = None) -> JobList:
    """Newest first; pass ``next_cursor`` back as ``cursor`` for the next page."""
    states = [s for v in state for s in v.split(",") if s] if state else None
    if states and len(states) > 16:
        raise UserError(f"state: got {len(states)} values; at most 16")
    try:
        states = [parse_state(s) for s in states] if states else None
    except UserError as e:
        raise UserError(f"state: {e}") from None
    scope = who.scope() if tenant is None or not who.admin else tenant
    page = request.app.state.store.list_jobs(tenant=scope, states=states, name=name, limit=limit, cursor=cursor)
    reasons = _reasons(request)
    return JobList(items=[JobSummary.of(j, reasons.get(j.id)) for j in page.items], next_cursor=page.next_cursor)


def _reasons(request: Request) -> dict[str, str]:
    loop = request.app.state.loop
    return loop.reasons if loop is not None else {}


def _job(request: Request, who: Principal, job_id: str):
    return request.app.state.store.get_job(job_id, tenant=who.scope())


@router.get("/jobs/{job_id}", response_model=JobDetail)
def get_job(request: Request, who: Caller, job_id: str) -> JobDetail:
    """Spec, state, attempts, latest metrics, checkpoints and recent events."""
    store = request.app.state.store
    job = _job(request, who, job_id)
    attempts, runs = _runs(store.attempts(job_id), job.backend_handle, store.run_outcome(job_id, job.backend_handle))
    checkpoints, error = _checkpoints(job.spec)
    every = store.events(job_id)
    preempted_by = next((e.message for e in reversed(every) if e.kind == PREEMPTED_BY), None)
    events = [EventOut(at=e.at, kind=e.kind, message=e.message) for e in every if e.kind != PREEMPTED_BY][-50:]
    summary = JobSummary.of(job, _reasons(request).get(job.id))
    return JobDetail(**summary.model_dump(), spec=job.spec, backend_handle=job.backend_handle, attempts=attempts, runs=runs,
                     metrics=store.latest_metrics(job_id), checkpoint=job.checkpoint, checkpoints=checkpoints,
                     checkpoints_error=error, events=events, preempted_by=preempted_by)


def _runs(attempts, current: str | None, outcome) -> tuple[list[AttemptOut], list[RunOut]]:
    """The job's attempts, each with the number of its run, and the runs in the order they started."""
    runs: dict[str, RunOut] = {}
    out = []
    for a in attempts:
        handle = a.submission or "unknown"
        run = runs.setdefault(handle, RunOut(number=len(runs) + 1, handle=handle, attempts=[], first_step=a.start_step))
        run.attempts.append(a.number)
        run.last_step, run.ended = a.last_step, a.kind
        out.append(AttemptOut.of(a, run.number))
    if current in runs:
        runs[current].outcome = outcome
    return out, list(runs.values())


def _checkpoints(spec: dict) -> tuple[list[CheckpointOut], str | None]:
    uri = (spec.get("checkpoint") or {}).get("uri")
    if not uri:
        return [], None
    from shipyard.checkpoint import CheckpointStore

    try:
        listed = CheckpointStore(uri, (spec.get("checkpoint") or {}).get("line")).list()
    except Exception as e:  # noqa: BLE001 - storage trouble must not hide the job
        return [], f"cannot list {uri}: {e}"
    out = []
    for c in listed[-20:]:
        r = c.record
        out.append(CheckpointOut(step=c.step, uri=c.uri, committed=c.committed, epoch=r.epoch if r else None,
                                 time=r.time if r else None, bytes=r.bytes if r else None))
    return out, None


@router.post("/jobs/{job_id}/cancel", response_model=JobSummary,
             responses={409: {"description": "the job has already finished"}})
def cancel(request: Request, who: Caller, job_id: str) -> JobSummary:
    """Cancel a queued or running job (a running one is stopped: its workers checkpoint first)."""
    store = request.app.state.store
    job = _job(request, who, job_id)
    from shipyard.scheduler.loop import settle_finished

    job = settle_finished(store, job, "the run had finished when the cancel arrived")  # then the 409 below
    if job.state in TERMINAL:
        store.transition(job_id, job.state, JobState.CANCELLED)  # raises the 409 with the allowed states
    job = store.transition(job_id, job.state, JobState.CANCELLED, cause="cancelled",
                           message="cancelled by the admin" if who.admin and who.tenant != job.tenant else "cancelled by the user")
    backend = request.app.state.backend
    if backend is not None and job.backend_handle:
        try:
            backend.cancel(job.backend_handle)
        except Exception as e:  # noqa: BLE001 - the loop's reconcile stops it later
            store.add_event(job_id, "backend", f"cancel of {job.backend_handle} failed, will retry: {e}")
    return JobSummary.of(job)


@router.get("/jobs/{job_id}/logs", response_class=PlainTextResponse,
            responses={200: {"content": {"text/plain": {}}, "description": "the driver's output"}})
async def logs(request: Request, who: Caller, job_id: str, follow: bool = False,
               tail: Annotated[int | None, Query(ge=1, le=100_000)] = 1000,
               rank: Annotated[int | None, Query(ge=0, le=1_000_000, description="only this rank's lines "
                                                                                 "(prefixed [rank N])")] = None) -> Response:
    """The job's driver output (``shipyard run``'s); ``follow=true`` streams until the run ends.
    Answered from the server's archive of the job's runs once it holds any (it outlives the Ray
    head), else from the backend; 410 when the job ran but its logs are gone from both.
    A followed stream is an asynchronous iterator on the event loop: when the client goes away
    it is cancelled there and then, holding no thread. Either way plain text: escape codes and
    Ray's job plumbing removed (:mod:`shipyard.loglines`); ``rank``: that rank's lines only."""
    job = await run_in_threadpool(_job, request, who, job_id)
    backend, archive = request.app.state.backend, request.app.state.logs
    live = backend is not None and job.backend_handle and job.state not in TERMINAL
    if follow and live and hasattr(backend, "follow_logs"):
        return StreamingResponse(acleaned(backend.follow_logs(job.backend_handle), rank), media_type="text/plain")
    archived = await run_in_threadpool(archive.read, job_id, tail, rank) if archive is not None else None
    if archived is not None:
        return PlainTextResponse(archived)
    text = ""
    if backend is not None and job.backend_handle:
        try:
            text = await run_in_threadpool(backend.logs, job.backend_handle, tail=tail if rank is None else None)
        except BackendError:
            text = ""
        text = clean(text) if rank is None else last_lines(only_rank(clean(text), rank), tail)
    if not text and archive is not None and job.state in TERMINAL and job.started_at is not None:
        raise ApiError(410, f"the logs of job {job_id} are gone: its run {job.backend_handle} is no longer on "
                            "the backend and this server has no copy of them", "logs_gone")
    return PlainTextResponse(text)


@router.get("/jobs/{job_id}/metrics", response_model=MetricsOut)
def metrics(request: Request, who: Caller, job_id: str,
            name: Annotated[list[str] | None, Query(description="only these metrics", max_length=64)] = None,
            since_step: Annotated[int | None, Query(ge=0, le=2**62)] = None) -> MetricsOut:
    """Reported metrics in step order (at most ~1000 points per job: older ones are thinned)."""
    _job(request, who, job_id)
    names = [n for v in name for n in v.split(",") if n] if name else None
    if names and (len(names) > 64 or max(map(len, names)) > 200):
        raise UserError("name: at most 64 metric names of at most 200 characters")
    points = request.app.state.store.metrics(job_id, names=names, since_step=since_step)
    return MetricsOut(job_id=job_id, points=[MetricPointOut(step=p.step, at=p.at, values=p.values) for p in points])


def _register_spec_schema(app) -> None:
    """Put the JobSpec's and the DriverReport's JSON schemas into the OpenAPI components (both
    bodies are read raw: the spec may be YAML, and a report is read only after its token is checked)."""
    original = app.openapi

    def openapi():
        if app.openapi_schema:
            return app.openapi_schema
        schema = original()
        from shipyard.run.records import DriverReport

        for name, model in (("JobSpec", JobSpec), ("DriverReport", DriverReport)):
            body_schema = model.model_json_schema(ref_template="#/components/schemas/{model}", by_alias=True)
            defs = body_schema.pop("$defs", {})
            schema.setdefault("components", {}).setdefault("schemas", {}).update({**defs, name: body_schema})
        app.openapi_schema = schema
        return schema

    app.openapi = openapi


__all__ = ["router", "SpecError", "_register_spec_schema"]
