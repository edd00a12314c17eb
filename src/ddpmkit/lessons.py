"""Helpers for the lesson notebooks (lessons/*.ipynb): a fast mode for the tests, small training runs
that are reused once trained, and inline pictures.

DDPMKIT_LESSONS_FAST=1 (set by the tests) shrinks steps and sample counts so that every notebook runs
top to bottom in seconds; the check cells stay on. Without it the lessons train their small models
for a few minutes each on 2 CPU cores and draw the pictures `make lessons` renders into docs/lessons/.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import matplotlib.pyplot as plt  # the lessons are notebooks: pyplot draws inline there
import torch
from PIL import Image

from .checkpoint import claim_run_folder, list_checkpoints, read_config
from .config import load_config
from .train import train
from .viz import make_grid

FAST = os.environ.get("DDPMKIT_LESSONS_FAST", "") not in ("", "0")
T = TypeVar("T")
_scratch: Path | None = None

# what shrinks a preset's network and run in fast mode (the 8x8 digits, a 2-level UNet, a few steps)
FAST_OVERRIDES = ["data.name=digits", "network.base_channels=8", "network.channel_mult=1,2", "network.attention_resolutions=",
                  "network.text_max_tokens=8", "train.batch_size=8", "train.warmup_steps=0", "train.eval_every=0"]


def pick(full: T, fast: T) -> T:
    """`full` in a full run of the lesson, `fast` under DDPMKIT_LESSONS_FAST=1."""
    return fast if FAST else full


def runs_dir() -> Path:
    """Where the lessons' runs live: runs/lessons beside the notebooks (reused by later lessons and
    reruns), or a scratch folder in fast mode; DDPMKIT_LESSONS_RUNS overrides both."""
    if "DDPMKIT_LESSONS_RUNS" in os.environ:
        return Path(os.environ["DDPMKIT_LESSONS_RUNS"])
    if FAST:  # a fresh folder per kernel: notebooks that run side by side do not share half-trained runs
        global _scratch
        if _scratch is None:
            _scratch = Path(tempfile.mkdtemp(prefix="ddpmkit-lessons-"))
            atexit.register(shutil.rmtree, _scratch, ignore_errors=True)  # the kernel's runs go with it
        return _scratch
    return Path("runs") / "lessons"


def small_run(preset: str, steps: int, *overrides: str, name: str | None = None, fast_steps: int = 3,
              fast_overrides: Sequence[str] = FAST_OVERRIDES) -> Path:
    """Train `preset` for `steps` steps (fast_steps, with fast_overrides, in fast mode) into
    runs_dir()/name and return the run folder; a finished run of the same config is reused."""
    folder = runs_dir() / (name or preset)
    n = fast_steps if FAST else steps
    extra = [*fast_overrides, "train.sample_every=0", "train.log_every=1"] if FAST else []
    cfg = load_config(preset, [*extra, *overrides, f"train.steps={n}", f"train.run_dir={folder}", "train.checkpoint_every=0"])
    done = list_checkpoints(folder)
    if done and read_config(done[-1])[0] == cfg:  # the same run, finished: a rerun of the lesson reuses it
        return folder
    # another config (a different lesson version, or fast mode): train afresh, in a folder of the lessons' own (with
    # DDPMKIT_LESSONS_RUNS=runs, runs/mnist may be the user's run of that name: refused, not deleted)
    if "DDPMKIT_LESSONS_RUNS" in os.environ:
        claim_run_folder(folder, "the lessons", "set DDPMKIT_LESSONS_RUNS to a folder of the lessons' own")
    return train(cfg, progress=not FAST, overwrite=True)  # the engine removes the earlier run's files


def show(images: torch.Tensor, title: str = "", nrow: int | None = None, scale: float = 0.35):
    """Draw a batch of images in [-1, 1] (B, C, H, W) as one grid in the notebook."""
    grid = make_grid(images.detach().float().cpu(), nrow=nrow)
    h, w = grid.shape[:2]
    fig, ax = plt.subplots(figsize=(max(2.0, scale * w / 10), max(1.2, scale * h / 10)))
    ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=255)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    plt.show()


def show_png(path: str | Path, width: float = 7.0):
    """Draw a PNG the library wrote (a figure of `ddpmkit forward`, a grid) in the notebook."""
    image = Image.open(path)
    fig, ax = plt.subplots(figsize=(width, width * image.height / image.width))
    ax.imshow(image)
    ax.axis("off")
    plt.show()
