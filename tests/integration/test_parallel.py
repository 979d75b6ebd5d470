"""Model-parallel strategies on the jobs/lm transformer: real `shipyard run` on the session's Ray
cluster (2 CPU workers, gloo) for each strategy family, plus 4-rank meshes (hybrid FSDP x TP,
TP with data-parallel replicas) in torch.multiprocessing where a Ray cluster adds nothing.

What "correct" means here: the first 20 steps' losses match a single-process reference run of
the same model (same seed), the same data (the same rows per step, concatenated across
data-parallel ranks) and the same optimizer with torch's own clip_grad_norm_. The distributed
loss of a step is the mean of the data-parallel ranks' losses, which for equal batch sizes is
the mean over the global batch, exactly what the reference computes.

Tolerance, LOSS_ATOL = 1e-4 (absolute, on losses of 3.5 to 6 nats, fp32 on CPU): the runs differ
from the reference only in the order of floating-point reductions (gradient all-reduce of two
halves vs one sum over the batch; a TP matmul's partial sums added by an all-reduce; microbatch
gradients accumulated in the pipeline; the clip norm summed per shard). Each such difference is a
few fp32 ulps (~1e-7 relative) per step; over 20 AdamW steps we observe at most ~1e-6. 1e-4
leaves two orders of magnitude for other machines' BLAS kernels, while what the test is for --
a rank reading the wrong rows, replicas not synchronised, gradients mis-scaled by the microbatch
count, a clip norm missing a shard -- moves the loss by 1e-2 or more within the first steps.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, job_module, train_on_ranks

pytestmark = pytest.mark.integration
JOB = str(REPO / "jobs" / "lm" / "job.yaml")
_model = job_module("lm")
LM, LMConfig, next_token_loss = _model.LM, _model.LMConfig, _model.next_token_loss

LOSS_ATOL = 1e-4
MODEL = {"context": 32, "dim": 64, "layers": 4, "heads": 4, "lr": 1e-3, "max_grad_norm": 1.0, "weight_decay": 0.0}
GLOBAL_BATCH = 8   # rows per step over all data-parallel ranks
ROWS = 160         # 20 steps per epoch at every data-parallel width
CORPUS = Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "json" / "decoder.py"


def make_corpus(root: Path, rows: int) -> Path:
    """``rows`` rows of 33 bytes of real Python source (the stdlib's json/decoder.py), sharded with
    the `text:` source exactly as `shipyard data shard` writes it."""
    from shipyard.data.sources import open_source
    from shipyard.data.writer import write_dataset

    src = root / "src"
    src.mkdir()
    text = CORPUS.read_bytes() if CORPUS.exists() else Path(__file__).read_bytes()
    (src / "a.py").write_bytes(text[:rows * (MODEL["context"] + 1)])
    data = root / "data"
    manifest = write_dataset(open_source(f"text:{src}/*.py:block={MODEL['context'] + 1}"), str(data), 64)
    assert manifest.rows == rows
    return data


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("lm"), ROWS)


def reference_losses(data: Path, dp: int, epochs: int, build=lambda cfg: LM(LMConfig.from_dict(cfg)),
                     loss_fn=next_token_loss) -> list[float]:
    """One process, no torch.distributed: the job's model (``build(MODEL)``, jobs/lm's by default)
    and optimizer on the rows each step's data-parallel ranks read together (ShardStream with
    the same rank/world arithmetic)."""
    from shipyard.data import ShardStream

    torch.manual_seed(0)
    model = build(MODEL)
    opt = torch.optim.AdamW(model.parameters(), lr=MODEL["lr"], betas=(0.9, 0.95), weight_decay=0.0)
    streams = [ShardStream(str(data), batch_size=GLOBAL_BATCH // dp, rank=r, world=dp, epochs=epochs)
               for r in range(dp)]
    losses = []
    for parts in zip(*streams):
        tokens = torch.cat([p["tokens"] for p in parts]).long()
        loss = loss_fn(model(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MODEL["max_grad_norm"])
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def step_losses(out: Path, ranks: list[int], key: str = "loss") -> dict[int, float]:
    """Step -> mean over the given (data-parallel) ranks of the loss (``key``) each reported (last
    record of a step wins: a resumed run appends after the first run's records)."""
    per_rank = []
    for r in ranks:
        by_step = {}
        for line in (out / f"rank{r}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            by_step[rec["step"]] = rec[key]
        per_rank.append(by_step)
    return {s: sum(d[s] for d in per_rank) / len(per_rank) for s in per_rank[0]}


def assert_losses_match(got: dict[int, float], expected: list[float], steps: range) -> None:
    assert sorted(got) == list(steps), sorted(got)
    for s in steps:
        assert abs(got[s] - expected[s - 1]) <= LOSS_ATOL, (s, got[s], expected[s - 1])


def shipyard_run(shipyard, ray_address, data, out, ckpt, strategy: list[str], *, workers=2, dp=2, epochs=1):
    sets = {"dataset.uri": data, "dataset.batch_size": GLOBAL_BATCH // dp, "dataset.epochs": epochs,
            "workers.count": workers, "checkpoint.uri": ckpt, "checkpoint.every_steps": 10,
            "checkpoint.keep_last": "null", "config.out": out, **{f"config.{k}": v for k, v in MODEL.items()}}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    args += [a for s in strategy for a in ("--set", s)]
    r = shipyard("run", JOB, *args, env={"RAY_ADDRESS": ray_address})
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return r.stdout


# -- real `shipyard run`, one per strategy family --------------------------------------------

def test_fsdp_matches_reference_shards_memory_and_resumes_under_ddp(shipyard, ray_address, corpus, tmp_path):
    out, ckpt = tmp_path / "out", tmp_path / "ck"
    out.mkdir()
    shipyard_run(shipyard, ray_address, corpus, out, ckpt, ["strategy.kind=fsdp"])
    expected = reference_losses(corpus, dp=2, epochs=2)
    assert_losses_match(step_losses(out, [0, 1]), expected, range(1, 21))

    # Per-rank parameter memory ~ 1/world of the model: FSDP2 pads each tensor's dim 0 to a
    # multiple of world, so a rank may hold a few rows more than an exact half.
    for r in (0, 1):
        p = json.loads((out / f"params-rank{r}.json").read_text())
        assert p["full"] / 2 <= p["local"] <= p["full"] / 2 * 1.01, p

    # FSDP-saved (DTensor shards) -> DDP-loaded (whole tensors): DCP reshards on load; the run
    # continues exactly where the FSDP run stopped.
    stdout = shipyard_run(shipyard, ray_address, corpus, out, ckpt, ["strategy.kind=ddp"], epochs=2)
    assert "restored from checkpoint at step 20" in stdout
    assert_losses_match(step_losses(out, [0, 1]), expected, range(1, 41))


def test_tensor_parallel_matches_reference_and_tp2_resumes_at_tp1(shipyard, ray_address, corpus, tmp_path):
    out, ckpt = tmp_path / "out", tmp_path / "ck"
    out.mkdir()
    shipyard_run(shipyard, ray_address, corpus, out, ckpt, ["strategy.kind=tensor", "strategy.tp=2"], dp=1)
    expected = reference_losses(corpus, dp=1, epochs=2)
    losses = step_losses(out, [0])
    assert_losses_match(losses, expected, range(1, 21))
    assert step_losses(out, [1]) == losses  # a TP peer reports the same loss: it read the same batches

    stdout = shipyard_run(shipyard, ray_address, corpus, out, ckpt, ["strategy.kind=tensor", "strategy.tp=1"],
                          workers=1, dp=1, epochs=2)
    assert "restored from checkpoint at step 20" in stdout
    assert_losses_match(step_losses(out, [0]), expected, range(1, 41))


def test_pipeline_two_stages_matches_reference_and_resumes(shipyard, ray_address, corpus, tmp_path):
    out, ckpt = tmp_path / "out", tmp_path / "ck"
    out.mkdir()
    pipe = ["strategy.kind=pipeline", "strategy.stages=2", "strategy.microbatches=4"]
    shipyard_run(shipyard, ray_address, corpus, out, ckpt, [*pipe, "strategy.schedule=1f1b"], dp=1)
    expected = reference_losses(corpus, dp=1, epochs=2)
    assert_losses_match(step_losses(out, [0]), expected, range(1, 21))
    assert_losses_match(step_losses(out, [1]), expected, range(1, 21))  # the loss reaches every stage
    # Each stage holds its part only, and the two parts are the whole model.
    held = [json.loads((out / f"params-rank{r}.json").read_text()) for r in (0, 1)]
    assert held[0]["local"] + held[1]["local"] == held[0]["full"] and min(h["local"] for h in held) > 0

    # The stages' checkpoints together are the model's: the other schedule resumes from them.
    stdout = shipyard_run(shipyard, ray_address, corpus, out, ckpt, [*pipe, "strategy.schedule=gpipe"],
                          dp=1, epochs=2)
    assert "restored from checkpoint at step 20" in stdout
    assert_losses_match(step_losses(out, [0]), expected, range(1, 41))


# -- 4-rank meshes, torch.multiprocessing ----------------------------------------------------

def run_ranks(world, strategy, data, out, ckpt, epochs=1, job=REPO / "jobs" / "lm"):
    """``train(ctx)`` of ``job``'s train.py on ``world`` ranks (jobs/lm's model is importable)."""
    dp = world // strategy.get("tp", 1) // strategy.get("stages", strategy.get("pp", 1))
    train_on_ranks(world, [([job, REPO / "jobs" / "lm"], {
        "name": "lm", "entrypoint": "train.py:train", "workers": {"count": world}, "strategy": strategy,
        "dataset": {"uri": str(data), "batch_size": GLOBAL_BATCH // dp, "epochs": epochs},
        "checkpoint": {"uri": str(ckpt), "every_steps": 10, "keep_last": None},
        "config": {**MODEL, "out": str(out)}})])


@pytest.mark.parametrize("strategy", [
    {"kind": "hybrid", "dp_shard": 2, "tp": 2, "activation_checkpoint": True},
    {"kind": "tensor", "tp": 2},  # two TP groups as data-parallel replicas
], ids=["hybrid-fsdp2xtp2-ac", "tensor-tp2xdp2"])
def test_four_rank_meshes_match_reference(corpus, tmp_path, strategy):
    out, ckpt = tmp_path / "out", tmp_path / "ck"
    out.mkdir()
    run_ranks(4, strategy, corpus, out, ckpt)
    expected = reference_losses(corpus, dp=2, epochs=2)
    # Mesh (dp, tp): ranks 0,1 are dp rank 0; ranks 2,3 dp rank 1.
    assert_losses_match(step_losses(out, [0, 2]), expected, range(1, 21))
    assert step_losses(out, [1]) == step_losses(out, [0])
    if strategy["kind"] == "hybrid":
        # A 4-rank 2-D (dp x tp) checkpoint resumes on 2 ranks of plain FSDP (DCP reshards).
        resumed = tmp_path / "resumed"
        resumed.mkdir()
        run_ranks(2, {"kind": "fsdp"}, corpus, resumed, ckpt, epochs=2)
        assert_losses_match(step_losses(resumed, [0, 1]), expected, range(21, 41))


def test_pipeline_runs_a_short_last_batch_whole_and_matches_reference(tmp_path):
    """165 rows in batches of 8: each epoch ends with a batch of 5, fewer rows than the 4
    microbatches need to be equal (5 is prime: one microbatch, under GPipe since 1F1B needs one
    per stage); it runs whole on both stages and its loss is the reference's, as the next
    epoch's steps are."""
    data = make_corpus(tmp_path, 165)
    out, ckpt = tmp_path / "out", tmp_path / "ck"
    out.mkdir()
    run_ranks(2, {"kind": "pipeline", "stages": 2, "microbatches": 4, "schedule": "1f1b"}, data, out, ckpt, epochs=2)
    expected = reference_losses(data, dp=1, epochs=2)
    assert len(expected) == 42  # 20 full batches and the short one, twice
    assert_losses_match(step_losses(out, [0]), expected, range(1, 43))
    assert step_losses(out, [1]) == step_losses(out, [0])  # the loss reaches every stage


def test_custom_strategy_runs_the_jobs_own_fsdp_matches_reference_and_resumes(corpus, tmp_path):
    """kind: custom applies nothing: the job shards the model itself on ctx.mesh["dp"]. Its losses
    are the reference's (so the data is split over dp and the gradients are reduced), and a second
    run resumes from the DCP checkpoint of the job's own FSDP modules at step 20."""
    job = REPO / "tests" / "integration" / "jobs" / "custom_fsdp"
    out, ckpt = tmp_path / "out", tmp_path / "ck"
    out.mkdir()
    run_ranks(2, {"kind": "custom"}, corpus, out, ckpt, job=job)
    expected = reference_losses(corpus, dp=2, epochs=2)
    assert_losses_match(step_losses(out, [0, 1]), expected, range(1, 21))
    assert all(json.loads(line)["sharded"] for line in (out / "rank0.jsonl").read_text().splitlines())
    run_ranks(2, {"kind": "custom"}, corpus, out, ckpt, epochs=2, job=job)
    steps = [json.loads(line)["step"] for line in (out / "rank0.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 41)), steps  # the second run began at step 21: it resumed
    assert_losses_match(step_losses(out, [0, 1]), expected, range(1, 41))
