"""Does a model copy its training images? The nearest-neighbour ratio test of memorisation.

A generated image x counts as a copy of a training image when its nearest training image n1 is much nearer than the
second nearest n2, in pixel space:

    ||x - n1||_2 / ||x - n2||_2 < 1/3

(Yoon et al. 2023, "Diffusion probabilistic models generalize when they fail to memorize"; Gu et al. 2023, "On
memorization in diffusion models"). A distance alone cannot tell a copy from a plain new image that lies near many
training images; the ratio can: a new image is about as far from its nearest training image as from the next one.
Held-out real images give the share that "not copying" has for the data (a few real digits are near-twins of
training digits). A judge's "recognisable" share says nothing of this: a network that has learnt its 4,500 training
digits by heart draws perfectly recognisable ones.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data import Dataset
from ..errors import UserError

COPY_RATIO = 1 / 3


@dataclass
class Copies:
    fraction: float  # share of the images whose ratio is below COPY_RATIO
    ratio: torch.Tensor  # (n,) ||x - n1|| / ||x - n2||
    nearest: torch.Tensor  # (n,) index of each image's nearest training image
    distance: torch.Tensor  # (n,) ||x - n1||, the root of the summed squared pixel differences
    n: int


@torch.no_grad()
def nearest_two(x: torch.Tensor, train: torch.Tensor | Dataset, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distances from each of x: (n, ...) to its nearest and second-nearest image of train (a tensor (N, ...)
    or a Dataset, e.g. a folder of images), as (n, 2), and the nearest's index (n,). train is read `chunk` images at a
    time (CIFAR-10's 50,000 at once would be 600 MB as float32)."""
    if len(train) < 2:
        raise UserError(f"the copy test needs at least 2 training images, got {len(train)}")
    shape = tuple(train.shape[1:]) if isinstance(train, torch.Tensor) else tuple(train.shape)
    if tuple(x.shape[1:]) != shape:
        raise UserError(f"samples of shape {tuple(x.shape[1:])} cannot be compared with training images of shape {shape}")
    a = x.reshape(len(x), -1).double()
    best = torch.full((len(a), 2), float("inf"), dtype=torch.float64)
    index = torch.zeros(len(a), 2, dtype=torch.long)
    for start in range(0, len(train), chunk):
        rows = train[start:start + chunk] if isinstance(train, torch.Tensor) else train.get_batch(torch.arange(start, min(start + chunk, len(train))))
        b = rows.reshape(-1, a.shape[1]).to(a.device, torch.float64)
        # float64: an exact copy's distance is 0 to ~1e-7 relative, not float32's cancellation noise
        d = torch.cdist(a, b)
        k = min(2, d.shape[1])
        d_top, i_top = d.topk(k, dim=1, largest=False)
        merged = torch.cat([best, d_top.cpu()], 1)
        merged_index = torch.cat([index, i_top.cpu() + start], 1)
        order = merged.argsort(1)[:, :2]
        best, index = merged.gather(1, order), merged_index.gather(1, order)
    return best, index[:, 0]


def copies(x: torch.Tensor, train: torch.Tensor | Dataset, ratio: float = COPY_RATIO, chunk: int = 4096) -> Copies:
    """The ratio test on images x against the training images: which of x copy one."""
    d, nearest = nearest_two(x, train, chunk)
    r = d[:, 0] / d[:, 1].clamp_min(1e-12)  # two identical training images: both are "nearest", ratio 1 unless x is one
    return Copies((r < ratio).double().mean().item(), r.float(), nearest, d[:, 0].float(), len(x))
