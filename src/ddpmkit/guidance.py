"""Classifier-free guidance (Ho & Salimans 2022) as a model wrapper.

    eps_guided = eps(x_t | null) + s * (eps(x_t | y) - eps(x_t | null))

s = 0 is the unconditional model, s = 1 the conditional one, s > 1 trades diversity for
fidelity to y. Both branches run in one batched call. Because every parameterization (eps, x0,
v) is affine in the network output at fixed x_t and t, guiding the raw output is the same as
guiding eps; with a learned variance only the mean channels are guided (GLIDE).
"""
from __future__ import annotations

import torch

from .parameterization import ModelFn


class ClassifierFreeGuidance:
    """model(x_t, t, y=labels) -> the guided output; pass it to any sampler with model_kwargs={'y': labels}."""

    def __init__(self, model: ModelFn, scale: float, null_label: int, learned_variance: bool = False):
        self.model = model
        self.scale = float(scale)
        self.null_label = int(null_label)
        self.learned_variance = learned_variance

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, **extra) -> torch.Tensor:
        if y is None:
            raise ValueError("classifier-free guidance needs class labels: model_kwargs={'y': labels}")
        y = torch.as_tensor(y, device=x_t.device).long().expand(x_t.shape[0])
        null = torch.full_like(y, self.null_label)
        out = self.model(torch.cat([x_t, x_t]), torch.cat([t, t]), y=torch.cat([y, null]), **extra)
        cond, uncond = out.chunk(2)
        if self.learned_variance:
            (c_mean, c_var), (u_mean, _) = cond.chunk(2, dim=1), uncond.chunk(2, dim=1)
            return torch.cat([u_mean + self.scale * (c_mean - u_mean), c_var], dim=1)
        return uncond + self.scale * (cond - uncond)
