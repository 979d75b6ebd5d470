"""A spec the kuberay backend could never place is refused at ``POST /v1/jobs`` (422 naming the
field and what is allowed), instead of queueing and then failing at the scheduler's submit."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from shipyard.api import ApiConfig, create_app
from shipyard.backends.kuberay import KubeRayBackend
from shipyard.backends.kuberay_manifest import KubeRayConfig, NodePool
from shipyard.store import Store

CONFIG = KubeRayConfig(image="registry.example.com/shipyard/worker:1", pools={"a100": NodePool({"pool": "a100"})},
                       images=("registry.example.com/team-a/*",))


def spec(**changes) -> dict:
    return {"name": "k", "entrypoint": "jobs.digits:train", "dataset": {"uri": "s3://d/x"},
            "workers": {"count": 2}, **changes}


@pytest.fixture
def api(tmp_path):
    store = Store.open(data_dir=tmp_path)
    store.create_tenant("default")
    backend = KubeRayBackend(CONFIG, api_client=object())  # the intake checks make no API call
    yield TestClient(create_app(store, backend=backend, config=ApiConfig(auth=False)))
    store.close()


@pytest.mark.parametrize("changes, message", [
    ({"dataset": {"uri": "/home/me/data"}}, "dataset.uri: got '/home/me/data'; jobs on Kubernetes read and write "
                                            "object storage, use an s3:// URI"),
    ({"workers": {"count": 2, "pool": "h100"}}, "workers.pool: got 'h100'; this server's pools are: a100"),
    ({"image": "docker.io/evil/miner:latest"},
     "image: got 'docker.io/evil/miner:latest'; this server allows only registry.example.com/shipyard/worker:1, "
     "registry.example.com/team-a/* (leave image out for the default)"),
], ids=["local-dataset", "unknown-pool", "image-not-allowed"])
def test_an_unplaceable_spec_is_refused_at_submit(api, changes, message):
    r = api.post("/v1/jobs", json=spec(**changes))
    assert r.status_code == 422, r.text
    assert message in r.text
    assert api.get("/v1/jobs").json()["items"] == []  # nothing queued


def test_allowed_images_and_pools_are_queued(api):
    for changes in ({}, {"image": "registry.example.com/team-a/torch:2"}, {"workers": {"count": 2, "pool": "a100"}}):
        r = api.post("/v1/jobs", json=spec(**changes))
        assert r.status_code == 201, r.text
