"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022), and its latent space.

    z ~ q(z | x) = N(mu(x), diag sigma^2(x))         encoder, a diagonal Gaussian posterior
    x_hat = D(z)                                      decoder
    loss = ||x - x_hat||^2 (summed) + kl_weight * KL(q(z|x) || N(0, I))

Diffusion then runs on scale_factor * mu(x): the scale factor (1 / std of the training latents,
computed from data and stored with the checkpoint) gives the latents unit variance, as the noise
schedule assumes. Images are padded with the background value -1 to `pad_to` so that the
latent grid is whole (28 -> 32 -> 8x8 for the digits) and cropped back after decoding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AutoencoderConfig
from ..errors import UserError
from .layers import Downsample, ResBlock, SelfAttention, Upsample, group_norm


def latent_shape(image_shape: tuple[int, ...], cfg: AutoencoderConfig) -> tuple[int, int, int]:
    """(z_channels, s, s) for square images (C, H, H) padded to max(pad_to, H); one halving per extra level."""
    if len(image_shape) != 3 or image_shape[1] != image_shape[2]:
        raise UserError(f"the autoencoder needs square images (C, H, H), got {tuple(image_shape)}")
    size = max(cfg.pad_to, image_shape[1])
    factor = 2 ** (len(cfg.channel_mult) - 1)
    if size % factor:
        raise UserError(f"image size {size} (after padding) must be divisible by {factor} for channel_mult={cfg.channel_mult}; "
                        f"set autoencoder.pad_to to a multiple of {factor}")
    return (cfg.z_channels, size // factor, size // factor)


class Encoder(nn.Module):
    """x: (B, C, S, S) -> posterior mean and log-variance, each (B, z, S / 2^(levels-1), same)."""

    def __init__(self, in_channels: int, z_channels: int, base: int, mult: tuple[int, ...], num_res_blocks: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, base, 3, padding=1)]
        ch = base
        for level, m in enumerate(mult):
            for _ in range(num_res_blocks):
                layers.append(ResBlock(ch, base * m, 0))
                ch = base * m
            if level < len(mult) - 1:
                layers.append(Downsample(ch))
        layers += [ResBlock(ch, ch, 0), SelfAttention(ch, 1), ResBlock(ch, ch, 0), group_norm(ch), nn.SiLU(),
                   nn.Conv2d(ch, 2 * z_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_var = self.net(x).chunk(2, dim=1)
        return mean, log_var.clamp(-30.0, 20.0)


class Decoder(nn.Module):
    """z: (B, z, s, s) -> x_hat: (B, C, s * 2^(levels-1), same)."""

    def __init__(self, out_channels: int, z_channels: int, base: int, mult: tuple[int, ...], num_res_blocks: int):
        super().__init__()
        ch = base * mult[-1]
        layers: list[nn.Module] = [nn.Conv2d(z_channels, ch, 3, padding=1), ResBlock(ch, ch, 0), SelfAttention(ch, 1),
                                   ResBlock(ch, ch, 0)]
        for level, m in reversed(list(enumerate(mult))):
            for _ in range(num_res_blocks + 1):
                layers.append(ResBlock(ch, base * m, 0))
                ch = base * m
            if level > 0:
                layers.append(Upsample(ch))
        layers += [group_norm(ch), nn.SiLU(), nn.Conv2d(ch, out_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class Autoencoder(nn.Module):
    """encode(x) -> (mean, log_var) of q(z | x); decode(z) -> x_hat; images (C, H, W) in [-1, 1]."""

    def __init__(self, image_shape: tuple[int, int, int], cfg: AutoencoderConfig):
        super().__init__()
        C = image_shape[0]
        self.image_shape = tuple(image_shape)
        self.size = max(cfg.pad_to, image_shape[1])
        self.latent_shape = latent_shape(self.image_shape, cfg)
        self.encoder = Encoder(C, cfg.z_channels, cfg.base_channels, cfg.channel_mult, cfg.num_res_blocks)
        self.decoder = Decoder(C, cfg.z_channels, cfg.base_channels, cfg.channel_mult, cfg.num_res_blocks)
        self.register_buffer("scale_factor", torch.tensor(1.0))  # set from data after training

    def _pad(self) -> tuple[int, int, int, int]:
        before = (self.size - self.image_shape[1]) // 2
        after = self.size - self.image_shape[1] - before
        return (before, after, before, after)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(F.pad(x, self._pad(), value=-1.0))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        left, right, top, bottom = self._pad()
        x = self.decoder(z)
        return x[..., top:x.shape[-2] - bottom, left:x.shape[-1] - right]

    def forward(self, x: torch.Tensor, eps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction from the posterior sample z = mean + sigma * eps (eps: (B, *latent_shape),
        drawn here when not given), and KL(q(z|x) || N(0, I)) per example: (B, C, H, W), (B,)."""
        mean, log_var = self.encode(x)
        if eps is None:
            eps = torch.randn_like(mean)
        z = mean + (0.5 * log_var).exp() * eps
        kl = 0.5 * (mean**2 + log_var.exp() - 1.0 - log_var).flatten(1).sum(1)
        return self.decode(z), kl

    # ---- the latent space diffusion sees
    @torch.no_grad()
    def to_latent(self, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
        """Scaled posterior means: (B, C, H, W) images -> (B, *latent_shape), about unit variance."""
        return torch.cat([self.encode(c)[0] for c in x.split(batch)]) * self.scale_factor

    @torch.no_grad()
    def from_latent(self, z: torch.Tensor, batch: int = 500) -> torch.Tensor:
        """Decode scaled latents back to images in [-1, 1]."""
        return torch.cat([self.decode(c / self.scale_factor) for c in z.split(batch)]).clamp(-1, 1)
