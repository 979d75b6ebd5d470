"""Counting the retries that absorb transient S3 errors, for every S3 request made through storage.

Three layers retry such a request, each in its own loop; each retry is counted once, by the
layer that makes it, so nothing is counted twice and nothing is parsed out of logs:

1. **botocore** (standard mode, ``storage.S3_RETRIES``) retries throttling, 5xx, connection errors
   and timeouts with backoff. Counted by :class:`CountingHTTPSession`, the HTTP session botocore
   sends through (AioConfig's public ``http_session_cls``): botocore numbers the attempts of one
   API call in ``request.context["retries"]["attempt"]``, so every send with an attempt above 1 is
   one retry, and its kind is what this session saw the previous attempt end with (a status code
   or an exception). A class in ``config_kwargs`` keeps ``storage_options()`` picklable and its
   ``str()`` stable, which s3fs's instance cache and DCP's fsspec writer rely on.
2. **aiohttp**, beneath botocore, re-sends an idempotent request once, at once, on a new
   connection when the connection was reset or closed before a response (RFC 9112 9.3.1.1);
   botocore never sees that. Counted with an aiohttp ``TraceConfig``: a second connection taken for
   one request, other than to follow a redirect, is that retry.
3. **s3fs**, above botocore: ``s3fs.core._error_wrapper`` re-runs a call when botocore gave up on a
   retryable error, and when reading a response *body* failed (truncated, reset mid-body). s3fs
   offers no hook that sees its retries (its custom error handler is only asked about errors it
   does not already retry), so that function is wrapped, transparently: every call of the wrapped
   function after the first is a retry, of the kind of the error before it. s3fs's other retry
   loop, in ``_get_file`` (``fs.get`` to a local file), is not counted; shipyard does not use it.

The wrapper in 3 is process-wide (any s3fs filesystem in the process); 1 and 2 apply to the
filesystems built from ``storage.storage_options()``. In shipyard processes that is the same set.
"""

from __future__ import annotations

import asyncio
import http.client
import logging
import threading
import time
from collections import Counter

import aiohttp
import botocore.exceptions as bce
import s3fs.core
from aiobotocore.httpsession import AIOHTTPSession

log = logging.getLogger(__name__)

KINDS = ("throttled", "server_error", "timeout", "connection", "body_read", "other")
"""``throttled``: 503/429 (S3's SlowDown); ``server_error``: other 5xx; ``timeout``: connect or
read timeouts; ``connection``: reset, refused or closed connections; ``body_read``: a response
body that ended early or broke while being read; ``other``: anything else a layer chose to retry."""

LOG_EVERY_S = 60.0  # at most one warning per this many seconds, summing the retries in between

_lock = threading.Lock()
_counts: Counter[str] = Counter()
_unlogged: Counter[str] = Counter()
_last_log = float("-inf")


def retry_counts() -> dict[str, int]:
    """Retries of S3 requests in this process so far, by kind (every kind in :data:`KINDS`)."""
    with _lock:
        return {kind: _counts[kind] for kind in KINDS}


def record(kind: str) -> None:
    """Count one retry; log a summary now and then (the first retry at once, then at most once
    every ``LOG_EVERY_S`` seconds), never one line per retry."""
    global _last_log, _unlogged
    now = time.monotonic()
    with _lock:
        _counts[kind] += 1
        _unlogged[kind] += 1
        if now - _last_log < LOG_EVERY_S:
            return
        _last_log, batch, total = now, _unlogged, sum(_counts.values())
        _unlogged = Counter()
    kinds = ", ".join(f"{k} {batch[k]}" for k in KINDS if batch[k])
    log.warning("S3: retried %d transient error%s (%s); %d since this process started. Retries "
                "absorb them; a steady stream of 'throttled' means the requests exceed what the bucket "
                "serves.", sum(batch.values()), "" if sum(batch.values()) == 1 else "s", kinds, total)


def classify_status(status: int) -> str:
    if status in (429, 503):
        return "throttled"
    if status >= 500:
        return "server_error"
    return "other"


def classify_exception(e: BaseException) -> str:
    if isinstance(e, bce.ClientError):
        meta = e.response.get("ResponseMetadata", {})
        code = e.response.get("Error", {}).get("Code", "")
        if code in ("SlowDown", "Throttling", "ThrottlingException", "RequestThrottled"):
            return "throttled"
        return classify_status(int(meta.get("HTTPStatusCode") or 0))
    if isinstance(e, (aiohttp.ClientPayloadError, http.client.IncompleteRead, bce.IncompleteReadError,
                      bce.ResponseStreamingError)):
        return "body_read"
    # fsspec's FSTimeoutError is an asyncio.TimeoutError.
    if isinstance(e, (bce.ConnectTimeoutError, bce.ReadTimeoutError, asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return "timeout"
    if isinstance(e, (bce.ConnectionError, bce.HTTPClientError, aiohttp.ClientConnectionError, ConnectionError)):
        return "connection"
    return "other"


# -- 1. botocore's retries, seen from the HTTP session it sends through ---------------------------
_PREVIOUS = "shipyard_previous_attempt"  # our key in botocore's per-call request context


class CountingHTTPSession(AIOHTTPSession):
    """aiobotocore's aiohttp session, counting botocore's retries (and, through :data:`_RECONNECTS`,
    aiohttp's own)."""

    async def _get_session(self, proxy_url):
        session = await super()._get_session(proxy_url)
        if _RECONNECTS not in session.trace_configs:
            session.trace_configs.append(_RECONNECTS)
        return session

    async def send(self, request):
        context = getattr(request, "context", None)
        if context is None:  # an older botocore: nothing to go by
            return await super().send(request)
        if context.get("retries", {}).get("attempt", 1) > 1:
            record(context.get(_PREVIOUS, "other"))
        try:
            response = await super().send(request)
        except Exception as e:
            context[_PREVIOUS] = classify_exception(e)
            raise
        context[_PREVIOUS] = classify_status(response.status_code)
        return response


# -- 2. aiohttp's reconnect-and-resend ------------------------------------------------------------
async def _on_connection(session, ctx, params) -> None:
    if getattr(ctx, "shipyard_sent", False):
        record("connection")
    ctx.shipyard_sent = True


async def _on_redirect(session, ctx, params) -> None:
    ctx.shipyard_sent = False


_RECONNECTS = aiohttp.TraceConfig()
_RECONNECTS.on_connection_create_start.append(_on_connection)
_RECONNECTS.on_connection_reuseconn.append(_on_connection)
_RECONNECTS.on_request_redirect.append(_on_redirect)
_RECONNECTS.freeze()


# -- 3. s3fs's retries around calls and body reads ------------------------------------------------
def _counting(error_wrapper):
    async def counting_error_wrapper(func, *, args=(), kwargs=None, retries):
        failed: BaseException | None = None  # the error that ended the previous call

        async def attempt(*a, **kw):
            nonlocal failed
            if failed is not None:
                record(classify_exception(failed))
                failed = None
            try:
                return await func(*a, **kw)
            except Exception as e:
                failed = e
                raise

        return await error_wrapper(attempt, args=args, kwargs=kwargs, retries=retries)

    counting_error_wrapper.__wrapped__ = error_wrapper
    counting_error_wrapper.shipyard_counting = True
    return counting_error_wrapper


def _install() -> None:
    original = getattr(s3fs.core, "_error_wrapper", None)
    if original is None:
        log.debug("s3fs.core._error_wrapper is gone; s3fs's own retries are not counted")
        return
    if not getattr(original, "shipyard_counting", False):
        s3fs.core._error_wrapper = _counting(original)


_install()
