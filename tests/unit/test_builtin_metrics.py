"""Built-in metrics and TensorBoard event files, on the real TrainContext loop (one gloo rank in
this process, a real shard stream, a stand-in for the progress board: no Ray), plus the
spec's ``metrics`` section."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
import yaml

from shipyard.data.sources import open_source
from shipyard.data.writer import write_dataset
from shipyard.errors import SpecError
from shipyard.runtime.meter import StepMeter, token_key
from shipyard.spec import load_spec, spec_from_dict

ROWS, TOKENS, BATCH = 96, 8, 4


class _Call:
    def __init__(self, calls: list):
        self.calls = calls

    def remote(self, **kwargs):
        self.calls.append(kwargs)


class Board:
    """What TrainContext calls on the ProgressBoard actor, recorded."""

    def __init__(self):
        self.updates: list[dict] = []
        self.update = _Call(self.updates)

    @property
    def metrics(self) -> dict:
        merged: dict = {}
        for u in self.updates:
            merged.update(u["metrics"])
        return merged


@pytest.fixture(scope="module")
def tokens_dataset(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("tokens")
    ids = np.arange(ROWS * TOKENS, dtype=np.int64).reshape(ROWS, TOKENS) % 251
    table = pa.table({"tokens": pa.FixedSizeListArray.from_arrays(pa.array(ids.ravel()), TOKENS),
                      "y": pa.array(np.arange(ROWS) % 10)})
    pq.write_table(table, root / "src.parquet")
    write_dataset(open_source(str(root / "src.parquet")), str(root / "shards"), 32)
    return str(root / "shards")


@pytest.fixture
def process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def context(uri: str, board, tb_dir: Path | None, **metrics):
    from shipyard.runtime.context import TrainContext

    raw = {"name": "tiny", "entrypoint": "train.py:train", "workers": {"count": 1},
           "dataset": {"uri": uri, "batch_size": BATCH, "shuffle": False},
           "stall_timeout_s": None, "metrics": {**metrics}}
    if tb_dir is not None:
        raw["metrics"].update(tensorboard=True, tensorboard_dir=str(tb_dir))
    spec = spec_from_dict(raw)
    return TrainContext(spec, rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), board=board)


def train(ctx, wait_s: float = 0.0) -> int:
    model, opt = ctx.prepare(torch.nn.Embedding(251, 4), lambda p: torch.optim.SGD(p, lr=0.1))
    steps = 0
    for batch in ctx.batches():
        opt.zero_grad()
        loss = model(batch["tokens"].long()).pow(2).mean()
        loss.backward()
        opt.step()
        ctx.report(loss=loss)
        steps += 1
        time.sleep(wait_s)
    ctx.close()
    return steps


def scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_the_loop_reports_step_time_throughput_and_tokens_without_user_code(tokens_dataset, process_group):
    board = Board()
    steps = train(context(tokens_dataset, board, None), wait_s=0.01)
    assert steps == ROWS // BATCH
    m = board.metrics
    assert {"loss", "step_time_s", "data_wait_s", "samples_per_s", "tokens_per_s"} <= set(m)
    assert "gpu_mem_gib" not in m  # CPU only
    assert 0.01 <= m["step_time_s"] < 1.0 and 0 <= m["data_wait_s"] < m["step_time_s"]
    assert m["samples_per_s"] == pytest.approx(BATCH / m["step_time_s"], rel=0.05)
    assert m["tokens_per_s"] == pytest.approx(TOKENS * m["samples_per_s"])  # 2-D integer "tokens": 8 a row
    # The user's metrics come first, so progress lines show them before the platform's.
    assert list(board.updates[-1]["metrics"])[0] == "loss"


def test_tensorboard_gets_one_point_per_step_for_reported_and_built_in_metrics(
        tokens_dataset, process_group, tmp_path):
    board = Board()
    steps = train(context(tokens_dataset, board, tmp_path / "tb"), wait_s=0.002)
    got = scalars(tmp_path / "tb")
    every_step = list(range(1, steps + 1))
    assert [s for s, _ in got["loss"]] == every_step
    assert [s for s, _ in got["step_time_s"]] == every_step
    assert [s for s, _ in got["data_wait_s"]] == every_step
    assert all(v >= 0.002 for _, v in got["step_time_s"])
    assert got["samples_per_s"] and got["tokens_per_s"]
    assert got["loss"][-1][1] == pytest.approx(board.metrics["loss"])


def test_a_resumed_attempt_replaces_the_steps_that_ran_twice(tokens_dataset, process_group, tmp_path):
    from shipyard.runtime.tensorboard import EventWriter

    first = EventWriter(tmp_path, resumed_step=0)
    first.add([(s, {"loss": 1.0}) for s in range(1, 11)])
    first.close()
    second = EventWriter(tmp_path, resumed_step=6)  # the checkpoint was at 6; 7..10 ran again
    second.add([(s, {"loss": 2.0}) for s in range(7, 13)])
    second.close()
    loss = scalars(tmp_path)["loss"]
    assert loss == [(s, 1.0) for s in range(1, 7)] + [(s, 2.0) for s in range(7, 13)]


def test_step_meter_aggregates_locally_between_pushes():
    meter = StepMeter(samples_per_step=64, dp_world=2, device=torch.device("cpu"), per_step=True)
    batch = {"tokens": torch.zeros(32, 16, dtype=torch.uint8), "y": torch.zeros(32, dtype=torch.long)}
    meter.boundary(0, 100.0)
    for step, t in enumerate([100.5, 101.0, 101.5, 102.0], start=1):
        meter.fetched(batch, 0.1)
        meter.boundary(step, t)
    out = meter.flush()
    assert out == {"step_time_s": 0.5, "data_wait_s": pytest.approx(0.1), "samples_per_s": 128.0,
                   "tokens_per_s": 32 * 16 * 2 / 0.5}
    assert [s for s, _ in meter.take_steps()] == [1, 2, 3, 4] and meter.take_steps() == []
    assert meter.flush() == {}  # no step since the last push: nothing new to say


def test_tokens_are_the_declared_key_or_the_first_2d_integer_tensor():
    batch = {"x": torch.zeros(4, 64), "mask": torch.zeros(4, 9, dtype=torch.bool),
             "ids": torch.zeros(4, 9, dtype=torch.int32), "y": torch.zeros(4, dtype=torch.long)}
    assert token_key(batch, None) == "ids"
    assert token_key(batch, "x") == "x"
    assert token_key({"x": torch.zeros(4, 64), "y": torch.zeros(4, dtype=torch.long)}, None) is None


def _spec(tmp_path: Path, metrics: dict) -> Path:
    (tmp_path / "train.py").write_text("def train(ctx):\n    pass\n")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"name": "j", "entrypoint": "train.py:train", "dataset": {"uri": "d"},
                                    "metrics": metrics}))
    return path


@pytest.mark.parametrize("metrics, expected", [
    ({"tensorboard": True, "tensorboard_dir": "s3://bucket/tb"},
     "metrics.tensorboard_dir: got 's3://bucket/tb'; must be a local path or file://"),
    ({"tensorboard_dir": "tb"}, "metrics.tensorboard_dir: got 'tb'; is set but metrics.tensorboard is false"),
    ({"tensorbord": True}, "metrics.tensorbord: unknown field; allowed: tensorboard, tensorboard_dir, tokens_key"),
])
def test_metrics_section_errors_name_the_field(tmp_path, metrics, expected):
    with pytest.raises(SpecError) as err:
        load_spec(_spec(tmp_path, metrics))
    assert expected in str(err.value)


def test_tensorboard_dir_is_resolved_against_the_spec_file(tmp_path):
    spec = load_spec(_spec(tmp_path, {"tensorboard": True, "tensorboard_dir": "runs/tb"}))
    assert spec.metrics.tensorboard_dir == str(tmp_path / "runs" / "tb")
    spec = load_spec(_spec(tmp_path, {"tensorboard": True, "tensorboard_dir": f"file://{tmp_path}/x"}))
    assert spec.metrics.tensorboard_dir == str(tmp_path / "x")
    from shipyard.runtime.tensorboard import log_dir

    default = load_spec(_spec(tmp_path, {"tensorboard": True}))
    assert log_dir(default, {"SHIPYARD_HOME": "/srv/sy"}) == Path("/srv/sy/tensorboard/j")


def test_the_driver_reports_values_that_change_after_the_last_step():
    """The loop's final push (the built-ins of its last steps) and an evaluation after the loop
    come at the step already reported: they must still reach the server."""
    from shipyard.run.records import RunSnapshot
    from shipyard.runtime.report import Session

    spec = spec_from_dict({"name": "j", "entrypoint": "train.py:train", "dataset": {"uri": "/d"}})
    s = Session(spec, "http://127.0.0.1:9/v1/jobs/j/report", "token", "sub-1")
    s._armed_after_init = True  # no signal handlers in the test process
    for metrics in ({"loss": 0.5}, {"loss": 0.5}, {"loss": 0.5, "samples_per_s": 900.0, "accuracy": float("nan")}):
        s.update(RunSnapshot(step=23, metrics=metrics))
    assert [(p.step, p.values) for p in s._points] == [
        (23, {"loss": 0.5}), (23, {"loss": 0.5, "samples_per_s": 900.0, "accuracy": None})]
