"""The diffusion prior of unCLIP (Ramesh et al. 2022, section 2.2): a denoiser of CLIP image
embeddings conditioned on the caption, as a small transformer.

The sequence is [caption tokens (L), CLIP text embedding, timestep, x_t, query]; the output at the
query token is the prediction (x0 of the embedding, as DALL-E 2's prior predicts). The network is an
ordinary denoiser of vectors, model(x_t, t, **condition), so every sampler drives it.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError
from .layers import timestep_embedding


def prior_data_scale(embed_dim: int) -> float:
    """The prior diffuses sqrt(E) * (unit CLIP embedding): about unit variance per coordinate,
    the scale the schedules assume for data (DALL-E 2 scales its embeddings the same way)."""
    return embed_dim ** 0.5


class PriorTransformer(nn.Module):
    """x: (B, E) noisy embeddings, t: (B,), text_embed: (B, E), context: (B, L, D), context_mask: (B, L) -> (B, E)."""

    def __init__(self, embed_dim: int, context_dim: int, width: int = 256, layers: int = 4, heads: int = 4, max_tokens: int = 16):
        super().__init__()
        self.embed_dim, self.width = embed_dim, width
        self.context_proj = nn.Linear(context_dim, width)
        self.text_embed_proj = nn.Linear(embed_dim, width)
        self.time_mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.x_proj = nn.Linear(embed_dim, width)
        self.query = nn.Parameter(0.02 * torch.randn(width))
        self.position = nn.Parameter(0.02 * torch.randn(max_tokens + 4, width))
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out_norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, embed_dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, text_embed: torch.Tensor | None = None, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        if text_embed is None or context is None:
            raise UserError("the prior is conditioned on a caption: pass text_embed= (B, E) and context= / context_mask= "
                            "(DiffusionModel.encode_prompts gives all three; the empty prompt is the unconditional branch)")
        B, L = x.shape[0], context.shape[1]
        if L + 4 > self.position.shape[0]:
            raise UserError(f"the prior takes at most {self.position.shape[0] - 4} caption tokens, got {L}")
        dtype = self.x_proj.weight.dtype
        time = self.time_mlp(timestep_embedding(t, self.width).to(dtype))
        tokens = torch.cat([self.context_proj(context.to(dtype)), self.text_embed_proj(text_embed.to(dtype))[:, None], time[:, None],
                            self.x_proj(x.to(dtype))[:, None], self.query.to(dtype).expand(B, 1, -1)], dim=1)  # (B, L + 4, W)
        tokens = tokens + self.position[:L + 4].to(dtype)
        mask = torch.ones(B, L, dtype=torch.bool, device=x.device) if context_mask is None else context_mask.bool()
        ignore = torch.cat([~mask, torch.zeros(B, 4, dtype=torch.bool, device=x.device)], dim=1)  # True = padding
        h = self.transformer(tokens, src_key_padding_mask=ignore)
        return self.out(self.out_norm(h[:, -1]))
