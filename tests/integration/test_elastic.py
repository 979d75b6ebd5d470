"""Elastic workers on a real two-node Ray cluster: a node dies, the job goes on with fewer workers;
a node comes back, the job grows again after a checkpoint. Every epoch still sees every row once.
The same for DDP and for Horovod (a new Horovod ring at each size).

The cluster is this module's own: a head and a second node (``ray start --address``), one logical
CPU each, so each node holds exactly one worker. Killing the second node's process group is a node
going away (its raylet and the worker on it die together). Its tests take turns on it: each starts
on two live nodes with both CPUs free, and leaves two (the node it added in place of the one it
killed), so a cluster is started once, not once per test."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

from conftest import free_port, stop_ray_node, wait_for_port

pytestmark = pytest.mark.integration
JOB = str(Path(__file__).parent / "jobs" / "record_ids" / "job.yaml")
RAY = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
# The head declares a dead node quickly (defaults: 5 missed health checks 3 s apart).
FAST_NODE_DEATH = {"RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "3",
                   "RAY_health_check_initial_delay_ms": "500"}


class Node:
    """One `ray start --block` in its own process group, stopped (or killed) as a whole. It carries
    a resource named after it (``node_<name>``), so a test can tell which Ray node it is."""

    def __init__(self, name: str, args: list[str], log: Path, env: dict | None = None):
        env = {**(env or os.environ), "RAY_USAGE_STATS_ENABLED": "0", **FAST_NODE_DEATH}
        self.name, self.log = f"node_{name}", open(log, "w")
        self.proc = subprocess.Popen([RAY, "start", "--block", "--num-cpus=1", "--node-ip-address=127.0.0.1",
                                      f"--resources={json.dumps({self.name: 1})}", "--disable-usage-stats", *args],
                                     env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self, sig=signal.SIGKILL, address: str | None = None) -> None:
        stop_ray_node(self.proc, sig, address)
        self.log.close()


def ray_env(address: str) -> dict:
    """The environment of a process that joins ``address``: with the cluster token where the head
    uses one (Ray 2.60 heads do once ~/.ray/auth_token exists), as `shipyard run` itself sends it."""
    from shipyard.config import enable_ray_token_auth

    env = {**os.environ, "RAY_ADDRESS": address}
    enable_ray_token_auth(env)
    return env


CLUSTER_READY = """
import sys, time, ray
address, want, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
ray.init(address=address, log_to_driver=False)
deadline = time.monotonic() + timeout
while True:
    alive = sum(n["Alive"] for n in ray.nodes())
    free = ray.available_resources().get("CPU", 0)
    if alive == want and free >= want or time.monotonic() > deadline:
        print(alive, free)
        break
    time.sleep(0.2)
"""


def cluster_ready(address: str, nodes: int, timeout: float = 60) -> tuple[int, float]:
    """Wait until ``nodes`` nodes are alive and all their CPUs (one each) free; returns (alive
    nodes, free CPUs) as last seen. One driver that polls, not a new process per look."""
    out = subprocess.run([sys.executable, "-c", CLUSTER_READY, address, str(nodes), str(timeout)],
                         capture_output=True, text=True, timeout=timeout + 60, env=ray_env(address))
    if out.returncode != 0:
        return 0, 0.0
    alive, free = out.stdout.strip().splitlines()[-1].split()
    return int(alive), float(free)


DRIVER_NODE = """
import json, sys, time, ray
from ray.util.state import list_actors
address = sys.argv[1]
ray.init(address=address, log_to_driver=False)
names = {n["NodeID"]: next(k for k in n["Resources"] if k.startswith("node_")) for n in ray.nodes() if n["Alive"]}
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    found = list_actors(address=address, filters=[("class_name", "=", "TrainController"), ("state", "=", "ALIVE")])
    if found:
        print(names[found[0].node_id])
        break
    time.sleep(0.5)
