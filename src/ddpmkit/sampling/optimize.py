"""Step grids optimised for a given model and sampler (in the spirit of Align Your Steps,
Sabour et al. 2024, and GITS, Chen et al. 2024).

With few steps, *where* the network is evaluated matters as much as the solver. This searches
the grid that brings a sampler closest to the exact probability-flow ODE solution (dopri5) on a
set of training trajectories: the free parameters are the log-sigma gaps between grid points
(softmax-normalised, so the grid always runs from sigma_max to sigma_min), searched by
Nelder-Mead from the uniform-in-log-SNR grid. Use different seeds to evaluate the result.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ..errors import UserError
from ..parameterization import Denoiser, ModelFn, Prediction, as_denoiser
from ..progress import progress_bar
from ..schedules import NoiseSchedule
from . import STOCHASTIC, sample


def grid_from_gaps(z: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """Timesteps (float64, decreasing, from T-1 to 0) whose log-sigma gaps are softmax(z)."""
    lo, hi = schedule.sigma_at(0.0).log().item(), schedule.sigma_at(schedule.T - 1).log().item()
    fractions = torch.softmax(torch.as_tensor(z, dtype=torch.float64), 0)
    log_sigma = hi - (hi - lo) * torch.cat([fractions.new_zeros(1), fractions.cumsum(0)])
    t = schedule.t_at_sigma(log_sigma.exp().clamp(math.exp(lo), math.exp(hi)))
    t[0], t[-1] = schedule.T - 1, 0.0
    # strictly decreasing even where round-off squeezes two points together (samplers require it)
    for i in range(1, len(t) - 1):
        t[i] = min(t[i].item(), t[i - 1].item() - 1e-6)
    return t


def optimize_grid(model: Denoiser | ModelFn, shape: Sequence[int], schedule: NoiseSchedule | None = None, sampler: str = "unipc",
                  steps: int = 10,
                  prediction: Prediction = "eps", seed: int = 0, max_evals: int = 600, reference_tol: float = 1e-8,
                  model_kwargs: dict | None = None, progress: bool = False, **sampler_options) -> torch.Tensor:
    """The timestep grid of `steps` points that minimises the mean endpoint distance of `sampler`
    from the exact ODE solution, over shape[0] trajectories drawn from `seed`.

    Returns a float64 tensor to pass as ``grid=`` to ``ddpmkit.sample``. Each objective evaluation
    runs the sampler once; the reference costs one adaptive solve.
    """
    if sampler in STOCHASTIC or sampler_options.get("eta"):  # its endpoint moves with its noise, not with the grid alone
        raise UserError(f"sampler {sampler!r} draws fresh noise as it goes, so it does not follow the probability-flow ODE whose "
                        "endpoint a tuned grid is fitted to; tune the grid of an ODE solver (unipc, dpmpp_2m, dpmpp_3m, ipndm, heun, "
                        "euler, ddim)")
    denoiser = as_denoiser(model, schedule, prediction)
    schedule = denoiser.schedule
    if steps < 3:
        raise UserError("a grid with fewer than 3 points has nothing to optimise")
    if steps > schedule.T:  # checked before the reference solve: the search's simplex has steps^2 entries
        raise UserError(f"steps must lie in [3, {schedule.T}] (the model's T), got {steps}")
    x_T = torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    first = next(denoiser.model.parameters()) if hasattr(denoiser.model, "parameters") else None
    if first is not None:
        x_T = x_T.to(first.device, first.dtype)
    # the sampler on the starting grid (uniform in log-SNR: zero gaps) first, so that its options are checked before the
    # long reference solve; Nelder-Mead's first evaluation reuses it
    n = steps - 1
    start = sample(denoiser, shape, sampler=sampler, grid=grid_from_gaps(torch.zeros(n), schedule), x_T=x_T, model_kwargs=model_kwargs,
                   **sampler_options).x
    ref = sample(denoiser, shape, sampler="dopri5", x_T=x_T, rtol=reference_tol, atol=reference_tol, model_kwargs=model_kwargs).x

    def loss(z) -> float:
        if not np.any(z):
            x = start
        else:
            x = sample(denoiser, shape, sampler=sampler, grid=grid_from_gaps(torch.as_tensor(z), schedule), x_T=x_T, model_kwargs=model_kwargs,
                       **sampler_options).x
        err = (x - ref).flatten(1).norm(dim=1).mean().item()
        return err if math.isfinite(err) else 1e10

    # start uniform in log-sigma (= uniform in log-SNR), with simplex edges that move a gap by ~40%
    simplex = np.vstack([np.zeros(n), 0.4 * np.eye(n)])
    from scipy.optimize import minimize  # slow to import: only when a grid is tuned

    with progress_bar(total=max_evals, desc=f"optimising a {steps}-step grid for {sampler}", leave=False, disable=not progress) as bar:
        def counted(z) -> float:
            bar.update(1)
            return loss(z)

        result = minimize(counted, simplex[0], method="Nelder-Mead",
                          options={"maxfev": max_evals, "xatol": 1e-4, "fatol": 1e-12, "adaptive": True, "initial_simplex": simplex})
    return grid_from_gaps(torch.as_tensor(result.x), schedule)
