"""Horovod inside Ray Train V2 TorchTrainer workers (shipyard.parallel.horovod), 2 CPU ranks over Gloo.

The workers are started by a plain TorchTrainer on the session's Ray head, as the launcher does
for every strategy; each rank writes what it saw to a JSON file and the assertions run here, so a
failure shows both ranks' numbers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Skip only when Horovod is absent: an installed Horovod that fails to import must fail the tests.
needs_horovod = pytest.mark.skipif(importlib.util.find_spec("horovod") is None,
                                   reason="horovod is not installed; run `bash deploy/horovod.sh` to build and install it")

LR = 0.1
ROWS = 8  # per rank


def rank_data(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each rank's own batch, different per rank, reproducible here for the expected values."""
    g = torch.Generator().manual_seed(1000 + rank)
    return torch.randn(ROWS, 3, generator=g), torch.randn(ROWS, generator=g)


def _write(out: str, rank: int, record: dict) -> None:
    Path(out, f"rank-{rank}.json").write_text(json.dumps(record))


def _one_step(config: dict) -> None:
    import torch.distributed as dist

    import horovod.torch as hvd
    from shipyard.parallel import horovod

    rank = dist.get_rank()
    torch.manual_seed(0)
    model, opt = horovod.apply_horovod(torch.nn.Linear(3, 1), torch.device("cpu"),
                                       lambda params: torch.optim.SGD(params, lr=LR))
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    x, y = rank_data(rank)
    loss = ((model(x).squeeze(1) - y) ** 2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    _write(config["out"], rank, {
        "hvd": [hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size()],
        "w0": w0.tolist(), "b0": b0.tolist(),
        "grad_w": model.weight.grad.tolist(), "grad_b": model.bias.grad.tolist(),
        "w": model.weight.detach().tolist(), "b": model.bias.detach().tolist(),
    })
    horovod.shutdown()


def _different_seeds(config: dict) -> None:
    import torch.distributed as dist

    from shipyard.parallel import horovod

    rank = dist.get_rank()
    torch.manual_seed(100 + rank)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    model[1].running_mean.fill_(float(rank + 1))  # buffers must come from rank 0 too
    before = {k: v.tolist() for k, v in model.state_dict().items()}
    # AdamW with weight decay: an optimizer-state initialisation step would move the parameters.
    model, _ = horovod.apply_horovod(model, torch.device("cpu"),
                                     lambda params: torch.optim.AdamW(params, lr=0.1, weight_decay=0.5))
    after = {k: v.tolist() for k, v in model.state_dict().items()}
    _write(config["out"], rank, {"before": before, "after": after})
    horovod.shutdown()


def run_on_two_ranks(fn, ray_address: str, tmp_path: Path) -> list[dict]:
    """Run ``fn`` on 2 TorchTrainer workers from a driver subprocess (this file as a script).

    A subprocess, like the other integration tests' drivers: Ray reads its token-auth mode at
    import, which must happen after RAY_ADDRESS is known (``enable_ray_token_auth``), and this
    pytest process stays free of a Ray connection. Run as ``__main__``, the worker functions
    travel to the workers by value.
    """
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "RAY_ADDRESS": ray_address, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, __file__, fn.__name__, str(out), str(tmp_path / "ray")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"driver failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in range(2)]


def _drive(fn_name: str, out: str, storage: str) -> None:
    from shipyard.config import enable_ray_token_auth

    enable_ray_token_auth()  # before ray is imported
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    TorchTrainer(globals()[fn_name], train_loop_config={"out": out},
                 torch_config=TorchConfig(backend="gloo"),
                 scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(name=fn_name.strip("_"), storage_path=storage)).fit()
    ray.shutdown()


def test_slot_layout_matches_horovods_topology():
    from shipyard.parallel.horovod import slot_layout

    # ranks 0, 1, 3 on node a; 2 on node b (Ray Train may interleave nodes)
    slots = slot_layout(["a", "a", "b", "a"])
    assert [(s.rank, s.local_rank, s.local_size, s.cross_rank, s.cross_size) for s in slots] == [
        (0, 0, 3, 0, 2), (1, 1, 3, 0, 1), (2, 0, 1, 1, 2), (3, 2, 3, 0, 1)]
    assert {s.size for s in slots} == {4}


@pytest.mark.integration
@needs_horovod
def test_gradients_are_averaged_across_ranks(ray_address, tmp_path):
    ranks = run_on_two_ranks(_one_step, ray_address, tmp_path)
    assert [r["hvd"] for r in ranks] == [[0, 2, 0, 2], [1, 2, 1, 2]]

    w0, b0 = torch.tensor(ranks[0]["w0"]), torch.tensor(ranks[0]["b0"])
    local = []
    for rank in range(2):  # d/dw mean((xw + b - y)^2) = 2/n x^T r,  d/db = 2/n sum(r)
        x, y = rank_data(rank)
        residual = x @ w0[0] + b0 - y
        local.append((2 / ROWS * residual @ x, 2 / ROWS * residual.sum()))
    assert not torch.allclose(local[0][0], local[1][0]), "the ranks' own gradients should differ"
    mean_w = (local[0][0] + local[1][0]) / 2
    mean_b = (local[0][1] + local[1][1]) / 2

    for r in ranks:
        assert torch.equal(torch.tensor(r["w0"]), w0) and torch.equal(torch.tensor(r["b0"]), b0)
        torch.testing.assert_close(torch.tensor(r["grad_w"])[0], mean_w)
        torch.testing.assert_close(torch.tensor(r["grad_b"])[0], mean_b)
        torch.testing.assert_close(torch.tensor(r["w"])[0], w0[0] - LR * mean_w)
        torch.testing.assert_close(torch.tensor(r["b"]), b0 - LR * mean_b)


@pytest.mark.integration
@needs_horovod
def test_initial_state_comes_from_rank_zero(ray_address, tmp_path):
    ranks = run_on_two_ranks(_different_seeds, ray_address, tmp_path)
    before0, before1 = ranks[0]["before"], ranks[1]["before"]
    assert before0["0.weight"] != before1["0.weight"], "different seeds should build different models"
    assert before0["1.running_mean"] != before1["1.running_mean"]
    for r in ranks:
        assert r["after"] == before0  # exactly rank 0's parameters and buffers, untouched by any step


if __name__ == "__main__":
    _drive(*sys.argv[1:])
