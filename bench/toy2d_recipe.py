"""The toy2d preset's recipe against others: training time and how sharp its 8 modes come out.

    .venv/bin/python bench/toy2d_recipe.py [--recipes 1000,1024,5e-3 3000,256,2e-3 ...] [--seeds 0]

Each recipe is STEPS,BATCH,LR on top of the preset (the first default is the preset's own, the second the one it
replaced). For each: the training wall time in this process (ddpmkit.threads' thread settings), then 2,000 samples
with 200 ancestral steps, the share within 0.5 of a mode of the ring (std 0.1; the 8-modes test asks > 90%) and
the smallest mode's share (1/8 = 12.5% when balanced; the test asks > 7%).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time

import ddpmkit.threads  # noqa: F401 -- before torch: passive OpenMP waits, as in ddpmkit's own processes

# isort: split
import torch

import ddpmkit
from ddpmkit.analytic import GaussianMixture, nearest_component
from ddpmkit.config import load_config
from ddpmkit.models import load_diffusion
from ddpmkit.train import train


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", default=["1000,1024,5e-3", "3000,256,2e-3"])
    p.add_argument("--seeds", default="0", help="training seeds, e.g. 0,1,2")
    args = p.parse_args()
    ring = GaussianMixture.ring(8, radius=2.0, std=0.1)
    print(f"CPU capability: {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads")
    print("| steps, batch, lr | seed | train s | near a mode | smallest mode |\n|---|---|---|---|---|")
    for recipe in args.recipes:
        steps, batch, lr = recipe.split(",")
        for seed in (int(s) for s in args.seeds.split(",")):
            run = tempfile.mkdtemp(prefix="toy2d-recipe-")
            cfg = load_config("toy2d", [f"train.run_dir={run}", f"train.steps={steps}", f"train.batch_size={batch}", f"train.lr={lr}",
                                        f"train.checkpoint_every={steps}", f"train.seed={seed}"])
            t0 = time.time()
            train(cfg, progress=False)
            secs = time.time() - t0
            m = load_diffusion(run)
            x = ddpmkit.sample(m.network, (2000, 2), m.schedule, steps=200, generator=torch.Generator().manual_seed(0)).x
            k = nearest_component(ring, x)
            near = (x.double() - ring.means[k]).norm(dim=1) < 0.5
            smallest = torch.bincount(k[near], minlength=8).min().item() / len(k)
            print(f"| {recipe} | {seed} | {secs:.1f} | {near.double().mean():.1%} | {smallest:.1%} |", flush=True)
            shutil.rmtree(run, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
