"""A Hugging Face model as it comes (jobs/hf_lm: LlamaForCausalLM from a small LlamaConfig, no
tp_plan() or layers of shipyard's) under fsdp and tensor parallel at world 2: its first 20
losses match a single-process reference run of the same model on the same rows, within
test_parallel's LOSS_ATOL (see there for why 1e-4). FSDP shards each decoder layer (found through
_no_split_modules); tensor parallel uses transformers' own plan, translated."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import REPO
from test_parallel import assert_losses_match, make_corpus, reference_losses, run_ranks, step_losses

pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")
pytestmark = pytest.mark.integration
JOB = REPO / "jobs" / "hf_lm"
sys.path.insert(0, str(JOB))
from hf_model import build, next_token_loss  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("hf"), 160)


@pytest.mark.parametrize("strategy", [{"kind": "fsdp"}, {"kind": "tensor", "tp": 2}], ids=["fsdp", "tensor-tp2"])
def test_hf_llama_matches_reference(corpus, tmp_path, strategy):
    out = tmp_path / "out"
    out.mkdir()
    run_ranks(2, strategy, corpus, out, tmp_path / "ck", job=JOB)
    dp = 2 // strategy.get("tp", 1)
    expected = reference_losses(corpus, dp=dp, epochs=1, build=build, loss_fn=next_token_loss)
    assert_losses_match(step_losses(out, list(range(0, 2, 2 // dp))), expected, range(1, 21))
    held = json.loads((out / "params-rank0.json").read_text())
    if strategy["kind"] == "fsdp":
        # Each decoder layer is its own FSDP unit, then the root; a rank holds about half.
        assert held["units"] == ["", *(f"model.layers.{i}" for i in range(4))], held["units"]
        assert held["full"] / 2 <= held["local"] <= held["full"] / 2 * 1.01, held
    else:
        assert step_losses(out, [1]) == step_losses(out, [0])  # TP peers read the same rows
        # Embedding, attention, MLP and lm_head are split; only the norms stay whole.
        assert held["full"] / 2 < held["local"] < held["full"] / 2 * 1.01, held
    steps = [json.loads(line)["step"] for line in (out / "rank0.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 21))
