"""Retry counting without a server: s3fs's own retry loop (the real one) and the log summary.

The botocore and aiohttp layers need real HTTP; tests/integration/test_s3_faults.py covers them.
"""

import asyncio
import logging
from collections import Counter

import aiohttp
import pytest
import s3fs.core
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

from shipyard import s3_retries, storage


def delta(before: dict) -> dict:
    return {k: v - before[k] for k, v in storage.retry_counts().items() if v != before[k]}


def flaky(*errors):
    """An async call that raises ``errors`` in turn, then returns "ok"; ``calls`` counts calls."""
    pending = list(errors)

    async def call():
        call.calls += 1
        if pending:
            raise pending.pop(0)
        return "ok"

    call.calls = 0
    return call


def slowdown() -> ClientError:
    return ClientError({"Error": {"Code": "SlowDown", "Message": "Please reduce your request rate."},
                        "ResponseMetadata": {"HTTPStatusCode": 503}}, "GetObject")


def test_s3fs_retries_are_counted_once_each_by_kind():
    before = storage.retry_counts()
    call = flaky(aiohttp.ClientPayloadError("short body"), slowdown())
    assert asyncio.run(s3fs.core._error_wrapper(call, retries=5)) == "ok"
    assert call.calls == 3
    assert delta(before) == {"body_read": 1, "throttled": 1}


def test_giving_up_counts_only_the_retries_made():
    before = storage.retry_counts()
    call = flaky(*[aiohttp.ClientPayloadError("short body")] * 5)
    with pytest.raises(aiohttp.ClientPayloadError):
        asyncio.run(s3fs.core._error_wrapper(call, retries=2))
    assert call.calls == 2 and delta(before) == {"body_read": 1}
    # Errors s3fs does not retry are not counted.
    call = flaky(PermissionError("denied"))
    with pytest.raises(PermissionError):
        asyncio.run(s3fs.core._error_wrapper(call, retries=5))
    assert call.calls == 1 and delta(before) == {"body_read": 1}


@pytest.mark.parametrize("error, kind", [
    (slowdown(), "throttled"),
    (ClientError({"Error": {"Code": "InternalError"}, "ResponseMetadata": {"HTTPStatusCode": 500}}, "GetObject"),
     "server_error"),
    (ReadTimeoutError(endpoint_url="http://s3"), "timeout"),
    (EndpointConnectionError(endpoint_url="http://s3"), "connection"),
    (ConnectionResetError(104, "reset"), "connection"),
    (aiohttp.ClientPayloadError("short body"), "body_read"),
    (ValueError("?"), "other"),
])
def test_classification(error, kind):
    assert s3_retries.classify_exception(error) == kind


def test_retries_are_logged_as_a_summary_not_one_line_each(monkeypatch, caplog):
    monkeypatch.setattr(s3_retries, "_last_log", float("-inf"))
    monkeypatch.setattr(s3_retries, "_unlogged", Counter())
    caplog.set_level(logging.WARNING, logger="shipyard.s3_retries")
    for kind in ("throttled", "throttled", "connection"):
        s3_retries.record(kind)
    assert [r.getMessage()[:45] for r in caplog.records] == ["S3: retried 1 transient error (throttled 1); "]
    monkeypatch.setattr(s3_retries, "_last_log", float("-inf"))  # the interval has passed
    s3_retries.record("body_read")
    assert caplog.records[-1].getMessage().startswith("S3: retried 3 transient errors (throttled 1, connection 1, body_read 1)")


def test_hooks_are_in_place():
    """The two places that are not public API: fail here, by name, when a library moves them."""
    from aiobotocore.httpsession import AIOHTTPSession

    assert "_get_session" in vars(AIOHTTPSession), "aiobotocore renamed _get_session: aiohttp resends go uncounted"
    assert getattr(s3fs.core._error_wrapper, "shipyard_counting", False), "s3fs retries are not counted"
