"""Drawing samples from a loaded model in one call: guidance through the one door, the model's
own prediction / variance / schedule, per-sample seeds, chunks of a bounded size, decoding.

    out = generate(ddpmkit.load("runs/mnist"), n=64, sampler="unipc", steps=20, seed=0)
    out.images          # (64, C, H, W) in [-1, 1] (decoded for latent models)

Sample k uses seed seed + k, so the result does not depend on batch_size.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .. import viz
from ..models import DiffusionModel
from ..sampling import sample
from .guided import GuidanceRequest, guided_model


@dataclass
class Generated:
    images: torch.Tensor  # (n, ...) decoded samples
    nfe: int  # network evaluations per sample
    xs: list[torch.Tensor] = field(default_factory=list)  # decoded x_t along the way (record_every > 0)
    x0s: list[torch.Tensor] = field(default_factory=list)  # decoded predicted x_0 along the way


def resolve_options(m: DiffusionModel, options: dict | None) -> dict:
    """Sampler options with variance='auto' replaced by the model's own (learned or beta-tilde),
    and no clipping of the predicted x_0 for latent models: [-1, 1] bounds pixels, not latents."""
    options = dict(options or {})
    if options.get("variance") == "auto":
        options["variance"] = m.default_variance
    if m.autoencoder is not None and "clip_x0" in options:
        options["clip_x0"] = False
    return options


# values (batch x C x H x W) per chunk that keep a CPU's activations in cache: bench/sampling_throughput.py
# measured the demo UNet at 422 / 604 / 735 / 564 / 378 image-evaluations/s for chunks of 16 / 64 / 128 / 250 / 500
# 28x28 digits (2 cores), against 545 images/s for its training forward pass
CPU_CHUNK_VALUES = 128 * 28 * 28
GPU_CHUNK_VALUES = 64 * CPU_CHUNK_VALUES


def auto_batch_size(data_shape: tuple[int, ...], device: str | torch.device = "cpu") -> int:
    """Samples drawn at once when the caller does not say: memory-friendly chunks (the per-sample
    seeds make the result independent of it)."""
    per_sample = max(1, int(torch.tensor(data_shape).prod()))
    budget = CPU_CHUNK_VALUES if torch.device(device).type == "cpu" else GPU_CHUNK_VALUES
    return max(1, budget // per_sample)


def generate(m: DiffusionModel, n: int, request: GuidanceRequest | None = None, sampler: str = "ddpm", steps: int | None = None,
             seed: int = 0, options: dict | None = None, batch_size: int | None = None, record_every: int = 0, progress: bool = True,
             device: str | torch.device | None = None, seeds: list[int] | None = None,
             callback: Callable[[dict], None] | None = None) -> Generated:
    """n samples of m as requested, in chunks of batch_size (default: auto_batch_size). seeds: sample k's seed (default seed + k;
    one seed for every sample gives them the same noise, e.g. frames of an interpolation).
    callback: called after every step of every chunk with the sampler's step info (x, x0 in the
    model's space, i = steps left) plus "start" (the chunk's first sample) and "n"."""
    device = m.device if device is None else torch.device(device)  # default: where the model's weights are
    batch_size = batch_size or auto_batch_size(m.data_shape, device)
    if n < 1 or batch_size < 1:
        raise ValueError(f"n = {n} and batch_size = {batch_size} must be >= 1")
    seeds = list(range(seed, seed + n)) if seeds is None else list(seeds)
    if len(seeds) != n:
        raise ValueError(f"give one seed per sample ({n}), got {len(seeds)}")
    request = request or GuidanceRequest()
    options = resolve_options(m, options)
    images, xs, x0s, nfe = [], [], [], 0
    chunks = -(-n // batch_size)  # equal-sized chunks: one shape for the network (and for torch.compile) where n allows
    sizes = [n // chunks + (k < n % chunks) for k in range(chunks)]
    for start, b in zip(itertools.accumulate([0, *sizes[:-1]]), sizes):
        model, kwargs, extra = guided_model(m, b, request.slice(start, b, m.num_classes), sampler, device)
        res = sample(model, (b, *m.data_shape), m.schedule, sampler=sampler, steps=steps, generator=seeds[start:start + b],
                     record_every=record_every, progress=progress, model_kwargs=kwargs, device=device, **m.sample_kwargs,
                     callback=None if callback is None else lambda info, s=start: callback({**info, "start": s, "n": n}),
                     **options, **extra)
        images.append(m.decode(res.x).cpu())
        xs.append([m.decode(x) for x in res.xs])
        x0s.append([m.decode(x) for x in res.x0s])
        nfe = res.nfe
    join = lambda parts: [torch.cat(frames) for frames in zip(*parts)]  # noqa: E731 -- chunks side by side, per recorded step
    return Generated(torch.cat(images), nfe, join(xs), join(x0s))


def save_generated(out: Generated, folder: str | Path, seed: int = 0, gif: bool = True) -> Path:
    """grid.png, samples/<seed>.png and (when recorded) reverse_process.gif and predicted_x0.gif
    for images; scatter.png for 2-D data; samples.pt either way."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    x = out.images
    if x.ndim == 4:
        viz.save_grid(x, folder / "grid.png")
        (folder / "samples").mkdir(exist_ok=True)
        for i, image in enumerate(viz.to_uint8(x)):
            viz.save_png(image, folder / "samples" / f"{seed + i:06d}.png")  # named by its seed
        if gif and out.xs:
            viz.reverse_process_gif(out.xs, folder / "reverse_process.gif")
            viz.reverse_process_gif(out.x0s, folder / "predicted_x0.gif")
    else:
        viz.scatter_2d(x, folder / "scatter.png", title=f"{len(x)} samples, {out.nfe} NFE")
    torch.save(x, folder / "samples.pt")
    return folder
