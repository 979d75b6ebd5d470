"""ctx.state's checks (runtime/user_state.py), the stop rule (runtime/stopping.py) and the bounds
on what a commit record read back from storage may say (checkpoint/store.py)."""

from __future__ import annotations

import json

import pytest
import torch

from shipyard.checkpoint import CheckpointStore, CommitRecord
from shipyard.checkpoint.store import COMMIT, MAX_COMMIT_BYTES
from shipyard.errors import CheckpointError, UserError
from shipyard.runtime import stopping, user_state
from shipyard.runtime.stopping import Stop


def test_json_values_go_to_the_record_and_tensors_to_dcp():
    split = user_state.split({"best": float("inf"), "patience": 3, "curriculum": {"stage": "b", "seen": [1, 2]},
                              "ema": torch.ones(2, 3), "note": None})
    assert split.json == {"best": float("inf"), "patience": 3, "curriculum": {"stage": "b", "seen": [1, 2]},
                          "note": None}
    assert list(split.tensors) == ["ema"]
    assert split.record()["tensors"] == {"ema": {"shape": [2, 3], "dtype": "float32"}}
    assert user_state.split({}).record() == {}


@pytest.mark.parametrize("state, message", [
    ({"when": {1, 2}}, r"ctx.state\['when'\]: a set is not JSON"),
    ({"m": {"deep": [object()]}}, r"ctx.state\['m'\]: a object is not JSON"),
    ({"m": {1: "x"}}, r"ctx.state\['m'\]: a dict key 1 is not a str"),
    ({"m": [torch.ones(1)]}, r"ctx.state\['m'\]: a tensor inside a list or dict"),
    ({"a.b": 1}, r"ctx.state: key 'a.b' is not a name"),
    ({3: 1}, r"ctx.state: key 3 is not a name"),
    ({"big": "x" * (user_state.MAX_JSON_BYTES + 1)}, r"its JSON values take \d+ bytes, more than"),
    ({"c": torch.ones(2, dtype=torch.complex64)}, r"ctx.state\['c'\]: a Tensor of torch.complex64 cannot be saved"),
])
def test_what_cannot_be_saved_is_a_user_error_naming_the_key(state, message):
    with pytest.raises(UserError, match=message):
        user_state.split(state)


def test_a_record_is_bounded_before_anything_is_allocated():
    saved = {"json": {"best": 0.5}, "tensors": {"ema": {"shape": [2], "dtype": "int64"}}}
    values, tensors = user_state.from_record(saved, "s3://b/ck")
    assert values == {"best": 0.5} and tensors["ema"].shape == (2,) and tensors["ema"].dtype == torch.int64
    for bad in ({"tensors": {"t": {"shape": [2**40, 2**20], "dtype": "float32"}}},
                {"tensors": {"t": {"shape": [2], "dtype": "object"}}},
                {"tensors": {"t": {"shape": [-1], "dtype": "float32"}}},
                {"tensors": {"t": {"shape": [True], "dtype": "float32"}}},
                {"tensors": {f"t{i}": {"shape": [1], "dtype": "int8"} for i in range(user_state.MAX_TENSORS + 1)}},
                {"json": [], "tensors": {}}, {"pickle": "x"}):
        with pytest.raises(CheckpointError, match="s3://b/ck: ctx.state"):
            user_state.from_record(bad, "s3://b/ck")


def test_every_rank_must_stop_at_the_same_step():
    assert stopping.check([Stop(7, "patience"), Stop(7, "patience")]) == Stop(7, "patience")
    with pytest.raises(UserError, match="every rank must stop at the same step \\(rank 0 stopped after step 7; "
                                        "rank 1 stopped after step 8\\)"):
        stopping.check([Stop(7, "a"), Stop(8, "a")])
    with pytest.raises(UserError, match="rank 1 did not stop"):
        stopping.check([Stop(7, "a"), None])
    assert stopping.reason_of("  two\nlines ") == "two lines" and len(stopping.reason_of("x" * 9999)) == 500


def test_a_finished_run_is_extended_only_by_more_epochs(tmp_path):
    record = CommitRecord(step=7, epoch=0, world=2, strategy="ddp", time=0.0,
                          finished={"reason": "patience", "epochs": 2}, uri="file:///ck/step-000000007")
    assert not stopping.extends(record, 2) and not stopping.extends(record, 1) and stopping.extends(record, 3)
    assert stopping.finished_line(record, "gan", 3) is None
    assert stopping.finished_line(record, "gan", 2) == (
        "gan already finished: stopped at step 7 (patience); checkpoint file:///ck/step-000000007. Nothing to "
        "train: raise dataset.epochs above 2 to go on, or start over with --fresh")
    assert stopping.finished_line(CommitRecord(step=7, epoch=0, world=2, strategy="ddp", time=0.0), "gan", 2) is None


def _commit(store: CheckpointStore, step: int, body: bytes) -> None:
    store.fs.makedirs(store.path_for(step), exist_ok=True)
    store.fs.pipe_file(f"{store.path_for(step)}/{COMMIT}", body)


def test_a_commit_record_read_back_is_bounded_and_checked(tmp_path):
    store = CheckpointStore(str(tmp_path))
    good = {"step": 5, "epoch": 0, "world": 1, "strategy": "ddp", "time": 1.0}
    _commit(store, 5, json.dumps(good).encode())
    assert store.read_record(5).step == 5 and store.read_record(5).parts == []  # written before parts existed
    _commit(store, 6, b" " * (MAX_COMMIT_BYTES + 1))
    with pytest.raises(CheckpointError, match=f"larger than {MAX_COMMIT_BYTES} bytes"):
        store.read_record(6)
    for step, body in ((7, {**good, "extra": 1}), (8, {**good, "step": "5"}), (9, {**good, "finished": "yes"}),
                       (10, [1, 2])):
        _commit(store, step, json.dumps(body).encode())
        with pytest.raises(CheckpointError, match="not a commit record shipyard wrote"):
            store.read_record(step)
