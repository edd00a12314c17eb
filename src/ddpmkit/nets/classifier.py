"""A small CNN classifier for digit images: the project's judge of generated digits."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..utils import queued_copy
from .layers import group_norm
from .unet import Conditioning, DownPath


class DigitClassifier(nn.Module):
    """x: (B, 1, H, W) in [-1, 1] -> logits (B, num_classes); ``features`` gives the (B, 128) embedding."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(4 * w, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to max_shift pixels (background -1 fills in): (B, C, H, W). One gather, not a slice per
    image: a slice's bounds are read by the host (four reads per image, each a wait on a GPU)."""
    B, C, H, W = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dx = torch.randint(0, 2 * max_shift + 1, (B,), generator=generator, device=generator.device)
    dy = torch.randint(0, 2 * max_shift + 1, (B,), generator=generator, device=generator.device)
    d = x.device
    rows = queued_copy(dy, d).view(B, 1, 1, 1) + torch.arange(H, device=d).view(1, 1, H, 1)
    cols = queued_copy(dx, d).view(B, 1, 1, 1) + torch.arange(W, device=d).view(1, 1, 1, W)
    return padded[torch.arange(B, device=d).view(B, 1, 1, 1), torch.arange(C, device=d).view(1, C, 1, 1), rows, cols]  # (B, C, H, W)


class NoisyClassifier(nn.Module):
    """p_phi(y | x_t) for classifier guidance: the UNet's down path and middle block with the time
    embedding, then GroupNorm-SiLU, global average pooling and a linear head (ADM's encoder
    classifier, with mean instead of attention pooling).

    x: (B, C, H, W) noisy images, t: (B,) float timesteps -> logits (B, num_classes)
    """

    def __init__(self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10, base_channels: int = 32,
                 channel_mult: tuple[int, ...] = (1, 2, 4), num_res_blocks: int = 1, attention_resolutions: tuple[int, ...] = (7,),
                 num_heads: int = 4, dropout: float = 0.0):
        super().__init__()
        emb_dim = 4 * base_channels
        self.cond = Conditioning(base_channels, emb_dim)
        self.down = DownPath(in_channels, image_size, base_channels, channel_mult, num_res_blocks, attention_resolutions,
                             num_heads, emb_dim, dropout)
        self.out_norm = group_norm(self.down.out_channels)
        self.head = nn.Linear(self.down.out_channels, num_classes)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h, _ = self.down(x, self.cond(x, t)[0])
        return self.head(F.silu(self.out_norm(h)).mean(dim=(2, 3)))
