"""Drawing samples from a loaded model in one call: guidance through the one door, the model's
own prediction / variance / schedule, per-sample seeds, chunks of a bounded size, decoding.

    out = generate(ddpmkit.load("runs/mnist"), n=64, sampler="unipc", steps=20, seed=0)
    out.images          # (64, C, H, W) in [-1, 1] (decoded for latent models)

Sample k uses seed seed + k, so the result does not depend on batch_size.
"""
from __future__ import annotations

import dataclasses
import itertools
import re
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import viz
from ..devices import out_of_memory, release_cached_memory
from ..errors import UserError
from ..models import DiffusionModel, compiled
from ..precision import DTYPES, Autocast, resolve_precision
from ..progress import progress_bar
from ..sampling import sample
from .guided import GuidanceRequest, guided_model


@dataclass
class Generated:
    images: torch.Tensor  # (n, ...) decoded samples
    nfe: int  # network evaluations per sample
    xs: list[torch.Tensor] = field(default_factory=list)  # decoded x_t along the way (record_every > 0), first GIF_SAMPLES samples
    x0s: list[torch.Tensor] = field(default_factory=list)  # decoded predicted x_0 along the way, likewise


def resolve_options(m: DiffusionModel, options: dict | None) -> dict:
    """Sampler options with no clipping of the predicted x_0 where it is not pixels (DiffusionModel.bounded_x0)."""
    options = dict(options or {})
    if not m.bounded_x0 and "clip_x0" in options:
        options["clip_x0"] = False
    return options


# samples the reverse-process GIFs show (the first ones): every sample's x_t and x_0 at 50 steps took memory growing with n,
# and a GIF of a 45 x 45 grid shows nothing an 8 x 8 one does not
GIF_SAMPLES = 64

# values (batch x C x H x W) per chunk that keep a CPU's activations in cache: 128 digits of 28x28 was the fastest
# chunk for the demo UNet on 2 cores (bench/sampling_throughput.py measures it on yours)
CPU_CHUNK_VALUES = 128 * 28 * 28
GPU_CHUNK_VALUES = 64 * CPU_CHUNK_VALUES


