"""Host time of a sampler step's per-sample noise: one randn per sample per step (how ddpmkit drew it before commit
d92e8c4) against the blocks `ddpmkit.sampling.noise.NoiseSource` draws now (one call per sample for up to
32 steps), in this process, alternating rounds, medians.

    .venv/bin/python bench/noise_draws.py [--n 500] [--steps 256] [--rounds 5]

On a GPU this time is the host's, not the GPU's: with 1,000 ancestral steps for 500 digits it is spent 1,000 times,
and the target for the whole run is 5 s. Both ways give the same numbers (tests/test_noise.py); the script checks it.
Last, a loop that spends --beside-ms per step waiting for something else (a sleep: the host is free, as while a GPU
computes) takes its noise in line, or drawn ahead on the worker threads as on a GPU: what the overlap saves.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import ddpmkit.threads  # noqa: F401 -- before torch: OpenMP threads wait passively beside other processes

# isort: split
import torch

from ddpmkit.devices import describe_cpu
from ddpmkit.sampling import noise as noise_module
from ddpmkit.sampling.noise import NoiseSource, padded


def per_step(n: int, shape: tuple[int, ...], steps: int) -> list[torch.Tensor]:
    """The old way: every step, one randn per sample from its own generator."""
    gens = [torch.Generator().manual_seed(s) for s in range(n)]
    values = math.prod(shape)
    return [torch.stack([torch.randn(padded(values), generator=g)[:values].reshape(shape) for g in gens]) for _ in range(steps)]


def in_blocks(n: int, shape: tuple[int, ...], steps: int) -> list[torch.Tensor]:
    noise = NoiseSource(n, 0, "cpu")
    return [noise.randn(shape) for _ in range(steps)]


def beside_other_work(n: int, shape: tuple[int, ...], steps: int, ms: float, ahead: bool) -> float:
    """ms per step of a loop that waits `ms` per step for something else (a sleep standing in for a GPU's step, during
    which the host is free) and takes its noise: blocks drawn ahead on the worker thread (as on a GPU) or in line."""
    noise = NoiseSource(n, 0, "cpu", prefetch=ahead)
    noise.randn(shape)
    start = time.perf_counter()
    for _ in range(steps):
        time.sleep(ms / 1000)
        noise.randn(shape)
    return 1000 * (time.perf_counter() - start) / steps


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=500, help="samples")
    p.add_argument("--steps", type=int, default=256, help="steps per timed run")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--beside-ms", type=float, default=2.0, help="the other work per step (a sleep) that drawing ahead overlaps")
    p.add_argument("--workers", type=int, default=None, help="threads that draw ahead (default: ddpmkit's, a quarter of the cores, 1-4)")
    args = p.parse_args()
    for name, value in (("--n", args.n), ("--steps", args.steps), ("--rounds", args.rounds)):
        if value < 1:
            p.error(f"{name} {value}: give a whole number >= 1")
    if args.beside_ms < 0:
        p.error(f"--beside-ms {args.beside_ms:g}: give a number >= 0")
    if args.workers is not None:
        if args.workers < 1:
            p.error(f"--workers {args.workers}: give a whole number >= 1")
        noise_module.WORKERS = args.workers
    print(f"{describe_cpu()}; {args.n} samples, {args.steps} steps a run, {args.rounds} rounds; {noise_module.WORKERS} worker thread(s) "
          "draw ahead", flush=True)
    for shape in ((1, 28, 28), (3, 32, 32)):
        a, b = per_step(args.n, shape, 3), in_blocks(args.n, shape, 3)
        assert all(torch.equal(x, y) for x, y in zip(a, b)), "the blocks must be the per-step numbers"
        times: dict[str, list[float]] = {"one call per sample per step": [], "blocks (NoiseSource)": []}
        for r in range(args.rounds):
            ways = [("one call per sample per step", per_step), ("blocks (NoiseSource)", in_blocks)]
            for label, fn in ways if r % 2 == 0 else ways[::-1]:  # who goes first alternates
                start = time.perf_counter()
                fn(args.n, shape, args.steps)
                times[label].append(1000 * (time.perf_counter() - start) / args.steps)
        old, new = (statistics.median(v) for v in times.values())
        print(f"{'x'.join(map(str, shape))}: one call per sample per step {old:.2f} ms a step, blocks {new:.2f} ms a step: "
              f"x{old / new:.2f} (per round: {' '.join(f'{o / b:.2f}' for o, b in zip(*times.values()))})", flush=True)
        side = {ahead: statistics.median(beside_other_work(args.n, shape, args.steps, args.beside_ms, ahead) for _ in range(args.rounds))
                for ahead in (False, True)}
        print(f"  beside {args.beside_ms:g} ms of other work a step: blocks in line {side[False]:.2f} ms a step, drawn ahead "
              f"by {noise_module.WORKERS} thread(s) {side[True]:.2f} ms a step", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
