"""shipyard.parallel.hf_adapter: what shipyard reads of transformers, checked on transformers'
own models. A failure names what changed: fix platform/shipyard/parallel/hf_adapter.py (and only
it), then the transformers pin in pyproject.toml."""

from __future__ import annotations

import pytest
from torch import nn

from shipyard.parallel import hf_adapter

transformers = pytest.importorskip("transformers", reason="transformers is an optional extra (pip install 'shipyard[hf]')")


def llama():
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=100, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config)


def gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100))


def test_a_llama_states_its_plans_and_blocks():
    model = llama()
    assert hf_adapter.is_hf(model)
    plan = hf_adapter.tp_plan(model)
    assert plan.get("model.layers.*.self_attn.q_proj") == "colwise", f"transformers' tp_plan changed: {plan}"
    assert plan.get("model.layers.*.mlp.down_proj") == "rowwise", f"transformers' tp_plan changed: {plan}"
    assert set(hf_adapter.pp_plan(model)) == {"model.embed_tokens", "model.layers", "model.norm", "lm_head"}, \
        f"transformers' pp_plan changed: {hf_adapter.pp_plan(model)}"
    assert hf_adapter.block_classes(model) == {"LlamaDecoderLayer"}, "transformers' _no_split_modules changed"


def test_gpt2_has_blocks_but_no_pipeline_plan():
    model = gpt2()
    assert hf_adapter.block_classes(model) == {"GPT2Block"}
    assert hf_adapter.pp_plan(model) == []  # so pipeline refuses it (its forward adds position embeddings)


def test_a_plain_torch_model_is_none_of_it():
    model = nn.Sequential(nn.Linear(2, 2))
    assert not hf_adapter.is_hf(model)
    assert hf_adapter.tp_plan(model) == {} and hf_adapter.pp_plan(model) == [] and hf_adapter.block_classes(model) == set()