def auto_batch_size(data_shape: tuple[int, ...], device: str | torch.device = "cpu") -> int:
    """Samples drawn at once when the caller does not say: memory-friendly chunks (the per-sample
    seeds make the result independent of it)."""
    per_sample = max(1, int(torch.tensor(data_shape).prod()))
    budget = CPU_CHUNK_VALUES if torch.device(device).type == "cpu" else GPU_CHUNK_VALUES
    return max(1, budget // per_sample)


def equal_chunks(n: int, batch_size: int) -> list[int]:
    """n split into the fewest chunks of at most batch_size, as equal as n allows: one shape for the network (and for
    torch.compile) where it can."""
    chunks = -(-n // batch_size)
    return [n // chunks + (k < n % chunks) for k in range(chunks)]


def auto_streams(m: DiffusionModel, device: torch.device, chunks: int) -> int:
    """Chunks drawn side by side when the caller does not say: two on a CPU with two or more threads, each
    thread computing one chunk with one core (bench/sampling_throughput.py: 1,022 against 942 image-evaluations/s
    one chunk at a time on 2 cores), else one. Compiled networks stay at one: dynamo's caches were not measured
    from two threads."""
    net = m.network.net if isinstance(m.network, Autocast) else m.network
    if device.type != "cpu" or compiled(net) or torch.get_num_threads() < 2:
        return 1
    return min(2, chunks)


def generate(m: DiffusionModel, n: int, request: GuidanceRequest | None = None, sampler: str = "ddpm", steps: int | None = None,
             seed: int = 0, options: dict | None = None, batch_size: int | None = None, record_every: int = 0, progress: bool = True,
             device: str | torch.device | None = None, seeds: list[int] | None = None,
             callback: Callable[[dict], None] | None = None, streams: int | None = None, precision: str = "fp32") -> Generated:
    """n samples of m as requested, in chunks of batch_size (default: auto_batch_size). seeds: sample k's seed (default seed + k;
    one seed for every sample gives them the same noise, e.g. frames of an interpolation).
    callback: called after every step of every chunk with the sampler's step info (x, x0 in the
    model's space, i = steps left) plus "start" (the chunk's first sample) and "n".
    streams: chunks drawn at once by as many threads, torch's threads shared between them (default: auto_streams);
    the per-sample seeds make the result independent of it, as of batch_size.
    precision: the network's ("fp32", "bf16", "fp16", or "auto": bf16 where the device computes it natively);
    the sampler's arithmetic stays float32."""
    device = m.device if device is None else torch.device(device)  # default: where the model's weights are
    for name, value in (("n", n), ("batch_size", batch_size)):  # only what the caller gave
        if value is not None and value < 1:
            raise UserError(f"{name} = {value} must be >= 1")
    shrink = batch_size is None  # a chunk size chosen here halves where the device has no memory for it; the caller's stays
    batch_size = batch_size or auto_batch_size(m.data_shape, device)
    seeds = list(range(seed, seed + n)) if seeds is None else list(seeds)
    if len(seeds) != n:
        raise UserError(f"give one seed per sample ({n}), got {len(seeds)}")
    request = request or GuidanceRequest()
    options = resolve_options(m, options)
    if (precision := resolve_precision(precision)) != "no":
        m = dataclasses.replace(m, network=Autocast(m.network, DTYPES[precision]))
    sizes = equal_chunks(n, batch_size)
    starts = list(itertools.accumulate([0, *sizes[:-1]]))
    chunks = len(sizes)
    streams = min(streams or auto_streams(m, device, chunks), chunks)
    # one bar for chunks side by side; one chunk at a time shows its sampler's own bar (also while halving for memory)
    bar = progress_bar(total=chunks * (steps or m.schedule.T), desc=f"{sampler} ({chunks} chunks, {streams} at once)",
                       unit="step", disable=not progress or streams == 1)
    failed = threading.Event()  # a chunk that raised (e.g. a callback cancelling) stops the others at their next step

    def on_step(info: dict, start: int) -> None:
        if failed.is_set():
            raise _Stopped()
        bar.update()
        if callback is not None:
            callback({**info, "start": start, "n": n})

    def draw(start: int, b: int) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], int]:
        try:
            model, kwargs, extra = guided_model(m, b, request.slice(start, b), sampler, device)
            shown = max(0, min(b, GIF_SAMPLES - start))  # of this chunk's samples, those the GIFs show
            res = sample(model, (b, *m.data_shape), sampler=sampler, steps=steps, generator=seeds[start:start + b],
                         record_every=record_every if shown else 0, progress=progress and streams == 1, model_kwargs=kwargs,
                         device=device, callback=lambda info: on_step(info, start), **options, **extra)
            with torch.no_grad():  # decoding latents (a VAE) needs no graph: the samples are the result
                return (m.decode(res.x).cpu(), [m.decode(x[:shown]) for x in res.xs], [m.decode(x[:shown]) for x in res.x0s],
                        res.nfe)
        except BaseException:
            failed.set()
            raise

    if streams == 1:
        parts = []
        while len(parts) < len(sizes):
            start, b = starts[len(parts)], sizes[len(parts)]
            try:
                parts.append(draw(start, b))
                continue
            except RuntimeError as e:  # torch.OutOfMemoryError is one
                if not (shrink and b > 1 and out_of_memory(e)):
                    raise
            failed.clear()  # out of the except clause: the traceback's frames, and the chunk's tensors they hold, are gone
            release_cached_memory(device)
            # the rest in halves; the per-sample seeds make them the samples the larger chunks would have been
            sizes[len(parts):] = equal_chunks(n - start, max(1, b // 2))
            starts = list(itertools.accumulate([0, *sizes[:-1]]))
            print(f"ddpmkit: {device} had no memory for {b} samples at once; drawing chunks of {sizes[len(parts)]} "
                  f"(the same samples)", file=sys.stderr)
    else:
        parts = _side_by_side(draw, list(zip(starts, sizes)), streams)
    bar.close()
    join = lambda frames: [torch.cat(f) for f in zip(*(f for f in frames if f))]  # noqa: E731 -- the GIFs' chunks, per recorded step
    images, xs, x0s, nfes = zip(*parts)
    return Generated(torch.cat(images), nfes[-1], join(xs), join(x0s))


class _Stopped(Exception):
    """A chunk stopped because a chunk in another stream failed."""


def _side_by_side(draw: Callable, chunks: list[tuple[int, int]], streams: int) -> list:
    """draw(*chunk) for every chunk, by `streams` threads that each compute with an equal share of torch's threads;
    results in the chunks' order. torch's thread count is per calling thread here (OpenMP), restored afterwards."""
    threads = torch.get_num_threads()

    def one_stream(mine: list[tuple[int, int]]) -> list:
        torch.set_num_threads(max(1, threads // streams))
        return [draw(*chunk) for chunk in mine]

    try:
        with ThreadPoolExecutor(streams, thread_name_prefix="ddpmkit-chunks") as pool:
            futures = [pool.submit(one_stream, chunks[k::streams]) for k in range(streams)]
            errors = [f.exception() for f in futures]
    finally:
        torch.set_num_threads(threads)  # also after a cancelled run (the web page cancels by raising)
    for e in sorted((e for e in errors if e is not None), key=lambda e: isinstance(e, _Stopped)):
        raise e  # the stream's own error first, not the other's stop
    done = [f.result() for f in futures]
    return [done[k % streams][k // streams] for k in range(len(chunks))]


GENERATED_FILES = ("grid.png", "reverse_process.gif", "predicted_x0.gif", "scatter.png", "samples.pt")


def save_generated(out: Generated, folder: str | Path, seed: int = 0, gif: bool = True, reference: torch.Tensor | None = None) -> Path:
    """grid.png, samples/<seed>.png and (when recorded) reverse_process.gif and predicted_x0.gif for images; scatter.png
    for 2-D points (over `reference`, the data, in grey); samples.pt in every case. What an earlier call wrote into the
    folder goes first, so that it never holds two calls' samples (64 of one model beside 16 of another) or a stale GIF."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    earlier = [folder / name for name in GENERATED_FILES] + [f for f in folder.glob("samples/*.png") if re.fullmatch(r"-?\d+", f.stem)]
    for path in earlier:
        path.unlink(missing_ok=True)  # only the files this writes: anything else in the folder stays
    x = out.images
    if x.ndim == 4:
        viz.save_grid(x, folder / "grid.png")
        (folder / "samples").mkdir(exist_ok=True)
        for i, image in enumerate(viz.to_uint8(x)):
            viz.save_png(image, folder / "samples" / f"{seed + i:06d}.png")  # named by its seed
        if gif and out.xs:
            viz.reverse_process_gif(out.xs, folder / "reverse_process.gif")
            viz.reverse_process_gif(out.x0s, folder / "predicted_x0.gif")
    elif x.shape[-1] == 2:  # other vectors (unCLIP's prior: CLIP embeddings) have no picture, only samples.pt
        viz.scatter_2d(x, folder / "scatter.png", reference, title=f"{len(x)} samples, {out.nfe} NFE")
    torch.save(x, folder / "samples.pt")
    return folder
