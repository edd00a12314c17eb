"""Noise schedules: the sequence beta_t and everything derived from it, in float64.

Timesteps are 0-indexed, t = 0..T-1, as in improved-diffusion: the paper's step t=1 is our t=0,
so alpha_bar[t] = prod_{i<=t} alpha_i and x_T of the paper is x at t = T-1 here.

The tables are float64 (improved-diffusion, EDM): products of 1000 numbers near 1 lose digits in
float32. Callers cast at the edge (``utils.extract``).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from .errors import UserError
from .utils import cached_table, on_device

ScheduleName = Literal["linear", "cosine", "scaled_linear", "sigmoid"]


def betas_for_alpha_bar(alpha_bar: Callable[[float], float], T: int, max_beta: float = 0.999) -> torch.Tensor:
    """Discretise a continuous alpha_bar(s), s in [0, 1], into T betas.

    beta_t = 1 - alpha_bar((t+1)/T) / alpha_bar(t/T), clipped at max_beta to avoid the
    singularity at s = 1 (Nichol & Dhariwal 2021, eq. 17 and the text after it).
    """
    betas = [min(1.0 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float64)


def linear_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DDPM's linear schedule, beta from 1e-4 to 0.02 for T = 1000.

    For other T the end points are scaled by 1000/T (improved-diffusion) so the total noise
    sum(beta) -- and so alpha_bar at the last step -- stays roughly the same.
    """
    scale = 1000.0 / T
    betas = torch.linspace(beta_start * scale, beta_end * scale, T, dtype=torch.float64)
    return betas.clamp(max=0.999)  # only binds for T < 50, where the scaled end exceeds 1


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal's cosine schedule: alpha_bar(s) = cos^2(((s + 0.008) / 1.008) * pi / 2)."""

    def f(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    return betas_for_alpha_bar(lambda u: f(u) / f(0.0), T, max_beta)


def scaled_linear_betas(T: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """Stable Diffusion's schedule: linear in sqrt(beta)."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2


def sigmoid_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """GeoDiff's sigmoid schedule: beta follows a sigmoid over [-6, 6] between the end points."""
    return torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64)) * (beta_end - beta_start) + beta_start


