"""Where FSDP and activation checkpointing find a model's repeated blocks (parallel/model.py),
on models as they come: Hugging Face ones built from a config (no download), a torchvision-style
ResNet, plain and torchtitan-style containers, an explicit strategy.blocks; and the tensor-parallel
plan translated from a Hugging Face model's own."""

from __future__ import annotations

import logging

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from shipyard.errors import UserError
from shipyard.parallel.activation_checkpoint import apply_activation_checkpoint
from shipyard.parallel.model import blocks, tp_plan
from shipyard.spec import FSDPStrategy

transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")


def names(model, strategy=None):
    return [n for n, _ in blocks(model, strategy)]


def llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=128, use_cache=False))


def test_hugging_face_models_blocks_are_their_no_split_module_layers():
    assert names(llama()) == ["model.layers.0", "model.layers.1"]
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=128, n_positions=64))
    assert names(gpt2) == ["transformer.h.0", "transformer.h.1", "transformer.h.2"]
    bert = transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                          intermediate_size=64, vocab_size=128))
    assert names(bert) == ["encoder.layer.0", "encoder.layer.1"]


class Bottleneck(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.conv(x)


class ResNet(nn.Module):
    """torchvision's layout: stem, then stages layer1..layer4 (each a Sequential of blocks), head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        for i in range(1, 5):
            setattr(self, f"layer{i}", nn.Sequential(Bottleneck(8), Bottleneck(8)))
        self.fc = nn.Linear(8, 10)


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.ModuleList([nn.Linear(4, 2)])                    # small, one type
        self.trunk = nn.ModuleList([nn.Linear(16, 16) for _ in range(3)])  # the largest: the blocks
        self.mixed = nn.ModuleList([nn.Linear(64, 64), nn.ReLU()])       # not one type


class Titan(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleDict({str(i): nn.Linear(4, 4) for i in range(3)})
        self.stack = nn.ModuleList([nn.Linear(64, 64) for _ in range(4)])
        self.norm = nn.LayerNorm(4)


def test_torchvision_plain_and_torchtitan_layouts():
    assert names(ResNet()) == ["layer1", "layer2", "layer3", "layer4"]
    assert names(Plain()) == ["trunk.0", "trunk.1", "trunk.2"]
    assert names(Titan()) == ["layers.0", "layers.1", "layers.2"]  # model.layers before any search


def test_strategy_blocks_overrides_and_a_bad_path_is_named():
    assert names(Titan(), FSDPStrategy(blocks="stack")) == [f"stack.{i}" for i in range(4)]
    with pytest.raises(UserError, match=r"strategy.blocks: 'norm' is a LayerNorm"):
        blocks(Titan(), FSDPStrategy(blocks="norm"))
    with pytest.raises(UserError, match=r"strategy.blocks: Titan has no submodule 'nope'"):
        blocks(Titan(), FSDPStrategy(blocks="nope"))
    with pytest.raises(ValidationError, match="blocks"):
        FSDPStrategy(blocks="model..layers")


def test_nothing_found_warns_once(caplog):
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)

    with caplog.at_level(logging.WARNING, logger="shipyard.parallel.model"):
        assert blocks(Flat()) == [] and blocks(Flat()) == []
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "Flat" in warnings[0] and "one unit" in warnings[0], warnings


def test_activation_checkpoint_wraps_found_blocks_and_keeps_the_output():
    model = llama()
    tokens = torch.randint(0, 128, (2, 8))
    before = model(tokens).logits
    apply_activation_checkpoint(model)
    assert all(type(b).__name__ == "CheckpointWrapper" for _, b in blocks(model))
    assert torch.equal(model(tokens).logits, before)


def test_hugging_face_tp_plan_translated_and_unknown_style_refused():
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan = tp_plan(llama())
    assert isinstance(plan["model.layers.*.self_attn.q_proj"], ColwiseParallel)
    assert isinstance(plan["model.layers.*.mlp.down_proj"], RowwiseParallel)
    assert set(plan) >= {"lm_head", "model.embed_tokens"}
    model = llama()
    model._tp_plan = {"model.layers.*.mlp.experts": "grouped_gemm"}
    with pytest.raises(UserError, match=r"'model.layers.\*.mlp.experts' the style 'grouped_gemm'"):
        tp_plan(model)
