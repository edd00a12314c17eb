"""Learned per-level uncertainty weighting (EDM2, Karras et al. 2024, Sec. 5 "loss weighting").

The per-example loss L(x; t) (already weighted by the configured lambda(t)) is replaced by

    L / exp(u(t)) + u(t),

where u(t) is a small learned function of the noise level: Fourier features of log-SNR(t) and one
linear layer, zero-initialised (u = 0: the plain loss at the start). For a fixed level, the u that
minimises E[L] exp(-u) + u is u* = ln E[L(t)], so at the optimum every level contributes
E[L] / E[L] = 1 to the gradient's scale: the levels whose loss is large (and hard to reduce) stop
drowning out the others, without a hand-tuned weighting. The network's predictions do not see u;
samplers call the wrapped network and never ask for it.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .schedules import NoiseSchedule


class LevelUncertainty(nn.Module):
    """u(t): cos(2 pi (f c + phi)) features of c = log-SNR(t) / 8, f ~ N(0, 1) and phi ~ U(0, 1) fixed
    (buffers drawn from a fixed seed, so every process and every reload builds the same ones), then
    one zero-initialised linear layer."""

    def __init__(self, schedule: NoiseSchedule, features: int = 64):
        super().__init__()
        self.schedule = schedule
        g = torch.Generator().manual_seed(0)
        self.register_buffer("freqs", torch.randn(features, generator=g))
        self.register_buffer("phases", torch.rand(features, generator=g))
        self.linear = nn.Linear(features, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """u at timesteps t: (B,) -> (B,), float32."""
        alpha_bar = self.schedule.alpha_bar_at(t.detach(), check=False)
        c = (alpha_bar / (1 - alpha_bar)).log().to(torch.float32).to(self.freqs.device) / 8
        feats = torch.cos(2 * math.pi * (c[:, None] * self.freqs + self.phases)) * math.sqrt(2)
        return self.linear(feats).squeeze(1)


class UncertaintyWeighted(nn.Module):
    """A denoiser with a LevelUncertainty head beside it (diffusion.uncertainty_weighting = true).
    net(x_t, t) as before; net(x_t, t, return_log_variance=True) -> (output, u(t)) for the loss.
    The head is saved with the weights and ignored when sampling."""

    def __init__(self, net: nn.Module, schedule: NoiseSchedule):
        super().__init__()
        self.net = net
        self.log_variance = LevelUncertainty(schedule)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, return_log_variance: bool = False, **extra):
        out = self.net(x_t, t, **extra)
        return (out, self.log_variance(t)) if return_log_variance else out


def uncertainty_weighted_loss(loss: torch.Tensor, log_variance: torch.Tensor) -> torch.Tensor:
    """L / exp(u) + u, per example: (B,), (B,) -> (B,)."""
    return loss * torch.exp(-log_variance.to(loss.dtype)) + log_variance.to(loss.dtype)
