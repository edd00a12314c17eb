"""A super-resolution stage as a training task: the denoiser of p(x | z), where z is the area-
downsampled x, corrupted by noise conditioning augmentation (CDM, Imagen).

    x_0 ~ q(x_0);  z = D(x_0) (optionally blurred);  s ~ U(0, aug_max);  z_s = sqrt(a(s)) z + sqrt(1 - a(s)) xi
    t, eps as in Algorithm 1;  gradient step on || eps - eps_theta(x_t, t, z_s, s) ||^2

Everything else (conditioning, prediction target, loss weighting, timestep sampling) is the
denoiser's, so a class- or text-conditional stage is one config away.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .. import viz
from ..config import Config
from ..data import DataError
from ..sampling import sample
from ..superres import augment, downsample, gaussian_blur, stage_inputs, upsample
from .batches import Batch
from .denoiser import DenoiserTask


class SuperResTask(DenoiserTask):
    name = "superres"

    def __init__(self, cfg: Config):
        if cfg.data.autoencoder:
            raise DataError("a super-resolution stage works on pixels: leave data.autoencoder empty (a latent base model's "
                            "decoded samples are its input at sampling)")
        super().__init__(cfg)
        if len(self.shape) != 3 or cfg.superres.low_res >= self.shape[-1]:
            raise DataError(f"superres.low_res = {cfg.superres.low_res} must be smaller than the images' side; the data has shape {self.shape}")

    resident_data = False  # the low-res input's augmentation is drawn and computed on the CPU

    def stage_inputs(self, x0: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        sr, g, B = self.cfg.superres, batch.generator, batch.size
        C, low = self.shape[0], sr.low_res
        level_all = torch.rand(B, generator=g, dtype=torch.float64) * sr.aug_max
        xi_all = torch.randn((B, C, low, low), generator=g)
        blur_all = torch.rand(B, generator=g) < sr.blur_prob
        lo, hi = sr.blur_sigma
        sigma_all = torch.where(blur_all, lo + (hi - lo) * torch.rand(B, generator=g), 0.0)
        z = downsample(x0, low)
        if sr.blur_prob > 0:
            z = gaussian_blur(z, sigma_all[batch.mine], max_sigma=hi)
        level = level_all[batch.mine]
        return {"low_res": augment(z, level, self.schedule, xi_all[batch.mine], check=False), "aug_level": level.float()}

    def held_out_inputs(self, x0: torch.Tensor) -> dict[str, torch.Tensor]:
        """The clean low-res images at level 0: the VLB of p(x | D(x))."""
        return {"low_res": downsample(x0, self.cfg.superres.low_res), "aug_level": torch.zeros(len(x0), device=x0.device)}

    def preview(self, ema: nn.Module, path: Path) -> torch.Tensor:
        """Held-out images as triples (upsampled low-res input | super-resolved | original), at the
        default sampling augmentation level; a conditional stage shows its unconditional branch."""
        tc, sr = self.cfg.train, self.cfg.superres
        device = next(ema.parameters()).device
        x = self.held_out[:min(16, tc.num_samples)]
        n = len(x)
        kwargs = {**self.conditioning.null_batch(n), **stage_inputs(downsample(x, sr.low_res), sr.aug_level, self.schedule, list(range(n)))}
        out = sample(self.denoiser(ema), (n, *self.shape), steps=tc.sample_steps, generator=0, clip_x0=True,
                     model_kwargs={k: v.to(device) for k, v in kwargs.items()})
        shown = upsample(downsample(x, sr.low_res), self.shape[-1], "nearest")
        rows = torch.stack([shown, out.x.cpu(), x], dim=1).reshape(3 * n, *self.shape)  # (n, 3, ...) -> triples in a row
        viz.save_grid(rows, path, nrow=12)
        return rows
