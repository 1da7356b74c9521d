"""Prompt tuning (Lester et al., EMNLP 2021) with the reparameterised prompts of VL-Adapter.

P = peft.n_prompts trainable vectors are prepended to the encoder's input embeddings (the VLModel
does the prepending and extends the attention mask). They come from an embedding table through a
small MLP (hidden = peft.prompt_hidden_dim, 800 in the paper):

    prompts = W_2 tanh(W_1 E[0..P-1] + c_1) + c_2         E: P x d,  W_1: h x d,  W_2: d x h

Prompts add tokens, so unlike the other methods they cannot be the identity at init. Sharing:
``single`` one prompt encoder for every task, ``multiple`` one per task. With peft.extra_prompts
(prompts on top of another method) the prompts are task-specific.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlscale.peft.adapter import init_linear_
from vlscale.peft.sites import select_key, zero3_unused_anchor


class PromptEncoder(nn.Module):
    """Encoder prompt vectors of the current task, one Embedding -> MLP set per weight-set key.

    Parameters per key: ``embedding_{key}`` (P, d), ``w1_{key}`` (h, d), ``b1_{key}``, ``w2_{key}``
    (d, h), ``b2_{key}``; owned directly so that ZeRO-3 gathers every set when this is called.
    """

    def __init__(self, keys: Sequence[str], n_prompts: int, d_model: int, hidden: int, device=None, dtype=None):
        super().__init__()
        self.keys, self.n_prompts, self.d_model, self.hidden = tuple(keys), n_prompts, d_model, hidden
        kw = dict(device=device, dtype=dtype)
        for key in self.keys:
            emb = nn.Parameter(torch.empty(n_prompts, d_model, **kw))
            nn.init.normal_(emb)  # as nn.Embedding
            self.register_parameter(f"embedding_{key}", emb)
            for i, (n_out, n_in) in enumerate(((hidden, d_model), (d_model, hidden)), start=1):
                w = nn.Parameter(torch.empty(n_out, n_in, **kw))
                b = nn.Parameter(torch.empty(n_out, **kw))
                init_linear_(w, b)
                self.register_parameter(f"w{i}_{key}", w)
                self.register_parameter(f"b{i}_{key}", b)

    def parameters_of(self, task: Optional[str]) -> tuple:
        """(embedding, w1, b1, w2, b2) the task uses."""
        key = select_key(self.keys, task, "prompts")
        return tuple(getattr(self, f"{n}_{key}") for n in ("embedding", "w1", "b1", "w2", "b2"))

    def forward(self, batch_size: int, task: Optional[str], dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """(batch_size, P, d_model) prompts of the task, in ``dtype`` when given."""
        params = self.parameters_of(task)
        emb, w1, b1, w2, b2 = params
        p = F.linear(torch.tanh(F.linear(emb, w1, b1)), w2, b2)
        anchor = zero3_unused_anchor(self, params)
        if anchor is not None:
            p = p + anchor
        if dtype is not None:
            p = p.to(dtype)
        return p.unsqueeze(0).expand(batch_size, -1, -1)

    def extra_repr(self) -> str:
        return f"keys={list(self.keys)}, n_prompts={self.n_prompts}, d_model={self.d_model}, hidden={self.hidden}"
