"""``POST /v1/jobs/{id}/report``: progress from the job's driver (see shipyard.runtime.report).

Authorised by the job's report token, not a user token. A report stores attempts, metric points,
events, step and checkpoint (:meth:`Store.record_report`) and moves the job between RUNNING and
RESTARTING as its attempts show; the loop still owns the terminal states, which it reads from
the backend, using the driver's typed ``outcome`` (stored with the run it belongs to: whether a
preempted run finished, and a failure's kind) and its error text (an event, for people). The body
is a :class:`~shipyard.run.records.DriverReport`; one of another schema version is refused (422).
A report from a run that is no longer the job's (a requeued job's previous run) is acknowledged
and dropped, so that driver stops retrying.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from shipyard.api.auth import check_report_token
from shipyard.api.errors import ApiError
from shipyard.api.schemas import ReportAck
from shipyard.run.decide import run_state
from shipyard.run.records import REPORT_SCHEMA, DriverReport, RunOutcome
from shipyard.store import JobState
from shipyard.store.states import IllegalTransition
from shipyard.untrusted import load_json

router = APIRouter(tags=["drivers"])
S = JobState

MAX_REPORT_VALUES = 1_000_000  # 100,000 metric points of a few values each, plus attempts and events
REPORT_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/DriverReport"}}}}}


@router.post("/jobs/{job_id}/report", response_model=ReportAck, openapi_extra=REPORT_BODY)
async def report(request: Request, job_id: str) -> ReportAck:
    """A driver's progress snapshot (the run's report token required; checked before the body is read)."""
    run = check_report_token(request, job_id)
    raw = await request.body()  # bounded by the middleware as it arrives
    doc = load_json(raw, "body", max_nodes=MAX_REPORT_VALUES)
    schema = doc.get("schema", 1) if isinstance(doc, dict) else None
    if schema != REPORT_SCHEMA:
        raise ApiError(422, f"body.schema: report schema {schema!r} is not supported; this server reads schema "
                            f"{REPORT_SCHEMA} (the driver runs another shipyard version than the server)")
    try:
        body = DriverReport.model_validate(doc)
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from None
    if body.submission is not None and body.submission != run:
        raise ApiError(403, f"this token reports for run {run}, not {body.submission}")
    return await run_in_threadpool(_record, request, job_id, body.model_copy(update={"submission": run}))


def _record(request: Request, job_id: str, body: DriverReport) -> ReportAck:
    store = request.app.state.store
    job = store.get_job(job_id)
    if body.submission is not None and job.backend_handle not in (None, body.submission) or (
            job.backend_handle is None and job.state in (S.QUEUED,)):
        return ReportAck(ok=False, state=job.state.value)
    request.app.state.metrics.reports.inc()
    submission = body.submission or job.backend_handle or "unknown"
    store.record_report(job_id, submission, body)
    o = body.outcome
    if o is not None and o.kind in (RunOutcome.FAILED, RunOutcome.USER_ERROR):
        store.add_event(job_id, "outcome", f"{o.kind.value}: {o.error or 'failed'}")
    target = run_state(body.attempts)
    state = job.state
    try:
        if state is S.ADMITTED and (body.attempts or body.step):
            state = store.transition(job_id, S.ADMITTED, S.RUNNING, message=f"running as {submission}").state
        if target is not None and target is not state and state in (S.RUNNING, S.RESTARTING) and o is None:
            state = store.transition(job_id, state, target).state
    except IllegalTransition:  # the loop or a cancel moved it first; it re-reads next tick
        state = store.get_job(job_id).state
    return ReportAck(ok=True, state=state.value)
