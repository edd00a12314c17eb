"""Cascaded diffusion (Ho et al. 2021; Imagen, Saharia et al. 2022): a base model, then one or
more super-resolution stages, each sampling x given the previous stage's images.

    stages = [Stage(ddpmkit.load("runs/imagen_base"), scale=5.0, threshold=0.995),
              Stage(ddpmkit.load("runs/imagen_sr"), aug_level=0.1)]
    outs = cascade(stages, n=8, request=GuidanceRequest(prompts=["a handwritten seven"]))
    outs[-1].images    # (8, 1, 28, 28); outs[0].images are the 14x14 base samples

    up = super_resolve(ddpmkit.load("runs/imagen_sr"), low_res_images)   # one stage alone

Each stage has its own sampler, steps, guidance and (for super-resolution) noise-augmentation
level. Sample k of stage i is drawn from seed seed + k + i * STAGE_SEED_OFFSET, so the result does
not depend on the batch size and the stages' noise streams do not overlap.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

import torch

from ..errors import UserError
from ..models import DiffusionModel
from ..superres import stage_inputs
from ..utils import side
from .generate import Generated, generate
from .guided import GuidanceRequest, applies_cfg

# torch's CPU generator keeps only a seed's low 32 bits (2**32 + k draws what k draws), so the offset is below 2**32: the
# golden-ratio constant puts stage i's seeds 2.65e9 i (mod 2**32) from the base's, apart for any n below 10**8
STAGE_SEED_OFFSET = 0x9E3779B1


class CascadeError(UserError):
    """Stages that do not fit together, or low-res images a stage cannot take."""


@dataclass
class Stage:
    model: DiffusionModel
    sampler: str = "ddpm"
    steps: int | None = None  # None = the model's T
    scale: float | None = None  # classifier-free guidance (conditional models); None = the default
    threshold: float = 0.0  # dynamic thresholding percentile; 0 = off
    aug_level: float | None = None  # super-resolution stages: None = the stage's superres.aug_level
    options: dict = field(default_factory=dict)  # more sampler options (eta, variance, grid, ...)

    def describe(self) -> str:
        m = self.model
        parts = [f"{side(m.data_shape)} {'super-resolution' if m.is_super_resolution else 'base'} ({m.path.parent.name})",
                 f"{self.sampler} {self.steps or m.schedule.T} steps"]
        if m.conditioning != "none":
            parts.append(f"guidance {self.scale if self.scale is not None else 'default'}")
        if self.threshold:
            parts.append(f"threshold {self.threshold:g}")
        if m.is_super_resolution:
            parts.append(f"aug {self.level:g}")
        return ", ".join(parts)

    @property
    def level(self) -> float:
        return self.model.config.superres.aug_level if self.aug_level is None else self.aug_level


def check_low_res(sr: DiffusionModel, images: torch.Tensor, source: str = "the low-res images") -> None:
    """A clear error unless images (B, C, h, w) are what the super-resolution stage sr takes."""
    if not sr.is_super_resolution:
        raise CascadeError(f"{sr.path} is not a super-resolution stage (train.task = {sr.config.train.task!r}); "
                           "train one with `ddpmkit train mnist_sr` (train.task = 'superres')")
    want = sr.low_res_shape
    if images.ndim != 4 or tuple(images.shape[1:]) != want:
        got = tuple(images.shape[1:]) if images.ndim == 4 else tuple(images.shape)
        raise CascadeError(f"{source}: shape {got} (C, H, W), but the stage {sr.path} upsamples {want[0]}-channel "
                           f"{side(want)} images to {side(sr.data_shape)}; resize to {side(want)} first "
                           "(`ddpmkit upscale --fit` does it)")


def super_resolve(sr: DiffusionModel, low_res: torch.Tensor, request: GuidanceRequest | None = None, aug_level: float | None = None,
                  sampler: str = "ddpm", steps: int | None = None, seed: int = 0, options: dict | None = None, batch_size: int | None = None,
                  record_every: int = 0, progress: bool = True, device: str | torch.device | None = None, precision: str = "fp32") -> Generated:
    """Samples of p(x | z) for low-res images z = low_res (n, C, h, w) in [-1, 1], one per image:
    z is noise-augmented to level aug_level (default: the stage's superres.aug_level) with sample
    k's own seed, and given to the network with the level. precision: the network's, as generate's."""
    check_low_res(sr, low_res)
    level = sr.config.superres.aug_level if aug_level is None else float(aug_level)
    n = len(low_res)
    extra = stage_inputs(low_res.float().cpu(), level, sr.schedule, list(range(seed, seed + n)))
    request = replace(request or GuidanceRequest(), extra=extra)
    return generate(sr, n, request, sampler, steps, seed, options, batch_size, record_every, progress, device, precision=precision)


def check_cascade(stages: list[Stage]) -> None:
    """Clear errors for stages that do not chain: a base first, then super-resolution stages whose
    low-res input is the previous stage's output."""
    if not stages:
        raise CascadeError("a cascade needs at least one stage")
    if stages[0].model.is_super_resolution:
        raise CascadeError(f"the first stage {stages[0].model.path} is a super-resolution stage; start with a base model")
    for prev, stage in itertools.pairwise(stages):
        out = prev.model.image_shape
        if not stage.model.is_super_resolution:
            raise CascadeError(f"{stage.model.path} comes after another stage but is not a super-resolution stage (train.task = 'superres')")
        if tuple(out) != stage.model.low_res_shape:
            made = f"{out[0]}-channel {side(out)} images" if len(out) == 3 else f"{out[0]}-D points, not images"
            raise CascadeError(f"{prev.model.path} makes {made}, but the next stage {stage.model.path} "
                               f"takes {stage.model.low_res_shape[0]}-channel {side(stage.model.low_res_shape)} ones")


def stage_request(stage: Stage, request: GuidanceRequest) -> GuidanceRequest:
    """The cascade's prompts or classes, with this stage's guidance; an unconditional stage gets none.
    Precomputed conditions (GuidanceRequest.conditions, e.g. unCLIP's image embeddings) are the base's."""
    if stage.model.conditioning in ("none", "embed"):  # unconditional, or unCLIP's decoder (conditions only)
        request = replace(request, prompts=[], classes=[])
    if stage.model.conditioning == "none" or stage.model.is_super_resolution:
        request = replace(request, conditions=None)
    request = replace(request, scale=stage.scale, threshold=stage.threshold)
    if not applies_cfg(stage.model, request.cfg_scale):
        request = replace(request, rescale=0.0)  # the cascade's guidance rescale is for the stages guided by classifier-free guidance
    return request


def cascade(stages: list[Stage], n: int, request: GuidanceRequest | None = None, seed: int = 0, batch_size: int | None = None,
            record_every: int = 0, progress: bool = True, device: str | torch.device | None = None, precision: str = "fp32") -> list[Generated]:
    """n samples through every stage; returns each stage's output (the last is the final image).
    record_every > 0 records the reverse process of every stage (for GIFs). precision: every stage's network's, as generate's."""
    check_cascade(stages)
    request = request or GuidanceRequest()
    if request.rescale and not any(stage_request(stage, request).rescale for stage in stages):
        raise CascadeError(f"guidance rescale (phi {request.rescale:g}) rescales classifier-free guidance, which no stage of this "
                           "cascade uses (each is unconditional or at scale 0 or 1): leave it out")
    outs: list[Generated] = []
    for i, stage in enumerate(stages):
        common = dict(sampler=stage.sampler, steps=stage.steps, seed=seed + i * STAGE_SEED_OFFSET, options=stage.options,
                      batch_size=batch_size, record_every=record_every, progress=progress, device=device, precision=precision)
        if i == 0:
            outs.append(generate(stage.model, n, stage_request(stage, request), **common))
        else:
            low = outs[-1].images.clamp(-1, 1)  # images, as the stage was trained on
            outs.append(super_resolve(stage.model, low, stage_request(stage, request), stage.aug_level, **common))
    return outs
