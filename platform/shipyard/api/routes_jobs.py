"""``/v1/jobs``: submit, list, read, cancel, logs, metrics.

A spec is validated here, once, by :func:`shipyard.spec.spec_from_dict` (the CLI's validation),
so its 422 names the field exactly as ``shipyard run`` does. ``201`` is answered only after the
job is committed to the store. Priorities above ``max_user_priority`` (default 100) need an admin
token: any tenant may order its own queue, but only an operator may claim the right to preempt
everybody (priority 1000 is the spec's maximum).
"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

import yaml
from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import PlainTextResponse, StreamingResponse

from shipyard.api.auth import Principal, principal
from shipyard.api.errors import ApiError
from shipyard.api.schemas import (AttemptOut, CheckpointOut, Created, EventOut, JobDetail, JobList, JobSummary,
                                  MetricPointOut, MetricsOut)
from shipyard.errors import SpecError, UserError
from shipyard.spec import JobSpec, spec_from_dict
from shipyard.store import JobState
from shipyard.store.states import TERMINAL, parse_state

router = APIRouter(tags=["jobs"])
Caller = Annotated[Principal, Depends(principal)]
YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")
SPEC_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/JobSpec"}},
    "application/yaml": {"schema": {"type": "string"}}}}}


def parse_body(raw: bytes, content_type: str) -> object:
    kind = content_type.split(";")[0].strip().lower()
    text = raw.decode("utf-8", errors="replace")
    if kind in YAML_TYPES:
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ApiError(400, f"body: not valid YAML{where}: {getattr(e, 'problem', e)}", "invalid_yaml") from None
    if kind in ("application/json", "") or kind.endswith("+json"):
        try:
            return json.loads(text)
        except ValueError as e:
            raise ApiError(400, f"body: not valid JSON: {e}", "invalid_json") from None
    raise ApiError(415, f"Content-Type {kind!r}: send the spec as application/json or application/yaml")


@router.post("/jobs", status_code=201, response_model=Created, openapi_extra=SPEC_BODY,
             responses={422: {"description": "invalid spec; the message names each field"}})
async def submit(request: Request, who: Caller) -> Created:
    """Queue a job. The body is a JobSpec, as JSON or YAML."""
    cfg = request.app.state.config
    raw = await request.body()
    if len(raw) > cfg.max_body_bytes:
        raise ApiError(413, f"request body larger than {cfg.max_body_bytes} bytes")
    spec = spec_from_dict(parse_body(raw, request.headers.get("content-type", "")), source="spec")
    if spec.priority > cfg.max_user_priority and not who.admin:
        raise ApiError(403, f"spec: priority: got {spec.priority}; priorities above {cfg.max_user_priority} "
                            "need an admin token", "forbidden_priority")
    # The store's writer thread commits concurrent submits together; this awaits that commit.
    job = await asyncio.wrap_future(request.app.state.store.submit_job(who.tenant, spec, priority=spec.priority))
    request.app.state.metrics.submissions.inc()
    if request.app.state.loop is not None:
        request.app.state.loop.wake()
    return Created(id=job.id, state=job.state.value)


@router.get("/jobs", response_model=JobList)
def list_jobs(request: Request, who: Caller,
              state: Annotated[list[str] | None, Query(description="filter by state (repeat or comma-separate)")] = None,
              name: str | None = None, tenant: Annotated[str | None, Query(description="admins only")] = None,
              limit: Annotated[int, Query(ge=1, le=1000)] = 50, cursor: str | None = None) -> JobList:
    """Newest first; pass ``next_cursor`` back as ``cursor`` for the next page."""
    states = [s for v in state for s in v.split(",") if s] if state else None
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
    attempts = [AttemptOut(number=a.number, started_at=a.started_at, ended_at=a.ended_at, kind=a.kind, cause=a.cause,
                           start_step=a.start_step, last_step=a.last_step, committed_step=a.committed_step,
                           steps_lost=a.steps_lost, recovery_s=a.recovery_s, run=a.submission)
                for a in store.attempts(job_id)]
    checkpoints, error = _checkpoints(job.spec)
    events = [EventOut(at=e.at, kind=e.kind, message=e.message) for e in store.events(job_id)[-50:]]
    summary = JobSummary.of(job, _reasons(request).get(job.id))
    return JobDetail(**summary.model_dump(), spec=job.spec, backend_handle=job.backend_handle, attempts=attempts,
                     metrics=store.latest_metrics(job_id), checkpoint=job.checkpoint, checkpoints=checkpoints,
                     checkpoints_error=error, events=events)


def _checkpoints(spec: dict) -> tuple[list[CheckpointOut], str | None]:
    uri = (spec.get("checkpoint") or {}).get("uri")
    if not uri:
        return [], None
    from shipyard.checkpoint import CheckpointStore

    try:
        listed = CheckpointStore(uri).list()
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
def logs(request: Request, who: Caller, job_id: str, follow: bool = False,
         tail: Annotated[int | None, Query(ge=1, le=100_000)] = 1000) -> Response:
    """The job's driver output (``shipyard run``'s); ``follow=true`` streams until the run ends."""
    job = _job(request, who, job_id)
    backend = request.app.state.backend
    if backend is None or not job.backend_handle:
        return PlainTextResponse("")
    if follow and hasattr(backend, "follow_logs"):
        return StreamingResponse(backend.follow_logs(job.backend_handle), media_type="text/plain")
    return PlainTextResponse(backend.logs(job.backend_handle, tail=tail))


@router.get("/jobs/{job_id}/metrics", response_model=MetricsOut)
def metrics(request: Request, who: Caller, job_id: str,
            name: Annotated[list[str] | None, Query(description="only these metrics")] = None,
            since_step: Annotated[int | None, Query(ge=0)] = None) -> MetricsOut:
    """Reported metrics in step order (at most ~1000 points per job: older ones are thinned)."""
    _job(request, who, job_id)
    names = [n for v in name for n in v.split(",") if n] if name else None
    points = request.app.state.store.metrics(job_id, names=names, since_step=since_step)
    return MetricsOut(job_id=job_id, points=[MetricPointOut(step=p.step, at=p.at, values=p.values) for p in points])


def _register_spec_schema(app) -> None:
    """Put JobSpec's JSON schema into the OpenAPI components (the body is read raw, for YAML)."""
    original = app.openapi

    def openapi():
        if app.openapi_schema:
            return app.openapi_schema
        schema = original()
        spec_schema = JobSpec.model_json_schema(ref_template="#/components/schemas/{model}")
        defs = spec_schema.pop("$defs", {})
        schema.setdefault("components", {}).setdefault("schemas", {}).update({**defs, "JobSpec": spec_schema})
        app.openapi_schema = schema
        return schema

    app.openapi = openapi


__all__ = ["router", "SpecError", "_register_spec_schema"]
