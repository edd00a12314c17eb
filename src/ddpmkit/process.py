"""The forward (noising) process of DDPM and its Gaussian posterior. Nothing here is trainable.

All functions take integer timesteps t: (B,) (0-indexed, see schedules.py) and tensors x: (B, ...).
"""
from __future__ import annotations

import torch

from .schedules import NoiseSchedule
from .utils import extract, mean_flat


def q_step_mean_variance(x_prev: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule) -> tuple[torch.Tensor, torch.Tensor]:
    """q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)   (DDPM eq. 2)."""
    beta = extract(schedule.betas, t, x_prev)
    return (1.0 - beta).sqrt() * x_prev, beta.expand_as(x_prev)


def q_step_sample(x_prev: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule, noise: torch.Tensor | None = None) -> torch.Tensor:
    """One forward step: x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) z."""
    noise = torch.randn_like(x_prev) if noise is None else noise
    mean, var = q_step_mean_variance(x_prev, t, schedule)
    return mean + var.sqrt() * noise


def q_mean_variance(x0: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule) -> tuple[torch.Tensor, torch.Tensor]:
    """q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)   (DDPM eq. 4)."""
    ab = extract(schedule.alpha_bar, t, x0)
    return ab.sqrt() * x0, (1.0 - ab).expand_as(x0)


def q_sample(x0: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Closed-form forward process: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps."""
    noise = torch.randn_like(x0) if noise is None else noise
    ab = extract(schedule.alpha_bar, t, x0)
    return ab.sqrt() * x0 + (1.0 - ab).sqrt() * noise


def q_posterior_mean_variance(
    x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q(x_{t-1} | x_t, x_0) = N(mu-tilde, beta-tilde I)   (DDPM eqs. 6-7).

    mu-tilde = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) x_0
             + sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) x_t
    Returns (mean, variance, log_variance_clipped); at t = 0 the variance is 0 and the log
    variance is clipped to beta-tilde_1, as improved-diffusion does.
    """
    c0, ct = posterior_mean_coefficients(schedule)
    mean = extract(c0, t, x_t) * x0 + extract(ct, t, x_t) * x_t
    var = extract(schedule.posterior_variance, t, x_t).expand_as(x_t)
    log_var = extract(schedule.posterior_log_variance_clipped, t, x_t).expand_as(x_t)
    return mean, var, log_var


def posterior_mean_coefficients(schedule: NoiseSchedule) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 tables (coef of x_0, coef of x_t) in mu-tilde_t(x_t, x_0) (DDPM eq. 7), computed once per schedule
    (so a GPU gets its copy once, not at every step)."""
    return schedule.posterior_mean_coef_x0, schedule.posterior_mean_coef_xt


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def prior_kl(x0: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """L_T = KL(q(x_T | x_0) || N(0, I)) per example, in nats per dimension: (B,).

    It has no learnable parameters; it is small when alpha_bar_T is close to 0.
    """
    x0_64 = x0.to(torch.float64)  # 1 - alpha_bar_T is close to 1: float32 loses the KL's digits
    t = torch.full((x0.shape[0],), schedule.T - 1, device=x0.device, dtype=torch.long)
    mean, var = q_mean_variance(x0_64, t, schedule)
    kl = normal_kl(mean, var.log(), torch.zeros_like(mean), torch.zeros_like(mean))
    return mean_flat(kl).to(x0.dtype)

