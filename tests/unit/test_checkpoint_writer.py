"""The checkpoint writer keeps DCP's file format: DCP's stock reader loads what it writes, and
its files hold the same items at the same offsets as DCP's own writer's (S3 in tests/integration)."""

import contextlib
import io
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp
from shipyard.torch_adapter import FsspecReader, FsspecWriter

from shipyard.checkpoint import writer
from shipyard.checkpoint.writer import CheckpointWriter, tensor_pieces

TENSORS = {
    "matrix": torch.randn(64, 33),
    "empty": torch.randn(0),
    "ints": torch.arange(10, dtype=torch.int64),
    "bf16": torch.randn(3, 4).to(torch.bfloat16),
    "scalar": torch.tensor(3.0),
    "transposed": torch.randn(5, 7).t(),
    "flags": torch.rand(9) > 0.5,
}


@pytest.mark.parametrize("name", list(TENSORS))
def test_pieces_are_what_torch_save_writes(name):
    t = TENSORS[name]
    pieces = tensor_pieces(t)
    saved = io.BytesIO()
    torch.save(t, saved)
    raw = b"".join(pieces)
    assert len(raw) == len(saved.getvalue())
    back = torch.load(io.BytesIO(raw), weights_only=True)
    assert back.dtype == t.dtype and back.stride() == t.stride() and torch.equal(back, t)


def test_storage_is_not_copied():
    t = torch.randn(1000)
    views = [p for p in tensor_pieces(t) if isinstance(p, memoryview)]
    assert len(views) == 1 and len(views[0]) == t.nbytes
    t[0] = 42.0  # the piece is the tensor's memory itself
    assert torch.frombuffer(views[0], dtype=torch.float32)[0].item() == 42.0


def test_falls_back_to_a_plain_save_when_the_envelope_has_no_hole(monkeypatch):
    monkeypatch.setattr(torch.serialization, "skip_data", contextlib.nullcontext)
    t = torch.randn(100)
    pieces = tensor_pieces(t)
    assert not any(isinstance(p, memoryview) for p in pieces)
    assert torch.equal(torch.load(io.BytesIO(b"".join(pieces)), weights_only=True), t)


@pytest.mark.parametrize("part", [1, 7, 100, 10**9])
def test_parts_cover_the_pieces_in_order(part):
    pieces = [b"abc", memoryview(b"defghij"), b"", b"k" * 250]
    parts = list(writer._parts(pieces, part))
    assert b"".join(b"".join(p) for p in parts) == b"".join(pieces)
    assert all(sum(map(len, p)) == part for p in parts[:-1])


def _state():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    return {"model": model.state_dict(), "extra": {"step": 3, "name": "x"}, **TENSORS}


def _storage_data(path):
    with open(path / ".metadata", "rb") as f:
        return {str(k): (v.relative_path, v.offset, v.length) for k, v in pickle.load(f).storage_data.items()}


@pytest.mark.parametrize("scheme", ["", "file://"])
def test_round_trip_through_dcp_same_layout_as_dcps_writer(tmp_path, scheme):
    state = _state()
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    dcp.save(state, storage_writer=CheckpointWriter(f"{scheme}{ours}", files=4, part_bytes=2**20), no_dist=True)
    dcp.save(state, storage_writer=FsspecWriter(str(theirs), thread_count=4), no_dist=True)
    assert _storage_data(ours) == _storage_data(theirs)
    assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in theirs.iterdir())

    loaded = {"model": {k: torch.zeros_like(v) for k, v in state["model"].items()}, "extra": {"step": 0, "name": ""},
              **{k: torch.zeros_like(v) for k, v in TENSORS.items()}}
    dcp.load(loaded, storage_reader=FsspecReader(str(ours)), no_dist=True)
    for k, v in state["model"].items():
        assert torch.equal(loaded["model"][k], v)
    for k, v in TENSORS.items():
        assert torch.equal(loaded[k], v), k
    assert loaded["extra"] == {"step": 3, "name": "x"}
