"""The reverse VP SDE (Song et al. 2021): Euler-Maruyama and predictor-corrector sampling.

The discrete schedule is the discretisation of the forward SDE  dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw,
with log alpha_bar(t) = -int_0^t beta; between integer steps beta(t) is constant (alpha_bar_at
interpolates log alpha_bar linearly), -log(1 - beta_t) ~ beta_t. The reverse-time SDE is

    dx = [-1/2 beta(t) x - beta(t) score(x, t)] dt + sqrt(beta(t)) dw_bar,   score = -eps / sqrt(1 - alpha_bar_t).

Both samplers run over a decreasing timestep grid and finish with the predicted x_0 at the last
point (score_sde's "noise removal" step).
"""
from __future__ import annotations

import math

import torch

from ..errors import UserError
from ..parameterization import Denoiser
from ..progress import progress_bar
from .grids import batch_t, timestep_grid
from .noise import NoiseSource


def euler_maruyama(denoiser: Denoiser, x: torch.Tensor, noise: NoiseSource, steps: int | None = None, grid="uniform",
                   corrector_steps: int = 0, snr: float = 0.16, callback=None, model_kwargs=None, progress=False,
                   **grid_options) -> torch.Tensor:
    """Euler-Maruyama on the reverse SDE, with `corrector_steps` Langevin MCMC corrections at each
    level before the predictor step (score_sde's predictor-corrector sampler with signal-to-noise
    ratio `snr`; 0 corrector steps is plain Euler-Maruyama).

    With the exact integral B = int beta dt over the step (from the schedule),
        x <- x + (x / 2 + score) B + sqrt(B) z.
    """
    if corrector_steps < 0 or snr <= 0:
        raise UserError("corrector_steps must be >= 0 and snr > 0")
    schedule = denoiser.schedule
    name = "pc" if corrector_steps else "euler_maruyama"
    ts = timestep_grid(grid, schedule, steps, name, **grid_options)
    log_ab = schedule.alpha_bar_at(ts).log().tolist()
    kwargs = model_kwargs or {}
    n = len(ts)
    positions = range(n)
    if progress:
        positions = progress_bar(positions, desc=name, leave=False)

    def score_at(x: torch.Tensor, k: int):
        out = denoiser(x, batch_t(ts[k], x), **kwargs)
        return -out.eps / (1 - torch.tensor(log_ab[k]).exp()).sqrt().item(), out.x0

    for k in positions:
        if k == n - 1:
            x0 = score_at(x, k)[1]
            x = x0
        elif k == 0 and math.isinf(log_ab[0]):
            # zero terminal SNR: the SDE's beta integral from alpha_bar = 0 is infinite, but x_T is exactly N(0, I) and
            # x_{t_1} given x_0 is Gaussian: DDPM's ancestral step from there (its x_T coefficient is 0), no corrector
            x0 = score_at(x, k)[1]
            x = math.exp(0.5 * log_ab[1]) * x0 + math.sqrt(-math.expm1(log_ab[1])) * noise.randn(x.shape[1:], x.dtype)
        else:
            t = ts[k].item()
            # Langevin corrector at level t (score_sde's LangevinCorrector for the VP SDE)
            alpha = (schedule.alpha_bar_at(t) / schedule.alpha_bar_at(max(t - 1.0, -1.0))).item()
            # score_sde sets step = 2 alpha (snr |z| / |score|)^2 with norms averaged over the batch, which ties a
            # sample to its batch. Here |z|^2 = D and |score|^2 = D / (1 - alpha_bar), their values for a network
            # whose |eps|^2 is D: a trained digit model's is 0.88-1.01 D from t = 50 up (0.37 D at t = 5), and each
            # sample's own norms gave digits no better (docs/samplers_and_evaluation.md) but wild steps in a few
            # dimensions, where a sample's |score| can be near 0
            step = 2 * alpha * snr**2 * (1 - math.exp(log_ab[k]))
            for _ in range(corrector_steps):
                score, _ = score_at(x, k)
                x = x + step * score + math.sqrt(2 * step) * noise.randn(x.shape[1:], x.dtype)
            score, x0 = score_at(x, k)
            B = log_ab[k + 1] - log_ab[k]
            x = x + (0.5 * x + score) * B + B**0.5 * noise.randn(x.shape[1:], x.dtype)
        if callback is not None:
            callback({"i": n - 1 - k, "t": int(round(ts[k].item())), "x": x, "x0": x0})
    return x


def pc(denoiser: Denoiser, x: torch.Tensor, noise: NoiseSource, **kw) -> torch.Tensor:
    """Predictor-corrector: Euler-Maruyama plus one Langevin correction per level (2 NFE a level)."""
    return euler_maruyama(denoiser, x, noise, **{"corrector_steps": 1, **kw})
