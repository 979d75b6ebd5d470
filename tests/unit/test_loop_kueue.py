"""With Kueue as the authority (the kuberay backend's ``queue``), the scheduler loop submits every
queued job at once, whatever shipyard thinks of capacity, and shows Kueue's hold as the job's
``waiting`` reason until the backend reports it running."""

from __future__ import annotations

import pytest

from shipyard.backends.base import BackendStatus, State
from shipyard.scheduler.loop import SchedulerLoop
from shipyard.store import JobState, Store

S = JobState
# 64 GPUs: far more than anything shipyard would see as free.
SPEC = {"name": "k", "entrypoint": "train.py:train", "dataset": {"uri": "s3://d"},
        "workers": {"count": 8, "cpus": 4, "gpus": 8}}
WAITING = "waiting for Kueue admission in queue team-a (Kueue's reason: kubectl get workloads -n ns -o wide)"


class KueueBackend:
    name = "kuberay"
    external_queue = "team-a"

    def __init__(self):
        self.submitted: list[str] = []
        self.state = BackendStatus(State.PENDING, "KueueAdmission", WAITING)

    def capacity(self):
        raise AssertionError("with Kueue admitting, shipyard must not gate on its own capacity view")

    def submit(self, job_id, spec, tenant, run=1, env=None):
        self.submitted.append(job_id)
        return f"ns/{job_id}"

    def status(self, handle):
        return self.state


@pytest.fixture
def store(tmp_path):
    with Store.open(f"sqlite:///{tmp_path / 's.db'}") as s:
        s.create_tenant("a", max_gpus=8)  # a shipyard quota Kueue's own quotas replace
        yield s


def test_queued_jobs_go_to_kueue_in_order_and_wait_with_its_reason(store):
    backend = KueueBackend()
    loop = SchedulerLoop(store, backend)
    first, second = store.add_job("a", SPEC), store.add_job("a", SPEC)
    loop.tick()
    assert backend.submitted == [first.id, second.id]
    assert store.get_job(first.id).state is S.ADMITTED
    loop.tick()  # the RayJobs are suspended in Kueue: still ADMITTED, and the API says why
    assert backend.submitted == [first.id, second.id]  # not submitted twice
    assert loop.reasons[first.id] == WAITING
    backend.state = BackendStatus(State.RUNNING, "", "")  # Kueue admitted and unsuspended them
    loop.tick()
    assert store.get_job(first.id).state is S.RUNNING and first.id not in loop.reasons
