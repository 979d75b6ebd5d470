"""``POST /v1/jobs/{id}/report``: progress from the job's driver (see shipyard.runtime.report).

Authorised by the job's report token, not a user token. A report stores attempts, metric points,
events, step and checkpoint (:meth:`Store.record_report`) and moves the job between RUNNING and
RESTARTING as its attempts show; the loop still owns the terminal states, which it reads from
the backend, using the driver's typed ``outcome`` (stored with the run it belongs to: whether a
preempted run finished, and a failure's kind) and its error text (an event, for people).
A report from a run that is no longer the job's (a requeued job's previous run) is acknowledged
and dropped, so that driver stops retrying.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field, ValidationError

from shipyard.api.auth import check_report_token
from shipyard.api.errors import ApiError
from shipyard.untrusted import load_json
from shipyard.api.schemas import ReportAck
from shipyard.runtime.report import RunOutcome
from shipyard.scheduler.loop import run_state
from shipyard.store import JobState
from shipyard.store.states import IllegalTransition

router = APIRouter(tags=["drivers"])
S = JobState


class Outcome(BaseModel):
    kind: RunOutcome | None = None  # sent by every driver since the outcome became typed
    ok: bool
    error: str | None = None
    user_error: bool = False
    preempted: bool = False
    step: int | None = Field(None, ge=0)
    total: int | None = Field(None, ge=0)

    def resolved(self) -> RunOutcome | None:
        """The run's outcome; for a driver that predates ``kind``, what its flags say for sure
        (its ``ok`` does not say whether a stopped run trained to the end: None, undecided)."""
        if self.kind is not None:
            return self.kind
        if self.preempted:
            return RunOutcome.STOPPED
        if not self.ok:
            return RunOutcome.USER_ERROR if self.user_error else RunOutcome.FAILED
        return None


class Report(BaseModel):
    submission: str | None = None
    step: int | None = Field(None, ge=0)
    total: int | None = Field(None, ge=0)
    checkpoint: str | None = Field(None, max_length=2000)
    attempts: list[dict[str, Any]] = Field(default_factory=list, max_length=10_000)
    events: list[tuple[float, str]] = Field(default_factory=list, max_length=10_000)
    metrics: list[tuple[int, float, dict[str, float | None]]] = Field(default_factory=list, max_length=100_000)
    outcome: Outcome | None = None


MAX_REPORT_VALUES = 1_000_000  # 100,000 metric points of a few values each, plus attempts and events
REPORT_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/Report"}}}}}


@router.post("/jobs/{job_id}/report", response_model=ReportAck, openapi_extra=REPORT_BODY)
async def report(request: Request, job_id: str) -> ReportAck:
    """A driver's progress snapshot (the run's report token required; checked before the body is read)."""
    run = check_report_token(request, job_id)
    raw = await request.body()  # bounded by the middleware as it arrives
    try:
        body = Report.model_validate(load_json(raw, "body", max_nodes=MAX_REPORT_VALUES))
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from None
    if body.submission is not None and body.submission != run:
        raise ApiError(403, f"this token reports for run {run}, not {body.submission}")
    return await run_in_threadpool(_record, request, job_id, body.model_copy(update={"submission": run}))


def _record(request: Request, job_id: str, body: Report) -> ReportAck:
    store = request.app.state.store
    job = store.get_job(job_id)
    if body.submission is not None and job.backend_handle not in (None, body.submission) or (
            job.backend_handle is None and job.state in (S.QUEUED,)):
        return ReportAck(ok=False, state=job.state.value)
    request.app.state.metrics.reports.inc()
    submission = body.submission or job.backend_handle or "unknown"
    o = body.outcome
    kind = o.resolved() if o is not None else None
    store.record_report(job_id, submission, step=body.step, total=body.total, checkpoint=body.checkpoint,
                        attempts=body.attempts, events=body.events, metrics=body.metrics, outcome=kind)
    if kind in (RunOutcome.FAILED, RunOutcome.USER_ERROR):
        store.add_event(job_id, "outcome", f"{kind.value}: {o.error or 'failed'}")
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
