"""Building blocks shared by the networks: time embedding, residual block, self-attention."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of float timesteps t: (B,) -> (B, dim)  (Transformer / DDPM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([args.cos(), args.sin()], dim=-1)
    return F.pad(emb, (0, dim % 2))


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups that divide the channel count."""
    return nn.GroupNorm(math.gcd(32, channels), channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters so the block it closes starts as the identity (ADM)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, time embedding as scale and shift of the second norm, dropout, conv; plus a skip.

    x: (B, C_in, H, W), emb: (B, E) -> (B, C_out, H, W). emb_dim = 0: no embedding (the autoencoder).
    """

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch) if emb_dim > 0 else None
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm2(self.conv1(F.silu(self.norm1(x))))
        if self.emb is not None:
            scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
            h = h * (1 + scale) + shift  # ADM's scale-shift norm
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions, residual. x: (B, C, H, W) -> same."""

    def __init__(self, channels: int, num_heads: int = 4):
        super().__init__()
        if channels % num_heads:
            raise UserError(f"attention channels {channels} are not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x).reshape(B, C, H * W))  # (B, 3C, L)
        q, k, v = qkv.reshape(B, 3, self.num_heads, C // self.num_heads, H * W).transpose(-1, -2).unbind(1)  # (B, nh, L, hs)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, nh, L, hs)
        h = h.transpose(-1, -2).reshape(B, C, H * W)
        return x + self.proj(h).reshape(B, C, H, W)


class CrossAttention(nn.Module):
    """Image positions attend to text tokens (Stable Diffusion, Imagen), residual.

    x: (B, C, H, W), context: (B, L, D), mask: (B, L) True at real tokens -> (B, C, H, W)
    """

    def __init__(self, channels: int, context_dim: int, num_heads: int = 4):
        super().__init__()
        if channels % num_heads:
            raise UserError(f"attention channels {channels} are not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.context_norm = nn.LayerNorm(context_dim)
        self.q = nn.Conv1d(channels, channels, 1)
        self.kv = nn.Linear(context_dim, 2 * channels)
        self.proj = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, C, H, W = x.shape
        nh, hs = self.num_heads, C // self.num_heads
        q = self.q(self.norm(x).reshape(B, C, H * W)).reshape(B, nh, hs, H * W).transpose(-1, -2)  # (B, nh, HW, hs)
        k, v = self.kv(self.context_norm(context)).reshape(B, -1, 2, nh, hs).permute(2, 0, 3, 1, 4)  # (B, nh, L, hs) each
        attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, L)
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, nh, HW, hs)
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H * W)).reshape(B, C, H, W)


class AttentionBlock(nn.Module):
    """Self-attention, then cross-attention to the context when the network is text-conditional."""

    def __init__(self, channels: int, num_heads: int, context_dim: int = 0):
        super().__init__()
        self.self_attn = SelfAttention(channels, num_heads)
        self.cross_attn = CrossAttention(channels, context_dim, num_heads) if context_dim > 0 else None

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.self_attn(x)
        return x if self.cross_attn is None else self.cross_attn(x, context, mask)


class NoAttention(nn.Module):
    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        return x


def pooled_context(context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of the real tokens: (B, L, D), (B, L) -> (B, D)."""
    if mask is None:
        return context.mean(1)
    w = mask.to(context.dtype)[..., None]
    return (context * w).sum(1) / w.sum(1).clamp(min=1)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 convolution to out_channels (default: as many as come in)."""

    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class LabelEmbedding(nn.Module):
    """Class labels 0..num_classes-1 plus a learned null label (index num_classes, also used for
    y=None): the unconditional branch of classifier-free guidance. Added to the time embedding."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)

    def forward(self, y: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        if y is None:
            y = torch.full((batch,), self.num_classes, device=device, dtype=torch.long)
        y = torch.as_tensor(y, device=device).long()
        if bool(((y < 0) | (y > self.num_classes)).any()):
            raise UserError(f"class labels must lie in [0, {self.num_classes - 1}] (or {self.num_classes} = null)")
        return self.table(y)
