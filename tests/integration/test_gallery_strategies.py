"""The jobs/ gallery (cnn, rnn, gan) under every strategy its models allow, on a real 2-process
gloo group through TrainContext (torch.multiprocessing: a Ray cluster adds nothing here; the
Ray path, with kills, is test_bring_your_own_model's).

Correct means what it means in test_parallel.py: the first 20 steps' losses (the GAN's two) equal
those of a single-process reference run within LOSS_ATOL (fp32 reduction order only; see there).
The reference runs one data-parallel step in one process: each rank's batch through the model on
its own (BatchNorm normalises each rank's batch with its own statistics; the GAN draws each
rank's noise from that rank's seed), the mean of the ranks' losses backward, one optimizer step.
After the run both ranks hold one model, bit for bit; under fsdp the CNN's parameters were
shards and its BatchNorm buffers whole, rank 0's, and a run with a rank SIGKILLed mid-way,
run again, resumes to the uninterrupted run's weights bit for bit (the CNN's buffers, both of the
GAN's models; under ddp through `shipyard run`: test_bring_your_own_model.py).

The strategies these models do not allow (tensor and hybrid: none declares a tensor-parallel
plan; pipeline: the CNN has BatchNorm, the others no repeated blocks to cut between; see each job's README) are refused at ctx.prepare
with one line naming the model and what it lacks.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, job_module, train_on_ranks
from test_parallel import assert_losses_match, make_corpus, step_losses

pytestmark = pytest.mark.integration
STEPS, WORLD = 20, 2
LEARNS = {"cnn": 0.2, "rnn": 1.0}  # nats the reference's loss falls in 20 steps, at least
cnn, rnn, gan = job_module("cnn"), job_module("rnn"), job_module("gan")


def batches(data: Path, batch: int):
    """The first STEPS steps' batches, one per data-parallel rank, as TrainContext reads them."""
    from shipyard.data import ShardStream

    streams = [ShardStream(str(data), batch_size=batch, rank=r, world=WORLD, epochs=1) for r in range(WORLD)]
    return islice(zip(*streams), STEPS)


def mean(losses: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(losses).mean()


def cnn_reference(cfg: dict, data: Path, batch: int):
    """Each rank's batch normalised by its own statistics; the running statistics are rank 0's
    (what DDP broadcasts at each forward and the platform before each checkpoint)."""
    torch.manual_seed(0)
    model = cnn.ResNet(cfg["width"], cfg["blocks"])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=1e-4)
    losses = []
    for parts in batches(data, batch):
        per_rank = [F.cross_entropy(model(parts[0]["x"]), parts[0]["y"])]
        rank0 = {k: b.clone() for k, b in model.named_buffers()}
        per_rank += [F.cross_entropy(model(p["x"]), p["y"]) for p in parts[1:]]
        mean(per_rank).backward()
        model.load_state_dict(rank0, strict=False)  # after backward: BatchNorm saved the others for it
        opt.step()
        opt.zero_grad()
        losses.append({"loss": mean(per_rank).item()})
    return losses, model.state_dict()


def rnn_reference(cfg: dict, data: Path, batch: int):
    torch.manual_seed(0)
    model = rnn.CharLSTM(cfg["dim"], cfg["hidden"], cfg["layers"])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"])
    losses = []
    for parts in batches(data, batch):
        loss = mean([rnn.next_token_loss(model(t[:, :-1]), t[:, 1:]) for t in (p["tokens"].long() for p in parts)])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["max_grad_norm"])
        opt.step()
        opt.zero_grad()
        losses.append({"loss": loss.item()})
    return losses, model.state_dict()


def gan_reference(cfg: dict, data: Path, batch: int):
    torch.manual_seed(0)
    g, d = gan.Generator(cfg["noise"], cfg["hidden"]), gan.Discriminator(cfg["hidden"])
    opt_g, opt_d = (torch.optim.Adam(m.parameters(), lr=cfg["lr"], betas=(0.5, 0.999)) for m in (g, d))
    noise = [torch.Generator().manual_seed(1 + r) for r in range(WORLD)]  # train.py: seed + 1 + dp rank
    losses = []
    for parts in batches(data, batch):
        fakes = [g(torch.randn(len(p["x"]), cfg["noise"], generator=n)) for p, n in zip(parts, noise)]
        loss_d = mean([gan.d_loss(d, p["x"], f) for p, f in zip(parts, fakes)])
        loss_d.backward()
        opt_d.step()
        opt_d.zero_grad()
        loss_g = mean([gan.g_loss(d, f) for f in fakes])
        loss_g.backward()
        opt_g.step()
        opt_g.zero_grad()
        opt_d.zero_grad()
        losses.append({"loss": loss_d.item(), "g_loss": loss_g.item()})
    return losses, {**{f"generator.{k}": v for k, v in g.state_dict().items()},
                    **{f"discriminator.{k}": v for k, v in d.state_dict().items()}}


