"""Editing with a trained model: image-to-image, inpainting, "same x_t, different samples", and
interpolation (between seeds, between real images through x_t, between prompts).

All of them start the reverse process from an intermediate noise level: `sample` takes x_T as
x_t at the first point of the grid, so any sampler works from any t. Each takes a Denoiser
(`ddpmkit.load(run).denoiser`, or a guided one), or a plain model function with its schedule and prediction.
"""
from __future__ import annotations

import torch

from .errors import UserError
from .parameterization import Denoiser, ModelFn, Prediction, as_denoiser
from .process import q_sample
from .reverse import default_variance, p_mean_variance
from .sampling import SampleResult, sample
from .sampling.grids import timestep_grid
from .sampling.noise import GeneratorLike, NoiseSource
from .schedules import NoiseSchedule
from .utils import append_dims, extract


def grid_from(t_start: float, schedule: NoiseSchedule, steps: int, grid: str = "uniform") -> torch.Tensor:
    """The part of a `steps`-point grid at or below t_start, starting exactly at t_start
    (diffusers' img2img convention: strength s runs about s * steps of the steps)."""
    full = timestep_grid(grid, schedule, steps)
    below = full[full < t_start - 1e-9]
    return torch.cat([full.new_tensor([t_start]), below])


def noised(x0: torch.Tensor, t: float, schedule: NoiseSchedule, generator: GeneratorLike = None) -> torch.Tensor:
    """x_t ~ q(x_t | x_0) at one (integer or fractional) t, with per-sample seeds."""
    eps = NoiseSource(x0.shape[0], generator, x0.device).randn(x0.shape[1:], x0.dtype)
    ab = schedule.alpha_bar_at(torch.tensor([float(t)], dtype=torch.float64)).to(x0.device, x0.dtype)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * eps


def img2img(model: Denoiser | ModelFn, x0: torch.Tensor, schedule: NoiseSchedule | None = None, strength: float = 0.5, sampler: str = "ddim",
            steps: int = 50, generator: GeneratorLike = None, prediction: Prediction = "eps", grid: str = "uniform",
            **kwargs) -> SampleResult:
    """SDEdit (Meng et al. 2022): noise the input x0: (B, ...) to t = strength * (T - 1), then run
    the reverse process from there. strength 0 returns (nearly) the input, 1 ignores it.
    generator: seeds of the noising (and of the sampler's noise, for stochastic samplers)."""
    if not 0.0 < strength <= 1.0:
        raise UserError(f"strength must lie in (0, 1], got {strength}")
    denoiser = as_denoiser(model, schedule, prediction)
    schedule = denoiser.schedule
    t_start = strength * (schedule.T - 1)
    x_t = noised(x0, t_start, schedule, _offset(generator, 1_000_003))
    return sample(denoiser, x0.shape, sampler=sampler, generator=generator, x_T=x_t,
                  grid=grid_from(t_start, schedule, steps, grid), **{"device": x0.device, **kwargs})


