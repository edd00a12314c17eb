"""What the network predicts (eps, x0, v or mu-tilde) and the exact conversions between them.

Every network, whatever it predicts, is wrapped once into a ``Denoiser``: a callable
``denoiser(x_t, t, **extra) -> DenoiserOutput(eps, x0, var_frac)``. Samplers and losses only
see that contract, so any sampler drives any parameterization.

Symbols: a = alpha_bar_t, x_t = sqrt(a) x0 + sqrt(1 - a) eps.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple, get_args

import torch

from .errors import UserError
from .process import posterior_mean_coefficients
from .schedules import NoiseSchedule
from .utils import append_dims, extract, on_device

Prediction = Literal["eps", "x0", "v", "mu"]
PREDICTIONS: tuple[str, ...] = get_args(Prediction)

ModelFn = Callable[..., torch.Tensor]
"""model(x_t: (B, ...), t: (B,) float timesteps, **extra) -> prediction (B, ...) [or (B, 2C, ...)]."""


def check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise UserError(f"unknown prediction {prediction!r}; choose one of {list(PREDICTIONS)}")


def _sqrt_ab(alpha_bar: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a = append_dims(alpha_bar, x.ndim).to(x.dtype)
    return a.sqrt(), (1.0 - a).sqrt()


def eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """eps = (x_t - sqrt(a) x0) / sqrt(1 - a)."""
    s, c = _sqrt_ab(alpha_bar, x_t)
    return (x_t - s * x0) / c


def x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x0 = (x_t - sqrt(1 - a) eps) / sqrt(a)   (DDPM eq. 4 solved for x_0)."""
    s, c = _sqrt_ab(alpha_bar, x_t)
    return (x_t - c * eps) / s


def v_from_x0_eps(x0: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """v = sqrt(a) eps - sqrt(1 - a) x0   (Salimans & Ho 2022)."""
    s, c = _sqrt_ab(alpha_bar, x0)
    return s * eps - c * x0


def x0_eps_from_v(x_t: torch.Tensor, v: torch.Tensor, alpha_bar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x0 = sqrt(a) x_t - sqrt(1 - a) v,  eps = sqrt(1 - a) x_t + sqrt(a) v."""
    s, c = _sqrt_ab(alpha_bar, x_t)
    return s * x_t - c * v, c * x_t + s * v


def mu_from_x0(x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """mu-tilde_t(x_t, x0), the posterior mean (DDPM eq. 7)."""
    c0, ct = posterior_mean_coefficients(schedule)
    return extract(c0, t, x_t) * x0 + extract(ct, t, x_t) * x_t


def x0_from_mu(x_t: torch.Tensor, mu: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """Invert mu-tilde = c0 x0 + ct x_t for x0 (c0 > 0 at every t)."""
    c0, ct = posterior_mean_coefficients(schedule)
    return (mu - extract(ct, t, x_t) * x_t) / extract(c0, t, x_t)


def target_for(prediction: str, x0: torch.Tensor, eps: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """The regression target of each parameterization for a training pair (x0, eps) at integer t."""
    check_prediction(prediction)
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        return v_from_x0_eps(x0, eps, on_device(schedule.alpha_bar, t.device)[t])  # the table copied there once, not every step
    return mu_from_x0(x_t, x0, t, schedule)


def to_x0_eps(
    prediction: str, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule
) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert a network output in any parameterization to (x0, eps) at timesteps t: (B,).

    t may be fractional for eps/x0/v (continuous-time samplers use ``alpha_bar_at``);
    mu-tilde is defined by the discrete posterior and needs integer t.
    """
    check_prediction(prediction)
    if prediction == "mu":
        if not bool((t == t.round()).all()):
            raise UserError("prediction='mu' is only defined at integer timesteps; use a discrete sampler")
        x0 = x0_from_mu(x_t, output, t.long(), schedule)
        return x0, eps_from_x0(x_t, x0, on_device(schedule.alpha_bar, t.device)[t.long()])
    alpha_bar = schedule.alpha_bar_at(t, check=False).to(t.device)
    if prediction == "eps":
        return x0_from_eps(x_t, output, alpha_bar), output
    if prediction == "x0":
        return output, eps_from_x0(x_t, output, alpha_bar)
    return x0_eps_from_v(x_t, output, alpha_bar)


class DenoiserOutput(NamedTuple):
    eps: torch.Tensor  # predicted noise, (B, ...)
    x0: torch.Tensor  # predicted clean data, (B, ...)
    var_frac: torch.Tensor | None  # learned-variance interpolation in [0, 1] (None if fixed)


class Denoiser:
    """The one denoiser object: ``model(x_t, t, **extra)`` together with what it predicts, so that
    ``denoiser(x_t, t, **extra) -> DenoiserOutput(eps, x0, var_frac)`` whatever the parameterization.

    Samplers, guidance wrappers, editing and likelihoods take a Denoiser and read the schedule from it;
    nothing downstream is told the schedule or prediction again. ``ddpmkit.load(run).denoiser`` is one.

    ``schedule`` is the schedule the model was trained with and t is always in its timesteps.
    With ``learned_variance`` the model returns 2C channels: the prediction and v in [-1, 1],
    which sets log Sigma = frac * log beta_t + (1 - frac) * log beta-tilde_t with
    frac = (v + 1) / 2 (Nichol & Dhariwal 2021, eq. 15).
    """

    def __init__(self, model: ModelFn, schedule: NoiseSchedule, prediction: Prediction = "eps", learned_variance: bool = False):
        check_prediction(prediction)
        self.model = model
        self.schedule = schedule
        self.prediction = prediction
        self.learned_variance = learned_variance
        self.nfe = 0  # calls so far, one per batch: a wrapper that runs its model on both halves of a batch counts once

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor | float, **extra) -> DenoiserOutput:
        t = times_for(x_t, t)
        self.nfe += 1
        return self.denoise(x_t, t, **extra)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, **extra) -> DenoiserOutput:
        """The model's output as (eps, x0, var_frac) at float timesteps t: (B,). Wrappers override this."""
        output, var_frac = split_variance(self.model(x_t, t, **extra), x_t, self.learned_variance)
        x0, eps = to_x0_eps(self.prediction, output, x_t, t, self.schedule)
        return DenoiserOutput(eps=eps, x0=x0, var_frac=var_frac)

    def with_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor, var_frac: torch.Tensor | None = None) -> DenoiserOutput:
        """The output whose clean-data estimate is x0 at (x_t, t): eps follows from x_t = sqrt(a) x0 + sqrt(1 - a) eps,
        so wrappers that edit x0 (thresholding, guidance rescale) stay consistent in every parameterization."""
        alpha_bar = self.schedule.alpha_bar_at(t, check=False).to(t.device)
        return DenoiserOutput(eps=eps_from_x0(x_t, x0, alpha_bar), x0=x0, var_frac=var_frac)

    def with_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, var_frac: torch.Tensor | None = None) -> DenoiserOutput:
        """The output whose noise estimate is eps at (x_t, t) (classifier guidance edits eps)."""
        alpha_bar = self.schedule.alpha_bar_at(t, check=False).to(t.device)
        return DenoiserOutput(eps=eps, x0=x0_from_eps(x_t, eps, alpha_bar), var_frac=var_frac)