def gan_weights(final: dict) -> dict:
    return {f"{part}.{k}": v for part in ("generator", "discriminator") for k, v in final[part].items()}


@dataclass(frozen=True)
class Job:
    name: str
    config: dict
    batch: int  # rows per rank and step
    data: str  # "digits" or "text": the fixture's rows
    reference: Callable  # (config, data, batch) -> (per-step losses, final state)
    losses: tuple[str, ...] = ("loss",)
    eval: bool = False
    weights: Callable | None = None  # final-rank<r>.pt -> its state, as the reference's; None: none written


JOBS = {
    "cnn": Job("cnn", {"width": 8, "blocks": 2, "lr": 0.003}, 16, "digits", cnn_reference, eval=True,
               weights=lambda final: final["model"]),
    "rnn": Job("rnn", {"dim": 32, "hidden": 64, "layers": 2, "lr": 0.003, "max_grad_norm": 1.0}, 4, "text",
               rnn_reference),
    "gan": Job("gan", {"noise": 8, "hidden": 32, "lr": 0.002}, 16, "digits", gan_reference, ("loss", "g_loss"),
               weights=gan_weights),
}


def first_rows(src: str, dst: Path, rows: int) -> Path:
    """The first ``rows`` rows of a source, sharded as `shipyard data shard` writes them."""
    import pyarrow as pa

    from shipyard.data.sources import Source, open_source
    from shipyard.data.writer import write_dataset

    table = pa.Table.from_batches(list(open_source(src).batches)).slice(0, rows)
    write_dataset(Source("first rows", table.schema, rows, iter(table.to_batches())), str(dst), 300)
    return dst


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """20 steps of rows for each kind of job: digits at 16 rows per rank, text at 4."""
    root = tmp_path_factory.mktemp("gallery")
    return {"digits": first_rows("sklearn:digits:train", root / "digits", STEPS * WORLD * 16),
            "digits-eval": first_rows("sklearn:digits:test", root / "digits-eval", 100),
            "text": make_corpus(root, STEPS * WORLD * 4)}


def spec(job: Job, strategy: dict, data: dict[str, Path], out: Path) -> dict:
    return {"name": job.name, "entrypoint": "train.py:train", "workers": {"count": WORLD}, "strategy": strategy,
            "dataset": {"uri": str(data[job.data]), "batch_size": job.batch, "epochs": 1,
                        **({"eval_uri": str(data["digits-eval"])} if job.eval else {})},
            "checkpoint": {"uri": str(out / "ck"), "every_steps": 7, "keep_last": None},
            "config": {**job.config, "out": str(out)}}