"""


def driver_node(address: str) -> subprocess.Popen:
    """Started at once: prints the name of the node the run's Ray Train controller (and so the
    driver and its progress board) is on, which the test must not kill."""
    return subprocess.Popen([sys.executable, "-c", DRIVER_NODE, address], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=ray_env(address))


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def records(out: Path) -> list[dict]:
    rows = []
    for f in out.glob("rank*.jsonl"):
        rank = int(f.stem.removeprefix("rank"))
        rows += [{**json.loads(line), "rank": rank} for line in f.read_text().splitlines() if line.strip()]
    return rows


def effective(rows: list[dict]) -> list[dict]:
    """The records of the steps that count: a step re-run after a restart replaces the earlier run
    of it (the latest write of a step decides its world; each of its ranks' latest record counts)."""
    by_step: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        by_step[r["step"]].append(r)
    keep = []
    for step, rs in by_step.items():
        world = max(rs, key=lambda r: r["t"])["world"]
        latest: dict[int, dict] = {}
        for r in sorted((r for r in rs if r["world"] == world), key=lambda r: r["t"]):
            latest[r["rank"]] = r
        assert len(latest) == world, f"step {step}: records from {sorted(latest)} of {world} ranks"
        keep += latest.values()
    return keep


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The module's cluster: ``(address, nodes, add_node)``; ``nodes`` holds every node started,
    the killed ones included; all are stopped at the end of the module."""
    logs = tmp_path_factory.mktemp("elastic-cluster")
    port, dash, agent = free_port(), free_port(), free_port()
    head = Node("head", ["--head", f"--port={port}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
                 f"--dashboard-agent-listen-port={agent}"], logs / "head.log")
    address = f"127.0.0.1:{port}"
    nodes = [head]

    def add_node() -> Node:
        node = Node(str(len(nodes)), [f"--address={address}", f"--dashboard-agent-listen-port={free_port()}"],
                    logs / f"node{len(nodes)}.log", env=ray_env(address))
        nodes.append(node)
        return node

    try:
        wait_for_port(port, timeout=60)
        wait_for_port(dash, timeout=60)
        yield address, nodes, add_node
    finally:
        for node in reversed(nodes):
            node.kill(signal.SIGTERM, address=address if node is head else None)


@pytest.fixture
def two_nodes(cluster):
    """The module's cluster as each test needs it: the head and one other live node, both CPUs
    free (what an earlier test ran has gone). A test that killed a node and failed before adding
    one back has one added here. Yields ``(address, [head, other], add_node)``."""
    address, nodes, add_node = cluster
    assert nodes[0].proc.poll() is None, "the head is gone: an earlier test killed it"
    if len([n for n in nodes if n.proc.poll() is None]) < 2:
        add_node()
    live = [n for n in nodes if n.proc.poll() is None]
    state = cluster_ready(address, 2)
    assert state == (2, 2.0), f"(alive nodes, free CPUs) = {state}, not (2, 2.0), before the test"
    yield address, live, add_node


@pytest.mark.parametrize("strategy", [
    "ddp",
    pytest.param("horovod", marks=pytest.mark.skipif(
        importlib.util.find_spec("horovod") is None,
        reason="horovod is not installed; `bash deploy/horovod.sh` builds it (deploy/test.sh runs it)")),
])
def test_a_lost_node_shrinks_the_job_and_a_new_node_grows_it_back_exactly(strategy, two_nodes, digits_shards, tmp_path):
    address, nodes, add_node = two_nodes
    out = tmp_path / "out"
    out.mkdir()
    exe = Path(sys.executable).parent / "shipyard"
    env = {**os.environ, "RAY_ADDRESS": address, "SHIPYARD_HOME": str(tmp_path / "home"), "NO_COLOR": "1",
           "COLUMNS": "200", "PYTHONUNBUFFERED": "1",
           # A group sized on the lost node's stale resources is given up on sooner (elastic default 15 s).
           "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "8"}
    job = subprocess.Popen(
        [str(exe), "run", JOB, "--set", f"strategy.kind={strategy}", "--set", f"dataset.uri={digits_shards / 'train'}", "--set", "dataset.epochs=4",
         "--set", f"checkpoint.uri={out / 'ck'}", "--set", f"config.out={out}", "--set", "config.step_sleep_s=0.2", "--set", "config.slow_at_world=1",
         "--set", "workers={min: 1, max: 2, resize_interval_s: 2}", "--set", "max_failures=1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # The job runs on both nodes; at step 15 the node without the driver goes away.
        keep = driver_node(address).communicate(timeout=150)[0].strip()
        assert keep in {n.name for n in nodes}, f"the run's controller was not found: {keep!r}"
        wait_for(lambda: any(r["step"] >= 15 and r["world"] == 2 for r in records(out)), 180, "step 15 on 2 workers")
        next(n for n in nodes if n.name != keep).kill()
        # It goes on alone from its last checkpoint (step 10); then a node joins and it grows back.
        wait_for(lambda: any(r["world"] == 1 for r in records(out)), 180, "steps on 1 worker")
        add_node()
        stdout, _ = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
            print(job.communicate()[0][-6000:])
    print(stdout[-4000:])
    assert job.returncode == 0, stdout[-4000:]

    lines = re.findall(r"^\s+(#\d+ .*)$", stdout, flags=re.M)
    assert len(lines) == 3, lines
    assert re.search(r"failed: rank \d: its node died \(node was terminated unexpectedly: health check failed", lines[0]) \
        and "(2 workers," in lines[0], lines[0]
    assert "was asked to stop: the job grows from 1 to 2 workers" in lines[1] and "(1 worker," in lines[1], lines[1]
    assert "lost 0" in lines[1], lines[1]  # grown after a checkpoint at the step it had reached
    assert "finished" in lines[2] and "(2 workers," in lines[2], lines[2]
    assert "2->1->2 workers" in stdout

    # Every epoch saw each of the 1,438 training rows exactly once, across both changes of size.
    seen: dict[int, list[int]] = defaultdict(list)
    for r in effective(records(out)):
        seen[r["epoch"]] += r["ids"]
    assert sorted(seen) == [0, 1, 2, 3], sorted(seen)
    for epoch, ids in seen.items():
        assert len(ids) == len(set(ids)) == 1438 and set(ids) == set(seen[0]), \
            f"epoch {epoch}: {len(ids)} rows, {len(set(ids))} distinct"
