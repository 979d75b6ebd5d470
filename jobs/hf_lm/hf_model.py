"""A Hugging Face ``LlamaForCausalLM`` built from a small ``LlamaConfig`` (no download), byte vocabulary.

Nothing here is for shipyard: the model declares no ``layers``, no ``tp_plan()``. shipyard finds
its decoder layers through transformers' ``_no_split_modules`` and translates its own tensor
parallel plan (``model.tp_plan``); see shipyard/parallel/hf_adapter.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM


def build(cfg: dict) -> LlamaForCausalLM:
    heads = cfg.get("heads", 4)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=256, hidden_size=cfg.get("dim", 64), num_hidden_layers=cfg.get("layers", 4),
        num_attention_heads=heads, num_key_value_heads=cfg.get("kv_heads", max(heads // 2, 1)),
        intermediate_size=cfg.get("intermediate", 2 * cfg.get("dim", 64)),
        max_position_embeddings=cfg.get("context", 256), use_cache=False))


def next_token_loss(output, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting each next byte (``output``: HF's CausalLMOutput; under
    pipeline too, rebuilt from the last stage's logits)."""
    return F.cross_entropy(output.logits.flatten(0, 1).float(), targets.flatten())
