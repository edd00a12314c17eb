"""Training objectives, per example: L_simple for each target, SNR weights, and the VLB terms.

Every function returns a (B,) tensor; the trainer reduces (EDM's convention), and evaluation
reuses the same VLB terms to report bits/dim.

The variational bound (DDPM eq. 5), with 0-indexed t:
    L = L_T + sum_{t=1}^{T-1} L_{t-1} + L_0
    L_T     = KL(q(x_T|x_0) || N(0, I))                     -> process.prior_kl
    L_{t-1} = KL(q(x_{t-1}|x_t, x_0) || p_theta(x_{t-1}|x_t)) -> vlb_term for t > 0
    L_0     = -log p_theta(x_0 | x_1), discretised Gaussian -> vlb_term for t = 0
"""
from __future__ import annotations

import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F

from .errors import UserError
from .parameterization import ModelFn, Prediction, split_variance, target_for, to_x0_eps
from .process import normal_kl, q_posterior_mean_variance, q_sample
from .reverse import default_variance, p_mean_variance
from .schedules import NoiseSchedule
from .uncertainty import uncertainty_weighted_loss
from .utils import mean_flat, on_device

LossType = Literal["simple", "hybrid", "vlb"]
LOSS_TYPES: tuple[str, ...] = get_args(LossType)


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor, bins: int = 256) -> torch.Tensor:
    """log p(x) of data in [-1, 1] quantised to `bins` levels under N(mean, e^log_var), elementwise.

    Each level covers a bin of width 2/(bins-1); the edge bins extend to -inf and +inf
    (DDPM section 3.3, the L_0 decoder). Uses the exact normal CDF in log space.
    """
    half_bin = 1.0 / (bins - 1)
    inv_std = torch.exp(-0.5 * log_var)
    upper = inv_std * (x - mean + half_bin)
    lower = inv_std * (x - mean - half_bin)
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_sf_lower = torch.special.log_ndtr(-lower)
    mass = (torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12)
    edge = 1.0 - half_bin
    return torch.where(x < -edge, log_cdf_upper, torch.where(x > edge, log_sf_lower, mass.log()))


def gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, e^log_var), elementwise: the L_0 decoder for continuous data."""
    return -0.5 * (math.log(2 * math.pi) + log_var + (x - mean) ** 2 * torch.exp(-log_var))


def vlb_term(
    x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor, schedule: NoiseSchedule,
    decoder: str = "discretized",
) -> torch.Tensor:
    """L_{t-1} for t > 0 and L_0 for t = 0, given p_theta's mean and log variance; nats/dim, (B,).

    decoder: 'discretized' (8-bit data in [-1, 1], DDPM eq. 13) or 'gaussian' (continuous data)."""
    true_mean, _, true_log_var = q_posterior_mean_variance(x0, x_t, t, schedule)
    kl = mean_flat(normal_kl(true_mean, true_log_var, mean, log_var))
    if decoder == "discretized":
        decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(x0, mean, log_var))
    elif decoder == "gaussian":
        decoder_nll = -mean_flat(gaussian_log_likelihood(x0, mean, log_var))
    else:
        raise UserError(f"unknown decoder {decoder!r}; choose 'discretized' or 'gaussian'")
    return torch.where(t == 0, decoder_nll, kl)


def from_x0_weight(prediction: str, w_x0: torch.Tensor, snr: torch.Tensor) -> torch.Tensor:
    """The weight on a target's squared error equal to the weight w_x0 on the x0 error, since
    ||eps - eps_hat||^2 = SNR ||x0 - x0_hat||^2 and ||v - v_hat||^2 = (SNR + 1) ||x0 - x0_hat||^2."""
    if prediction == "eps":
        return w_x0 / snr
    if prediction == "x0":
        return w_x0
    if prediction == "v":
        return w_x0 / (snr + 1)
    raise UserError(f"SNR-based loss weights are defined for eps, x0 and v prediction, not {prediction!r}")


def snr_weight(prediction: str, snr: torch.Tensor, gamma: float | None) -> torch.Tensor:
    """Min-SNR-gamma weights (Hang et al. 2023): min(SNR, gamma) on the x0 error, for each target."""
    if gamma is None:
        return torch.ones_like(snr)
    return from_x0_weight(prediction, snr.clamp(max=gamma), snr)


def edm_weight(prediction: str, snr: torch.Tensor, sigma_data: float, gamma: float | None = None) -> torch.Tensor:
    """EDM's lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 = SNR + 1 / sd^2 on the x0 error (sigma^2 =
    1 / SNR), for each target: the weight that makes the x0 loss of an EDM-preconditioned network its
    unit-weight loss on the inner network's output (preconditioning.py). With gamma, the SNR term is
    clipped as in min-SNR-gamma: min(SNR, gamma) + 1 / sd^2, so the nearly clean levels, whose
    weight grows without bound, do not take the training from the middle of the chain."""
    snr_term = snr if gamma is None else snr.clamp(max=gamma)
    return from_x0_weight(prediction, snr_term + 1.0 / sigma_data**2, snr)


def training_losses(
    model: ModelFn,
    x0: torch.Tensor,
    t: torch.Tensor,
    schedule: NoiseSchedule,
    noise: torch.Tensor | None = None,
    prediction: Prediction = "eps",
    loss_type: LossType = "simple",
    learned_variance: bool = False,
    min_snr_gamma: float | None = None,
    edm_sigma_data: float | None = None,
    hybrid_lambda: float = 0.001,
    model_kwargs: dict | None = None,
    uncertainty: bool = False,
) -> dict[str, torch.Tensor]:
    """Algorithm 1 for one batch: per-example losses at integer timesteps t: (B,).

    'simple': || target - net(x_t, t) ||^2 (DDPM's L_simple; eps target by default).
    'hybrid': L_simple + lambda * L_vlb with the mean detached in L_vlb, so the VLB only trains
              the learned variance (Nichol & Dhariwal 2021, L_hybrid).
    'vlb':    T * L_{t-1}, an unbiased single-sample estimate of the full bound sum_t L_{t-1}.
    The 'simple' loss is weighted per example by min-SNR-gamma (min_snr_gamma), by EDM's
    lambda(sigma) (edm_sigma_data = sigma_data; clipped at min_snr_gamma if both), else unweighted.
    uncertainty: the model (an UncertaintyWeighted) also returns its learned u(t), and the weighted
    simple loss L becomes L / exp(u) + u (EDM2).
    Returns {'loss', 'mse', 'vlb'?, 'log_variance'?}, each (B,).
    """
    if loss_type not in LOSS_TYPES:
        raise UserError(f"unknown loss type {loss_type!r}; choose one of {list(LOSS_TYPES)}")
    noise = torch.randn_like(x0) if noise is None else noise
    x_t = q_sample(x0, t, schedule, noise)
    output = model(x_t, t.float(), **(model_kwargs or {}), **({"return_log_variance": True} if uncertainty else {}))
    if uncertainty:
        output, log_variance = output
    output, var_frac = split_variance(output, x_t, learned_variance)
    target = target_for(prediction, x0, noise, x_t, t, schedule)
    snr = (on_device(schedule.log_snr, t.device)[t]).exp().to(x0.dtype)
    mse = mean_flat((target - output) ** 2)
    terms = {"mse": mse}
    if loss_type == "simple":
        if edm_sigma_data:
            terms["loss"] = edm_weight(prediction, snr, edm_sigma_data, min_snr_gamma or None) * mse
        else:
            terms["loss"] = snr_weight(prediction, snr, min_snr_gamma) * mse if min_snr_gamma else mse
        if uncertainty:
            terms["loss"] = uncertainty_weighted_loss(terms["loss"], log_variance)
            terms["log_variance"] = log_variance.detach()
        return terms
    mean_source = output.detach() if loss_type == "hybrid" else output
    pred_x0, _ = to_x0_eps(prediction, mean_source, x_t, t, schedule)
    mean, log_var = p_mean_variance(pred_x0, x_t, t, schedule, default_variance(learned_variance), var_frac)
    vlb = vlb_term(x0, x_t, t, mean, log_var, schedule)
    terms["vlb"] = vlb
    if loss_type == "hybrid":
        terms["loss"] = mse + hybrid_lambda * schedule.T * vlb
    else:
        terms["loss"] = schedule.T * vlb
    return terms


def info_nce(image_embed: torch.Tensor, text_embed: torch.Tensor, scale: torch.Tensor | float,
             rows: slice | torch.Tensor | None = None) -> torch.Tensor:
    """CLIP's symmetric InfoNCE loss (Radford et al. 2021), per example.

    image_embed, text_embed: (B, E) unit vectors of B matching pairs; scale = 1 / temperature.
    logits[i, j] = scale * <image_i, text_j>; pair i's loss is the mean of the cross-entropy of
    picking text i among the B texts for image i and of picking image i among the B images for text i:
        l_i = -1/2 [log softmax_j(logits[i, :])_i + log softmax_j(logits[:, i])_i]
    rows: the examples whose losses to return (default all; a process's slice of the global batch,
    whose embeddings are all here): (B_rows,)."""
    logits = scale * image_embed.float() @ text_embed.float().T  # (B, B)
    target = torch.arange(len(logits), device=logits.device)
    rows = slice(None) if rows is None else rows
    image_to_text = F.cross_entropy(logits[rows], target[rows], reduction="none")
    text_to_image = F.cross_entropy(logits.T[rows], target[rows], reduction="none")
    return (image_to_text + text_to_image) / 2
