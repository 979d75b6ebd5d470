"""shipyard.torch_adapter: one tripwire per private torch symbol it touches.

Each test checks what shipyard relies on. A failure names the symbol and what shipyard uses it
for: fix platform/shipyard/torch_adapter.py (and only it), then raise the torch pin.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import torch
from torch import nn

from shipyard import torch_adapter

PLATFORM = Path(__file__).parents[2] / "platform" / "shipyard"


def tripped(symbol: str, use: str, what: str) -> str:
    return (f"torch {torch.__version__} changed {symbol}: {what}. shipyard uses it to {use}; "
            "update platform/shipyard/torch_adapter.py")


def test_fsspec_writer_sets_what_the_checkpoint_writer_reads(tmp_path):
    use = "write DCP checkpoints to S3 (checkpoint/writer.py subclasses it)"
    params = inspect.signature(torch_adapter.FsspecWriter.__init__).parameters
    assert "thread_count" in params, tripped("FsspecWriter.__init__", use, "no thread_count parameter")
    writer = torch_adapter.FsspecWriter(str(tmp_path), thread_count=2)
    for attr in ("path", "sync_files", "fs"):
        assert hasattr(writer, attr), tripped("FsspecWriter", use, f"it no longer sets .{attr}")
    assert hasattr(writer.fs, "fs") and hasattr(writer.fs, "concat_path"), tripped(
        "FsspecWriter.fs", use, "it is no longer a FileSystem wrapper with .fs and .concat_path")
    assert str(writer.fs.concat_path(writer.path, "a.distcp")).endswith("a.distcp")


def test_fsspec_reader_takes_a_path_and_storage_options(tmp_path):
    params = list(inspect.signature(torch_adapter.FsspecReader.__init__).parameters)
    assert params[:2] == ["self", "path"] and "kwargs" in params, tripped(
        "FsspecReader.__init__", "read DCP checkpoints from S3", f"its parameters are now {params}")


def test_storage_layout_helpers_keep_their_shape():
    use = "lay out checkpoint files as DCP's own writer does, so DCP's reader finds every item"
    fields = [f.name for f in dataclasses.fields(torch_adapter.StorageInfo)]
    assert fields[:3] == ["relative_path", "offset", "length"], tripped("_StorageInfo", use, f"fields {fields}")
    params = list(inspect.signature(torch_adapter.split_by_size_and_type).parameters)
    assert params == ["bins", "items"], tripped("_split_by_size_and_type", use, f"parameters {params}")


def test_load_whole_reads_a_checkpoint_without_a_model(tmp_path):
    import torch.distributed.checkpoint as dcp

    saved = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "step": 4}
    dcp.save(saved, storage_writer=torch_adapter.FsspecWriter(str(tmp_path)), no_dist=True)
    state: dict = {}
    torch_adapter.load_whole(state, torch_adapter.FsspecReader(str(tmp_path)))
    assert torch.equal(state["model"]["w"], saved["model"]["w"]) and state["step"] == 4, tripped(
        "_load_state_dict/_EmptyStateDictLoadPlanner", "export a checkpoint with no live model", f"read back {state}")


def test_replicate_and_checkpoint_wrapper_keep_their_signatures():
    from torch.distributed._composable.replicate_with_fsdp import replicate

    params = inspect.signature(replicate).parameters
    assert "mesh" in params, tripped("replicate_with_fsdp.replicate", "replicate along dp under tensor parallel",
                                     f"no mesh parameter ({list(params)})")
    block = nn.Linear(3, 3)
    wrapped = torch_adapter.checkpoint_wrapper(block, preserve_rng_state=True)
    x = torch.randn(2, 3)
    assert torch.equal(wrapped(x), block(x))
    keys = {k.replace("_checkpoint_wrapped_module.", "") for k in wrapped.state_dict()}
    assert keys == set(block.state_dict()), tripped("checkpoint_wrapper", "checkpoint activations per block",
                                                     f"its state_dict keys are {sorted(wrapped.state_dict())}")


def test_no_other_module_imports_a_private_torch_name():
    found = []
    for path in sorted(PLATFORM.rglob("*.py")):
        if path.name == "torch_adapter.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch"):
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("torch")]
            else:
                continue
            found += [f"{path.relative_to(PLATFORM)}: {n}" for n in names
                      if any(part.startswith("_") for part in n.split("."))]
    assert not found, f"private torch names outside shipyard.torch_adapter: {found}"