def split_variance(output: torch.Tensor, x_t: torch.Tensor, learned_variance: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prediction, var_frac) of a network output: with a learned variance the network returns 2C channels, the
    prediction and v in [-1, 1], and frac = (v + 1) / 2 interpolates log Sigma between beta-tilde_t and beta_t
    (Nichol & Dhariwal 2021, eq. 15); else the output is the prediction, of x_t's shape."""
    if not learned_variance:
        if output.shape != x_t.shape:
            raise UserError(f"the model returned shape {tuple(output.shape)} for input {tuple(x_t.shape)}")
        return output, None
    if output.shape[1] != 2 * x_t.shape[1]:
        raise UserError(f"a learned-variance model must return {2 * x_t.shape[1]} channels, got {output.shape[1]}")
    prediction, v = output.chunk(2, dim=1)
    return prediction, (v + 1) / 2


class DenoiserWrapper(Denoiser):
    """A denoiser built on another (guidance, thresholding): it keeps the inner one's schedule, prediction
    and variance, and overrides ``denoise``, where it calls ``self.inner.denoise`` (so nfe counts the outer calls)."""

    def __init__(self, inner: Denoiser):
        if not isinstance(inner, Denoiser):
            raise TypeError(f"{type(self).__name__} wraps a Denoiser, got {type(inner).__name__}: wrap a network once with "
                            "Denoiser(model, schedule, prediction), or take ddpmkit.load(run).denoiser")
        super().__init__(inner.model, inner.schedule, inner.prediction, inner.learned_variance)
        self.inner = inner


def times_for(x_t: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """t as a float tensor (B,) on x_t's device (float64 is kept: continuous-time solvers ask for exact noise levels)."""
    t = torch.as_tensor(t, device=x_t.device)
    if not t.is_floating_point():
        t = t.float()
    return t.expand(x_t.shape[0]) if t.ndim == 0 else t


def as_denoiser(model: ModelFn | Denoiser, schedule: NoiseSchedule | None = None, prediction: Prediction = "eps",
                learned_variance: bool = False) -> Denoiser:
    """A Denoiser as given, or a plain model function wrapped with its schedule and prediction (a closed-form
    model in a test, a network of one's own). A Denoiser already knows both: giving them again is an error,
    since a second copy is how a wrapper ends up thresholding eps as if it were x0."""
    if isinstance(model, Denoiser):
        if prediction != "eps" or learned_variance or (schedule is not None and schedule is not model.schedule
                                                        and not schedule.same_as(model.schedule)):
            raise UserError("this denoiser carries its own schedule, prediction and variance: do not pass them again")
        return model
    if schedule is None:
        raise UserError("a plain model function needs its schedule (and prediction): or pass a Denoiser, e.g. ddpmkit.load(run).denoiser")
    return Denoiser(model, schedule, prediction, learned_variance)


def from_x0(prediction: str, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """The network output in `prediction` that corresponds to the clean-data estimate x0 at (x_t, t):
    the inverse of to_x0_eps, so wrappers that edit x0 (thresholding, guidance rescale) can hand the
    result back in the model's own parameterization."""
    check_prediction(prediction)
    if prediction == "x0":
        return x0
    if prediction == "mu":
        if not bool((t == t.round()).all()):
            raise UserError("prediction='mu' is only defined at integer timesteps; use a discrete sampler")
        return mu_from_x0(x_t, x0, t.long(), schedule)
    alpha_bar = schedule.alpha_bar_at(t, check=False).to(t.device)
    eps = eps_from_x0(x_t, x0, alpha_bar)
    return eps if prediction == "eps" else v_from_x0_eps(x0, eps, alpha_bar)
