"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022), and its latent space.

    z ~ q(z | x) = N(mu(x), diag sigma^2(x))         encoder, a diagonal Gaussian posterior
    x_hat = D(z)                                      decoder
    loss = ||x - x_hat||^2 (summed) + kl_weight * KL(q(z|x) || N(0, I))

Diffusion then runs on scale_factor * mu(x): the scale factor (1 / std of the training latents,
computed from data and stored with the checkpoint) gives the latents unit variance, as the noise
schedule assumes. Images are padded with the background value -1 to `pad_to` so that the
latent grid is whole (28 -> 32 -> 8x8 for the digits) and cropped back after decoding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import AutoencoderConfig, Config, build_config
from .nets.layers import Downsample, ResBlock, SelfAttention, Upsample, group_norm


class Encoder(nn.Module):
    """x: (B, C, S, S) -> posterior mean and log-variance, each (B, z, S / 2^(levels-1), same)."""

    def __init__(self, in_channels: int, z_channels: int, base: int, mult: tuple[int, ...], num_res_blocks: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, base, 3, padding=1)]
        ch = base
        for level, m in enumerate(mult):
            for _ in range(num_res_blocks):
                layers.append(ResBlock(ch, base * m, 0))
                ch = base * m
            if level < len(mult) - 1:
                layers.append(Downsample(ch))
        layers += [ResBlock(ch, ch, 0), SelfAttention(ch, 1), ResBlock(ch, ch, 0), group_norm(ch), nn.SiLU(),
                   nn.Conv2d(ch, 2 * z_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_var = self.net(x).chunk(2, dim=1)
        return mean, log_var.clamp(-30.0, 20.0)


class Decoder(nn.Module):
    """z: (B, z, s, s) -> x_hat: (B, C, s * 2^(levels-1), same)."""

    def __init__(self, out_channels: int, z_channels: int, base: int, mult: tuple[int, ...], num_res_blocks: int):
        super().__init__()
        ch = base * mult[-1]
        layers: list[nn.Module] = [nn.Conv2d(z_channels, ch, 3, padding=1), ResBlock(ch, ch, 0), SelfAttention(ch, 1),
                                   ResBlock(ch, ch, 0)]
        for level, m in reversed(list(enumerate(mult))):
            for _ in range(num_res_blocks + 1):
                layers.append(ResBlock(ch, base * m, 0))
                ch = base * m
            if level > 0:
                layers.append(Upsample(ch))
        layers += [group_norm(ch), nn.SiLU(), nn.Conv2d(ch, out_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class Autoencoder(nn.Module):
    """encode(x) -> (mean, log_var) of q(z | x); decode(z) -> x_hat; images (C, H, W) in [-1, 1]."""

    def __init__(self, image_shape: tuple[int, int, int], cfg: AutoencoderConfig):
        super().__init__()
        C, H, W = image_shape
        if H != W:
            raise ValueError(f"the autoencoder needs square images, got {image_shape}")
        self.image_shape = tuple(image_shape)
        self.size = max(cfg.pad_to, H)
        factor = 2 ** (len(cfg.channel_mult) - 1)
        if self.size % factor:
            raise ValueError(f"image size {self.size} (after padding) must be divisible by {factor} for channel_mult={cfg.channel_mult}; "
                             f"set autoencoder.pad_to to a multiple of {factor}")
        self.latent_shape = (cfg.z_channels, self.size // factor, self.size // factor)
        self.encoder = Encoder(C, cfg.z_channels, cfg.base_channels, cfg.channel_mult, cfg.num_res_blocks)
        self.decoder = Decoder(C, cfg.z_channels, cfg.base_channels, cfg.channel_mult, cfg.num_res_blocks)
        self.register_buffer("scale_factor", torch.tensor(1.0))  # set from data after training

    def _pad(self) -> tuple[int, int, int, int]:
        before = (self.size - self.image_shape[1]) // 2
        after = self.size - self.image_shape[1] - before
        return (before, after, before, after)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(F.pad(x, self._pad(), value=-1.0))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        left, right, top, bottom = self._pad()
        x = self.decoder(z)
        return x[..., top:x.shape[-2] - bottom, left:x.shape[-1] - right]

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction from a posterior sample, and KL(q(z|x) || N(0, I)) per example: (B, ...), (B,)."""
        mean, log_var = self.encode(x)
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        z = mean + (0.5 * log_var).exp() * eps
        kl = 0.5 * (mean**2 + log_var.exp() - 1.0 - log_var).flatten(1).sum(1)
        return self.decode(z), kl

    # ---- the latent space diffusion sees
    @torch.no_grad()
    def to_latent(self, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
        """Scaled posterior means: (B, C, H, W) images -> (B, *latent_shape), about unit variance."""
        return torch.cat([self.encode(c)[0] for c in x.split(batch)]) * self.scale_factor

    @torch.no_grad()
    def from_latent(self, z: torch.Tensor, batch: int = 500) -> torch.Tensor:
        """Decode scaled latents back to images in [-1, 1]."""
        return torch.cat([self.decode(c / self.scale_factor) for c in z.split(batch)]).clamp(-1, 1)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio of images in [-1, 1] (peak-to-peak 2), per example, dB."""
    mse = ((x - y) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp(min=1e-12))


@dataclass
class LoadedAutoencoder:
    model: Autoencoder
    config: Config
    metrics: dict
    path: Path


def train_autoencoder(cfg: Config, progress: bool = True) -> Path:
    """Train on the dataset's train split, set the latent scale factor from the training latents,
    report held-out reconstruction PSNR; returns the folder run_dir/autoencoder."""
    from tqdm.auto import tqdm

    from .checkpoint import save_module_folder
    from .data import load_dataset
    from .train import batch_indices, lr_at, step_generator

    tc = cfg.train
    data = load_dataset(cfg.data.name, cfg.data.path or None, cfg.data.image_size, cfg.data.channels)
    if len(data.shape) != 3:
        raise ValueError(f"the autoencoder needs images; {cfg.data.name!r} has examples of shape {data.shape}")
    torch.manual_seed(tc.seed)
    model = Autoencoder(data.shape, cfg.autoencoder)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    bar = tqdm(range(tc.steps), desc="autoencoder", disable=not progress, dynamic_ncols=True)
    model.train()
    for step in bar:
        g = step_generator(tc.seed, step)
        x = data.get_batch(batch_indices(step, tc.batch_size, len(data), tc.seed))
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tc)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=tc.mixed_precision == "bf16"):
            x_hat, kl = model(x, g)
        rec = ((x_hat.float() - x) ** 2).flatten(1).sum(1)
        loss = (rec + cfg.autoencoder.kl_weight * kl.float()).mean()
        if not torch.isfinite(loss):
            raise RuntimeError(f"autoencoder loss became {loss.item()} at step {step}; lower train.lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        if step % tc.log_every == 0:
            bar.set_postfix(rec=f"{rec.mean().item():.2f}", kl=f"{kl.mean().item():.1f}")
    bar.close()
    model.eval()
    with torch.no_grad():
        latents = torch.cat([model.encode(c)[0] for c in data.get_batch(torch.arange(len(data))).split(500)])
        model.scale_factor.fill_(1.0 / latents.std().item())
        try:
            test = load_dataset(cfg.data.name, cfg.data.path or None, cfg.data.image_size, cfg.data.channels, split="test")
            x_test = test.get_batch(torch.arange(len(test)))
        except Exception:  # no held-out split: report on the training data
            x_test = data.get_batch(torch.arange(min(500, len(data))))
        recon = model.from_latent(model.to_latent(x_test))
    metrics = {"psnr_db": psnr(recon, x_test).mean().item(), "mse": ((recon - x_test) ** 2).mean().item(),
               "scale_factor": model.scale_factor.item(), "n_held_out": len(x_test),
               "image_elements": math.prod(data.shape), "latent_elements": math.prod(model.latent_shape)}
    meta = {**cfg.to_dict(), "image_shape": list(data.shape), "latent_shape": list(model.latent_shape), "metrics": metrics}
    out = save_module_folder(Path(tc.run_dir) / "autoencoder", meta, "autoencoder", model)
    print(f"held-out reconstruction PSNR {metrics['psnr_db']:.2f} dB; latent {tuple(model.latent_shape)} = "
          f"{metrics['latent_elements']} elements vs {metrics['image_elements']} "
          f"({metrics['image_elements'] / metrics['latent_elements']:.2f}x fewer); scale factor {metrics['scale_factor']:.4f}")
    return out


def load_autoencoder(path: str | Path) -> LoadedAutoencoder:
    """An autoencoder folder from train-autoencoder (or its run folder)."""
    from .checkpoint import read_module_folder

    path, meta, weights = read_module_folder(path, "autoencoder", "train-autoencoder")
    shape, metrics = tuple(meta.pop("image_shape")), meta.pop("metrics", {})
    meta.pop("latent_shape", None)
    cfg = build_config(meta)
    model = Autoencoder(shape, cfg.autoencoder)
    model.load_state_dict(weights)
    return LoadedAutoencoder(model.eval(), cfg, metrics, path)


def encode_dataset(ae: Autoencoder, dataset) -> "ArrayDataset":
    """The dataset in the autoencoder's scaled latent space; labels (and image files, for their
    captions) carry over."""
    from .data import ArrayDataset, DataError

    if tuple(dataset.shape) != tuple(ae.image_shape):
        raise DataError(f"the autoencoder was trained on images of shape {ae.image_shape}, the data has {tuple(dataset.shape)}")
    latents = ae.to_latent(dataset.get_batch(torch.arange(len(dataset))))
    out = ArrayDataset(latents, getattr(dataset, "labels", None))
    if hasattr(dataset, "files"):
        out.files = dataset.files
    return out
