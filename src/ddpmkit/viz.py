"""Pictures: sample grids, reverse-process GIFs, forward-process strips and Fourier spectra."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1]: (B, C, H, W) -> uint8 (B, H, W, C)."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def make_grid(x: torch.Tensor, nrow: int | None = None, pad: int = 2, upscale: int = 1) -> np.ndarray:
    """Tile images (B, C, H, W) in [-1, 1] into one uint8 image (rows*H', cols*W', C)."""
    imgs = to_uint8(x)
    if upscale > 1:
        imgs = imgs.repeat(upscale, axis=1).repeat(upscale, axis=2)
    B, H, W, C = imgs.shape
    cols = nrow or max(1, math.ceil(math.sqrt(B)))
    rows = math.ceil(B / cols)
    grid = np.full((rows * (H + pad) + pad, cols * (W + pad) + pad, C), 255, dtype=np.uint8)
    for i, im in enumerate(imgs):
        r, c = divmod(i, cols)
        grid[pad + r * (H + pad): pad + r * (H + pad) + H, pad + c * (W + pad): pad + c * (W + pad) + W] = im
    return grid


def _pil(arr: np.ndarray):
    from PIL import Image

    return Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """One uint8 image (H, W, C) to a PNG file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _pil(image).save(path)
    return path


def save_grid(x: torch.Tensor, path: str | Path, nrow: int | None = None, upscale: int = 2) -> Path:
    return save_png(make_grid(x, nrow, upscale=upscale), path)


def save_gif(frames: Sequence[np.ndarray], path: str | Path, duration_ms: int = 60, hold_last_ms: int = 1500) -> Path:
    """Write uint8 frames (H, W, C) as a looping GIF; the last frame is held a little longer."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [_pil(f) for f in frames]
    durations = [duration_ms] * (len(images) - 1) + [hold_last_ms]
    images[0].save(path, save_all=True, append_images=images[1:], duration=durations, loop=0, optimize=False)
    return path


def reverse_process_gif(xs: Sequence[torch.Tensor], path: str | Path, nrow: int | None = None, upscale: int = 2) -> Path:
    """GIF of the coarse-to-fine reverse process from recorded x_t (each (B, C, H, W))."""
    return save_gif([make_grid(x, nrow, upscale=upscale) for x in xs], path)


def scatter_2d(x: torch.Tensor, path: str | Path, reference: torch.Tensor | None = None, title: str = "") -> Path:
    """Scatter plot of 2-D samples, optionally over reference data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    if reference is not None:
        ax.scatter(*reference[:5000].T.cpu().numpy(), s=1, c="0.75", label="data")
    ax.scatter(*x.T.detach().cpu().numpy(), s=1, c="C0", label="samples")
    ax.set_aspect("equal")
    ax.set_title(title)
    ax.legend(loc="upper right", markerscale=5)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def radial_power_spectrum(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Radially averaged power spectrum of images (B, C, H, W), averaged over batch and channels.

    Returns (frequencies in cycles/pixel, power). Natural images fall off roughly as 1/f^2;
    white noise is flat -- which is why the forward process drowns high frequencies first.
    """
    x = x.detach().double().cpu()
    H, W = x.shape[-2:]
    power = torch.fft.fftshift(torch.fft.fft2(x), dim=(-2, -1)).abs().pow(2).mean(dim=(0, 1)) / (H * W)
    fy = torch.fft.fftshift(torch.fft.fftfreq(H, dtype=torch.float64))
    fx = torch.fft.fftshift(torch.fft.fftfreq(W, dtype=torch.float64))
    radius = (fy[:, None] ** 2 + fx[None] ** 2).sqrt()
    nbins = min(H, W) // 2
    edges = torch.linspace(0, 0.5, nbins + 1, dtype=torch.float64)
    which = torch.bucketize(radius.flatten(), edges[1:-1])
    totals = torch.zeros(nbins, dtype=torch.float64).index_add_(0, which, power.flatten())
    counts = torch.zeros(nbins, dtype=torch.float64).index_add_(0, which, torch.ones_like(power.flatten()))
    centers = 0.5 * (edges[1:] + edges[:-1])
    keep = counts > 0
    return centers[keep][1:].numpy(), (totals[keep] / counts[keep])[1:].numpy()  # drop DC


def plot_spectra(spectra: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    cmap = plt.get_cmap("viridis")
    for i, (label, (f, p)) in enumerate(spectra.items()):
        ax.loglog(f, p, label=label, color=cmap(i / max(1, len(spectra) - 1)))
    ax.set_xlabel("spatial frequency (cycles / pixel)")
    ax.set_ylabel("power")
    ax.set_title(title)
    ax.legend(fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path
