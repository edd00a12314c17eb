"""The KL autoencoder of latent diffusion as a training task (Rombach et al. 2022).

    loss = ||x - D(z)||^2 (summed over pixels) + kl_weight * KL(q(z|x) || N(0, I)),  z ~ q(z|x)

After the last step the latent scale factor (1 / std of the training latents) is set from data,
and the held-out reconstruction PSNR is recorded with the final checkpoint.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path

import torch
from torch import nn

from .. import viz
from ..config import Config
from ..data import DataError
from ..evaluate.metrics import psnr
from ..nets.autoencoder import latent_shape
from .batches import Batch
from .task import Task


class AutoencoderTask(Task):
    name = "autoencoder"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.data = self.load_data()
        if len(self.data.shape) != 3:
            raise DataError(f"the autoencoder needs images; {cfg.data.name!r} has examples of shape {self.data.shape}")
        self.shape, self.num_examples = tuple(self.data.shape), len(self.data)
        self.latent_shape = latent_shape(self.shape, cfg.autoencoder)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        eps = torch.randn((batch.size, *self.latent_shape), generator=batch.generator)  # the posterior samples' noise
        x = batch.local(self.data.get_batch(batch.indices))
        x_hat, kl = model(x, batch.local(eps))
        rec = ((x_hat.float() - x) ** 2).flatten(1).sum(1)
        return rec + self.cfg.autoencoder.kl_weight * kl.float()

    @functools.cached_property
    def held_out(self) -> torch.Tensor:
        """Up to 500 held-out images, loaded once."""
        data = self.load_data("test")
        return data.get_batch(torch.arange(min(500, len(data))))

    @torch.no_grad()
    def _reconstruct(self, ema: nn.Module, x: torch.Tensor) -> torch.Tensor:
        device = next(ema.parameters()).device
        return torch.cat([ema.decode(ema.encode(c.to(device))[0]).clamp(-1, 1).cpu() for c in x.split(250)])

    def preview(self, ema: nn.Module, path: Path) -> torch.Tensor:
        """Held-out images (top row) and their reconstructions (below)."""
        x = self.held_out[:8]
        shown = torch.cat([x, self._reconstruct(ema, x)])
        viz.save_grid(shown, path, nrow=len(x))
        return shown

    def evaluate(self, ema: nn.Module) -> dict[str, float]:
        x = self.held_out
        return {"psnr_db": psnr(self._reconstruct(ema, x), x).mean().item()}

    @torch.no_grad()
    def finish(self, ema: nn.Module, model: nn.Module) -> dict:
        device = next(ema.parameters()).device
        x_train = self.data.get_batch(torch.arange(self.num_examples))
        latents = torch.cat([ema.encode(c.to(device))[0] for c in x_train.split(500)])
        for m in (ema, model):  # both copies, so a resumed run carries it too
            m.scale_factor.fill_(1.0 / latents.std().item())
        x = self.held_out
        recon = ema.from_latent(ema.to_latent(x.to(device))).cpu()
        metrics = {"psnr_db": psnr(recon, x).mean().item(), "mse": ((recon - x) ** 2).mean().item(),
                   "scale_factor": ema.scale_factor.item(), "n_held_out": len(x),
                   "image_elements": math.prod(self.shape), "latent_elements": math.prod(self.latent_shape)}
        print(f"held-out reconstruction PSNR {metrics['psnr_db']:.2f} dB; latent {self.latent_shape} = "
              f"{metrics['latent_elements']} elements vs {metrics['image_elements']} "
              f"({metrics['image_elements'] / metrics['latent_elements']:.2f}x fewer); scale factor {metrics['scale_factor']:.4f}")
        return metrics
