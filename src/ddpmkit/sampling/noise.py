"""Reproducible randomness for samplers: one generator per sample.

EDM's StackedRandomGenerator idea: sample k is drawn from its own generator seeded with seed_k,
so it comes out the same whatever the batch size or its position in the batch.

Sample k's j-th draw of a shape with n values is the first n values of the j-th
``torch.randn(m, generator=g_k)`` with m = n rounded up to a multiple of 16 (when a sampler switches to another
shape, the rest of the current block is skipped). torch's CPU normal sampler turns uniforms into normals 16 at a
time, so K such draws made as one ``randn((K, m))`` are the same numbers whatever K (tests/test_noise.py checks
it for this torch): the draws are made in blocks, one call per sample for many steps, not one per sample per
step. On a GPU the next block is drawn on worker threads while the GPU runs the current steps, into pinned
memory, and copied once per block with a copy the host does not wait for: no step waits and none makes a
per-sample call.
"""
from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ..errors import UserError
from ..utils import queued_copy

GeneratorLike = None | int | Sequence[int] | torch.Generator

# values per sample a block may hold: 32 draws of a 28x28 digit, 8 of a 3x32x32 image, 1 from 3x128x128 up; and
# values a whole block may hold (64 MB of float32, pinned on the host and again on a GPU): 32 draws of 500 digits,
# 2 of 8,192
BLOCK_VALUES = 2**15
MAX_BLOCK_DRAWS = 32
BLOCK_TOTAL = 2**24

# threads that draw blocks ahead, each for a slice of the samples (a draw of many values runs without Python's lock):
# a quarter of the cores, at most 4, so the sampler's own thread and torch's keep theirs
WORKERS = max(1, min(4, (os.cpu_count() or 1) // 4))
_POOL: ThreadPoolExecutor | None = None


def padded(n: int) -> int:
    """n values rounded up to whole groups of 16 (torch's CPU normal sampler's unit)."""
    return 16 * -(-n // 16)


def block_draws(k: int, values: int, batch: int = 1) -> int:
    """Draws in the k-th block (k = 0, 1, ...) for `batch` samples of `values` (padded) values each: 1, 1, 2, 4, ... up
    to what BLOCK_VALUES and BLOCK_TOTAL allow. The numbers do not depend on it (whole groups of 16 values: module
    docstring), so neither do they on the batch, the device or drawing ahead."""
    cap = max(1, min(MAX_BLOCK_DRAWS, BLOCK_VALUES // values, BLOCK_TOTAL // (batch * values)))
    cap = 2 ** int(math.log2(cap))
    return min(cap, 1 if k == 0 else 2 ** (k - 1))


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(WORKERS, thread_name_prefix="ddpmkit-noise")
    return _POOL


def _forget_pool() -> None:
    global _POOL
    _POOL = None  # a forked child has none of its parent's threads: it starts its own pool when it needs one


os.register_at_fork(after_in_child=_forget_pool)


class Ahead:
    """A block being drawn on the worker threads: the pinned block, and per slice of samples a future of their
    generators' states before it (to put back if the sampler asks for another shape instead)."""

    def __init__(self, key: tuple, block: torch.Tensor, parts: list[Future]):
        self.key, self.block, self.parts = key, block, parts

    def states(self) -> list[torch.Tensor]:
        return [state for part in self.parts for state in part.result()]  # waits for every slice


class NoiseSource:
    """Draws standard normal noise of shape (B, *shape) for a batch of B samples.

    prefetch: draw the next block of per-sample noise on worker threads while the current one is used (default:
    on any device but the CPU, where the network and the draws share the same cores)."""

    def __init__(self, batch_size: int, generator: GeneratorLike = None, device: torch.device | str = "cpu",
                 prefetch: bool | None = None):
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
        self.prefetch = self.device.type != "cpu" if prefetch is None else prefetch
        self.pin = self.device.type == "cuda"
        self._key: tuple | None = None  # (shape, dtype) of the block in use
        self._block: torch.Tensor | None = None  # (B, draws, padded values) on the device
        self._row = 0
        self._blocks_drawn = 0  # blocks of this key so far
        self._ahead: Ahead | None = None  # the next block, drawn ahead

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(B, *shape) standard normal noise."""
        shape = tuple(int(s) for s in shape)
        if self.generators is not None:
            return self._per_sample(shape, dtype)
        if self.generator is not None:
            z = torch.randn((self.batch_size, *shape), generator=self.generator, dtype=dtype, device=self.generator.device)
            return self._to_device(z)
        return torch.randn((self.batch_size, *shape), dtype=dtype, device=self.device)

    # ---- per-sample generators, in blocks ------------------------------------------------------------------
    def _per_sample(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        key = (shape, dtype)
        if key != self._key:
            self._key, self._blocks_drawn, self._block = key, 0, None
        if self._block is None or self._row == self._block.shape[1]:
            self._block, self._row = self._next_block(key), 0
            self._blocks_drawn += 1
            if self.prefetch:
                self._ahead = self._draw_ahead(key, self._blocks_drawn)
        n = math.prod(shape)
        # contiguous, as a stacked draw was: a strided view would, e.g., make torch.compile specialise twice (x_T, then x_t)
        z = self._block[:, self._row, :n].reshape(self.batch_size, *shape).contiguous()
        self._row += 1
        return z

    def _next_block(self, key: tuple) -> torch.Tensor:
        """Block number self._blocks_drawn of `key`: the one drawn ahead if it is that one, else drawn now (after putting
        the generators back where they were before a block drawn ahead for another key)."""
        if self._ahead is not None:
            ahead, self._ahead = self._ahead, None
            states = ahead.states()
            if ahead.key == key:
                return self._to_device(ahead.block)
            for g, state in zip(self.generators, states):
                g.set_state(state)
        block = self._empty_block(key, self._blocks_drawn)
        _fill(block, self.generators, 0, self.batch_size, False)
        return self._to_device(block)

    def _empty_block(self, key: tuple, k: int) -> torch.Tensor:
        """Block k of key, to be filled: (B, draws, padded values) on the CPU, pinned for a GPU."""
        shape, dtype = key
        values = padded(math.prod(shape))
        return torch.empty((self.batch_size, block_draws(k, values, self.batch_size), values), dtype=dtype, pin_memory=self.pin)

    def _draw_ahead(self, key: tuple, k: int) -> Ahead:
        """Block k of key, filled by the worker threads, a slice of the samples each; the copy to the device is queued
        later by the sampler's own thread, on its stream."""
        block = self._empty_block(key, k)
        bounds = [self.batch_size * i // WORKERS for i in range(WORKERS + 1)]
        parts = [_pool().submit(_fill, block, self.generators, lo, hi, True) for lo, hi in itertools.pairwise(bounds) if hi > lo]
        return Ahead(key, block, parts)

    def _to_device(self, z: torch.Tensor) -> torch.Tensor:
        return queued_copy(z, self.device)


def _fill(block: torch.Tensor, generators: list[torch.Generator], lo: int, hi: int, save_states: bool) -> list[torch.Tensor]:
    """Samples lo..hi-1's rows of a block, each from its own generator, on the CPU (the same numbers on any device);
    with save_states, their generators' states before the draws."""
    states = [g.get_state() for g in generators[lo:hi]] if save_states else []
    draws, values = block.shape[1:]
    for g, rows in zip(generators[lo:hi], block[lo:hi]):
        torch.randn((draws, values), generator=g, dtype=block.dtype, out=rows)
    return states
