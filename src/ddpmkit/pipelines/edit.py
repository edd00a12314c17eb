"""Editing a loaded model's images in one call each, through the one guidance door: SDEdit
img2img, RePaint inpainting, posterior samples from one x_t, and interpolation between seeds,
images or prompts. The CLI (`ddpmkit img2img ...`) and the web page both call these.

    m = ddpmkit.load("runs/mnist")
    edited = edit_img2img(m, load_image_as("mnist5k:0", m.image_shape), n=4, strength=0.5)

Images come in and go out in data space, (B, C, H, W) in [-1, 1]; latent models encode and
decode on the way.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from ..editing import check_frames, img2img, inpaint, interpolate_images, interpolate_seeds, lerp_condition, posterior_samples, seed_noise
from ..errors import UserError
from ..models import DiffusionModel
from ..sampling import sample
from .generate import generate, resolve_options
from .guided import GuidanceRequest, guided_model


def edit_img2img(m: DiffusionModel, image: torch.Tensor, n: int, strength: float = 0.5, request: GuidanceRequest | None = None,
                 sampler: str = "ddim", steps: int = 50, seed: int = 0, options: dict | None = None) -> torch.Tensor:
    """n SDEdit variations of one image: (1, C, H, W) -> (n, C, H, W). options: the sampler's
    (sampling.options.sampler_options); a grid there is a name, whose part below the strength's t runs."""
    options = resolve_options(m, options)
    grid = check_partway_grid(options.pop("grid", "uniform"))
    model, kwargs, extra = guided_model(m, n, request, sampler)
    z = m.encode(image)
    out = img2img(model, z.expand(n, *z.shape[1:]), strength=strength, sampler=sampler, steps=steps, generator=seed, grid=grid,
                  model_kwargs=kwargs, **options, **extra)
    return m.decode(out.x)


def check_partway_grid(grid: str | torch.Tensor | None) -> str | None:
    """img2img's grid: a name (its part below strength * T runs); a tuned grid (a tensor, or a tune-grid file) spans the
    whole trajectory."""
    if grid is not None and (not isinstance(grid, str) or grid.endswith(".json")):
        raise UserError("img2img starts partway down a grid, at strength * T; a tuned grid file spans the whole trajectory: give a grid name")
    return grid


def edit_inpaint(m: DiffusionModel, image: torch.Tensor, mask: torch.Tensor, n: int, request: GuidanceRequest | None = None,
                 steps: int = 100, resample: int | None = None, seed: int = 0, sampler: str = "ddpm", options: dict | None = None) -> torch.Tensor:
    """n RePaint completions of one image: (1, C, H, W), mask (1, 1, H, W) with 1 = keep -> (n, C, H, W).
    Latent models inpaint in latent space with the mask area-downsampled to the latents (a latent
    pixel is kept only where all its pixels are), as Stable Diffusion's legacy inpainting did. RePaint noises back
    `resample` times a step (None = 5); of the sampler options it reads clip_x0 alone.
    A 9-channel inpainting UNet (Stable Diffusion inpainting) is instead conditioned on the mask and the
    masked image, and samples with any `sampler` and its `options`, one pass a step (resample None or 1)."""
    if tuple(mask.shape[-2:]) != tuple(image.shape[-2:]):
        raise UserError(f"the mask is {tuple(mask.shape[-2:])} pixels, the image {tuple(image.shape[-2:])}")
    options = dict(options or {})
    if getattr(m, "inpainting", False):
        if resample not in (None, 1):  # else taken and ignored
            raise UserError(f"resample {resample}: a 9-channel inpainting UNet sees the mask and fills the image in one pass a step; "
                            "RePaint's resampling is for other models: leave it out")
        return _inpaint_conditioned(m, image, mask, n, request, sampler, steps, seed, options)
    if sampler != "ddpm":  # RePaint's steps are Algorithm 2's; another sampler was taken and ignored
        raise UserError(f"RePaint inpaints with Algorithm 2 (ddpm), noising back `resample` times a step; sampler {sampler!r} needs a "
                        "9-channel inpainting UNet (a Stable Diffusion inpainting folder): leave the sampler out")
    clip_x0 = options.pop("clip_x0", True)
    unread = {k: v for k, v in options.items() if (k, v) != ("variance", "auto")}  # RePaint's variance is the model's own
    if unread:
        got = ", ".join(f"{k}={v}" for k, v in unread.items())
        raise UserError(f"RePaint's respaced Algorithm 2 takes no sampler options but clipping (got {got}); "
                        "they choose a 9-channel inpainting UNet's sampler: leave them out")
    model, kwargs, _ = guided_model(m, n, request, "ddpm")
    z, mask = m.encode(image), mask.to(m.device)
    keep = mask if m.autoencoder is None else latent_mask(mask, tuple(z.shape[-2:]))
    x = inpaint(model, z.expand(n, *z.shape[1:]), keep, steps=steps, resample=5 if resample is None else resample, generator=seed,
                clip_x0=m.bounded_x0 and clip_x0, model_kwargs=kwargs)
    return m.decode(x)


