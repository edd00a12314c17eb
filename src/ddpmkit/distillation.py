"""Progressive distillation (Salimans & Ho 2022, "Progressive distillation for fast sampling of diffusion
models", Algorithm 2): a student learns to take in one DDIM step what its teacher takes in two.

Symbols: alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t), z_t = alpha_t x + sigma_t eps.

The grid of a K-step sampler runs uniformly in t + 1 from T to 0: t_j = -1 + T j / K for j = K..0, so t_K = T - 1
and t_0 = -1 is the clean data (alpha_bar = 1). The network is evaluated at t_K .. t_1, and grid(2K) contains
grid(K): the student's step t_j -> t_{j-1} is the teacher's two steps t_j -> t_{j-1/2} -> t_{j-1}.

DDIM (eta = 0), from t to s:   z_s = alpha_s x_hat + sigma_s (z_t - alpha_t x_hat) / sigma_t
The student's target: the x_tilde whose one DDIM step from t lands where the teacher's two steps land, z'':
    x_tilde = (z'' - (sigma'' / sigma_t) z_t) / (alpha'' - (sigma'' / sigma_t) alpha_t)
Loss: max(SNR_t, 1) || x_tilde - x_hat_student(z_t) ||^2 (the paper's "truncated SNR" weighting).
"""
from __future__ import annotations

import torch

from .errors import UserError
from .parameterization import Denoiser
from .schedules import NoiseSchedule
from .utils import append_dims


def uniform_grid(schedule: NoiseSchedule, steps: int) -> torch.Tensor:
    """t_j = -1 + T j / steps for j = steps..0: (steps + 1,) float64, from T - 1 down to -1 (the clean data)."""
    if not 1 <= steps <= schedule.T:
        raise UserError(f"steps must lie in 1..{schedule.T}, got {steps}")
    return -1.0 + schedule.T * torch.arange(steps, -1, -1, dtype=torch.float64) / steps