def posterior_samples(model: Denoiser | ModelFn, x0: torch.Tensor, t: int, n: int, schedule: NoiseSchedule | None = None, steps: int = 100,
                      seed: int = 0, prediction: Prediction = "eps", **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """The lectures' "same x_t, different samples": noise one image x0: (1, ...) to x_t once, then
    draw n samples of p(x_0 | x_t) with ancestral sampling. Returns (x_t (1, ...), samples (n, ...))."""
    denoiser = as_denoiser(model, schedule, prediction)
    schedule = denoiser.schedule
    x_t = noised(x0[:1], t, schedule, [seed])
    out = sample(denoiser, (n, *x0.shape[1:]), sampler="ddpm", generator=seed + 1,
                 x_T=x_t.expand(n, *x0.shape[1:]), grid=grid_from(float(t), schedule, steps), **{"device": x0.device, **kwargs})
    return x_t, out.x


@torch.no_grad()
def inpaint(model: Denoiser | ModelFn, x0: torch.Tensor, mask: torch.Tensor, schedule: NoiseSchedule | None = None, steps: int = 100,
            resample: int = 5, generator: GeneratorLike = None, prediction: Prediction = "eps", clip_x0: bool = True,
            model_kwargs: dict | None = None) -> torch.Tensor:
    """RePaint (Lugmayr et al. 2022) with an unconditional model: fill where mask == 0 and keep x0
    where mask == 1. x0: (B, ...), mask broadcastable to x0.

    At each step of a respaced ancestral sampler the known region is replaced by a fresh sample of
    q(x_{t-1} | x_0) and the unknown one by p_theta(x_{t-1} | x_t); `resample` times per step the
    result is noised back one step, x_t ~ q(x_t | x_{t-1}), and denoised again, so the two regions
    harmonise. steps * resample network evaluations."""
    if resample < 1:
        raise UserError(f"resample must be >= 1, got {resample}")
    mask = mask.to(x0.dtype).expand_as(x0)
    noise = NoiseSource(x0.shape[0], generator, x0.device)
    denoiser = as_denoiser(model, schedule, prediction)
    schedule = denoiser.schedule
    respaced = schedule.respace(torch.unique(timestep_grid("uniform", schedule, steps).round().long()))
    variance = default_variance(denoiser.learned_variance)
    x = noise.randn(x0.shape[1:], x0.dtype)
    for i in range(respaced.T - 1, -1, -1):
        t_model = respaced.timesteps[i].to(torch.float32).expand(x0.shape[0]).to(x0.device)
        i_vec = torch.full((x0.shape[0],), i, dtype=torch.long, device=x0.device)
        for u in range(resample):
            out = denoiser(x, t_model, **(model_kwargs or {}))
            x0_hat = out.x0.clamp(-1, 1) if clip_x0 else out.x0
            mean, log_var = p_mean_variance(x0_hat, x, i_vec, respaced, variance, out.var_frac)
            unknown = mean + ((0.5 * log_var).exp() * noise.randn(x0.shape[1:], x0.dtype) if i > 0 else 0.0)
            known = q_sample(x0, i_vec - 1, respaced, noise.randn(x0.shape[1:], x0.dtype)) if i > 0 else x0
            x_prev = mask * known + (1 - mask) * unknown
            if u == resample - 1 or i == 0:
                x = x_prev
                break
            beta = extract(respaced.betas, i_vec, x0)  # q(x_t | x_{t-1}) of the respaced chain
            x = (1 - beta).sqrt() * x_prev + beta.sqrt() * noise.randn(x0.shape[1:], x0.dtype)
    return x


# ---- interpolation


def slerp(a: torch.Tensor, b: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between noise tensors, per example over all but the batch dim:
    keeps the norm that Gaussian noise has, where a straight line would shrink it in the middle."""
    af, bf = a.flatten(1), b.flatten(1)
    cos = (af * bf).sum(1) / (af.norm(dim=1) * bf.norm(dim=1)).clamp(min=1e-12)
    theta = cos.clamp(-1, 1).acos()
    alpha = torch.as_tensor(alpha, dtype=a.dtype)
    sin = theta.sin()
    near = sin.abs() < 1e-6  # parallel vectors: fall back to a straight line
    wa = torch.where(near, 1 - alpha, ((1 - alpha) * theta).sin() / sin.where(~near, torch.ones_like(sin)))
    wb = torch.where(near, alpha.expand_as(theta), (alpha * theta).sin() / sin.where(~near, torch.ones_like(sin)))
    return append_dims(wa, a.ndim) * a + append_dims(wb, a.ndim) * b


def seed_noise(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """x_T of one seed: (1, *shape), the same noise `sample(generator=seed)` starts from."""
    return NoiseSource(1, [seed]).randn(shape)


def check_frames(n: int) -> int:
    """An interpolation's frame count: both ends at least (one frame showed the first end alone, as if interpolated)."""
    if n < 2:
        raise UserError(f"an interpolation needs at least 2 frames, its two ends; got {n}")
    return n


def interpolate_seeds(model: Denoiser | ModelFn, seed_a: int, seed_b: int, n: int, shape: tuple[int, ...], schedule: NoiseSchedule | None = None,
                      sampler: str = "ddim", steps: int = 50, prediction: Prediction = "eps", **kwargs) -> torch.Tensor:
    """n samples along the slerp from seed_a's x_T to seed_b's. A stochastic sampler draws the same noise for every
    frame (seed_a's), so neighbouring frames differ only by their x_T."""
    alphas = torch.linspace(0, 1, check_frames(n))
    x_T = torch.cat([slerp(seed_noise(seed_a, shape), seed_noise(seed_b, shape), float(a)) for a in alphas])
    return sample(as_denoiser(model, schedule, prediction), (n, *shape), sampler=sampler, steps=steps, x_T=x_T,
                  generator=[seed_a] * n, **kwargs).x


def interpolate_images(model: Denoiser | ModelFn, xa: torch.Tensor, xb: torch.Tensor, t: int, n: int, schedule: NoiseSchedule | None = None,
                       seed: int = 0, steps: int = 100, prediction: Prediction = "eps", **kwargs) -> torch.Tensor:
    """The DDPM paper's interpolation (section 4.3, Fig. 8): encode two images xa, xb: (1, ...) to
    x_t with q (the same noise), interpolate linearly, and decode every mixture with the reverse
    process from t (the same reverse noise for all, so neighbours differ only by the mixture)."""
    check_frames(n)
    denoiser = as_denoiser(model, schedule, prediction)
    schedule = denoiser.schedule
    eps = NoiseSource(1, [seed], xa.device).randn(xa.shape[1:])
    ab = schedule.alpha_bar[t].to(xa.device, xa.dtype)
    xt_a, xt_b = ab.sqrt() * xa + (1 - ab).sqrt() * eps, ab.sqrt() * xb + (1 - ab).sqrt() * eps
    lam = append_dims(torch.linspace(0, 1, n, dtype=xa.dtype, device=xa.device), xa.ndim)
    x_t = (1 - lam) * xt_a + lam * xt_b
    return sample(denoiser, x_t.shape, sampler="ddpm", generator=[seed + 1] * n, x_T=x_t,
                  grid=grid_from(float(t), schedule, steps), **{"device": xa.device, **kwargs}).x


def lerp_condition(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """Between two prompt encodings: token embeddings mix linearly (padding is zero in both), the
    mask keeps every token that either prompt has."""
    out = {}
    for key in a:
        if a[key].dtype == torch.bool:
            out[key] = a[key] | b[key]
        else:
            out[key] = (1 - alpha) * a[key] + alpha * b[key]
    return out


def _offset(generator: GeneratorLike, offset: int) -> GeneratorLike:
    """Seeds for a second, independent stream (the noising) from the sampler's seeds."""
    if isinstance(generator, int):
        return generator + offset
    if isinstance(generator, (list, tuple)):
        return [int(s) + offset for s in generator]
    return generator
