"""Pictures: sample grids, reverse-process GIFs, forward-process strips, Fourier spectra, and
labelled rows of images at their own resolutions (cascade stages, super-resolution)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from .errors import UserError
from .process import q_sample
from .schedules import NoiseSchedule

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1]: (B, C, H, W) -> uint8 (B, H, W, C)."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def grid_columns(n: int) -> int:
    """Columns of a near-square grid of n images (the grids' default)."""
    return max(1, math.ceil(math.sqrt(n)))


def make_grid(x: torch.Tensor, nrow: int | None = None, pad: int = 2, upscale: int = 1) -> np.ndarray:
    """Tile images (B, C, H, W) in [-1, 1] into one uint8 image (rows*H', cols*W', C)."""
    imgs = to_uint8(x)
    if upscale > 1:
        imgs = imgs.repeat(upscale, axis=1).repeat(upscale, axis=2)
    B, H, W, C = imgs.shape
    cols = nrow or grid_columns(B)
    rows = math.ceil(B / cols)
    grid = np.full((rows * (H + pad) + pad, cols * (W + pad) + pad, C), 255, dtype=np.uint8)
    for i, im in enumerate(imgs):
        r, c = divmod(i, cols)
        grid[pad + r * (H + pad): pad + r * (H + pad) + H, pad + c * (W + pad): pad + c * (W + pad) + W] = im
    return grid


def _pil(arr: np.ndarray):
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
    fig = new_figure(figsize=(4, 4), dpi=100)
    ax = fig.subplots()
    if reference is not None:
        ax.scatter(*reference[:5000].T.cpu().numpy(), s=1, c="0.75", label="data")
    ax.scatter(*x.T.detach().cpu().numpy(), s=1, c="C0", label="samples")
    ax.set_aspect("equal")
    ax.set_title(title)
    ax.legend(loc="upper right", markerscale=5)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    return path


def radial_power_spectrum(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Radially averaged power spectrum of images (B, C, H, W), averaged over batch and channels.

    Returns (frequencies in cycles/pixel, power): ring k averages |FFT|^2 / (H W) over the frequencies nearest
    k / min(H, W) in radius (a cosine of k cycles across the image lands in ring k; white noise of variance
    s^2 is s^2 in every ring), for k = 1 .. min(H, W) // 2: the DC term is left out, and so are the corners past
    the Nyquist frequency, where only part of each ring lies on the grid. Natural images fall off roughly as
    1/f^2; white noise is flat -- which is why the forward process drowns high frequencies first.
    """
    x = x.detach().double().cpu()
    H, W = x.shape[-2:]
    power = torch.fft.fft2(x).abs().pow(2).mean(dim=(0, 1)).flatten() / (H * W)
    fy, fx = torch.fft.fftfreq(H, dtype=torch.float64), torch.fft.fftfreq(W, dtype=torch.float64)
    n = min(H, W)
    ring = ((fy[:, None] ** 2 + fx[None] ** 2).sqrt() * n).round().long().flatten()
    totals = torch.zeros(int(ring.max()) + 1, dtype=torch.float64).index_add_(0, ring, power)
    counts = torch.bincount(ring, minlength=len(totals)).double()
    k = torch.arange(len(totals))
    keep = (counts > 0) & (k >= 1) & (k <= n // 2)  # not DC (the mean), not the corners past 0.5 cycles/pixel
    return (k.double() / n)[keep].numpy(), (totals / counts.clamp(min=1))[keep].numpy()


def spectra_figure(spectra: dict[str, tuple[np.ndarray, np.ndarray]], title: str = "", size: tuple[float, float] = (5, 4)) -> Figure:
    """Log-log curves of radially averaged power spectra {label: (frequencies, power)}."""
    fig = new_figure(figsize=size, dpi=100)
    ax = fig.subplots()
    import matplotlib  # slow to import: only where a plot is drawn
    from matplotlib.ticker import NullFormatter  # (the minor labels, below)

    cmap = matplotlib.colormaps["viridis"]
    for i, (label, (f, p)) in enumerate(spectra.items()):
        ax.loglog(f, p, label=label, color=cmap(i / max(1, len(spectra) - 1)))
    ax.xaxis.set_minor_formatter(NullFormatter())  # over less than a decade the minor labels collide
    ax.set_xlabel("spatial frequency (cycles / pixel)")
    ax.set_ylabel("power")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig


def plot_spectra(spectra: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path, title: str = "") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    spectra_figure(spectra, title).savefig(path, bbox_inches="tight")
    return path


def new_figure(**kwargs) -> Figure:
    """A matplotlib figure of the object API: no pyplot, no global backend to set."""
    from matplotlib.figure import Figure  # slow to import: only where a plot is drawn

    return Figure(**kwargs)


def figure_array(fig: Figure) -> np.ndarray:
    """A matplotlib figure rendered in memory: uint8 (H, W, 3)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # slow to import: only where a plot is drawn

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def forward_process_at(x0: torch.Tensor, schedule: NoiseSchedule, t: int, seed: int = 0, draws: int = 16) -> tuple[torch.Tensor, Figure]:
    """One frame of the forward process for an interactive view: x_t ~ q(x_t | x_0) of one image
    x0: (1, C, H, W) at timestep t with the seed's noise, and the figure of x_t's radially averaged
    power spectrum (over `draws` noise draws) against x_0's and pure noise's."""
    if not 0 <= t < schedule.T:
        raise UserError(f"t must lie in 0..{schedule.T - 1}, got {t}")
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn((draws, *x0.shape[1:]), generator=g)
    x_t = q_sample(x0.expand_as(eps), torch.full((draws,), t), schedule, eps)
    ab = float(schedule.alpha_bar[t])
    spectra = {"x_0": radial_power_spectrum(x0), f"x_t, t={t}": radial_power_spectrum(x_t), "noise": radial_power_spectrum(eps)}
    fig = spectra_figure(spectra, f"sqrt(alpha_bar) = {ab ** 0.5:.3f}, SNR = {ab / max(1 - ab, 1e-12):.3g}", size=(4.5, 3.4))
    fig.subplots_adjust(left=0.17, right=0.97, bottom=0.15, top=0.91)  # fixed margins: one draw, no layout pass
    return x_t[:1], fig


def forward_process_figures(x0: torch.Tensor, schedule: NoiseSchedule, timesteps: Sequence[int], out: str | Path, seed: int = 0,
                            title: str = "") -> tuple[Path, Path]:
    """The lectures' two pictures of q(x_t | x_0) for one image x0: (1, C, H, W): a strip of x_t at
    the given timesteps (one noise draw), and the radially averaged power spectrum of x_t against
    t (averaged over 16 noise draws so the curves are smooth). Returns the two PNG paths."""
    bad = [t for t in timesteps if not 0 <= t < schedule.T]
    if bad:
        raise UserError(f"timesteps {bad} outside [0, {schedule.T - 1}]")
    if min(x0.shape[-2:]) < 2:  # one row or column has no spatial frequencies (the spectrum's IndexError)
        raise UserError(f"the spectrum needs an image of at least 2x2 pixels; this one is {x0.shape[-1]}x{x0.shape[-2]} (--size resizes it)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn((1, *x0.shape[1:]), generator=g)
    frames = [("x_0", x0)] + [(f"t={t}", q_sample(x0, torch.tensor([t]), schedule, eps)) for t in timesteps]
    fig = new_figure(figsize=(1.6 * len(frames), 1.9), dpi=120)
    for ax, (label, x) in zip(fig.subplots(1, len(frames)), frames):
        img = to_uint8(x)[0]
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255)
        ax.set_title(label, fontsize=8)
        ax.axis("off")
    fig.suptitle(title or f"q(x_t | x_0), T={schedule.T}", fontsize=9)
    fig.savefig(out / "forward_strip.png", bbox_inches="tight")
    many = torch.randn((16, *x0.shape[1:]), generator=g)
    spectra = {"x_0": radial_power_spectrum(x0)}
    for t in timesteps:
        spectra[f"t={t}"] = radial_power_spectrum(q_sample(x0.expand_as(many), torch.full((16,), t), schedule, many))
    plot_spectra(spectra, out / "spectrum.png", "radially averaged power spectrum of x_t")
    return out / "forward_strip.png", out / "spectrum.png"


def labelled_rows(rows: Sequence[tuple[str, torch.Tensor]], path: str | Path, n: int = 8, title: str = "") -> Path:
    """A figure of labelled rows of images, each shown at its own resolution in equal-sized cells
    (so a 14x14 stage looks as coarse as it is beside its 28x28 super-resolution): rows of
    (label, images (B, C, H, W) in [-1, 1]); the first n images of each row."""
    n = min(n, max(len(x) for _, x in rows))
    fig = new_figure(figsize=(1.1 * n + 1.4, 1.15 * len(rows) + 0.3), dpi=110)
    axes = np.asarray(fig.subplots(len(rows), n, squeeze=False))
    for r, (label, x) in enumerate(rows):
        images = to_uint8(x[:n])
        for c in range(n):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c < len(images):
                img = images[c]
                ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        axes[r, 0].set_ylabel(label, fontsize=8, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    return path
