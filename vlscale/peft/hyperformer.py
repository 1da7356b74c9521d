"""Hyperformer (Karimi Mahabadi et al., ACL 2021), laid out as VL-Adapter's reference code runs it.

A hypernetwork per stack (encoder, decoder) generates the bottleneck adapter of every site of that
stack from a task embedding and a layer embedding; a generator per sublayer kind (self-attention,
the decoder's cross-attention, FFN) turns the stack's code for a layer into that sublayer's weights:

    e = [task_emb(t) (task_embedding_dim) ; layer_emb_stack(l) (layer_embedding_dim)]   (1024 in the paper)
    z = LayerNorm(W_2 relu(W_1 e + c_1) + c_2)      (1024 -> hypernet_hidden_dim -> projected_dim)
    W_d = G^k_dw z (k x d), b_d = G^k_db z,   W_u = G^k_uw z (d x k), b_u = G^k_ub z   (k: the sublayer kind)
    a(h) = h + W_u act(W_d h + b_d) + b_u           (hidden = d_model // reduction_factor)

This is the reference's ``--unique_hyper_net`` (hyperformer's AdapterLayersHyperNetController, one per
stack, cross-attention generators in the decoder's; VL-Adapter's scripts/image/hyperformer.sh): on
CLIP-RN101 + BART-base it updates 5.79% of the parameters, the paper's Table 1 figure to the digit
(one hypernetwork with a site embedding for every site, vlscale's layout before 2026-12-03, updated 2.18%).

The up-generators start at zero, so every generated W_u, b_u is zero and the adapters are the identity
at init (the generators still get gradients through z); the down-generators are N(0, 1e-2), as the
reference's. Tasks share everything but their task embedding, so ``peft.sharing`` does not apply.

Each task's embedding is a parameter of its own (``task_embedding_<task>``, as the reference's
ParameterDict of task embeddings), shared by both stacks: a step of one task gives the others no
gradient, and the trainer leaves them out of its update (their own optimizer group,
vlscale.peft.trainable.task_of), as the reference trainer's AdamW skips them.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from vlscale.config import ConfigError
from vlscale.peft.adapter import ACTIVATIONS, adapter_hidden, apply_adapter
from vlscale.peft.sites import Site, zero3_unused_anchor


class TaskEmbeddings(nn.Module):
    """One (1, dim) parameter per task, N(0, 1) as the reference's randn; shape (1, dim) keeps it in the
    weight-decay group, as the reference's task-embedding table."""

    def __init__(self, tasks: Sequence[str], dim: int, device=None, dtype=None):
        super().__init__()
        for task in tasks:
            self.register_parameter(f"task_embedding_{task}",
                                    nn.Parameter(nn.init.normal_(torch.empty(1, dim, device=device, dtype=dtype))))

    def forward(self, task: str) -> torch.Tensor:
        used = getattr(self, f"task_embedding_{task}")
        # the other tasks' embeddings an exact zero gradient under ZeRO-3 (sites.zero3_unused_anchor): DeepSpeed
        # re-applied their last gradient, which TaskSteps kept out of the update but the gradient norm and the
        # clipping coefficient counted
        anchor = zero3_unused_anchor(self, [used])
        return used[0] if anchor is None else used[0] + anchor


