"""The trainable visual projection θV→L (VL-T5 / VL-Adapter's visual embedding).

    v = LN(W_f f + b_f) + LN(W_p p + b_p) + E_order[k]

f: a CLIP grid/patch feature or a video frame feature; p: its normalised position
(x1, y1, x2, y2, area) — a grid cell or a frame's time span; k: which image of the example it came
from (NLVR2 has two). Always trainable.
"""

from __future__ import annotations

import torch
from torch import nn


class VisualProjector(nn.Module):
    def __init__(self, feat_dim: int, d_model: int, n_images: int = 2, eps: float = 1e-6):
        super().__init__()
        self.feat = nn.Sequential(nn.Linear(feat_dim, d_model), nn.LayerNorm(d_model, eps=eps))
        self.pos = nn.Sequential(nn.Linear(5, d_model), nn.LayerNorm(d_model, eps=eps))
        self.image_order = nn.Embedding(n_images, d_model)

    def forward(self, feats: torch.Tensor, boxes: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
        """feats (B, N, V, F), boxes (B, N, V, 5), image_index (N,) -> (B, N, V, d_model)."""
        dtype = self.feat[0].weight.dtype
        order = self.image_order(image_index)[None, :, None, :]
        return self.feat(feats.to(dtype)) + self.pos(boxes.to(dtype)) + order


def grid_boxes(side: int) -> torch.Tensor:
    """(side*side, 5) boxes of a side x side grid, row-major."""
    idx = torch.arange(side, dtype=torch.float32)
    y1, x1 = torch.meshgrid(idx / side, idx / side, indexing="ij")
    x1, y1 = x1.reshape(-1), y1.reshape(-1)
    w = torch.full_like(x1, 1.0 / side)
    return torch.stack([x1, y1, x1 + w, y1 + w, w * w], dim=-1)


def frame_boxes(n_frames: int, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """(F, 5) positions of F frames along time: (t0, 0, t1, 1, duration).

    With ``lengths`` (B,), each video's frames are placed along its own length: (B, F, 5), so a
    video's positions do not depend on the longest video of its batch (slots past a video's length,
    its padding, get positions past 1 and are masked)."""
    n = torch.tensor([[float(max(n_frames, 1))]]) if lengths is None else lengths.float().clamp(min=1)[:, None]
    t = torch.arange(n_frames, dtype=torch.float32, device=n.device) / n
    d = (1.0 / n).expand_as(t)
    out = torch.stack([t, torch.zeros_like(t), t + d, torch.ones_like(t), d], dim=-1)
    return out[0] if lengths is None else out
