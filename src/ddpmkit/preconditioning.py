"""EDM preconditioning for VP schedules (Karras et al. 2022, Table 1), written in the VP variables.

EDM writes a noisy example as x = x_0 + sigma n and its denoiser as
    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma)),
with c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2), c_in = 1 / sqrt(sigma^2 + sd^2)
(sd = sigma_data, the data's standard deviation): the network's input and its regression target
F* = (x_0 - c_skip x) / c_out both have unit variance at every noise level.

A VP sample x_t = sqrt(a) x_0 + sqrt(1 - a) eps (a = alpha_bar_t) is that x scaled by sqrt(a), with
sigma^2 = (1 - a) / a. With D = 1 - a + a sd^2 (the variance of x_t) the same denoiser reads
    x0_hat = sqrt(a) sd^2 / D * x_t + sd sqrt(1 - a) / sqrt(D) * F(x_t / sqrt(D); t),
so the preconditioned network is an x0-predicting network to the rest of ddpmkit; c_noise is the
VP timestep t itself, as in EDM's own VP preconditioning. Training it with the x0 loss weighted by
1 / c_out^2 = SNR + 1 / sd^2 (losses.loss_weight 'edm') is EDM's loss, || F - F* ||^2.
With sd = 1 this is v-prediction: F = -v.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .schedules import NoiseSchedule
from .utils import append_dims


class EDMCoefficients(NamedTuple):
    c_skip: torch.Tensor  # multiplies x_t
    c_out: torch.Tensor  # multiplies the network output F
    c_in: torch.Tensor  # scales x_t into the network


def edm_coefficients(alpha_bar: torch.Tensor, sigma_data: float) -> EDMCoefficients:
    """The VP form of EDM's c_skip, c_out and c_in at alpha_bar: (B,) (float64 in, float64 out)."""
    a = alpha_bar.to(torch.float64)
    var_x_t = 1 - a + a * sigma_data**2  # D: the variance of x_t for data of std sigma_data
    return EDMCoefficients(c_skip=a.sqrt() * sigma_data**2 / var_x_t, c_out=sigma_data * (1 - a).sqrt() / var_x_t.sqrt(),
                           c_in=1 / var_x_t.sqrt())


def edm_target(x0: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """F* = (x_0 - c_skip x_t) / c_out: what the inner network F learns to output."""
    c = edm_coefficients(alpha_bar, sigma_data)
    return (x0 - append_dims(c.c_skip, x0.ndim).to(x0.dtype) * x_t) / append_dims(c.c_out, x0.ndim).to(x0.dtype)


class EDMPreconditioned(nn.Module):
    """An inner network F wrapped into the x0-predicting denoiser D above (diffusion.precondition =
    'edm', with diffusion.prediction = 'x0'). The coefficients are computed in float64 from the
    schedule's exact alpha_bar(t), fractional t included, whatever precision F runs in."""

    def __init__(self, net: nn.Module, schedule: NoiseSchedule, sigma_data: float):
        super().__init__()
        self.net = net
        self.schedule = schedule
        self.sigma_data = sigma_data

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, **extra) -> torch.Tensor:
        alpha_bar = self.schedule.alpha_bar_at(t.detach(), check=False).to(x_t.device)
        c_skip, c_out, c_in = (append_dims(c, x_t.ndim).to(torch.float32) for c in edm_coefficients(alpha_bar, self.sigma_data))
        F = self.net(c_in.to(x_t.dtype) * x_t, t, **extra)
        return c_skip * x_t.float() + c_out * F.float()