def assert_killed_run_resumes_bit_identical(job: Job, strategy: dict, data: dict[str, Path], clean: Path,
                                            chaos: Path) -> None:
    """Rank 1 SIGKILLed at step 12, the job run again: it resumes from the checkpoint at step 7
    and ends with the weights of the uninterrupted run in ``clean``, bit for bit, on every rank."""
    from torch.multiprocessing.spawn import ProcessException

    chaos.mkdir()
    killed = spec(job, strategy, data, chaos)
    killed["config"]["kills"] = [[12, 1]]
    killed["checkpoint"]["async_upload"] = False  # step 7's checkpoint committed before the kill
    with pytest.raises(ProcessException):  # rank 1's SIGKILL, or rank 0's error at its peer's loss, seen first
        train_on_ranks(WORLD, [(REPO / "jobs" / job.name, killed)])
    assert (chaos / "killed-12").exists()
    train_on_ranks(WORLD, [(REPO / "jobs" / job.name, killed)])  # the kill's marker is there: no second kill
    records = [json.loads(line)["step"] for line in (chaos / "rank1.jsonl").read_text().splitlines()]
    assert records == [*range(1, 13), *range(8, STEPS + 1)]  # killed after 12, resumed at 8
    for r in range(WORLD):
        want, got = (job.weights(torch.load(out / f"final-rank{r}.pt")) for out in (clean, chaos))
        for k, v in want.items():
            assert torch.equal(got[k], v), f"rank {r}: {k} differs from the uninterrupted run"


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("name", list(JOBS))
def test_gallery_job_matches_single_process_reference(data, tmp_path, name, strategy):
    """20 steps against the reference; the ranks end with one model; under fsdp, for the jobs
    that write their weights (the CNN's buffers, the GAN's two models), a killed run resumes
    to this run's weights."""
    job = JOBS[name]
    clean = tmp_path / "clean"
    clean.mkdir()
    train_on_ranks(WORLD, [(REPO / "jobs" / name, spec(job, {"kind": strategy}, data, clean))])
    expected, reference_state = job.reference(job.config, data[job.data], job.batch)
    assert len(expected) == STEPS
    for key in job.losses:
        assert_losses_match(step_losses(clean, [0, 1], key), [e[key] for e in expected], range(1, STEPS + 1))
    if name in LEARNS:  # (a GAN's two losses chase each other: no such bound)
        assert expected[-1]["loss"] < expected[0]["loss"] - LEARNS[name], (expected[0], expected[-1])

    if job.weights is None:
        return
    finals = [torch.load(clean / f"final-rank{r}.pt") for r in range(WORLD)]
    assert finals[0]["step"] == finals[1]["step"] == STEPS
    ended = [job.weights(f) for f in finals]
    assert ended[0].keys() == reference_state.keys()
    for k, v in ended[0].items():
        assert torch.equal(ended[1][k], v), f"{k}: rank 1 ends with a different model"
    if name == "cnn":
        buffers = {k for k in reference_state if k.rsplit(".", 1)[-1].startswith(("running_", "num_batches"))}
        assert len(buffers) == 15  # 5 BatchNorms x mean, var, count
        # fsdp shards the parameters; the buffers stay whole on every rank (DDP holds nothing sharded)...
        assert finals[0]["sharded"] == (sorted(set(reference_state) - buffers) if strategy == "fsdp" else [])
        # ...and they are rank 0's statistics: the reference's, which only rank 0's batches update.
        for k in buffers:
            assert torch.allclose(ended[0][k].float(), reference_state[k].float(), atol=1e-4), k
    if strategy == "fsdp":  # (under ddp through `shipyard run` on Ray: test_bring_your_own_model.py)
        assert_killed_run_resumes_bit_identical(job, {"kind": strategy}, data, clean, tmp_path / "chaos")


REFUSED = {  # job -> strategy -> what the one line says
    "cnn": {"tensor": "ResNet declares no tensor-parallel plan", "hybrid": "ResNet declares no tensor-parallel plan",
            "pipeline": "ResNet.stem.1 is a BatchNorm"},
    "rnn": {"tensor": "CharLSTM declares no tensor-parallel plan", "hybrid": "CharLSTM declares no tensor-parallel plan",
            "pipeline": "CharLSTM declares no pipeline_split_points"},
    "gan": {"tensor": "Generator declares no tensor-parallel plan", "hybrid": "Generator declares no tensor-parallel plan",
            "pipeline": "Generator declares no pipeline_split_points"},
}
STRATEGIES = {"tensor": {"kind": "tensor", "tp": 2}, "hybrid": {"kind": "hybrid", "tp": 2, "dp_shard": 1},
              "pipeline": {"kind": "pipeline", "stages": 2, "microbatches": 2}}


def test_strategies_the_models_do_not_allow_are_refused_in_one_line(data, tmp_path):
    """Every (job, strategy) of REFUSED in one 2-rank group (a spawn costs more than a refusal)."""
    runs = [(job, strategy) for job in REFUSED for strategy in REFUSED[job]]
    errors = tmp_path / "errors"
    errors.mkdir()
    train_on_ranks(WORLD, [(REPO / "jobs" / job, spec(JOBS[job], STRATEGIES[s], data, tmp_path / f"{job}-{s}"))
                           for job, s in runs], errors=errors)
    for i, (job, strategy) in enumerate(runs):
        for r in range(WORLD):
            line = (errors / f"{i}-rank{r}.txt").read_text()
            assert REFUSED[job][strategy] in line and "\n" not in line, (job, strategy, line)
