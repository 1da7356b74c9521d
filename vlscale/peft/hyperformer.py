"""Hyperformer (Karimi Mahabadi et al., ACL 2021): one shared hypernetwork generates every adapter.

Each adapter site s and task t get an input from learnt embeddings; a shared projector turns it
into a small code z, and linear generators turn z into that site's bottleneck-adapter weights:

    e = [task_emb(t) (task_embedding_dim) ; site_emb(s) (layer_embedding_dim)]     (1024 in the paper)
    z = LayerNorm(W_2 relu(W_1 e + c_1) + c_2)            (1024 -> hypernet_hidden_dim -> projected_dim)
    W_d = G_dw z (k x d), b_d = G_db z,   W_u = G_uw z (d x k), b_u = G_ub z
    a(h) = h + W_u act(W_d h + b_d) + b_u                 (k = d_model // reduction_factor)

The up-generators G_uw, G_ub start at zero, so every generated W_u, b_u is zero and the adapters
are the identity at init (the generators still get gradients through z). Tasks share everything
but their task embedding, so ``peft.sharing`` does not apply. The site embedding distinguishes
encoder/decoder, layer and sublayer (self-attn / cross-attn / FFN).

Each task's embedding is a parameter of its own (``task_embedding_<task>``, as the reference's
ParameterDict of task embeddings): a step of one task gives the others no gradient, and the trainer
leaves them out of its update (their own optimizer group, vlscale.peft.trainable.task_of), as the
reference trainer's AdamW skips them. One (n_tasks, dim) table had every row moved and decayed in
every step. Shape (1, dim) keeps it in the weight-decay group, as the table was.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from vlscale.peft.adapter import ACTIVATIONS, adapter_hidden, apply_adapter
from vlscale.peft.sites import Site


class HyperNetwork(nn.Module):
    """[task emb; site emb] -> projector -> LayerNorm -> (W_d, b_d, W_u, b_u) in nn.Linear layout."""

    def __init__(self, tasks: Sequence[str], n_sites: int, d_model: int, hidden: int, task_embedding_dim: int,
                 layer_embedding_dim: int, hypernet_hidden_dim: int, projected_dim: int,
                 generator_std: float = 1e-2, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.d_model, self.hidden = d_model, hidden
        for task in tasks:  # N(0, 1), as nn.Embedding and the reference's randn
            self.register_parameter(f"task_embedding_{task}",
                                    nn.Parameter(nn.init.normal_(torch.empty(1, task_embedding_dim, **kw))))
        self.site_embedding = nn.Embedding(n_sites, layer_embedding_dim, **kw)
        self.projector = nn.Sequential(
            nn.Linear(task_embedding_dim + layer_embedding_dim, hypernet_hidden_dim, **kw), nn.ReLU(),
            nn.Linear(hypernet_hidden_dim, projected_dim, **kw))
        self.norm = nn.LayerNorm(projected_dim, **kw)
        self.down_weight = nn.Linear(projected_dim, hidden * d_model, **kw)
        self.down_bias = nn.Linear(projected_dim, hidden, **kw)
        self.up_weight = nn.Linear(projected_dim, d_model * hidden, **kw)
        self.up_bias = nn.Linear(projected_dim, d_model, **kw)
        # small generated down weights (std ~ generator_std * sqrt(projected_dim)), as the reference code
        for gen in (self.down_weight, self.down_bias):
            nn.init.normal_(gen.weight, std=generator_std)
            nn.init.zeros_(gen.bias)
        for gen in (self.up_weight, self.up_bias):  # generated up-projection = 0: identity at init
            nn.init.zeros_(gen.weight)
            nn.init.zeros_(gen.bias)

    def forward(self, task: str, site_index: torch.Tensor):
        e = torch.cat([getattr(self, f"task_embedding_{task}")[0], self.site_embedding(site_index)], dim=-1)
        z = self.norm(self.projector(e))
        return (self.down_weight(z).view(self.hidden, self.d_model), self.down_bias(z).view(self.hidden),
                self.up_weight(z).view(self.d_model, self.hidden), self.up_bias(z).view(self.d_model))


class HyperformerLayers(nn.Module):
    """Adapters at every adapter site whose weights the shared :class:`HyperNetwork` generates."""

    def __init__(self, sites: Sequence[Site], cfg, tasks: Sequence[str], d_model: int, device=None, dtype=None):
        super().__init__()
        if cfg.activation not in ACTIVATIONS:
            raise ValueError(f"peft.activation={cfg.activation!r} is not one of {list(ACTIVATIONS)}")
        self.tasks = tuple(tasks)
        self.site_keys = tuple(s.key for s in sites)
        self._site_index = {k: i for i, k in enumerate(self.site_keys)}
        self.activation, self.fused = cfg.activation, cfg.fused
        self.hypernet = HyperNetwork(
            self.tasks, len(self.site_keys), d_model, adapter_hidden(d_model, cfg.reduction_factor),
            cfg.task_embedding_dim, cfg.layer_embedding_dim, cfg.hypernet_hidden_dim,
            cfg.hypernet_projected_dim, device=device, dtype=dtype)

    def weights(self, site_key: str, task: Optional[str], device=None):
        """The generated (w_down, b_down, w_up, b_up) of one site for one task."""
        if task is None:
            raise RuntimeError(f"hyperformer: no task selected; call peft.set_task(name) with one of {list(self.tasks)}")
        if task not in self.tasks:
            raise KeyError(f"hyperformer: unknown task {task!r}; known tasks: {list(self.tasks)}")
        device = device if device is not None else self.hypernet.site_embedding.weight.device
        return self.hypernet(task, torch.tensor(self._site_index[site_key], device=device))

    def forward(self, x: torch.Tensor, site_key: str, task: Optional[str]) -> torch.Tensor:
        return apply_adapter(x, *self.weights(site_key, task, x.device), self.activation, self.fused)
