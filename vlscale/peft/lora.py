"""LoRA (Hu et al., ICLR 2022) on the q and v projections of every attention block.

A frozen projection y = W x (+ b) gets a trainable low-rank update (rank r = peft.lora_rank):

    y = W x (+ b) + (alpha / r) * B A dropout(x)          A: r x in, B: out x r

LoRA sites are encoder self-attention, decoder self-attention and decoder cross-attention q and v
(T5 ``.q``/``.v``; BART ``q_proj``/``v_proj``, whose biases train too with peft.bias=lora_only, the default,
or all: decided in trainable.py). A starts as nn.Linear's default init and B at zero, so the update is
zero at init. Dropout follows the hooked projection's train/eval mode.
Sharing: A is the "down" and B the "up" projection for ``sites.weight_keys``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlscale.peft.adapter import init_linear_
from vlscale.peft.sites import Site, param_shape, select_key, weight_keys, zero3_unused_anchor


class LoRALinear(nn.Module):
    """The LoRA update of one projection for every task. Parameters ``A_{key}`` (r, in), ``B_{key}`` (out, r)."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float,
                 a_keys: Sequence[str], b_keys: Sequence[str], device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.scale = alpha / rank
        self.dropout = dropout
        self.a_keys, self.b_keys = tuple(a_keys), tuple(b_keys)
        kw = dict(device=device, dtype=dtype)
        for key in self.a_keys:
            a = nn.Parameter(torch.empty(rank, in_features, **kw))
            init_linear_(a, None)
            self.register_parameter(f"A_{key}", a)
        for key in self.b_keys:  # zero: no update at init
            self.register_parameter(f"B_{key}", nn.Parameter(torch.zeros(out_features, rank, **kw)))

    def factors(self, task: Optional[str]):
        """(A, B) the task uses (the same Parameter objects where shared)."""
        a = select_key(self.a_keys, task, "lora A (down)")
        b = select_key(self.b_keys, task, "lora B (up)")
        return getattr(self, f"A_{a}"), getattr(self, f"B_{b}")

    def forward(self, x: torch.Tensor, task: Optional[str], training: bool = False) -> torch.Tensor:
        """The update (alpha/r) B A dropout(x), in x's dtype."""
        a, b = self.factors(task)
        h = F.dropout(x.to(a.dtype), self.dropout, training=training and self.dropout > 0)
        out = F.linear(F.linear(h, a) * self.scale, b)  # scaled at rank width, not at the output's
        anchor = zero3_unused_anchor(self, (a, b))
        return (out if anchor is None else out + anchor).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scale={self.scale:g}, "
                f"dropout={self.dropout}, A={list(self.a_keys)}, B={list(self.b_keys)}")


class LoRALayers(nn.Module):
    """LoRA updates of every q/v projection."""

    def __init__(self, sites: Sequence[Site], cfg, tasks: Sequence[str], lm: nn.Module, device=None, dtype=None):
        super().__init__()
        a_keys = weight_keys(cfg.sharing, cfg.half_shared, "down", tasks)
        b_keys = weight_keys(cfg.sharing, cfg.half_shared, "up", tasks)
        layers = {}
        for s in sites:
            out_features, in_features = param_shape(lm.get_submodule(s.name).weight)
            layers[s.key] = LoRALinear(in_features, out_features, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout,
                                       a_keys, b_keys, device, dtype)
        self.sites = nn.ModuleDict(layers)
        self.site_names = {s.key: s.name for s in sites}

    def forward(self, x: torch.Tensor, site_key: str, task: Optional[str], training: bool = False):
        return self.sites[site_key](x, task, training)
