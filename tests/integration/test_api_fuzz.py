"""Schemathesis over the OpenAPI document: generated requests to every route never get a 5xx,
with an admin token, a user token and none (the app over a real SQLite store, through ASGI, with
a storage policy like a shared server's; no Ray, no backend)."""

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is a dev dependency (pip install -e '.[dev]')")

from shipyard.api import ApiConfig, create_app  # noqa: E402
from shipyard.api.intake import StoragePolicy  # noqa: E402
from shipyard.store import Store  # noqa: E402

_store = Store.open(f"sqlite:///{Path(tempfile.mkdtemp(prefix='shipyard-fuzz-')) / 'shipyard.db'}")
_store.create_tenant("fuzz")
TOKENS = {"admin": _store.create_token("fuzz", admin=True)[0], "user": _store.create_token("fuzz")[0], "none": None}
_store.add_job("fuzz", {"name": "seed", "entrypoint": "train.py:train", "dataset": {"uri": "/d"}})
_policy = StoragePolicy("s3://fuzz-bucket/tenants", allow_local=False)
schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(_store, config=ApiConfig(report_key=b"k",
                                                                                           storage=_policy)))


@pytest.mark.parametrize("who", list(TOKENS))
@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_route_answers_with_a_server_error(case, who):
    token = TOKENS[who]
    response = case.call(headers={"Authorization": f"Bearer {token}"} if token else {})
    assert response.status_code < 500, f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:500]}"
