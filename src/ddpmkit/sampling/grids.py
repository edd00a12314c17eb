"""Step grids: which noise levels a sampler visits.

A grid is a decreasing float64 tensor of `steps` timesteps in [0, T-1] (fractional values are
fine for the continuous-time solvers); the sampler evaluates the network once at each and ends
with the predicted x_0 at the last. Discrete samplers (ddpm, ddim) round to integers.

    uniform    t evenly spaced from T-1 to 0 (DDIM, diffusers' "linspace")
    trailing   T-1, T-1-T/n, ..., T/n-1 (Lin et al. 2024; diffusers' "trailing")
    leading    (n-1)k, ..., k, 0 with k = T//n (DDIM's code, Stable Diffusion; diffusers' "leading")
    quadratic  t = (T-1) u^2, dense near the data (DDIM's CIFAR-10 setting)
    karras     sigma^(1/rho) evenly spaced, rho = 7 (EDM, Karras et al. 2022)
    logsnr     log-SNR lambda evenly spaced (DPM-Solver's "logSNR" steps)
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import UserError
from ..schedules import NoiseSchedule


def batch_t(t: torch.Tensor | float, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A grid time (a host number or 0-dim CPU tensor) for each of x's samples, filled on x's device. A CPU tensor
    copied to a GPU at every step would make the host wait for the GPU there; a fill is queued like any kernel."""
    if isinstance(t, torch.Tensor):
        dtype = dtype or t.dtype
        t = t.item()  # a CPU tensor: no wait
    return torch.full((x.shape[0],), t, dtype=dtype or torch.float64, device=x.device)


def _uniform(s: NoiseSchedule, n: int, **_) -> torch.Tensor:
    return torch.linspace(s.T - 1, 0, n, dtype=torch.float64)


def _trailing(s: NoiseSchedule, n: int, **_) -> torch.Tensor:
    return (torch.arange(s.T, 0, -s.T / n, dtype=torch.float64).round() - 1)[:n]


def _leading(s: NoiseSchedule, n: int, **_) -> torch.Tensor:
    return (torch.arange(n, dtype=torch.float64) * (s.T // n)).flip(0)


def _quadratic(s: NoiseSchedule, n: int, **_) -> torch.Tensor:
    return (s.T - 1) * torch.linspace(1, 0, n, dtype=torch.float64) ** 2


def _karras(s: NoiseSchedule, n: int, rho: float = 7.0, **_) -> torch.Tensor:
    lo, hi = s.sigma_at(0.0) ** (1 / rho), s.sigma_at(s.T - 1) ** (1 / rho)
    sigmas = (hi + torch.linspace(0, 1, n, dtype=torch.float64) * (lo - hi)) ** rho
    return _from_sigmas(s, sigmas)


def _logsnr(s: NoiseSchedule, n: int, **_) -> torch.Tensor:
    lam = torch.linspace(s.log_snr_at(s.T - 1).item(), s.log_snr_at(0.0).item(), n, dtype=torch.float64)
    return _from_sigmas(s, (-0.5 * lam).exp())


def _from_sigmas(s: NoiseSchedule, sigmas: torch.Tensor) -> torch.Tensor:
    t = s.t_at_sigma(sigmas.clamp(s.sigma_at(0.0).item(), s.sigma_at(s.T - 1).item()))
    t[0], t[-1] = s.T - 1, 0.0  # exact end points, no round-off
    return t


SIGMA_SPACED = ("karras", "logsnr")  # the grids spaced by sigma, from sigma_{T-1}
GRIDS: dict[str, Callable[..., torch.Tensor]] = {
    "uniform": _uniform,
    "trailing": _trailing,
    "leading": _leading,
    "quadratic": _quadratic,
    "karras": _karras,
    "logsnr": _logsnr,
}


def check_grid_name(grid: str) -> None:
    if grid not in GRIDS:
        raise UserError(f"unknown grid {grid!r}; choose one of {sorted(GRIDS)}")


# the samplers each option of the command line belongs to (a message for the others)
OPTION_SAMPLERS = {"eta": "ddim, euler_ancestral, dpmpp_2m_sde and dpmpp_3m_sde", "churn": "edm",
                   "order": "unipc, ipndm and the dpmpp samplers", "variance": "ddpm",
                   "rtol": "dopri5", "atol": "dopri5",
                   "clip_x0": "every sampler but ddim_uniform, consistency, euler_maruyama and pc"}


def timestep_grid(grid: str | torch.Tensor, schedule: NoiseSchedule, steps: int | None, sampler: str | None = None,
                  **options) -> torch.Tensor:
    """The decreasing timesteps (float64, shape (steps,)) a sampler visits.

    grid: a name from GRIDS, or an explicit decreasing tensor of timesteps in [0, T-1].
    sampler: the name of the sampler whose leftover options these are, for the message that refuses them.
    options: rho for 'karras'.
    """
    unknown = sorted(set(options) - {"rho"})
    if unknown:  # what the solver's own signature did not take, with where it belongs
        where = "".join(f"; {k} is for {OPTION_SAMPLERS[k]}" for k in unknown if k in OPTION_SAMPLERS)
        raise UserError(f"{f'sampler {sampler!r}' if sampler else 'this sampler'} takes no option(s) {unknown}{where}")
    if isinstance(grid, torch.Tensor):
        t = grid.to(torch.float64).flatten()
        if t.numel() < 1 or not bool(t.isfinite().all()) or bool((t[1:] >= t[:-1]).any()) or t.min() < 0 or t.max() > schedule.T - 1:
            raise UserError(f"an explicit grid must be strictly decreasing timesteps in [0, {schedule.T - 1}]")
        return t
    check_grid_name(grid)
    steps = schedule.T if steps is None else int(steps)
    if not 1 <= steps <= schedule.T:
        raise UserError(f"steps must lie in [1, {schedule.T}], got {steps}")
    if steps == 1:
        return torch.tensor([schedule.T - 1.0], dtype=torch.float64)
    if grid in SIGMA_SPACED and schedule.zero_terminal_snr:
        # zero terminal SNR: sigma_{T-1} is infinite, so T-1 comes first and the others are spaced below it, on the
        # schedule without its last step (whose sigmas are all finite)
        below = NoiseSchedule(schedule.betas[:-1])
        rest = GRIDS[grid](below, steps - 1, **options) if steps > 2 else torch.zeros(1, dtype=torch.float64)
        return torch.cat([torch.tensor([schedule.T - 1.0], dtype=torch.float64), rest])
    return GRIDS[grid](schedule, steps, **options)


def integer_grid(grid: str | torch.Tensor, schedule: NoiseSchedule, steps: int | None, **options) -> torch.Tensor:
    """``timestep_grid`` rounded to distinct integer timesteps (increasing), for respacing."""
    return torch.unique(timestep_grid(grid, schedule, steps, **options).round().long())
