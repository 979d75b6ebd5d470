"""jobs/rnn (a byte-level LSTM) under ddp on a real 2-process gloo group, through TrainContext:
the first 20 steps' losses match a single-process run on the same rows (both ranks' batches
concatenated), and fall. Tolerance as in test_parallel.py (fp32 reduction order only)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, free_port, job_module

pytestmark = pytest.mark.integration
_model = job_module("rnn")
CharLSTM, next_token_loss = _model.CharLSTM, _model.next_token_loss

MODEL = {"dim": 32, "hidden": 64, "layers": 2, "lr": 0.003, "max_grad_norm": 1.0}
CONTEXT, BATCH, ROWS = 32, 4, 160  # 4 rows per rank: 20 steps
LOSS_ATOL = 1e-4
CORPUS = Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "json" / "decoder.py"


def make_corpus(root: Path) -> Path:
    from shipyard.data.sources import open_source
    from shipyard.data.writer import write_dataset

    src = root / "src"
    src.mkdir()
    text = CORPUS.read_bytes() if CORPUS.exists() else Path(__file__).read_bytes()
    (src / "a.py").write_bytes(text[:ROWS * (CONTEXT + 1)])
    data = root / "data"
    assert write_dataset(open_source(f"text:{src}/*.py:block={CONTEXT + 1}"), str(data), 64).rows == ROWS
    return data


def _rank(rank, port, data, out, ckpt):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        import train
        from shipyard.runtime.context import TrainContext
        from shipyard.spec import spec_from_dict

        spec = spec_from_dict({
            "name": "rnn", "entrypoint": "train.py:train", "workers": {"count": 2}, "strategy": {"kind": "ddp"},
            "dataset": {"uri": data, "batch_size": BATCH, "epochs": 1},
            "checkpoint": {"uri": ckpt, "every_steps": 10}, "config": {**MODEL, "out": out}})
        ctx = TrainContext(spec, rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"))
        train.train(ctx)
        ctx.close()
    finally:
        dist.destroy_process_group()


def reference_losses(data: Path) -> list[float]:
    from shipyard.data import ShardStream

    torch.manual_seed(0)
    model = CharLSTM(MODEL["dim"], MODEL["hidden"], MODEL["layers"])
    opt = torch.optim.AdamW(model.parameters(), lr=MODEL["lr"])
    streams = [ShardStream(str(data), batch_size=BATCH, rank=r, world=2, epochs=1) for r in range(2)]
    losses = []
    for parts in zip(*streams):
        tokens = torch.cat([p["tokens"] for p in parts]).long()
        loss = next_token_loss(model(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MODEL["max_grad_norm"])
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_rnn_under_ddp_matches_single_process_reference(tmp_path):
    import torch.multiprocessing as mp

    data, out = make_corpus(tmp_path), tmp_path / "out"
    out.mkdir()
    mp.spawn(_rank, args=(free_port(), str(data), str(out), str(tmp_path / "ck")), nprocs=2)
    per_rank = [{json.loads(line)["step"]: json.loads(line)["loss"]
                 for line in (out / f"rank{r}.jsonl").read_text().splitlines()} for r in (0, 1)]
    expected = reference_losses(data)
    assert len(expected) == 20 and sorted(per_rank[0]) == list(range(1, 21))
    for s in range(1, 21):
        got = (per_rank[0][s] + per_rank[1][s]) / 2
        assert abs(got - expected[s - 1]) <= LOSS_ATOL, (s, got, expected[s - 1])
    assert expected[-1] < expected[0] - 1.0  # from ~5.5 nats (uniform over 256 bytes) down
