"""Several prepared models, ctx.state and stopping, on the real TrainContext loop: gloo ranks in
this process or in torch.multiprocessing children, a real shard stream and local checkpoints
(no Ray). Phases run in fresh contexts, as a restarted job's would."""

from __future__ import annotations

import json
import os
import traceback
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from shipyard.checkpoint import CheckpointStore
from shipyard.checkpoint import dcp as ckpt
from shipyard.checkpoint.dcp import Part
from shipyard.data.sources import open_source
from shipyard.data.writer import write_dataset
from shipyard.errors import UserError
from shipyard.runtime.stopping import finished_before
from shipyard.spec import spec_from_dict

ROWS, WIDTH, BATCH = 64, 8, 4  # world 1: 16 steps an epoch; world 2: 8


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("rows")
    x = np.random.default_rng(0).standard_normal((ROWS, WIDTH)).astype(np.float32)
    pq.write_table(pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), WIDTH),
                             "id": pa.array(np.arange(ROWS))}), root / "src.parquet")
    write_dataset(open_source(str(root / "src.parquet")), str(root / "shards"), 16)
    return str(root / "shards")


def make_spec(data: str, ck: str | None, world: int = 1, epochs: int = 2, **extra):
    raw = {"name": "parts", "entrypoint": "train.py:train", "workers": {"count": world},
           "dataset": {"uri": data, "batch_size": BATCH, "epochs": epochs}, "stall_timeout_s": None, **extra}
    if ck is not None:
        raw["checkpoint"] = {"uri": ck, "every_steps": 3, "async_upload": True}
    return spec_from_dict(raw)


def context(spec, rank: int = 0, world: int = 1):
    from shipyard.runtime.context import TrainContext

    return TrainContext(spec, rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))


@pytest.fixture
def process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def gan_step(ctx, g, d, og, od, batch) -> None:
    """One step of a tiny GAN: noise from the global RNG, both models stepped."""
    real = batch["x"]
    fake = g(torch.randn(len(real), 4))
    od.zero_grad()
    scores = d(torch.cat([real, fake.detach()]))
    labels = torch.cat([torch.ones(len(real), 1), torch.zeros(len(real), 1)])
    torch.nn.functional.binary_cross_entropy_with_logits(scores, labels).backward()
    od.step()
    og.zero_grad()
    torch.nn.functional.binary_cross_entropy_with_logits(d(fake), torch.ones(len(real), 1)).backward()
    og.step()
    ctx.state["steps_seen"] = ctx.state.get("steps_seen", 0) + 1
    ctx.state["ids"] = ctx.state.get("ids", []) + batch["id"].tolist()[:1]
    ctx.state["fake_sum"] = ctx.state.get("fake_sum", torch.zeros(WIDTH)) + fake.detach().sum(0)


def prepare_gan(ctx):
    torch.manual_seed(0)
    g, og = ctx.prepare(torch.nn.Linear(4, WIDTH), lambda p: torch.optim.Adam(p, lr=0.01), name="generator")
    d, od = ctx.prepare(torch.nn.Linear(WIDTH, 1), lambda p: torch.optim.Adam(p, lr=0.01), name="discriminator")
    return g, d, og, od


def weights(*models) -> list[dict]:
    return [{k: v.detach().clone() for k, v in getattr(m, "module", m).state_dict().items()} for m in models]


def _gan_run(ctx, crash_after=None) -> dict:
    g, d, og, od = prepare_gan(ctx)
    result = {"restored_step": ctx.step, "restored_state": dict(ctx.state)}
    try:
        for batch in ctx.batches():
            gan_step(ctx, g, d, og, od, batch)
            if ctx.step == crash_after:
                raise RuntimeError("injected crash")
    except RuntimeError:
        ctx.abandon()  # what the platform does when train(ctx) raises
    else:
        ctx.close()
    return {**result, "step": ctx.step, "weights": weights(g, d), "state": dict(ctx.state)}


