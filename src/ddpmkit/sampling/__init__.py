"""Samplers: stateless functions over the one denoiser contract, and the ``sample`` entry point."""
from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..distillation import consistency_sampler, ddim_uniform
from ..errors import UserError
from ..parameterization import Denoiser, ModelFn, Prediction, as_denoiser
from ..schedules import NoiseSchedule
from .ancestral import ddim, ddpm
from .churn import edm, euler_ancestral
from .grids import GRIDS, timestep_grid
from .noise import GeneratorLike, NoiseSource
from .ode import dopri5, dpmpp_2m, dpmpp_2m_sde, dpmpp_3m, dpmpp_3m_sde, euler, heun, ipndm, unipc
from .sde import euler_maruyama, pc

# name -> sampler function; each takes (denoiser, x_T, noise, steps=, grid=, callback=, model_kwargs=, progress=, **options)
SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddpm": ddpm,  # Algorithm 2, respaced for fewer steps
    "ddim": ddim,  # eta = 0 deterministic, eta = 1 DDPM-like
    "ddim_uniform": ddim_uniform,  # DDIM on the uniform grid a progressively distilled student learned
    "consistency": consistency_sampler,  # multistep consistency sampling of a consistency run
    "euler": euler,  # probability-flow ODE solvers
    "heun": heun,
    "dpmpp_2m": dpmpp_2m,
    "dpmpp_3m": dpmpp_3m,
    "unipc": unipc,
    "ipndm": ipndm,
    "dopri5": dopri5,
    "dpmpp_2m_sde": dpmpp_2m_sde,  # reverse-SDE solvers
    "dpmpp_3m_sde": dpmpp_3m_sde,
    "euler_maruyama": euler_maruyama,
    "pc": pc,
    "euler_ancestral": euler_ancestral,  # noise, then the ODE: k-diffusion's "Euler a"
    "edm": edm,  # EDM's stochastic Heun (Algorithm 2)
}
# and ddim with eta > 0; euler_ancestral with eta = 0 and edm with churn = 0 are ODE solvers
STOCHASTIC = {"consistency", "ddpm", "dpmpp_2m_sde", "dpmpp_3m_sde", "euler_maruyama", "pc", "euler_ancestral", "edm"}


@dataclass
class SampleResult:
    """What a sampler returns: the samples, the network evaluations spent, and (optionally)
    the trajectory of x_t and of the predicted x_0 at the recorded steps, oldest first."""

    x: torch.Tensor  # (B, ...)
    nfe: int
    timesteps: list[int] = field(default_factory=list)  # t of each recorded step
    xs: list[torch.Tensor] = field(default_factory=list)  # x_t after each recorded step
    x0s: list[torch.Tensor] = field(default_factory=list)  # predicted x_0 at each recorded step


def _check_options(sampler: str, options: dict) -> None:
    """Name the options a sampler takes instead of failing with a TypeError deep inside it."""
    params = inspect.signature(SAMPLERS[sampler]).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return  # checked by the sampler (timestep_grid names the unknown ones)
    known = [name for name in params if name not in ("denoiser", "x", "noise", "callback", "model_kwargs", "progress")]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise UserError(f"sampler {sampler!r} takes no option(s) {unknown}; its options are {known}")


def sample(
    model: Denoiser | ModelFn,
    shape: Sequence[int],
    schedule: NoiseSchedule | None = None,
    sampler: str = "ddpm",
    steps: int | None = None,
    prediction: Prediction = "eps",
    generator: GeneratorLike = None,
    learned_variance: bool = False,
    model_kwargs: dict | None = None,
    record_every: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
    x_T: torch.Tensor | None = None,
    callback: Callable[[dict], None] | None = None,
    **sampler_options,
) -> SampleResult:
    """Draw samples of shape (B, *dims) from a diffusion model.

    model: a Denoiser (``ddpmkit.load(run).denoiser``, or a guidance wrapper of one), which knows its
        schedule, prediction and variance; or any callable model(x_t: (B, ...), t: (B,) float timesteps,
        **model_kwargs) returning the ``prediction`` (eps, x0, v or mu), with its ``schedule`` (the one it
        was trained with), ``prediction`` and ``learned_variance``.
    sampler: one of SAMPLERS ('ddpm', 'ddim', 'euler', 'heun', 'dpmpp_2m', 'dpmpp_3m', 'unipc', 'dopri5',
        'dpmpp_2m_sde', 'dpmpp_3m_sde', 'euler_maruyama', 'pc').
    steps: grid points, one network evaluation each (Heun and pc: about two); None = all T steps.
    generator: an int seed s (sample k uses seed s + k, so it does not depend on the batch size),
        a list of per-sample seeds, a torch.Generator, or None for the global RNG.
    record_every: keep x_t and predicted x_0 every this many steps (0 = none) for pictures.
    callback: called after every step with {"i": steps left, "t", "x": x_t, "x0": predicted x_0}
        (live previews, progress, cancelling by raising).
    sampler_options: passed to the sampler: grid= (a name in GRIDS or a tensor of timesteps),
        variance= and clip_x0= for 'ddpm', eta= for 'ddim' and the SDE solvers, order=, rtol=...
    """
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
    _check_options(sampler, sampler_options)
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2 or min(shape) < 1:
        raise UserError(f"shape must be (batch, *dims) of sizes >= 1, got {shape}")
    denoiser = as_denoiser(model, None if schedule is None else schedule.to("cpu"), prediction, learned_variance)
    # at SNR 0 every sampler steps in alpha_bar or takes an exact first step from the pure noise, but an eps-model gives NaN
    if denoiser.schedule.zero_terminal_snr and denoiser.prediction == "eps":
        raise UserError("this schedule ends at zero SNR (alpha_bar_T = 0), where an eps-prediction gives no x_0 (it divides "
                        "by sqrt(alpha_bar_T) = 0): zero-SNR models predict v or x0")
    if device is None:
        params = getattr(denoiser.model, "parameters", None)
        first = next(params(), None) if callable(params) else None
        device = first.device if first is not None else torch.device("cpu")
    noise = NoiseSource(shape[0], generator, device)
    x = noise.randn(shape[1:]) if x_T is None else x_T.to(device)
    result = SampleResult(x=x, nfe=0)
    nfe_before = denoiser.nfe
    step_count = 0

    def record(info: dict) -> None:
        nonlocal step_count
        step_count += 1
        if record_every and (step_count % record_every == 0 or info["i"] == 0):
            result.timesteps.append(info["t"])
            result.xs.append(info["x"].detach().cpu())
            result.x0s.append(info["x0"].detach().cpu())
        if callback is not None:
            callback(info)

    with torch.no_grad():
        result.x = SAMPLERS[sampler](
            denoiser, x, noise, steps=steps, callback=record, model_kwargs=model_kwargs, progress=progress, **sampler_options
        )
    result.nfe = denoiser.nfe - nfe_before
    return result


__all__ = ["GRIDS", "SAMPLERS", "STOCHASTIC", "SampleResult", "sample", "NoiseSource", "timestep_grid"]
