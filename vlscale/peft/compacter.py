"""Compacter (Karimi Mahabadi et al., NeurIPS 2021): adapters whose projections are PHM layers.

A parameterised-hypercomplex-multiplication (PHM) layer builds its (in x out) weight from n
Kronecker products of a small "rule" A_i (n x n) and a block B_i ((in/n) x (out/n)):

    W = sum_{i=1..n} A_i kron B_i                   (n = peft.phm_dim, 2 in the paper)
    B_i = s_i t_i^T  (rank peft.phm_rank)           only with peft.factorized_phm
    A_i shared by every PHM layer                   only with peft.shared_phm_rule

so a d x k projection costs n^3 + d k / n parameters instead of d k. Both the down (d -> k) and the
up (k -> d) projection of a bottleneck adapter are PHM layers, k = d_model // reduction_factor:

    a(h) = h + W_u^T act(W_d^T h + b_d) + b_u

B_i of the up-projection (t_i when factorised) and b_u start at zero, so W_u = 0 and the adapter
is the identity at init. A_i ~ N(0, 1/n) and B_i ~ Xavier(in, out) give W the variance of a
Xavier-initialised dense weight. Sharing works as for bottleneck adapters (``sites.weight_keys``).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from vlscale.config import ConfigError
from vlscale.peft.adapter import ACTIVATIONS, adapter_hidden, apply_adapter
from vlscale.peft.sites import Site, select_key, weight_keys, zero3_unused_anchor


def phm_weight(rule: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """sum_i kron(rule[i], blocks[i]): rule (n, n, n), blocks (n, p, q) -> (n p, n q)."""
    n, p, q = blocks.shape
    return torch.einsum("iab,icd->acbd", rule, blocks).reshape(n * p, n * q)


class PHMRule(nn.Module):
    """The rule matrices A_i (n, n, n) shared by every PHM layer (``peft.shared_phm_rule``)."""

    def __init__(self, n: int, device=None, dtype=None):
        super().__init__()
        self.rule = nn.Parameter(torch.empty(n, n, n, device=device, dtype=dtype))
        nn.init.normal_(self.rule, std=1.0 / math.sqrt(n))

    def forward(self) -> torch.Tensor:
        # a copy computed inside forward: ZeRO-3 gathers `rule` for this call and may free it after
        return self.rule.clone()


class CompacterAdapter(nn.Module):
    """The Compacter adapter of one site for every task.

    Parameters (owned directly, so ZeRO-3 gathers them when the site is called), per projection
    ``p`` in (down, up) and weight-set key: ``{p}_rule_{key}`` (n, n, n) unless the rule is shared,
    ``{p}_blocks_{key}`` (n, in/n, out/n) or the factors ``{p}_s_{key}`` (n, in/n, r) and
    ``{p}_t_{key}`` (n, out/n, r), and ``{p}_bias_{key}``.
    """

    def __init__(self, d_model: int, hidden: int, down_keys: Sequence[str], up_keys: Sequence[str], n: int,
                 shared_rule: bool = False, factorized: bool = False, rank: int = 1,
                 activation: str = "gelu", fused: bool = True, device=None, dtype=None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ConfigError(f"peft.activation={activation!r} is not one of {list(ACTIVATIONS)}")
        if d_model % n or hidden % n:
            raise ConfigError(f"peft.phm_dim={n} must divide d_model={d_model} and the adapter hidden size "
                             f"{hidden} (d_model // peft.reduction_factor)")
        self.d_model, self.hidden, self.n = d_model, hidden, n
        self.shared_rule, self.factorized, self.rank = shared_rule, factorized, rank
        self.activation, self.fused = activation, fused
        self.down_keys, self.up_keys = tuple(down_keys), tuple(up_keys)
        kw = dict(device=device, dtype=dtype)
        for part, keys, fan_in, fan_out in (("down", self.down_keys, d_model, hidden),
                                            ("up", self.up_keys, hidden, d_model)):
            zero = part == "up"
            std = math.sqrt(2.0 / (fan_in + fan_out))  # Xavier std of the full (in x out) weight
            for key in keys:
                if not shared_rule:
                    rule = nn.Parameter(torch.empty(n, n, n, **kw))
                    nn.init.normal_(rule, std=1.0 / math.sqrt(n))
                    self.register_parameter(f"{part}_rule_{key}", rule)
                p, q = fan_in // n, fan_out // n
                if factorized:
                    s = nn.Parameter(torch.empty(n, p, rank, **kw))
                    t = nn.Parameter(torch.empty(n, q, rank, **kw))
                    factor_std = math.sqrt(std / math.sqrt(rank))  # var(s t^T) = r var(s) var(t) = std^2
                    nn.init.normal_(s, std=factor_std)
                    nn.init.zeros_(t) if zero else nn.init.normal_(t, std=factor_std)
                    self.register_parameter(f"{part}_s_{key}", s)
                    self.register_parameter(f"{part}_t_{key}", t)
                else:
                    blocks = nn.Parameter(torch.empty(n, p, q, **kw))
                    nn.init.zeros_(blocks) if zero else nn.init.normal_(blocks, std=std)
                    self.register_parameter(f"{part}_blocks_{key}", blocks)
                self.register_parameter(f"{part}_bias_{key}", nn.Parameter(torch.zeros(fan_out, **kw)))

    def _blocks(self, part: str, key: str) -> torch.Tensor:
        if self.factorized:
            return getattr(self, f"{part}_s_{key}") @ getattr(self, f"{part}_t_{key}").transpose(1, 2)
        return getattr(self, f"{part}_blocks_{key}")

    def _rule(self, part: str, key: str, shared: Optional[torch.Tensor]) -> torch.Tensor:
        if self.shared_rule:
            if shared is None:
                raise RuntimeError("compacter: peft.shared_phm_rule is on but no shared rule was passed")
            return shared
        return getattr(self, f"{part}_rule_{key}")

    def weights(self, task: Optional[str], shared_rule: Optional[torch.Tensor] = None):
        """(w_down, b_down, w_up, b_up) in nn.Linear layout: w = (sum_i A_i kron B_i)^T."""
        out = []
        for part, keys in (("down", self.down_keys), ("up", self.up_keys)):
            key = select_key(keys, task, f"compacter {part}-projection")
            w = phm_weight(self._rule(part, key, shared_rule), self._blocks(part, key))
            out += [w.t(), getattr(self, f"{part}_bias_{key}")]
        return tuple(out)

    def forward(self, x: torch.Tensor, task: Optional[str], shared_rule: Optional[torch.Tensor] = None):
        out = apply_adapter(x, *self.weights(task, shared_rule), self.activation, self.fused)
        anchor = zero3_unused_anchor(self, self._used(task))
        return out if anchor is None else out + anchor

    def _used(self, task: Optional[str]) -> list:
        used = []
        for part, keys in (("down", self.down_keys), ("up", self.up_keys)):
            key = select_key(keys, task, f"compacter {part}-projection")
            names = ("rule", "s", "t", "blocks", "bias")
            used += [getattr(self, f"{part}_{n}_{key}") for n in names if hasattr(self, f"{part}_{n}_{key}")]
        return used

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, hidden={self.hidden}, n={self.n}, shared_rule={self.shared_rule}, "
                f"factorized={self.factorized}, rank={self.rank}, down={list(self.down_keys)}, "
                f"up={list(self.up_keys)}")


class CompacterLayers(nn.Module):
    """Compacter adapters at every adapter site, plus the shared rule when ``shared_phm_rule``."""

    def __init__(self, sites: Sequence[Site], cfg, tasks: Sequence[str], d_model: int, device=None, dtype=None):
        super().__init__()
        hidden = adapter_hidden(d_model, cfg.reduction_factor)
        down = weight_keys(cfg.sharing, cfg.half_shared, "down", tasks)
        up = weight_keys(cfg.sharing, cfg.half_shared, "up", tasks)
        self.shared_rule = PHMRule(cfg.phm_dim, device, dtype) if cfg.shared_phm_rule else None
        self.sites = nn.ModuleDict({
            s.key: CompacterAdapter(d_model, hidden, down, up, cfg.phm_dim, cfg.shared_phm_rule,
                                    cfg.factorized_phm, cfg.phm_rank, cfg.activation, cfg.fused, device, dtype)
            for s in sites})

    def forward(self, x: torch.Tensor, site_key: str, task: Optional[str]) -> torch.Tensor:
        rule = self.shared_rule() if self.shared_rule is not None else None
        return self.sites[site_key](x, task, rule)
