"""Bottleneck adapters (Houlsby et al., ICML 2019), as placed by VL-Adapter (Sung et al., CVPR 2022).

At every adapter site (self-attention, decoder cross-attention and FFN outputs, before dropout +
residual) the sublayer output h (d_model wide) goes through a bottleneck of width
d_model // reduction_factor and back, with a skip connection:

    h ──┬── down: W_d (k x d), b_d ── act (gelu) ── up: W_u (d x k), b_u ──┐
        └──────────────────────────────────────────────────────────── + ──► a(h)

    a(h) = h + W_u act(W_d h + b_d) + b_u

W_u and b_u start at zero, so a(h) = h exactly at init: inserting adapters leaves the backbone's
output unchanged. With ``peft.fused`` the math runs in ``vlscale.kernels.adapter.fused_adapter``
(weights in nn.Linear layout); otherwise, or on the meta device, in its ``adapter_reference``.
Sharing: each projection holds one weight set per key (``shared`` or a task name, see
``sites.weight_keys``); half-shared adapters share one projection object across tasks.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlscale.config import ConfigError
from vlscale.kernels.adapter import ACTIVATIONS, activate, adapter_reference, fused_adapter
from vlscale.peft.sites import Site, select_key, weight_keys, zero3_unused_anchor


def apply_adapter(x, w_down, b_down, w_up, b_up, activation: str, fused: bool) -> torch.Tensor:
    """The adapter on a sublayer output; fused when asked for and possible, in the weights' dtype."""
    if x.dtype != w_down.dtype:
        # e.g. T5 keeps `wo` in fp32 under bf16 weights: compute the branch in the adapter's dtype
        h = activate(F.linear(x.to(w_down.dtype), w_down, b_down), activation)
        return x + F.linear(h, w_up, b_up).to(x.dtype)
    if fused and x.device.type != "meta":
        return fused_adapter(x, w_down, b_down, w_up, b_up, activation)
    return adapter_reference(x, w_down, b_down, w_up, b_up, activation)


def init_linear_(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    """nn.Linear's default initialisation, on given tensors."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        fan_in = weight.shape[1]
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        nn.init.uniform_(bias, -bound, bound)


class BottleneckAdapter(nn.Module):
    """The adapter of one site for every task. Parameters ``{down,up}_{weight,bias}_{key}``.

    Parameters are owned directly (not by child modules) so that DeepSpeed ZeRO-3 gathers all
    of them when this module is called, also the ones the fused kernel reads as tensors.
    """

    def __init__(self, d_model: int, hidden: int, down_keys: Sequence[str], up_keys: Sequence[str],
                 activation: str = "gelu", fused: bool = True, device=None, dtype=None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ConfigError(f"peft.activation={activation!r} is not one of {list(ACTIVATIONS)}")
        self.d_model, self.hidden, self.activation, self.fused = d_model, hidden, activation, fused
        self.down_keys, self.up_keys = tuple(down_keys), tuple(up_keys)
        kw = dict(device=device, dtype=dtype)
        for key in self.down_keys:
            w = nn.Parameter(torch.empty(hidden, d_model, **kw))
            b = nn.Parameter(torch.empty(hidden, **kw))
            init_linear_(w, b)
            self.register_parameter(f"down_weight_{key}", w)
            self.register_parameter(f"down_bias_{key}", b)
        for key in self.up_keys:  # zero: the adapter is the identity at init
            self.register_parameter(f"up_weight_{key}", nn.Parameter(torch.zeros(d_model, hidden, **kw)))
            self.register_parameter(f"up_bias_{key}", nn.Parameter(torch.zeros(d_model, **kw)))

    def weights(self, task: Optional[str]):
        """(w_down, b_down, w_up, b_up) the task uses (the same Parameter objects where shared)."""
        d = select_key(self.down_keys, task, "adapter down-projection")
        u = select_key(self.up_keys, task, "adapter up-projection")
        return (getattr(self, f"down_weight_{d}"), getattr(self, f"down_bias_{d}"),
                getattr(self, f"up_weight_{u}"), getattr(self, f"up_bias_{u}"))

    def forward(self, x: torch.Tensor, task: Optional[str]) -> torch.Tensor:
        weights = self.weights(task)
        out = apply_adapter(x, *weights, self.activation, self.fused)
        anchor = zero3_unused_anchor(self, weights)
        return out if anchor is None else out + anchor

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, hidden={self.hidden}, down={list(self.down_keys)}, "
                f"up={list(self.up_keys)}, activation={self.activation}, fused={self.fused}")


def adapter_hidden(d_model: int, reduction_factor: int) -> int:
    hidden = d_model // reduction_factor
    if hidden < 1:
        raise ConfigError(f"peft.reduction_factor={reduction_factor} leaves no hidden units for d_model={d_model}")
    return hidden


class AdapterLayers(nn.Module):
    """Bottleneck adapters at every adapter site, one :class:`BottleneckAdapter` per site key."""

    def __init__(self, sites: Sequence[Site], cfg, tasks: Sequence[str], d_model: int, device=None, dtype=None):
        super().__init__()
        hidden = adapter_hidden(d_model, cfg.reduction_factor)
        down = weight_keys(cfg.sharing, cfg.half_shared, "down", tasks)
        up = weight_keys(cfg.sharing, cfg.half_shared, "up", tasks)
        self.sites = nn.ModuleDict({
            s.key: BottleneckAdapter(d_model, hidden, down, up, cfg.activation, cfg.fused, device, dtype)
            for s in sites})

    def forward(self, x: torch.Tensor, site_key: str, task: Optional[str]) -> torch.Tensor:
        return self.sites[site_key](x, task)
