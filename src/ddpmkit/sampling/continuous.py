"""The probability-flow ODE in sigma coordinates, which the continuous-time solvers share.

With x_bar = x_t / sqrt(alpha_bar_t) and sigma = sqrt((1 - alpha_bar_t) / alpha_bar_t), the VP
probability-flow ODE  dx = -1/2 beta(t) [x + score(x, t)] dt  becomes (DDIM eq. 14, EDM eq. 4)

    dx_bar / dsigma = eps(x_t, t) = (x_bar - D(x_bar; sigma)) / sigma,

with D the predicted x_0. In log-SNR lambda = -log sigma it is semi-linear, which the
exponential integrators (DPM-Solver++, UniPC) solve exactly in the linear part. The solvers walk
x_bar down a grid of sigmas that ends with sigma = 0, where x_bar is the sample.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from ..parameterization import Denoiser, DenoiserOutput
from ..progress import progress_bar
from .grids import batch_t, timestep_grid


class SigmaDenoiser:
    """The denoiser as a function of (x_bar, sigma): it evaluates the network at the exact real
    timestep t(sigma) on x_t = x_bar / sqrt(1 + sigma^2)."""

    def __init__(self, denoiser: Denoiser, model_kwargs: dict | None = None, clip_x0: bool = False):
        self.denoiser = denoiser
        self.schedule = denoiser.schedule
        self.model_kwargs = model_kwargs or {}
        self.clip_x0 = clip_x0

    def __call__(self, x_bar: torch.Tensor, sigma: float) -> DenoiserOutput:
        t = batch_t(self.schedule.t_at_sigma(sigma), x_bar)
        out = self.denoiser(x_bar / math.sqrt(1.0 + sigma**2), t, **self.model_kwargs)
        if self.clip_x0 and sigma > 0:
            # keep the data prediction in the data range, and eps consistent with it
            x0 = out.x0.clamp(-1, 1)
            out = DenoiserOutput(eps=(x_bar - x0) / sigma, x0=x0, var_frac=out.var_frac)
        return out


class Trajectory:
    """Set-up and bookkeeping common to the sigma-space solvers: the grid, x_bar at its start,
    the progress bar and the per-step callback (which sees x_t in the usual VP scale)."""

    def __init__(self, denoiser: Denoiser, x: torch.Tensor, steps: int | None, grid, model_kwargs: dict | None,
                 callback: Callable[[dict], None] | None, progress: bool, name: str, options: dict | None = None):
        schedule = denoiser.schedule
        options = dict(options or {})  # clip_x0 for the denoiser; the rest (rho) for the grid
        self.D = SigmaDenoiser(denoiser, model_kwargs, clip_x0=options.pop("clip_x0", False))
        self.ts = timestep_grid(grid, schedule, steps, name, **options)
        self.sigmas: list[float] = schedule.sigma_at(self.ts).tolist() + [0.0]
        self.n = len(self.ts)  # network evaluations on the grid
        self.callback = callback
        self.progress = progress
        self.name = name
        if math.isinf(self.sigmas[0]):  # zero terminal SNR: x_bar is infinite there, so the first step is taken in x
            self.x_bar = self.step_from_pure_noise(x)
        else:
            self.x_bar = x * math.sqrt(1.0 + self.sigmas[0] ** 2)  # x is x_t at the first grid time

    def step_from_pure_noise(self, x: torch.Tensor) -> torch.Tensor:
        """The exact first step from a grid that starts at alpha_bar = 0 (sigma = inf), where x = x_T is pure noise:
        eps = x_T exactly, so x_bar at the next sigma is x0 + sigma_1 x_T (DDIM's step, the limit of every solver's
        first step). The grid then starts at its second point."""
        D = self.D
        out = D.denoiser(x, batch_t(self.ts[0], x), **D.model_kwargs)
        x0 = out.x0.clamp(-1, 1) if D.clip_x0 else out.x0
        x_bar = x0 + self.sigmas[1] * x
        self.report(0, x_bar, x0)
        self.ts, self.sigmas, self.n = self.ts[1:], self.sigmas[1:], self.n - 1
        return x_bar

    def steps(self) -> Iterable[int]:
        if not self.progress:
            return range(self.n)

        return progress_bar(range(self.n), desc=self.name, leave=False)

    def report(self, k: int, x_bar: torch.Tensor, x0: torch.Tensor) -> None:
        """After step k (sigma_k -> sigma_{k+1}): x_bar is at sigma_{k+1}, x0 was predicted at sigma_k."""
        if self.callback is not None:
            x = x_bar / math.sqrt(1.0 + self.sigmas[k + 1] ** 2)
            self.callback({"i": self.n - 1 - k, "t": int(round(self.ts[k].item())), "x": x, "x0": x0})

    def heun_step(self, x_bar: torch.Tensor, sigma: float, sigma_next: float) -> tuple[torch.Tensor, DenoiserOutput]:
        """Heun's step from sigma to sigma_next (EDM, Algorithm 1, lines 4-8): an Euler step, then the average of the
        slopes eps at both ends; a step to sigma = 0 stays Euler. Returns x_bar at sigma_next and the output at sigma."""
        out = self.D(x_bar, sigma)
        x_next = x_bar + (sigma_next - sigma) * out.eps
        if sigma_next > 0:
            x_next = x_bar + (sigma_next - sigma) * 0.5 * (out.eps + self.D(x_next, sigma_next).eps)
        return x_next, out

    def lambdas(self) -> list[float]:
        """lambda_k = -log sigma_k (half the log-SNR); +inf at sigma = 0."""
        return [-math.log(s) if s > 0 else math.inf for s in self.sigmas]
