"""An MLP denoiser for low-dimensional data (2-D toys)."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError
from .layers import LabelEmbedding, timestep_embedding


class MLPDenoiser(nn.Module):
    """x: (B, D), t: (B,) -> (B, D_out). Residual SiLU blocks, time embedding added at every block."""

    def __init__(self, dim: int = 2, hidden: int = 256, num_layers: int = 4, out_dim: int | None = None, time_dim: int = 64,
                 num_classes: int = 0):
        super().__init__()
        self.time_dim = time_dim
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.label_emb = LabelEmbedding(num_classes, hidden) if num_classes > 0 else None
        self.input = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, hidden)) for _ in range(num_layers))
        self.output = nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, out_dim or dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.time_dim))
        if self.label_emb is not None:
            emb = emb + self.label_emb(y, x.shape[0], x.device)
        elif y is not None:
            raise UserError("this network is not class-conditional (network.num_classes = 0)")
        h = self.input(x)
        for block in self.blocks:
            h = h + block(h + emb)
        return self.output(h)