class AdapterGenerator(nn.Module):
    """z -> (W_d, b_d, W_u, b_u) of one sublayer kind, in nn.Linear layout."""

    def __init__(self, projected_dim: int, d_model: int, hidden: int, generator_std: float, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.d_model, self.hidden = d_model, hidden
        self.down_weight = nn.Linear(projected_dim, hidden * d_model, **kw)
        self.down_bias = nn.Linear(projected_dim, hidden, **kw)
        self.up_weight = nn.Linear(projected_dim, d_model * hidden, **kw)
        self.up_bias = nn.Linear(projected_dim, d_model, **kw)
        for gen in (self.down_weight, self.down_bias):  # generated down weights of std ~ generator_std * |z|
            nn.init.normal_(gen.weight, std=generator_std)
            nn.init.zeros_(gen.bias)
        for gen in (self.up_weight, self.up_bias):  # generated up-projection = 0: identity at init
            nn.init.zeros_(gen.weight)
            nn.init.zeros_(gen.bias)

    def forward(self, z: torch.Tensor):
        return (self.down_weight(z).view(self.hidden, self.d_model), self.down_bias(z).view(self.hidden),
                self.up_weight(z).view(self.d_model, self.hidden), self.up_bias(z).view(self.d_model))


class StackHyperNetwork(nn.Module):
    """One stack's hypernetwork: [task emb; layer emb] -> projector -> LayerNorm -> a generator per kind."""

    def __init__(self, n_layers: int, kinds: Sequence[str], d_model: int, hidden: int, task_embedding_dim: int,
                 layer_embedding_dim: int, hypernet_hidden_dim: int, projected_dim: int,
                 generator_std: float = 1e-2, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.layer_embedding = nn.Embedding(n_layers, layer_embedding_dim, **kw)
        self.projector = nn.Sequential(
            nn.Linear(task_embedding_dim + layer_embedding_dim, hypernet_hidden_dim, **kw), nn.ReLU(),
            nn.Linear(hypernet_hidden_dim, projected_dim, **kw))
        self.norm = nn.LayerNorm(projected_dim, **kw)
        self.generators = nn.ModuleDict({k: AdapterGenerator(projected_dim, d_model, hidden, generator_std, **kw)
                                         for k in kinds})

    def forward(self, task_embedding: torch.Tensor, layer: torch.Tensor, kind: str):
        e = torch.cat([task_embedding, self.layer_embedding(layer)], dim=-1)
        return self.generators[kind](self.norm(self.projector(e)))


class HyperformerLayers(nn.Module):
    """Adapters at every adapter site, their weights generated by the site's stack's hypernetwork."""

    def __init__(self, sites: Sequence[Site], cfg, tasks: Sequence[str], d_model: int, device=None, dtype=None):
        super().__init__()
        if cfg.activation not in ACTIVATIONS:
            raise ConfigError(f"peft.activation={cfg.activation!r} is not one of {list(ACTIVATIONS)}")
        self.tasks = tuple(tasks)
        self.sites = {s.key: s for s in sites}
        self.activation, self.fused = cfg.activation, cfg.fused
        self.task_embeddings = TaskEmbeddings(self.tasks, cfg.task_embedding_dim, device, dtype)
        hidden = adapter_hidden(d_model, cfg.reduction_factor)
        stacks = {}
        for s in sites:
            stacks.setdefault(s.stack, []).append(s)
        self.hypernets = nn.ModuleDict({
            stack: StackHyperNetwork(
                max(s.layer for s in ss) + 1, list(dict.fromkeys(s.kind for s in ss)), d_model, hidden,
                cfg.task_embedding_dim, cfg.layer_embedding_dim, cfg.hypernet_hidden_dim, cfg.hypernet_projected_dim,
                device=device, dtype=dtype)
            for stack, ss in stacks.items()})

    def weights(self, site_key: str, task: Optional[str], device=None):
        """The generated (w_down, b_down, w_up, b_up) of one site for one task."""
        if task is None:
            raise RuntimeError(f"hyperformer: no task selected; call peft.set_task(name) with one of {list(self.tasks)}")
        if task not in self.tasks:
            raise KeyError(f"hyperformer: unknown task {task!r}; known tasks: {list(self.tasks)}")
        site = self.sites[site_key]
        hypernet = self.hypernets[site.stack]
        device = device if device is not None else hypernet.layer_embedding.weight.device
        return hypernet(self.task_embeddings(task), torch.tensor(site.layer, device=device), site.kind)

    def forward(self, x: torch.Tensor, site_key: str, task: Optional[str]) -> torch.Tensor:
        return apply_adapter(x, *self.weights(site_key, task, x.device), self.activation, self.fused)
