"""Reproducible randomness for samplers: one generator per sample.

EDM's StackedRandomGenerator idea: sample k is drawn from its own generator seeded with seed_k,
so it comes out the same whatever the batch size or its position in the batch.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import UserError

GeneratorLike = None | int | Sequence[int] | torch.Generator


class NoiseSource:
    """Draws standard normal noise of shape (B, *shape) for a batch of B samples."""

    def __init__(self, batch_size: int, generator: GeneratorLike = None, device: torch.device | str = "cpu"):
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.generators: list[torch.Generator] | None = None
        self.generator: torch.Generator | None = None
        if isinstance(generator, torch.Generator):
            self.generator = generator
        elif generator is not None:
            # an int seed s means seeds s, s+1, ..., s+B-1: sample k always uses seed s+k
            seeds = list(range(generator, generator + batch_size)) if isinstance(generator, int) else [int(s) for s in generator]
            if len(seeds) != batch_size:
                raise UserError(f"got {len(seeds)} seeds for a batch of {batch_size} samples")
            self.generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(B, *shape) standard normal noise."""
        if self.generators is not None:
            # drawn on the CPU so the numbers do not depend on the device either
            z = torch.stack([torch.randn(tuple(shape), generator=g, dtype=dtype) for g in self.generators])
            return z.to(self.device)
        if self.generator is not None:
            z = torch.randn((self.batch_size, *shape), generator=self.generator, dtype=dtype, device=self.generator.device)
            return z.to(self.device)
        return torch.randn((self.batch_size, *shape), dtype=dtype, device=self.device)
