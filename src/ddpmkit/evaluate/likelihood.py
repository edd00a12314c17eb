"""Negative log-likelihood: from the variational bound (DDPM) and from the probability-flow ODE
(Song et al. 2021, instantaneous change of variables).

Both report per-example figures; `bits/dim` = nats/dim / ln 2.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import UserError
from ..losses import vlb_term
from ..parameterization import Denoiser, ModelFn, Prediction, as_denoiser
from ..process import prior_kl, q_sample
from ..progress import progress_bar
from ..reverse import default_variance, p_mean_variance
from ..sampling.continuous import SigmaDenoiser
from ..schedules import NoiseSchedule

LN2 = math.log(2.0)


@dataclass
class VLBResult:
    """The bound L_T + sum_{t>=1} L_{t-1} + L_0 per example, in nats per dimension."""

    prior: torch.Tensor  # (B,) L_T
    terms: torch.Tensor  # (B, T): column t holds L_{t-1} for t >= 1 and L_0 in column 0

    @property
    def total(self) -> torch.Tensor:
        return self.prior + self.terms.sum(1)

    @property
    def bits_per_dim(self) -> torch.Tensor:
        return self.total / LN2


def _term_at(denoiser: Denoiser, x0: torch.Tensor, t_vec: torch.Tensor, schedule: NoiseSchedule, variance: str,
             decoder: str, clip_x0: bool, generator: torch.Generator | None, model_kwargs: dict | None) -> torch.Tensor:
    """L_{t-1} (L_0 where t = 0) at one draw x_t ~ q(x_t | x_0), nats/dim, (B,) float64."""
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    x_t = q_sample(x0, t_vec, schedule, noise)
    out = denoiser(x_t, t_vec.float(), **(model_kwargs or {}))
    x0_hat = out.x0.clamp(-1, 1) if clip_x0 else out.x0
    mean, log_var = p_mean_variance(x0_hat, x_t, t_vec, schedule, variance, out.var_frac)
    return vlb_term(x0, x_t, t_vec, mean, log_var, schedule, decoder).to(torch.float64)


def vlb(model: Denoiser | ModelFn, x0: torch.Tensor, schedule: NoiseSchedule | None = None, prediction: Prediction = "eps",
        learned_variance: bool = False, variance: str | None = None, decoder: str = "discretized", clip_x0: bool = False,
        generator: torch.Generator | None = None, model_kwargs: dict | None = None, progress: bool = False) -> VLBResult:
    """Every term of the variational bound (DDPM eq. 5) for the examples x0: (B, ...).

    Each L_{t-1} is the closed-form KL between the true posterior q(x_{t-1}|x_t, x_0) and
    p_theta(x_{t-1}|x_t), at one draw x_t ~ q(x_t|x_0) (improved-diffusion's calc_bpd_loop);
    L_0 is the decoder NLL ('discretized' for 8-bit data, 'gaussian' for continuous data).
    T network evaluations.
    """
    denoiser = as_denoiser(model, schedule, prediction, learned_variance)
    schedule = denoiser.schedule
    variance = variance or default_variance(denoiser.learned_variance)
    B = x0.shape[0]
    terms = torch.zeros(B, schedule.T, dtype=torch.float64, device=x0.device)
    steps = range(schedule.T - 1, -1, -1)
    if progress:
        steps = progress_bar(steps, desc="variational bound", leave=False)
    with torch.no_grad():
        for t in steps:
            t_vec = torch.full((B,), t, device=x0.device, dtype=torch.long)
            terms[:, t] = _term_at(denoiser, x0, t_vec, schedule, variance, decoder, clip_x0, generator, model_kwargs)
    return VLBResult(prior=prior_kl(x0, schedule).to(torch.float64), terms=terms)


def vlb_estimate(model: Denoiser | ModelFn, x0: torch.Tensor, schedule: NoiseSchedule | None = None, prediction: Prediction = "eps",
                 learned_variance: bool = False, draws: int = 16, decoder: str = "discretized", clip_x0: bool = False,
                 generator: torch.Generator | None = None, model_kwargs: dict | None = None) -> torch.Tensor:
    """An unbiased estimate of the bound, (B,) nats/dim, for monitoring during training:
    L_T + L_0 + (T - 1) * mean of L_{t-1} at `draws` uniform t in [1, T-1] per example.
    draws + 1 network evaluations instead of T."""
    denoiser = as_denoiser(model, schedule, prediction, learned_variance)
    schedule = denoiser.schedule
    variance = default_variance(denoiser.learned_variance)
    B = x0.shape[0]

    def term(t_vec: torch.Tensor) -> torch.Tensor:
        return _term_at(denoiser, x0, t_vec, schedule, variance, decoder, clip_x0, generator, model_kwargs)

    with torch.no_grad():
        total = prior_kl(x0, schedule).to(torch.float64) + term(torch.zeros(B, dtype=torch.long, device=x0.device))
        if schedule.T > 1:
            acc = torch.zeros(B, dtype=torch.float64, device=x0.device)
            for _ in range(draws):
                t_vec = torch.randint(1, schedule.T, (B,), generator=generator).to(x0.device)
                acc += term(t_vec)
            total = total + (schedule.T - 1) * acc / draws
    return total


@dataclass
class ODELikelihood:
    nll: torch.Tensor  # (B,) -log p(x) in nats per dimension
    nfe: int

    @property
    def bits_per_dim(self) -> torch.Tensor:
        return self.nll / LN2


def ode_nll(model: Denoiser | ModelFn, x: torch.Tensor, schedule: NoiseSchedule | None = None, prediction: Prediction = "eps",
            t_start: float = 0.0, divergence: str = "auto", rtol: float = 1e-5, atol: float = 1e-5,
            generator: torch.Generator | None = None, model_kwargs: dict | None = None) -> ODELikelihood:
    """-log p(x) per dimension from the probability-flow ODE (score_sde's likelihood).

    In u = log sigma the ODE is dx_bar/du = x_bar - D(x_bar; sigma), and along a trajectory
    d log p / du = -div(x_bar - D) = div D - dim. Integrating from sigma(t_start) to sigma_max,
        log p(x) = log N(x_bar(sigma_max); 0, (1 + sigma_max^2) I) + int (dim - div D) du.
    x is taken as x_bar at sigma(t_start) (t_start = 0: the least noisy level a network knows;
    exact models may start lower, t in [-1, 0]). divergence: 'exact' (one backward pass per
    dimension; small dims), 'hutchinson' (Rademacher probe, one backward pass; images) or 'auto'.
    """
    dim = x[0].numel()
    if divergence == "auto":
        divergence = "exact" if dim <= 32 else "hutchinson"
    if divergence not in ("exact", "hutchinson"):
        raise UserError(f"unknown divergence {divergence!r}; choose 'exact', 'hutchinson' or 'auto'")
    denoiser = as_denoiser(model, schedule, prediction)
    schedule = denoiser.schedule
    D = SigmaDenoiser(denoiser, model_kwargs)
    s0, s1 = schedule.sigma_at(t_start).item(), schedule.sigma_at(schedule.T - 1).item()
    if s0 <= 0:
        raise UserError("t_start must be > -1 (sigma = 0 is the data itself)")
    probe = torch.randint(0, 2, x.shape, generator=generator).to(x) * 2 - 1 if divergence == "hutchinson" else None

    def div_D(x_bar: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            xr = x_bar.detach().requires_grad_(True)
            d = D(xr, sigma).x0
            if probe is not None:
                (g,) = torch.autograd.grad((d * probe).sum(), xr)
                return d.detach(), (g * probe).flatten(1).sum(1)
            flat = d.flatten(1)
            trace = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
            for i in range(dim):
                (g,) = torch.autograd.grad(flat[:, i].sum(), xr, retain_graph=i < dim - 1)
                trace = trace + g.flatten(1)[:, i]
            return d.detach(), trace

    def f(u: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        x_bar, _ = state
        # torchdiffeq's first-step heuristic may probe far outside the span: stay inside it
        d, div = div_D(x_bar, math.exp(min(max(u.item(), span[0].item()), span[1].item())))
        return x_bar - d, dim - div

    span = torch.tensor([math.log(s0), math.log(s1)], dtype=torch.float64)
    from torchdiffeq import odeint  # slow to import (scipy): only for the ODE likelihood

    x_end, delta = odeint(f, (x, torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)), span,
                          rtol=rtol, atol=atol, method="dopri5")
    x_end, delta = x_end[-1], delta[-1]
    var = 1.0 + s1**2
    log_prior = -0.5 * (x_end.flatten(1) ** 2).sum(1) / var - 0.5 * dim * math.log(2 * math.pi * var)
    return ODELikelihood(nll=-(log_prior + delta) / dim, nfe=denoiser.nfe)


def dequantize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform dequantisation of 8-bit data in [-1, 1] (k / 127.5 - 1) to (k + u) / 128 - 1, u ~ U[0, 1)."""
    k = ((x + 1) * 127.5).round()
    u = torch.rand(x.shape, generator=generator).to(x)
    return (k + u) / 128.0 - 1.0


def dequantized_bits_per_dim(nll_nats_per_dim: torch.Tensor) -> torch.Tensor:
    """Bits/dim of the 8-bit data from the density of dequantised data: each bin is 1/128 wide,
    so -log P(k) <= E_u[-log p(x)] + dim log 128 (Jensen)."""
    return (nll_nats_per_dim + math.log(128.0)) / LN2
