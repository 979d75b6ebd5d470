"""What needs a CUDA device: NCCL collectives (one rank), the checkpoint's CUDA staging (pinned,
non-blocking device-to-host copies) restored bit for bit, and FSDP2's bf16 compute.

Collected only by tests/gpu/proof.py (``pytest tests/gpu -m gpu``): the suite's testpaths leave
tests/gpu out. Without a CUDA device every test is skipped with the reason "no CUDA device".
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def nccl():
    """A 1-rank NCCL default process group on cuda:0, as a job with ``workers.gpus: 1`` has."""
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                            device_id=device)
    yield device
    dist.destroy_process_group()


def test_nccl_collectives_on_one_rank(nccl):
    assert dist.get_backend() == "nccl"
    x = torch.arange(1 << 20, device=nccl, dtype=torch.float32)
    dist.all_reduce(x)
    torch.testing.assert_close(x, torch.arange(1 << 20, device=nccl, dtype=torch.float32))
    y = torch.full((4096,), 1.5, device=nccl, dtype=torch.bfloat16)
    dist.all_reduce(y, op=dist.ReduceOp.MAX)
    assert y.dtype == torch.bfloat16 and bool((y == 1.5).all())
    gathered = [torch.empty(8, device=nccl)]
    dist.all_gather(gathered, torch.ones(8, device=nccl))
    assert gathered[0].sum().item() == 8
    torch.cuda.synchronize()


def _job(seed: int, device):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(4)]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _train_step(model, opt)  # creates the optimizer state (exp_avg, exp_avg_sq on the GPU)
    return model, opt


def _train_step(model, opt) -> None:
    opt.zero_grad(set_to_none=True)
    model(torch.randn(8, 1024, device=next(model.parameters()).device)).square().mean().backward()
    opt.step()


def _host_copy(model, opt) -> tuple[dict, dict]:
    params = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    state = {i: {k: (v.to("cpu", copy=True) if torch.is_tensor(v) else v) for k, v in s.items()}
             for i, s in opt.state_dict()["state"].items()}
    return params, state


@pytest.mark.parametrize("async_upload", [True, False], ids=["async", "sync"])
def test_checkpoint_round_trip_from_cuda(nccl, tmp_path, async_upload):
    """Saved on the GPU, training on at once (the async copy races the next optimizer steps
    unless the pre-step hook waits for it), restored into another model: the saved step's
    values come back exactly, not the ones after it."""
    from shipyard.checkpoint import CheckpointStore
    from shipyard.checkpoint import dcp as ckpt
    from shipyard.checkpoint.saver import Checkpointer

    model, opt = _job(0, nccl)
    store = CheckpointStore(str(tmp_path / "ck"))
    committed = []
    saver = Checkpointer(store, strategy="ddp", keep_last=2, async_upload=async_upload, on_commit=committed.append)
    want_params, want_state = _host_copy(model, opt)
    saver.save(step=1, epoch=0, model=model, optimizer=opt, data_state={"step": 1})
    for _ in range(3):
        _train_step(model, opt)
    saver.close()
    assert [c.record.step for c in committed] == [1]
    assert not torch.equal(model[0].weight.detach().cpu(), want_params["0.weight"])  # it did train on

    fresh, fresh_opt = _job(1, nccl)
    assert not torch.equal(fresh[0].weight.detach().cpu(), want_params["0.weight"])
    rank_state = ckpt.restore(store, store.latest(), model=fresh, optimizer=fresh_opt)
    assert rank_state["data"] == {"step": 1}
    got_params, got_state = _host_copy(fresh, fresh_opt)
    assert got_params.keys() == want_params.keys()
    for k, v in want_params.items():
        assert torch.equal(got_params[k], v), k
    assert fresh[0].weight.device.type == "cuda"
    for i, s in want_state.items():
        for k, v in s.items():
            assert torch.equal(got_state[i][k], v) if torch.is_tensor(v) else got_state[i][k] == v, (i, k)


def test_fsdp_bf16_computes_in_bf16_and_keeps_fp32_weights(nccl):
    sys.path.insert(0, str(REPO / "jobs" / "lm"))
    from model import LM, LMConfig, next_token_loss

    from shipyard.parallel import STRATEGIES
    from shipyard.spec import FSDPStrategy

    torch.manual_seed(0)
    model, opt = STRATEGIES["fsdp"](LM(LMConfig.from_dict({"context": 64, "dim": 128, "layers": 2, "heads": 4})),
                                    nccl, lambda p: torch.optim.AdamW(p, lr=1e-3), FSDPStrategy(mixed_precision="bf16"))
    tokens = torch.randint(0, 256, (8, 65), device=nccl)
    losses = []
    for _ in range(5):
        logits = model(tokens[:, :-1])
        assert logits.dtype == torch.bfloat16
        loss = next_token_loss(logits, tokens[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