def _inpaint_conditioned(m: DiffusionModel, image: torch.Tensor, keep: torch.Tensor, n: int, request: GuidanceRequest | None,
                         sampler: str, steps: int, seed: int, options: dict | None) -> torch.Tensor:
    """Stable Diffusion inpainting: the UNet sees x_t beside the mask (1 = fill, nearest-downsampled to the latents)
    and the latents of the image with the part to fill blanked out (0, mid-grey)."""
    fill = 1.0 - keep.float().to(m.device)
    image = image.to(m.device)
    masked_latents = m.encode(image * (fill < 0.5))
    small = torch.nn.functional.interpolate(fill, size=tuple(masked_latents.shape[-2:]))
    request = request or GuidanceRequest()
    extra = {"mask": small.expand(n, -1, -1, -1), "masked_latents": masked_latents.expand(n, -1, -1, -1)}
    request = replace(request, extra={**(request.extra or {}), **extra})
    return generate(m, n, request, sampler, steps, seed, options, progress=False).images  # sample k from seed + k, as every sampling


def latent_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A pixel mask (1, 1, H, W), 1 = keep, at the latents' size: a latent pixel is kept only when
    every pixel it covers is (area average 1), so nothing to be filled leaks into the kept part."""
    return (torch.nn.functional.interpolate(mask.float(), size=size, mode="area") > 0.999).float()


def check_level(m: DiffusionModel, t: int) -> None:
    """The noise level an edit noises its image to, x_t: 1..T-1 (0 is no noise worth a reverse process)."""
    if not 0 < t < m.schedule.T:
        raise UserError(f"t must lie in 1..{m.schedule.T - 1}, got {t}")


def edit_posterior(m: DiffusionModel, image: torch.Tensor, t: int, n: int, request: GuidanceRequest | None = None,
                   steps: int = 100, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise one image to x_t once and draw n samples of p(x_0 | x_t). Returns (x_t as a picture
    (1, C, H, W): zeros for latent models, whose noisy latent is no picture; samples (n, C, H, W))."""
    check_level(m, t)
    model, kwargs, _ = guided_model(m, n, request, "ddpm")
    x_t, xs = posterior_samples(model, m.encode(image), t, n, steps=steps, seed=seed, model_kwargs=kwargs)
    shown = x_t.clamp(-1, 1) if m.autoencoder is None else torch.zeros_like(image)
    return shown, m.decode(xs)


def interpolation_seeds(m: DiffusionModel, seed_a: int, seed_b: int, n: int, request: GuidanceRequest | None = None,
                        sampler: str = "ddim", steps: int = 50, options: dict | None = None) -> torch.Tensor:
    """n samples along the slerp from seed_a's x_T to seed_b's: (n, C, H, W)."""
    model, kwargs, extra = guided_model(m, n, request, sampler)
    x = interpolate_seeds(model, seed_a, seed_b, n, m.data_shape, sampler=sampler, steps=steps, model_kwargs=kwargs,
                          device=m.device, **resolve_options(m, options), **extra)
    return m.decode(x)


def interpolation_images(m: DiffusionModel, a: torch.Tensor, b: torch.Tensor, t: int, n: int, request: GuidanceRequest | None = None,
                         steps: int = 50, seed: int = 0) -> torch.Tensor:
    """DDPM Fig. 8: two images (1, C, H, W) noised to x_t with the same noise, mixed, denoised: (n, C, H, W)."""
    check_level(m, t)  # t = 0 mixed the images with next to no noise; past T, an index error
    model, kwargs, _ = guided_model(m, n, request, "ddpm")
    x = interpolate_images(model, m.encode(a), m.encode(b), t, n, seed=seed, steps=steps, model_kwargs=kwargs)
    return m.decode(x)


def interpolation_prompts(m: DiffusionModel, prompt_a: str, prompt_b: str, n: int, seed: int = 0, request: GuidanceRequest | None = None,
                          sampler: str = "ddim", steps: int = 50, options: dict | None = None) -> torch.Tensor:
    """n samples from one seed's x_T along the line between two prompts' embeddings: (n, C, H, W). A stochastic sampler
    draws the same noise (the seed's) for every frame."""
    if m.conditioning != "text":
        raise UserError(f"interpolating prompts needs a text-conditional model; {m.path} is conditioned on {m.conditioning}")
    ca, cb = m.encode_prompts([prompt_a]), m.encode_prompts([prompt_b])
    conds = [lerp_condition(ca, cb, float(w)) for w in torch.linspace(0, 1, check_frames(n))]
    request = replace(request or GuidanceRequest(), conditions={k: torch.cat([c[k] for c in conds]) for k in ca})
    model, kwargs, extra = guided_model(m, n, request, sampler)
    x_T = seed_noise(seed, m.data_shape).expand(n, *m.data_shape)
    x = sample(model, x_T.shape, sampler=sampler, steps=steps, x_T=x_T, generator=[seed] * n, model_kwargs=kwargs,
               device=m.device, **resolve_options(m, options), **extra).x
    return m.decode(x)
