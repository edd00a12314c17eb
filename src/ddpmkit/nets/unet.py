"""A DDPM/ADM-style UNet: residual blocks, self-attention at chosen resolutions, time embedding."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Downsample, LabelEmbedding, ResBlock, SelfAttention, Upsample, group_norm, timestep_embedding, zero_module


class UNet(nn.Module):
    """eps_theta(x_t, t) for images. x: (B, C, H, W), t: (B,) float timesteps -> (B, C_out, H, W).

    Levels i = 0..len(channel_mult)-1 run at resolution image_size / 2^i with
    base_channels * channel_mult[i] channels; each has num_res_blocks ResBlocks going down and
    num_res_blocks + 1 coming up (each taking a skip connection), with self-attention after the
    blocks of levels whose resolution is in attention_resolutions.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int | None = None,
        image_size: int = 28,
        base_channels: int = 64,
        channel_mult: tuple[int, ...] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: tuple[int, ...] = (7,),
        num_heads: int = 4,
        dropout: float = 0.1,
        num_classes: int = 0,
    ):
        super().__init__()
        factor = 2 ** (len(channel_mult) - 1)
        if image_size % factor:
            raise ValueError(
                f"image size {image_size} must be divisible by {factor} for {len(channel_mult)} UNet levels "
                f"(channel_mult={tuple(channel_mult)}); resize the data or use fewer levels"
            )
        resolutions = [image_size // 2**i for i in range(len(channel_mult))]
        unknown = set(attention_resolutions) - set(resolutions)
        if unknown:
            raise ValueError(f"attention_resolutions {sorted(unknown)} are not UNet resolutions; choose from {resolutions}")
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        emb_dim = 4 * base_channels
        self.base_channels = base_channels
        self.time_mlp = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = LabelEmbedding(num_classes, emb_dim) if num_classes > 0 else None
        self.input_conv = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        self.down = nn.ModuleList()
        skip_channels = [base_channels]
        ch = base_channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                out = base_channels * mult
                attn = SelfAttention(out, num_heads) if resolutions[level] in attention_resolutions else nn.Identity()
                self.down.append(nn.ModuleList([ResBlock(ch, out, emb_dim, dropout), attn]))
                ch = out
                skip_channels.append(ch)
            if level < len(channel_mult) - 1:
                self.down.append(Downsample(ch))
                skip_channels.append(ch)

        self.mid_block1 = ResBlock(ch, ch, emb_dim, dropout)
        self.mid_attn = SelfAttention(ch, num_heads)
        self.mid_block2 = ResBlock(ch, ch, emb_dim, dropout)

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for j in range(num_res_blocks + 1):
                out = base_channels * mult
                attn = SelfAttention(out, num_heads) if resolutions[level] in attention_resolutions else nn.Identity()
                self.up.append(nn.ModuleList([ResBlock(ch + skip_channels.pop(), out, emb_dim, dropout), attn]))
                ch = out
            if level > 0:
                self.up.append(Upsample(ch))

        self.out_norm = group_norm(ch)
        self.out_conv = zero_module(nn.Conv2d(ch, self.out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """y: (B,) class labels for a class-conditional network (None = the null label)."""
        emb = self.time_mlp(timestep_embedding(t, self.base_channels))  # (B, E)
        if self.label_emb is not None:
            emb = emb + self.label_emb(y, x.shape[0], x.device)
        elif y is not None:
            raise ValueError("this network is not class-conditional (network.num_classes = 0)")
        h = self.input_conv(x)
        skips = [h]
        for layer in self.down:
            if isinstance(layer, Downsample):
                h = layer(h)
            else:
                block, attn = layer
                h = attn(block(h, emb))
            skips.append(h)
        h = self.mid_block2(self.mid_attn(self.mid_block1(h, emb)), emb)
        for layer in self.up:
            if isinstance(layer, Upsample):
                h = layer(h)
            else:
                block, attn = layer
                h = attn(block(torch.cat([h, skips.pop()], dim=1), emb))
        return self.out_conv(F.silu(self.out_norm(h)))
