"""Where along the chain does a model err? Held-out eps-MSE by timestep range, for several checkpoints.

    .venv/bin/python bench/error_by_timestep.py runs/demo runs/other [--weights ema|model --n 256]

For each checkpoint, noises n held-out digits at timesteps drawn uniformly within each range
(the same draws for every checkpoint), converts the network's output to eps whatever it predicts
(eps, x0, v, mu) and prints the mean squared error against the true noise. Unconditional
models only (conditional ones: their null branch would be measured).
"""
from __future__ import annotations

import argparse

import ddpmkit.threads  # noqa: F401 -- before torch: OpenMP threads wait passively beside other processes

# isort: split
import torch

from ddpmkit.data import load_dataset
from ddpmkit.models import load_diffusion
from ddpmkit.parameterization import to_x0_eps
from ddpmkit.process import q_sample

EDGES = (0, 25, 50, 100, 200, 300, 400, 500, 600, 700, 800, 900, 1000)


@torch.no_grad()
def eps_mse_by_range(checkpoint: str, x0: torch.Tensor, weights: str, draws: int, seed: int) -> list[float]:
    m = load_diffusion(checkpoint, weights=weights)
    T = m.schedule.T
    edges = [round(e * T / 1000) for e in EDGES]
    g = torch.Generator().manual_seed(seed)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        total = 0.0
        for _ in range(draws):
            t = torch.randint(lo, hi, (len(x0),), generator=g)
            eps = torch.randn(x0.shape, generator=g)
            x_t = q_sample(x0, t, m.schedule, eps)
            _, eps_hat = to_x0_eps(m.config.diffusion.prediction, m.network(x_t, t.float()), x_t, t, m.schedule)
            total += ((eps_hat - eps) ** 2).mean().item()
        out.append(total / draws)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--weights", default="ema", choices=["ema", "model"])
    p.add_argument("--n", type=int, default=256, help="held-out digits")
    p.add_argument("--draws", type=int, default=2, help="(t, eps) draws per digit and range")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    x0 = load_dataset("mnist5k", split="test").x[: args.n]
    print(f"held-out eps-MSE by timestep range (T = 1000 scale; {args.n} digits x {args.draws} draws, {args.weights} weights)")
    print(f"{'t from':>24s} " + " ".join(f"{lo:>8d}" for lo in EDGES[:-1]))
    for ckpt in args.checkpoints:
        row = eps_mse_by_range(ckpt, x0, args.weights, args.draws, args.seed)
        print(f"{ckpt[-24:]:>24s} " + " ".join(f"{v:8.5f}" for v in row))


if __name__ == "__main__":
    main()
