"""The randomness of a training step, as a function of (seed, step) alone.

The data order of step s comes from a permutation seeded by (seed, epoch), and everything else a
task draws (t, eps, flips, condition dropout, augmentation) from a generator seeded by (seed, s).
Nothing random is carried from step to step, so a resumed run continues exactly; and N processes
draw the global batch's randomness and each take their slice, so N processes train like one.

On a GPU the step's bulk randomness (timesteps, noise, flips) is drawn there, from a generator of the
training device seeded the same way (`device_generator`), so no step copies it from the host; on a CPU
that generator is the step generator itself. Both hold per device kind: a run resumed on the same kind
of device continues bit for bit, but the GPU's random stream is not the CPU's, so a run moved between a
CPU and a GPU draws other noise from then on (and computes in other kernels).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..utils import queued_copy


def step_generator(seed: int, step: int, stream: int = 0, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on `device` that depends only on (seed, step, stream)."""
    return torch.Generator(device).manual_seed((seed * 1_000_003 + step) * 7 + stream)


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
    device_generator: torch.Generator | None = None  # on `device` (the step generator itself on a CPU); None: draw on the CPU

    @property
    def size(self) -> int:
        return len(self.indices)

    @property
    def bulk_generator(self) -> torch.Generator:
        """Where a task draws its bulk randomness (timesteps, noise): the device's generator when there is one."""
        return self.generator if self.device_generator is None else self.device_generator

    def local(self, x: torch.Tensor) -> torch.Tensor:
        """This process's slice of a global-batch tensor, on the training device."""
        return queued_copy(x[self.mine], self.device)  # no wait for the device on a GPU


def step_batch(seed: int, step: int, batch_size: int, num_examples: int, device: torch.device, mine: slice | None = None) -> Batch:
    """The Batch of `step` (a function of the seed and the step), `mine` of it on `device` (default: all of it).
    On a GPU the bulk randomness is drawn there; on a CPU from the step generator itself."""
    generator = step_generator(seed, step)
    on_device = generator if device.type == "cpu" else step_generator(seed, step, stream=2, device=device)
    return Batch(step, batch_indices(step, batch_size, num_examples, seed), generator, mine or slice(0, batch_size), device, on_device)
