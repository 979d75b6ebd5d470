"""A small decoder-only transformer language model (GPT-style, pre-norm, byte-level vocabulary).

It declares what shipyard's model-parallel strategies need (see shipyard/parallel/model.py):
``layers`` (an nn.ModuleDict of blocks: FSDP units, activation-checkpoint units), ``tp_plan()``
and ``pipeline_split_points``. A pipeline stage is this class with the other stages' modules
replaced by pass-throughs, which its forward (``h = m(h)`` throughout) runs unchanged; the
``is not None`` tests are for a model cut by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LMConfig:
    vocab: int = 256        # bytes
    context: int = 256      # tokens the model sees (a shard row holds context + 1)
    dim: int = 256
    layers: int = 4
    heads: int = 4
    mlp_ratio: int = 4

    @classmethod
    def from_dict(cls, d: dict) -> "LMConfig":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


class Embed(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab, cfg.dim)
        self.pos = nn.Embedding(cfg.context, cfg.dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tok(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))


class Attention(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.head_dim = cfg.dim // cfg.heads
        self.wq = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        # -1 heads: under tensor parallelism wq/wk/wv are split by output columns, so this rank
        # holds heads / tp of the heads; the arithmetic below is the same.
        q, k, v = (w(x).view(b, t, -1, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.mlp_ratio * cfg.dim)
        self.w2 = nn.Linear(cfg.mlp_ratio * cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x)))


class Block(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.attn_norm = nn.LayerNorm(cfg.dim)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.LayerNorm(cfg.dim)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class LM(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        if cfg.dim % cfg.heads:
            raise ValueError(f"dim {cfg.dim} is not a multiple of heads {cfg.heads}")
        self.cfg = cfg
        # Registration order is forward order: the pipeline cuts along it.
        self.embed = Embed(cfg)
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.layers)})
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab, bias=False)

    # A pipeline stage may begin at any block but the first.
    @property
    def pipeline_split_points(self) -> list[str]:
        return [f"layers.{i}" for i in range(1, self.cfg.layers)]

    def tp_plan(self) -> dict:
        """Megatron-style: q/k/v and the MLP's first layer split by output columns (each rank owns
        heads / tp heads and a slice of the hidden units), the output projections by input rows,
        so each block costs two all-reduces. Embedding, norms and head stay replicated: at this
        size they are a small part of the model and splitting them buys nothing but traffic."""
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

        plan = {}
        for name in ("attn.wq", "attn.wk", "attn.wv", "mlp.w1"):
            plan[f"layers.*.{name}"] = ColwiseParallel()
        for name in ("attn.wo", "mlp.w2"):
            plan[f"layers.*.{name}"] = RowwiseParallel()
        return plan

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) if self.embed is not None else tokens
        for layer in self.layers.values():
            h = layer(h)
        h = self.norm(h) if self.norm is not None else h
        return self.head(h) if self.head is not None else h


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting each next byte."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