def _alpha_sigma(schedule: NoiseSchedule, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ab = append_dims(schedule.alpha_bar_at(t.detach(), check=False), like.ndim).to(like.device)
    return ab.sqrt().to(like.dtype), (1 - ab).sqrt().to(like.dtype)


def ddim_step(denoiser: Denoiser, z_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor,
              model_kwargs: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One deterministic DDIM step from t to s < t (per example, (B,) float timesteps; s = -1 is the data):
    (z_s, x_hat)."""
    x_hat = denoiser(z_t, t, **(model_kwargs or {})).x0
    return ddim_from(denoiser.schedule, z_t, x_hat, t, s), x_hat


def ddim_from(schedule: NoiseSchedule, z_t: torch.Tensor, x_hat: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """z_s = alpha_s x_hat + sigma_s (z_t - alpha_t x_hat) / sigma_t for a given clean-data estimate x_hat."""
    a_t, s_t = _alpha_sigma(schedule, t, z_t)
    a_s, s_s = _alpha_sigma(schedule, s, z_t)
    return a_s * x_hat + s_s * (z_t - a_t * x_hat) / s_t


def progressive_target(teacher: Denoiser, z_t: torch.Tensor, t: torch.Tensor, t_mid: torch.Tensor, t_next: torch.Tensor,
                       model_kwargs: dict | None = None) -> torch.Tensor:
    """x_tilde: the clean-data estimate whose one DDIM step t -> t_next equals the teacher's two steps
    t -> t_mid -> t_next from z_t: (B, ...)."""
    with torch.no_grad():
        z_mid, _ = ddim_step(teacher, z_t, t, t_mid, model_kwargs)
        z_next, _ = ddim_step(teacher, z_mid, t_mid, t_next, model_kwargs)
    a_t, s_t = _alpha_sigma(teacher.schedule, t, z_t)
    a_n, s_n = _alpha_sigma(teacher.schedule, t_next, z_t)
    ratio = s_n / s_t
    return (z_next - ratio * z_t) / (a_n - ratio * a_t)


def truncated_snr_weight(schedule: NoiseSchedule, t: torch.Tensor) -> torch.Tensor:
    """max(SNR_t, 1) per example, (B,) float64: the x-space loss weight of progressive distillation."""
    ab = schedule.alpha_bar_at(t.detach(), check=False)
    return (ab / (1 - ab)).clamp(min=1.0).to(t.device)


def progressive_loss(student: Denoiser, teacher: Denoiser, x0: torch.Tensor, j: torch.Tensor, steps: int, noise: torch.Tensor,
                     model_kwargs: dict | None = None, check: bool = True) -> torch.Tensor:
    """Per-example distillation loss for a student of `steps` steps (its teacher takes 2 * steps): for each example,
    the student's grid point j in 1..steps (B,), z_t ~ q(z_t | x0) with the given noise, and the truncated-SNR
    weighted error of the student's x_hat against the teacher's two-step target. (B,) check=False: j the trainer drew,
    not read back (on a GPU the read waits for the device)."""
    if check and not bool(((j >= 1) & (j <= steps)).all()):
        raise UserError(f"the grid index j must lie in 1..{steps}")
    fine = uniform_grid(teacher.schedule, 2 * steps).to(x0.device)  # index 2 * steps - 2j holds t_j of the student's grid
    i = 2 * (steps - j)
    t, t_mid, t_next = fine[i], fine[i + 1], fine[i + 2]
    a_t, s_t = _alpha_sigma(teacher.schedule, t, x0)
    z_t = a_t * x0 + s_t * noise
    target = progressive_target(teacher, z_t, t, t_mid, t_next, model_kwargs)
    x_hat = student(z_t, t, **(model_kwargs or {})).x0
    error = (target - x_hat).pow(2).flatten(1).mean(1)
    return truncated_snr_weight(teacher.schedule, t).to(error.dtype) * error


def ddim_uniform(denoiser: Denoiser, x: torch.Tensor, noise, steps: int | None = None, callback=None,
                 model_kwargs: dict | None = None, progress: bool = False) -> torch.Tensor:
    """The sampler of a progressively distilled run (SAMPLERS['ddim_uniform']): `steps` deterministic DDIM steps on
    uniform_grid, the grid its student learned, from x = x_T. noise is unused (deterministic)."""
    if steps is None:
        raise UserError("ddim_uniform needs the number of steps (a distilled run samples in its student_steps)")
    grid = uniform_grid(denoiser.schedule, steps)  # on the host, where reading a time back costs nothing
    on = grid.to(x.device)
    for k in range(steps):
        t, s = on[k].expand(len(x)), on[k + 1].expand(len(x))
        x, x0 = ddim_step(denoiser, x, t, s, model_kwargs)
        if callback is not None:
            callback({"i": steps - 1 - k, "t": float(grid[k]), "x": x, "x0": x0})
    return x


@torch.no_grad()
def sample_uniform_ddim(denoiser: Denoiser, x_T: torch.Tensor, steps: int, model_kwargs: dict | None = None) -> torch.Tensor:
    """`steps` DDIM steps on uniform_grid (the grid a progressively distilled student learned): x_T -> x_0."""
    return ddim_uniform(denoiser, x_T, None, steps, model_kwargs=model_kwargs)


# ---- consistency distillation (Song et al. 2023, "Consistency models", Algorithm 2)
#
# A consistency function maps every point of a probability-flow ODE trajectory to the trajectory's origin. In the
# variance-exploding view x_bar = z_t / alpha_t, sigma = sigma_t / alpha_t, with D(z_t, t) an x0-estimate:
#     f(z_t, t) = c_skip(sigma) x_bar + (1 - c_skip(sigma)) D(z_t, t),  c_skip = w^2 / ((sigma - sigma_min)^2 + w^2)
# so f = x_bar exactly at sigma_min (the boundary condition; sigma_min = sigma at t = 0) and f -> D away from it.
# The paper writes f = c_skip x + c_out F with sd = 0.5 around a raw network F; ddpmkit's D is already a
# preconditioned x0-estimate (EDM's D = c_skip x + c_out F), so the boundary's width w is sigma_min itself: f is
# the teacher's D wherever the noise is more than a few sigma_min (c_skip = 0.01 at 11 sigma_min), and the student
# starts as its teacher. (With w = sd, f would add c_skip x_bar's noise on top of a clean D: at sigma = sd half of
# x_bar, noise included, which the network must learn to cancel; 1,000 steps of that left grainy digits.)
# Distillation: for adjacent grid points t_n < t_{n+1}, z_{n+1} = alpha x0 + sigma eps, z_n one teacher ODE (DDIM)
# step from it; loss || f_theta(z_{n+1}, t_{n+1}) - f_target(z_n, t_n) ||^2 with the target network an EMA of theta.


def sigma_of(schedule: NoiseSchedule, t: torch.Tensor) -> torch.Tensor:
    """sigma(t) = sigma_t / alpha_t in float64, (B,) (t = 0 gives the schedule's sigma_min)."""
    ab = schedule.alpha_bar_at(t.detach(), check=False)
    return ((1 - ab) / ab).sqrt()


def consistency_c_skip(schedule: NoiseSchedule, t: torch.Tensor, width: float | None = None) -> torch.Tensor:
    """c_skip(sigma(t)) in float64, (B,): 1 at t = 0, falling to 0 as the noise grows, over `width` (default sigma_min)."""
    sigma_min = sigma_of(schedule, torch.zeros(1))
    w = sigma_min if width is None else width
    return w**2 / ((sigma_of(schedule, t) - sigma_min) ** 2 + w**2)


class ConsistencyFunction(torch.nn.Module):
    """f(z_t, t) = c_skip x_bar + (1 - c_skip) D(z_t, t) for an x0-predicting network D (z_t, t -> x0)."""

    def __init__(self, net: torch.nn.Module, schedule: NoiseSchedule, width: float | None = None):
        super().__init__()
        self.net, self.schedule, self.width = net, schedule, width

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, **extra) -> torch.Tensor:
        c = append_dims(consistency_c_skip(self.schedule, t, self.width), z_t.ndim).to(z_t.device)
        ab = append_dims(self.schedule.alpha_bar_at(t.detach(), check=False), z_t.ndim).to(z_t.device)
        x_bar = z_t / ab.sqrt().to(z_t.dtype)
        return (c * x_bar + (1 - c) * self.net(z_t, t, **extra)).to(z_t.dtype)


def consistency_grid(schedule: NoiseSchedule, points: int) -> torch.Tensor:
    """The teacher's ODE grid of consistency distillation: `points` times from 0 to T - 1, increasing, float64."""
    if not 2 <= points <= schedule.T:
        raise UserError(f"the consistency grid needs 2..{schedule.T} points, got {points}")
    return torch.linspace(0, schedule.T - 1, points, dtype=torch.float64)


def consistency_loss(student: Denoiser, target: Denoiser, teacher: Denoiser, x0: torch.Tensor, n: torch.Tensor, points: int,
                     noise: torch.Tensor, model_kwargs: dict | None = None) -> torch.Tensor:
    """Per-example consistency distillation loss at grid intervals n in 0..points-2 (B,): the squared distance between
    the student's f at z_{n+1} and the target network's f at the teacher's one ODE step from there. (B,)"""
    grid = consistency_grid(teacher.schedule, points).to(x0.device)
    t_hi, t_lo = grid[n + 1], grid[n]
    a, s = _alpha_sigma(teacher.schedule, t_hi, x0)
    z_hi = a * x0 + s * noise
    with torch.no_grad():
        z_lo, _ = ddim_step(teacher, z_hi, t_hi, t_lo, model_kwargs)
        aim = target(z_lo, t_lo, **(model_kwargs or {})).x0
    online = student(z_hi, t_hi, **(model_kwargs or {})).x0
    return (online - aim).pow(2).flatten(1).mean(1)


def consistency_sampler(denoiser: Denoiser, x: torch.Tensor, noise, steps: int | None = None, callback=None,
                        model_kwargs: dict | None = None, progress: bool = False) -> torch.Tensor:
    """Multistep consistency sampling (SAMPLERS['consistency']): x0 = f(x_T, T - 1); then at each later time tau of the
    uniform grid, re-noise x0 to tau and map it back, `steps` network evaluations in all. denoiser: a consistency run's."""
    steps = steps or 1
    times = uniform_grid(denoiser.schedule, steps)[:-1]  # T - 1, ..., T / steps - 1, on the host
    on = times.to(x.device)
    x0 = x
    for k, tau in enumerate(on):
        if k > 0:
            a, s = _alpha_sigma(denoiser.schedule, tau.expand(len(x)), x)
            x = a * x0 + s * noise.randn(x.shape[1:], x.dtype)
        x0 = denoiser(x, tau.expand(len(x)), **(model_kwargs or {})).x0
        if callback is not None:
            callback({"i": steps - 1 - k, "t": float(times[k]), "x": x0, "x0": x0})
    return x0
