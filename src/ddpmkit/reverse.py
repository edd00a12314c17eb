"""The reverse process p_theta(x_{t-1} | x_t) = N(mu_theta, Sigma_theta) built from a denoiser output.

Shared by the ancestral sampler (Algorithm 2) and the variational bound (losses.py), so the two
can never disagree about what the model's distribution is.
"""
from __future__ import annotations

from typing import Literal, get_args

import torch

from .errors import UserError
from .process import q_posterior_mean_variance
from .schedules import NoiseSchedule
from .utils import extract

Variance = Literal["beta_tilde", "beta", "learned"]
VARIANCES: tuple[str, ...] = get_args(Variance)


def check_variance(variance: str) -> None:
    if variance not in VARIANCES:
        raise UserError(f"unknown variance {variance!r}; choose one of {list(VARIANCES)}")


def default_variance(learned_variance: bool) -> str:
    """The model's own variance if it learned one, else beta-tilde_t (DDPM's "fixed_small")."""
    return "learned" if learned_variance else "beta_tilde"


def p_log_variance(
    variance: str, i: torch.Tensor, like: torch.Tensor, schedule: NoiseSchedule, var_frac: torch.Tensor | None = None
) -> torch.Tensor:
    """log sigma_t^2 of p_theta(x_{t-1}|x_t) at table positions i: (B,).

    'beta_tilde': sigma_t^2 = beta-tilde_t (DDPM's lower bound on the reverse variance, "fixed_small").
    'beta':       sigma_t^2 = beta_t (the upper bound, "fixed_large"); at t = 0, where only the
                  decoder's likelihood uses it, beta-tilde_1 as in improved-diffusion.
    'learned':    interpolate the two in log space with the network's var_frac in [0, 1].
    """
    check_variance(variance)
    log_small = extract(schedule.posterior_log_variance_clipped, i, like)
    if variance == "beta_tilde":
        return log_small.expand_as(like)
    log_large_table = torch.cat([schedule.posterior_log_variance_clipped[1:2], schedule.betas[1:].log()]) if schedule.T > 1 else schedule.betas.log()
    log_large = extract(log_large_table, i, like)
    if variance == "beta":
        return log_large.expand_as(like)
    if var_frac is None:
        raise UserError("variance='learned' needs a model trained with learned variance")
    return var_frac * log_large + (1 - var_frac) * log_small


def p_mean_variance(
    x0: torch.Tensor,
    x_t: torch.Tensor,
    i: torch.Tensor,
    schedule: NoiseSchedule,
    variance: str = "beta_tilde",
    var_frac: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and log variance of p_theta(x_{t-1} | x_t) given the predicted x0.

    mu_theta(x_t, t) = mu-tilde_t(x_t, x0_theta): with eps-prediction this equals DDPM eq. (11),
    mu = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_theta) / sqrt(alpha_t).
    ``i`` indexes ``schedule`` (which may be respaced); x0 is already clipped if the caller wants it.
    """
    mean, _, _ = q_posterior_mean_variance(x0, x_t, i, schedule)
    return mean, p_log_variance(variance, i, x_t, schedule, var_frac)
