"""Samplers that add fresh noise to x_bar and then step the probability-flow ODE in sigma (see continuous.py):

- Euler ancestral (k-diffusion's sample_euler_ancestral, "Euler a" in Stable Diffusion web UIs): an Euler step down to
  sigma_down, then noise up to sigma_next. On a grid of the schedule's own timesteps it is DDIM with the same eta, draw
  for draw (DDIM eq. 12 divided by sqrt(alpha_bar_s)); its use is on the continuous grids (karras, logsnr).
- EDM's stochastic sampler (Karras et al. 2022, Algorithm 2): raise the noise level from sigma to
  sigma_hat = (1 + gamma) sigma by adding fresh noise, then take a Heun step from sigma_hat to sigma_next. The added
  noise and the ODE's removal of it correct the errors earlier steps made (EDM sec. 4); churn = 0 is Heun's method.
"""
from __future__ import annotations

import math

import torch

from ..errors import UserError
from ..parameterization import Denoiser
from .continuous import Trajectory
from .noise import NoiseSource


def ancestral_sigmas(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step from sigma to sigma_next: the ODE goes to sigma_down, fresh noise of
    sigma_up brings it to sigma_next (sigma_down^2 + sigma_up^2 = sigma_next^2). eta = 1 is DDPM's posterior noise:
    sigma_up^2 = sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2 (beta-tilde in these coordinates); eta = 0 the ODE."""
    if sigma_next == 0:
        return 0.0, 0.0
    up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - up**2), up


def euler_ancestral(denoiser: Denoiser, x: torch.Tensor, noise: NoiseSource, steps: int | None = None, grid="karras",
                    eta: float = 1.0, callback=None, model_kwargs=None, progress=False, **options) -> torch.Tensor:
    """Euler ancestral: x_bar <- x_bar + (sigma_down - sigma) eps, then + sigma_up z (ancestral_sigmas). One network
    evaluation per step; eta = 0 is Euler's method on the ODE."""
    if not 0.0 <= eta < math.inf:
        raise UserError(f"`eta` must be a finite number >= 0, got {eta}")
    tr = Trajectory(denoiser, x, steps, grid, model_kwargs, callback, progress, "euler_ancestral", options)
    x_bar, s = tr.x_bar, tr.sigmas
    for k in tr.steps():
        out = tr.D(x_bar, s[k])
        down, up = ancestral_sigmas(s[k], s[k + 1], eta)
        x_bar = x_bar + (down - s[k]) * out.eps
        if up > 0:
            x_bar = x_bar + up * noise.randn(x_bar.shape[1:], x_bar.dtype)
        tr.report(k, x_bar, out.x0)
    return x_bar


def edm(denoiser: Denoiser, x: torch.Tensor, noise: NoiseSource, steps: int | None = None, grid="karras",
        churn: float = 40.0, churn_min: float = 0.05, churn_max: float = 50.0, s_noise: float = 1.003,
        callback=None, model_kwargs=None, progress=False, **options) -> torch.Tensor:
    """EDM's stochastic sampler (Karras et al. 2022, Algorithm 2), in x_bar = x_t / sqrt(alpha_bar) against sigma:

        gamma     = min(churn / N, sqrt(2) - 1)  where churn_min <= sigma_k <= churn_max, else 0
        sigma_hat = (1 + gamma) sigma_k  (at most the schedule's largest sigma)
        x_hat     = x_bar + sqrt(sigma_hat^2 - sigma_k^2) s_noise z
        x_bar     = x_hat + (sigma_{k+1} - sigma_hat) (d + d') / 2,  d = eps(x_hat; sigma_hat), d' its value at the
                    Euler step's end (Heun; the last step, to sigma = 0, stays Euler): 2N - 1 network evaluations.

    The defaults are EDM's for ImageNet-64 (Table 5: S_churn 40, S_tmin 0.05, S_tmax 50, S_noise 1.003). churn = 0 is
    Heun's method (the `heun` sampler), step for step."""
    for name, value in (("churn", churn), ("churn_min", churn_min), ("s_noise", s_noise)):
        if not 0.0 <= value < math.inf:
            raise UserError(f"`{name}` must be a finite number >= 0, got {value}")
    if not churn_max >= churn_min:  # also refuses NaN
        raise UserError(f"`churn_max` must be >= `churn_min` ({churn_min}), got {churn_max}")
    tr = Trajectory(denoiser, x, steps, grid, model_kwargs, callback, progress, "edm", options)
    x_bar, s = tr.x_bar, tr.sigmas
    sigma_max = tr.D.schedule.sigma_at(tr.D.schedule.T - 1).item()
    gamma = min(churn / tr.n, math.sqrt(2) - 1) if tr.n else 0.0  # n = 0: one step from pure noise, taken exactly
    for k in tr.steps():
        sigma_hat = s[k]
        if gamma > 0 and churn_min <= s[k] <= churn_max:
            sigma_hat = min((1 + gamma) * s[k], sigma_max)
            x_bar = x_bar + math.sqrt(sigma_hat**2 - s[k] ** 2) * s_noise * noise.randn(x_bar.shape[1:], x_bar.dtype)
        x_bar, out = tr.heun_step(x_bar, sigma_hat, s[k + 1])
        tr.report(k, x_bar, out.x0)
    return x_bar
