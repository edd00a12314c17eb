"""A contrastive text-image encoder (CLIP, Radford et al. 2021) at the scale of the digits.

Text tower: the frozen text encoder's token embeddings (MiniLM by default), mean-pooled as
sentence-transformers pools them, then a learned projection. Image tower: the UNet's down path
with a pooled linear head (the noisy classifier's architecture); the noisy variant also takes t,
so it embeds x_t for CLIP guidance (GLIDE's noisy CLIP). Both embeddings are unit vectors, and
logit_scale = log(1 / temperature) is learned.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .layers import pooled_context

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clips the learned temperature at 1/100


class CLIP(nn.Module):
    """encode_image(x (B, C, H, W), t (B,) or None) -> (B, E); encode_text(context (B, L, D),
    context_mask (B, L)) -> (B, E); both L2-normalised. forward returns both and the scale
    1 / temperature (for training: a wrapped model exposes only forward)."""

    def __init__(self, image_tower: nn.Module, image_shape: tuple[int, ...], context_dim: int, embed_dim: int, text_hidden: int = 256,
                 init_temperature: float = 0.07, noisy: bool = False):
        super().__init__()
        self.image_tower = image_tower
        self.image_shape, self.embed_dim, self.context_dim, self.noisy = tuple(image_shape), embed_dim, context_dim, noisy
        self.text_proj = nn.Sequential(nn.LayerNorm(context_dim), nn.Linear(context_dim, text_hidden), nn.GELU(),
                                       nn.Linear(text_hidden, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))

    @property
    def scale(self) -> torch.Tensor:
        """1 / temperature, clipped at 100."""
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()

    def encode_image(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise UserError(f"this CLIP embeds images of shape {self.image_shape} (C, H, W); got {tuple(x.shape[1:])}")
        if t is None:
            if self.noisy:
                raise UserError("this is a noisy CLIP: give the timestep t of x_t")
            t = torch.zeros(x.shape[0], device=x.device)
        t = torch.as_tensor(t, device=x.device).float().expand(x.shape[0])
        return F.normalize(self.image_tower(x, t).float(), dim=-1)

    def encode_text(self, context: torch.Tensor, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        if context.ndim != 3 or context.shape[-1] != self.context_dim:
            raise UserError(f"this CLIP embeds text tokens of width {self.context_dim} (B, L, D); got {tuple(context.shape)}")
        return F.normalize(self.text_proj(pooled_context(context, context_mask)).float(), dim=-1)

    @torch.no_grad()
    def embed_images(self, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        """Embeddings of clean images, in chunks, on the CPU: (B, C, H, W) -> (B, E)."""
        device = self.logit_scale.device
        return torch.cat([self.encode_image(c.to(device), torch.zeros(len(c), device=device)).cpu() for c in x.split(batch_size)])

    @torch.no_grad()
    def embed_texts(self, tokens: dict[str, torch.Tensor], batch_size: int = 500) -> torch.Tensor:
        """Embeddings of encoded captions ({'context', 'context_mask'} of TextEncoder.encode): (B, E)."""
        device = self.logit_scale.device
        return torch.cat([self.encode_text(c.to(device), m.to(device)).cpu()
                          for c, m in zip(tokens["context"].split(batch_size), tokens["context_mask"].split(batch_size))])

    def forward(self, x: torch.Tensor, t: torch.Tensor | None, context: torch.Tensor,
                context_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.encode_image(x, t), self.encode_text(context, context_mask), self.scale
