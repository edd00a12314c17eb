"""The low-resolution side of a super-resolution stage (Ho et al. 2021, "Cascaded Diffusion
Models"; Saharia et al. 2022, Imagen): making low-res inputs from images, and noise conditioning
augmentation. Nothing here is trainable.

A super-resolution stage models p(x | z) for a high-res x and its low-res version z = D(x) (area
downsampling). Trained on real z it meets, in a cascade, the base model's samples instead, whose
small errors it was never shown. Noise conditioning augmentation corrupts z with the forward
process at a random level s,

    z_s = sqrt(alpha_bar(s)) z + sqrt(1 - alpha_bar(s)) xi,    xi ~ N(0, I),

and tells the network s, so at sampling a moderate s washes out the base model's artefacts
while the network knows how much to trust z_s. The level s is a fraction of the schedule in
[0, 1]: s = 0 is the clean z, s = 1 the last timestep.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import UserError
from .schedules import NoiseSchedule
from .utils import append_dims

UPSAMPLE_MODES = ("nearest", "bilinear", "bicubic")


def downsample(x: torch.Tensor, size: int) -> torch.Tensor:
    """Area downsampling (each low-res pixel the mean of the high-res pixels it covers):
    x: (B, C, H, W) -> (B, C, size, size)."""
    if x.ndim != 4:
        raise UserError(f"super-resolution works on images (B, C, H, W); got shape {tuple(x.shape)}")
    if size < 1 or size > min(x.shape[-2:]):
        raise UserError(f"cannot downsample {tuple(x.shape[-2:])} images to {size}x{size}")
    return F.adaptive_avg_pool2d(x, size)


def upsample(z: torch.Tensor, size: int, mode: str = "bicubic") -> torch.Tensor:
    """z: (B, C, h, w) -> (B, C, size, size); what the UNet sees beside x_t."""
    if mode not in UPSAMPLE_MODES:
        raise UserError(f"unknown upsampling {mode!r}; choose one of {list(UPSAMPLE_MODES)}")
    if mode == "nearest":
        return F.interpolate(z, size=(size, size), mode="nearest")
    return F.interpolate(z, size=(size, size), mode=mode, align_corners=False)


def aug_timestep(level: torch.Tensor, schedule: NoiseSchedule, check: bool = True) -> torch.Tensor:
    """The real timestep of augmentation level s in [0, 1]: s (T - 1) (float64). check=False skips the range check
    (a read of the levels) for levels the trainer drew."""
    level = torch.as_tensor(level, dtype=torch.float64)
    if check and not bool(((level >= 0) & (level <= 1)).all()):  # written so that NaN fails too
        raise UserError(f"augmentation levels must lie in [0, 1], got {level.min().item():g} .. {level.max().item():g}")
    return level * (schedule.T - 1)


def augment(z: torch.Tensor, level: torch.Tensor, schedule: NoiseSchedule, noise: torch.Tensor, check: bool = True) -> torch.Tensor:
    """Noise conditioning augmentation: z_s = sqrt(alpha_bar(s)) z + sqrt(1 - alpha_bar(s)) xi.

    z: (B, C, h, w) clean low-res images; level: (B,) in [0, 1]; noise xi: like z. Level 0 returns z. check=False:
    levels the trainer drew, not read back to check their range."""
    ab = schedule.alpha_bar_at(aug_timestep(level.cpu(), schedule, check), check=check)
    ab = torch.where(level.cpu() == 0, torch.ones_like(ab), ab)  # exactly the clean image at s = 0
    ab = append_dims(ab, z.ndim).to(z.device)
    return (ab.sqrt() * z + (1 - ab).sqrt() * noise.to(z.device)).to(z.dtype)


def gaussian_blur(z: torch.Tensor, sigma: torch.Tensor, max_sigma: float | None = None) -> torch.Tensor:
    """Blur augmentation (CDM section 4.2): each image blurred by its own Gaussian kernel of
    standard deviation sigma (B,) pixels (sigma 0 leaves it as it is). z: (B, C, h, w). The kernels reach 3 max_sigma
    pixels (default: sigma's largest, read back); the trainer gives its bound, so that a step reads nothing and every
    process's kernels have one size."""
    radius = max(1, math.ceil(3 * (float(sigma.max()) if max_sigma is None else max_sigma)))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    s = sigma.to(torch.float64).clamp(min=1e-6)[:, None]
    kernel = torch.exp(-0.5 * (offsets[None] / s) ** 2)
    kernel = torch.where(sigma[:, None] > 0, kernel, (offsets[None] == 0).to(kernel.dtype))
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).to(z.dtype).to(z.device)  # (B, K), separable
    B, C, h, w = z.shape
    padded = F.pad(z.reshape(1, B * C, h, w), (radius, radius, radius, radius), mode="replicate")
    k = kernel.repeat_interleave(C, dim=0)  # (B*C, K): one kernel per image, for all its channels
    rows = F.conv2d(padded, k[:, None, None, :], groups=B * C)
    return F.conv2d(rows, k[:, None, :, None], groups=B * C).reshape(B, C, h, w)


# sample k's augmentation noise uses seed k + this: a stream apart from the sampler's seed k (below 2**32, which torch's CPU
# generator keeps of a seed; with cascade.STAGE_SEED_OFFSET, no two streams of a cascade of n < 10**8 samples meet)
AUG_SEED_OFFSET = 0x6A09E667


def stage_inputs(z: torch.Tensor, level: float, schedule: NoiseSchedule, seeds: list[int]) -> dict[str, torch.Tensor]:
    """The model kwargs of a super-resolution stage for low-res images z (B, C, h, w) at sampling:
    low_res = z_s (augmented at `level` with sample k's noise drawn from seed seeds[k]) and
    aug_level = s, so a sample does not depend on the batch it is drawn in."""
    if len(seeds) != len(z):
        raise UserError(f"one seed per low-res image: {len(seeds)} seeds for {len(z)} images")
    s = torch.full((len(z),), float(level), dtype=torch.float64)
    noise = torch.stack([torch.randn(z.shape[1:], generator=torch.Generator().manual_seed(AUG_SEED_OFFSET + k)) for k in seeds])
    return {"low_res": augment(z, s, schedule, noise.to(z.dtype)), "aug_level": s.float().to(z.device)}