SCHEDULES: dict[str, Callable[[int], torch.Tensor]] = {
    "linear": linear_betas,
    "cosine": cosine_betas,
    "scaled_linear": scaled_linear_betas,
    "sigmoid": sigmoid_betas,
}


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024, Algorithm 1: shift and scale sqrt(alpha_bar) so the last step has SNR 0.

    The first value of sqrt(alpha_bar) is kept; the last becomes exactly 0, so x_T carries no
    signal and training sees the pure-noise input that sampling starts from.
    """
    sqrt_ab = torch.cumprod(1.0 - betas, 0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    alpha_bar = sqrt_ab**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1.0 - alphas


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A discrete variance schedule beta_0..beta_{T-1} and its derived float64 tables.

    Symbols (DDPM paper): alpha_t = 1 - beta_t, alpha_bar_t = prod_{s<=t} alpha_s.
    ``timesteps`` maps position i of the tables to the timestep of the original schedule the
    network was trained on; it is arange(T) except for respaced schedules (``respace``).
    Derived tables are computed once and cached (samplers read them at every step).
    """

    betas: torch.Tensor
    timesteps: torch.Tensor | None = None

    def __post_init__(self) -> None:
        betas = torch.as_tensor(self.betas, dtype=torch.float64).flatten()
        if betas.numel() < 1:
            raise UserError("a noise schedule needs at least one step")
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise UserError("every beta_t must lie in (0, 1]")
        object.__setattr__(self, "betas", betas)
        ts = torch.arange(len(betas)) if self.timesteps is None else torch.as_tensor(self.timesteps).long()
        object.__setattr__(self, "timesteps", ts)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, T: int = 1000, zero_terminal_snr: bool = False) -> NoiseSchedule:
        """Build a named schedule: 'linear' (DDPM), 'cosine', 'scaled_linear' or 'sigmoid'."""
        if name not in SCHEDULES:
            raise UserError(f"unknown noise schedule {name!r}; choose one of {sorted(SCHEDULES)}")
        if T < 1:
            raise UserError(f"the number of diffusion steps T must be >= 1, got {T}")
        betas = SCHEDULES[name](T)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        return cls(betas)

    def respace(self, use_timesteps: torch.Tensor | list[int]) -> NoiseSchedule:
        """Schedule on a subsequence of timesteps, with betas recomputed for that subsequence.

        improved-diffusion's respacing: keep alpha_bar at the kept steps and set
        beta_i = 1 - alpha_bar[s_i] / alpha_bar[s_{i-1}], so q(x_s|x_0) is unchanged at every kept
        step and the DDPM posterior and sampler apply as they are ("predict every k-th step").
        """
        keep = torch.as_tensor(use_timesteps).long().flatten()
        keep = torch.unique(keep)  # sorted, no repeats
        if keep.numel() == 0 or keep.min() < 0 or keep.max() >= self.T:
            raise UserError(f"respaced timesteps must lie in [0, {self.T - 1}]")
        ab = self.alpha_bar[keep]
        ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
        return NoiseSchedule(1.0 - ab / ab_prev, timesteps=self.timesteps[keep])

    # ---- tables ---------------------------------------------------------------------------
    @property
    def T(self) -> int:
        return self.betas.numel()

    @property
    def zero_terminal_snr(self) -> bool:
        """Whether the last step is pure noise (alpha_bar_T = 0, Lin et al. 2024): sigma is infinite there."""
        return float(self.alpha_bar[-1]) == 0.0

    @cached_table
    def alphas(self) -> torch.Tensor:
        return 1.0 - self.betas

    @cached_table
    def alpha_bar(self) -> torch.Tensor:
        return torch.cumprod(self.alphas, 0)

    @cached_table
    def alpha_bar_prev(self) -> torch.Tensor:
        """alpha_bar_{t-1}, with alpha_bar_{-1} = 1 (x_{-1} is the data x_0 itself)."""
        return torch.cat([self.betas.new_ones(1), self.alpha_bar[:-1]])

    @cached_table
    def posterior_variance(self) -> torch.Tensor:
        """beta-tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * beta_t (DDPM eq. 7)."""
        return (1.0 - self.alpha_bar_prev) / (1.0 - self.alpha_bar) * self.betas

    @cached_table
    def posterior_mean_coef_x0(self) -> torch.Tensor:
        """sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t): mu-tilde_t's coefficient of x_0 (DDPM eq. 7)."""
        return self.alpha_bar_prev.sqrt() * self.betas / (1.0 - self.alpha_bar)

    @cached_table
    def posterior_mean_coef_xt(self) -> torch.Tensor:
        """sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t): mu-tilde_t's coefficient of x_t (DDPM eq. 7)."""
        return self.alphas.sqrt() * (1.0 - self.alpha_bar_prev) / (1.0 - self.alpha_bar)

    @cached_table
    def posterior_log_variance_clipped(self) -> torch.Tensor:
        """log beta-tilde_t with the t=0 entry (beta-tilde_0 = 0) replaced by beta-tilde_1."""
        v = self.posterior_variance
        if self.T == 1:
            return self.betas.log()
        return torch.cat([v[1:2], v[1:]]).log()

    @cached_table
    def log_snr(self) -> torch.Tensor:
        """lambda_t = log(alpha_bar_t / (1 - alpha_bar_t))."""
        ab = self.alpha_bar
        return ab.log() - (-ab).log1p()

    # ---- continuous time -----------------------------------------------------------------
    def alpha_bar_at(self, t: torch.Tensor | float, check: bool = True) -> torch.Tensor:
        """alpha_bar at any real t in [-1, T-1]; equals the table at integer t.

        log alpha_bar is interpolated linearly between integer steps: inside a step this is the
        exact alpha_bar of a constant continuous-time beta over that step, and t = -1 gives 1
        (the clean data). Returns float64, on t's device where that device has float64 (CPU, CUDA),
        else on the CPU. check=False skips the range check, whose read of t would make a GPU's host wait:
        for t a sampler or the trainer made (networks' wrappers), not for t a user gave.
        """
        t = torch.as_tensor(t)
        on = t.device if t.device.type in ("cpu", "cuda", "meta") else torch.device("cpu")
        t = t.to(on, torch.float64)
        if check and bool(((t < -1) | (t > self.T - 1)).any()):
            raise UserError(f"t must lie in [-1, {self.T - 1}], got min {t.min().item()}, max {t.max().item()}")
        log_ab = on_device(self.log_alpha_bar_from_minus_one, on)  # index 0 is t = -1
        u = t + 1
        lo = u.floor().long().clamp(0, self.T)
        hi = (lo + 1).clamp(max=self.T)
        w = u - lo
        a, b = log_ab[lo], log_ab[hi]
        # where w == 0 avoid 0 * (-inf) when the last alpha_bar is 0 (zero terminal SNR)
        out = torch.where(w == 0, a, a + w * (b - a))
        return out.exp()

    @cached_table
    def log_alpha_bar_from_minus_one(self) -> torch.Tensor:
        """[0, log alpha_bar_0, ..., log alpha_bar_{T-1}]: log alpha_bar at t = -1 (the data), 0, ..., T - 1."""
        return torch.cat([self.betas.new_zeros(1), self.alpha_bar.log()])

    def log_snr_at(self, t: torch.Tensor | float) -> torch.Tensor:
        ab = self.alpha_bar_at(t)
        return ab.log() - (-ab).log1p()

    def sigma_at(self, t: torch.Tensor | float) -> torch.Tensor:
        """sigma(t) = sqrt((1 - alpha_bar) / alpha_bar), the noise level of x_t / sqrt(alpha_bar_t).

        In these (EDM / DDIM eq. 14) coordinates the probability-flow ODE is dx/dsigma = eps."""
        return (-0.5 * self.log_snr_at(t)).exp()

    def t_at_sigma(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """The real timestep with ``sigma_at(t) == sigma``: the inverse of ``sigma_at`` (float64).

        log alpha_bar = -log(1 + sigma^2) is piecewise linear in t, so the inverse is exact."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        neg_log_ab = torch.cat([self.betas.new_zeros(1), -self.alpha_bar.log()])  # increasing; index 0 is t = -1
        target = torch.log1p(sigma**2)
        if bool(((target < 0) | (target > neg_log_ab[-1] * (1 + 1e-12))).any()):
            raise UserError(f"sigma must lie in [0, {self.sigma_at(self.T - 1).item():.4g}] for this schedule")
        hi = torch.searchsorted(neg_log_ab, target).clamp(1, self.T)
        lo = hi - 1
        w = ((target - neg_log_ab[lo]) / (neg_log_ab[hi] - neg_log_ab[lo])).clamp(0, 1)
        return lo + w - 1.0

    def to(self, device: torch.device | str) -> NoiseSchedule:
        return NoiseSchedule(self.betas.to(device), self.timesteps.to(device))

    def same_as(self, other: NoiseSchedule) -> bool:
        """The same betas on the same timesteps (wherever the tables live)."""
        return (self.T == other.T and torch.equal(self.betas.cpu(), other.betas.cpu())
                and torch.equal(self.timesteps.cpu(), other.timesteps.cpu()))

    def __repr__(self) -> str:
        return f"NoiseSchedule(T={self.T}, beta=[{self.betas[0]:.3g}..{self.betas[-1]:.3g}], alpha_bar_T={self.alpha_bar[-1]:.3g})"


def spaced_timesteps(T: int, steps: int) -> torch.Tensor:
    """`steps` timesteps from [0, T-1], evenly spaced and always including T-1 and 0.

    With steps = T/k this is DDPM "every k-th step" sampling.
    """
    if not 1 <= steps <= T:
        raise UserError(f"steps must lie in [1, {T}], got {steps}")
    if steps == 1:
        return torch.tensor([T - 1])
    return torch.linspace(0, T - 1, steps, dtype=torch.float64).round().long()
