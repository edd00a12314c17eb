"""DDPM ancestral sampling (Ho et al. 2020, Algorithm 2), on all T steps or "every k-th step".

    x_T ~ N(0, I)
    for t = T, ..., 1:
        z ~ N(0, I) if t > 1 else z = 0
        x_{t-1} = 1/sqrt(alpha_t) (x_t - (1 - alpha_t)/sqrt(1 - alpha_bar_t) eps_theta(x_t, t)) + sigma_t z
    return x_0

With fewer steps the schedule is respaced (improved-diffusion): the betas are recomputed for
the kept subsequence so every step is again an exact DDPM posterior step.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..errors import UserError
from ..parameterization import Denoiser
from ..progress import progress_bar
from ..reverse import check_variance, default_variance, p_mean_variance
from ..schedules import NoiseSchedule
from .grids import batch_t, check_grid_name, integer_grid
from .noise import NoiseSource

StepCallback = Callable[[dict], None]


def _respaced(schedule: NoiseSchedule, steps: int | None, grid) -> NoiseSchedule:
    """The schedule on the grid's integer timesteps (all T steps when steps is None or T)."""
    if (steps is None or steps == schedule.T) and isinstance(grid, str):
        check_grid_name(grid)  # every grid of T steps is all of them, but a misspelt name is still an error
        return schedule
    return schedule.respace(integer_grid(grid, schedule, steps))


def ddpm(
    denoiser: Denoiser,
    x: torch.Tensor,
    noise: NoiseSource,
    steps: int | None = None,
    grid: str = "uniform",
    variance: str = "auto",
    clip_x0: bool = False,
    callback: StepCallback | None = None,
    model_kwargs: dict | None = None,
    progress: bool = False,
    cond_fn: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    """Run Algorithm 2 from x = x_T: (B, ...) and return x_0.

    variance: sigma_t^2 = beta-tilde_t ('beta_tilde'), beta_t ('beta') or the model's ('learned');
        'auto' is the denoiser's own: learned if it learned one, else beta-tilde.
    clip_x0: clip the predicted x_0 to [-1, 1] before forming the posterior mean (DDPM's code).
    callback receives {'i', 't', 'x' (x_{t-1}), 'x0' (predicted x_0)} after every step.
    cond_fn(x_t, t, **model_kwargs) -> g shifts every mean by Sigma_t * g: classifier guidance's
    Algorithm 1 with g = s * grad log p(y | x_t) (ClassifierGuidance.cond_fn).
    """
    if variance == "auto":
        variance = default_variance(denoiser.learned_variance)
    check_variance(variance)
    schedule = _respaced(denoiser.schedule, steps, grid)
    positions = range(schedule.T - 1, -1, -1)
    if progress:
        positions = progress_bar(positions, desc="ddpm", leave=False)
    batch = x.shape[0]
    for i in positions:
        i_vec = torch.full((batch,), i, device=x.device, dtype=torch.long)
        t_model = batch_t(schedule.timesteps[i], x, torch.float32)
        out = denoiser(x, t_model, **(model_kwargs or {}))
        x0 = out.x0.clamp(-1, 1) if clip_x0 else out.x0
        mean, log_var = p_mean_variance(x0, x, i_vec, schedule, variance, out.var_frac)
        if cond_fn is not None:
            mean = mean + log_var.exp() * cond_fn(x, t_model, **(model_kwargs or {}))
        if i > 0:
            x = mean + (0.5 * log_var).exp() * noise.randn(x.shape[1:], x.dtype)
        else:
            x = mean  # DDPM: z = 0 at the last step, x_0 is the mean
        if callback is not None:
            callback({"i": i, "t": int(schedule.timesteps[i]), "x": x, "x0": x0})
    return x


def ddim(
    denoiser: Denoiser,
    x: torch.Tensor,
    noise: NoiseSource,
    steps: int | None = None,
    grid: str = "uniform",
    eta: float = 0.0,
    clip_x0: bool = False,
    callback: StepCallback | None = None,
    model_kwargs: dict | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12) on `steps` evenly spaced timesteps.

        x_{s} = sqrt(alpha_bar_s) x0_hat + sqrt(1 - alpha_bar_s - sigma^2) eps_hat + sigma z
        sigma = eta * sqrt((1 - alpha_bar_s) / (1 - alpha_bar_t)) * sqrt(1 - alpha_bar_t / alpha_bar_s)

    eta = 0 is the deterministic sampler (an Euler step of the probability-flow ODE in
    x / sqrt(alpha_bar)); eta = 1 is exactly DDPM ancestral sampling with sigma_t^2 = beta-tilde_t.
    """
    if not 0.0 <= eta < math.inf:
        raise UserError(f"eta must be a finite number >= 0, got {eta}")
    schedule = _respaced(denoiser.schedule, steps, grid)
    ab = schedule.alpha_bar
    positions = range(schedule.T - 1, -1, -1)
    if progress:
        positions = progress_bar(positions, desc=f"ddim(eta={eta:g})", leave=False)
    for i in positions:
        t_model = batch_t(schedule.timesteps[i], x, torch.float32)
        out = denoiser(x, t_model, **(model_kwargs or {}))
        x0, eps = out.x0, out.eps
        if clip_x0:
            x0 = x0.clamp(-1, 1)
            eps = (x - ab[i].sqrt().item() * x0) / (1 - ab[i]).sqrt().item()  # keep eps consistent with the clipped x0
        ab_t, ab_s = ab[i], (ab[i - 1] if i > 0 else ab.new_tensor(1.0))
        sigma = eta * ((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s)).sqrt()
        x = ab_s.sqrt().item() * x0 + (1 - ab_s - sigma**2).clamp(min=0).sqrt().item() * eps
        if i > 0 and eta > 0:
            x = x + sigma.item() * noise.randn(x.shape[1:], x.dtype)
        if callback is not None:
            callback({"i": i, "t": int(schedule.timesteps[i]), "x": x, "x0": x0})
    return x