def _gan_phases(rank, world, port, data, out):
    """An uninterrupted run, then a run that crashes after step 8 and its resumed run, in the same
    processes (fresh contexts, as in-place recovery does): children cost seconds to import torch."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        for name, ck, crash_after in (("clean", "clean-ck", None), ("crashed", "ck", 8), ("resumed", "ck", None)):
            results[name] = _gan_run(context(make_spec(data, os.path.join(out, ck), world), rank, world), crash_after)
        torch.save(results, os.path.join(out, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_named_models_and_state_resume_bit_identical_at_world_two(dataset, tmp_path):
    mp.spawn(_gan_phases, args=(2, free_port(), dataset, str(tmp_path)), nprocs=2, join=True)
    runs = [torch.load(tmp_path / f"{r}.pt", weights_only=False) for r in range(2)]
    ck = str(tmp_path / "ck")
    assert runs[0]["crashed"]["step"] == 8
    record = CheckpointStore(ck).latest()
    assert record.step == 16 and record.parts == ["generator", "discriminator"]
    assert record.state["json"]["steps_seen"] == 16 and record.state["tensors"] == {
        "fake_sum": {"shape": [WIDTH], "dtype": "float32"}}
    for rank in range(2):
        clean, resumed = runs[rank]["clean"], runs[rank]["resumed"]
        assert resumed["restored_step"] == 6  # checkpoints at 3 and 6; the crash after 8
        assert resumed["restored_state"]["steps_seen"] == 6
        assert resumed["step"] == clean["step"] == 16
        for a, b in zip(clean["weights"], resumed["weights"]):
            for k in a:
                assert torch.equal(a[k], b[k]), f"rank {rank} {k} differs from the uninterrupted run"
    clean, resumed = runs[0]["clean"], runs[0]["resumed"]
    assert resumed["state"]["ids"] == clean["state"]["ids"] and len(clean["state"]["ids"]) == 16
    assert torch.equal(resumed["state"]["fake_sum"], clean["state"]["fake_sum"])
    # ctx.state must be the same on every rank: rank 0's JSON is what every rank gets back.
    assert runs[1]["resumed"]["restored_state"]["ids"] == resumed["restored_state"]["ids"]
    # Named parts under parts.<name>; nothing at the unnamed part's top-level keys.
    state = ckpt.consolidate(CheckpointStore(ck).latest())
    assert set(state) == {"parts", "state"} and set(state["parts"]) == {"generator", "discriminator"}


def test_the_unnamed_model_keeps_the_old_layout_and_old_records_load(dataset, tmp_path, process_group):
    ck = str(tmp_path / "ck")
    ctx = context(make_spec(dataset, ck, epochs=1))
    model, opt = ctx.prepare(torch.nn.Linear(WIDTH, 1), lambda p: torch.optim.SGD(p, lr=0.1))
    for batch in ctx.batches():
        opt.zero_grad()
        model(batch["x"]).sum().backward()
        opt.step()
    ctx.close()
    store = CheckpointStore(ck)
    record = store.latest()
    assert set(ckpt.consolidate(record)) == {"model", "optim"}
    # A commit record written before parts, state and finished existed still loads, and restores.
    path = Path(store.path_for(record.step)) / "COMMIT.json"
    body = json.loads(path.read_text())
    for key in ("parts", "state", "finished"):
        body.pop(key)
    path.write_text(json.dumps(body))
    again = context(make_spec(dataset, ck, epochs=1))
    restored, _ = again.prepare(torch.nn.Linear(WIDTH, 1), lambda p: torch.optim.SGD(p, lr=0.1))
    assert again.step == 16
    assert torch.equal(restored.module.weight, model.module.weight)
    again.close()


def test_a_second_unnamed_prepare_is_refused_at_that_call(dataset, tmp_path, process_group):
    ctx = context(make_spec(dataset, None))
    ctx.prepare(torch.nn.Linear(WIDTH, 1), lambda p: torch.optim.SGD(p, lr=0.1))
    with pytest.raises(UserError, match=r"a model is already prepared; name each one .*name=\"discriminator\""):
        ctx.prepare(torch.nn.Linear(WIDTH, 1), lambda p: torch.optim.SGD(p, lr=0.1))
    ctx.prepare(torch.nn.Linear(WIDTH, 1), lambda p: torch.optim.SGD(p, lr=0.1), name="d")
    with pytest.raises(UserError, match=r"name='d'\): a model of that name is already prepared"):
        ctx.prepare(torch.nn.Linear(WIDTH, 1), lambda p: torch.optim.SGD(p, lr=0.1), name="d")
    with pytest.raises(UserError, match="a name is 1-64 letters"):
        ctx.prepare(torch.nn.Linear(WIDTH, 1), lambda p: torch.optim.SGD(p, lr=0.1), name="a.b")
    with pytest.raises(UserError, match=r"ctx.train_step\(name='g'\): no such prepared model \(there are: the "
                                        r"unnamed one, name='d'\)"):
        ctx.train_step(torch.zeros(1, WIDTH), torch.zeros(1, 1), torch.nn.functional.mse_loss, name="g")
    ctx.close()


def test_several_models_are_refused_under_tensor_parallelism(dataset, tmp_path, process_group):
    ctx = context(make_spec(dataset, None, strategy={"kind": "tensor", "tp": 1}))
    ctx._parts.append(Part("", torch.nn.Linear(1, 1), None))  # as if one model were prepared
    with pytest.raises(UserError, match="strategy tensor takes one prepared model; several .* under ddp and fsdp"):
        ctx.prepare(torch.nn.Linear(WIDTH, 1), lambda p: torch.optim.SGD(p, lr=0.1), name="d")


def _train_single(ctx, stop_at=None, break_at=None, raise_at=None) -> None:
    torch.manual_seed(0)
    model, opt = ctx.prepare(torch.nn.Linear(WIDTH, 1), lambda p: torch.optim.SGD(p, lr=0.1))
    for batch in ctx.batches():
        opt.zero_grad()
        model(batch["x"]).sum().backward()
        opt.step()
        ctx.state["last_id"] = int(batch["id"][0])
        if ctx.step == stop_at:
            ctx.stop("patience ran out")
        if ctx.step == break_at:
            break
        if ctx.step == raise_at:
            raise RuntimeError("boom")


def test_stop_commits_the_stop_step_marked_finished_and_a_rerun_trains_nothing(dataset, tmp_path, process_group):
    ck = str(tmp_path / "ck")
    ctx = context(make_spec(dataset, ck))
    _train_single(ctx, stop_at=5)
    assert ctx.step == 5  # ctx.batches() yielded nothing after the stop
    ctx.close()
    record = CheckpointStore(ck).latest()
    assert record.step == 5 and record.finished == {"reason": "patience ran out", "epochs": 2}
    assert record.state == {"json": {"last_id": ctx.state["last_id"]}, "tensors": {}}

    assert finished_before(make_spec(dataset, ck)).startswith(
        "parts already finished: stopped at step 5 (patience ran out); checkpoint ")
    rerun = context(make_spec(dataset, ck))
    _train_single(rerun)
    assert rerun.step == 5 and rerun.state == ctx.state  # restored, and nothing trained
    rerun.close()

    # More epochs than the stopped run had: the data was extended, so it trains on to the new end.
    assert finished_before(make_spec(dataset, ck, epochs=3)) is None
    longer = context(make_spec(dataset, ck, epochs=3))
    _train_single(longer)
    longer.close()
    assert longer.step == 48 and CheckpointStore(ck).latest().finished is None


def test_a_break_stops_at_close_and_an_exception_is_no_stop(dataset, tmp_path, process_group):
    ck = str(tmp_path / "ck")
    ctx = context(make_spec(dataset, ck))
    _train_single(ctx, break_at=4)  # step 3 was checkpointed on schedule
    ctx.close()
    record = CheckpointStore(ck).latest()
    assert record.step == 4 and record.finished["reason"] == "break out of ctx.batches() after step 4"

    other = str(tmp_path / "other")
    failed = context(make_spec(dataset, other))
    with pytest.raises(RuntimeError, match="boom"):
        _train_single(failed, raise_at=4)
    failed.abandon()  # the platform's path after an exception: no close(), no stop
    assert CheckpointStore(other).latest().step == 3 and CheckpointStore(other).latest().finished is None


def test_a_stop_at_a_step_already_checkpointed_marks_that_record(dataset, tmp_path, process_group):
    ck = str(tmp_path / "ck")
    ctx = context(make_spec(dataset, ck))
    model, opt = ctx.prepare(torch.nn.Linear(WIDTH, 1), lambda p: torch.optim.SGD(p, lr=0.1))
    for _ in ctx.batches():
        if ctx.step == 2:
            ctx.checkpoint()
            ctx.stop("target reached")
    ctx.close()
    assert [c.step for c in CheckpointStore(ck).list()] == [2]
    assert CheckpointStore(ck).latest().finished["reason"] == "target reached"


def test_state_values_that_cannot_be_saved_fail_the_save_naming_the_key(dataset, tmp_path, process_group):
    ctx = context(make_spec(dataset, str(tmp_path / "ck")))
    ctx.prepare(torch.nn.Linear(WIDTH, 1), lambda p: torch.optim.SGD(p, lr=0.1))
    ctx.state["best"] = float("inf")
    ctx.state["when"] = {1, 2}
    with pytest.raises(UserError, match=r"ctx.state\['when'\]: a set is not JSON"):
        ctx.checkpoint()
    ctx.close()


def _one_rank_breaks(rank, world, port, data, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=20))
    spec = make_spec(data, os.path.join(out, "ck"), world, stall_timeout_s=3)
    ctx = context(spec, rank, world)
    result = {}
    try:
        model, opt = ctx.prepare(torch.nn.Linear(WIDTH, 1), lambda p: torch.optim.SGD(p, lr=0.1))
        for batch in ctx.batches():
            opt.zero_grad()
            model(batch["x"]).sum().backward()
            opt.step()
            if rank == 1 and ctx.step == 2:
                break
        ctx.close()
    except BaseException as e:  # noqa: BLE001 - recorded for the test
        result = {"type": type(e).__name__, "message": str(e), "trace": traceback.format_exc()}
        ctx.abandon()
    with open(os.path.join(out, f"{rank}.json"), "w") as f:
        json.dump(result, f)
    os._exit(0)  # rank 0 may still hold a broken collective: do not wait for the group's teardown


def test_a_break_on_one_rank_only_fails_with_a_user_error_instead_of_hanging(dataset, tmp_path):
    mp.spawn(_one_rank_breaks, args=(2, free_port(), dataset, str(tmp_path)), nprocs=2, join=True)
    broke = json.loads((tmp_path / "1.json").read_text())
    assert broke["type"] == "UserError", broke
    assert "rank 1 stopped after step 2, but not every rank stopped within 3s" in broke["message"]
    assert json.loads((tmp_path / "0.json").read_text())  # rank 0 failed too (its peer left), not hung
