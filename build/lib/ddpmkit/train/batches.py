"""The randomness of a training step, as a function of (seed, step) alone.

The data order of step s comes from a permutation seeded by (seed, epoch), and everything else a
task draws (t, eps, flips, condition dropout, augmentation) from a generator seeded by (seed, s).
Nothing random is carried from step to step, so a resumed run continues exactly; and N processes
draw the global batch's randomness and each take their slice, so N processes train like one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A generator that depends only on (seed, step, stream)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 7 + stream)


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> torch.Tensor:
    """The global batch of `step`: positions [step*B, (step+1)*B) of an endless stream made of
    permutations of range(n), one per epoch, each seeded by (seed, epoch)."""
    start, stop = step * batch_size, (step + 1) * batch_size
    out = []
    for epoch in range(start // n, (stop - 1) // n + 1):
        perm = torch.randperm(n, generator=step_generator(seed, epoch, stream=1))
        lo, hi = max(start - epoch * n, 0), min(stop - epoch * n, n)
        out.append(perm[lo:hi])
    return torch.cat(out)


@dataclass
class Batch:
    """What the engine hands a task for one step: the global batch's example indices and the
    step's generator; the task draws the global batch's randomness from it (in a fixed order)
    and computes the loss of this process's slice `mine` on `device`."""

    step: int
    indices: torch.Tensor  # (B_global,) example indices
    generator: torch.Generator
    mine: slice  # this process's part of the global batch
    device: torch.device

    @property
    def size(self) -> int:
        return len(self.indices)

    def local(self, x: torch.Tensor) -> torch.Tensor:
        """This process's slice of a global-batch tensor, on the training device."""
        return x[self.mine].to(self.device)
