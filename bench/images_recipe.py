"""The images preset's laptop form on real photos, end to end, as a practitioner would run it on their own folder:

    .venv/bin/python bench/images_recipe.py [--out DIR] [--steps 2000] [--figure docs/images_recipe.png]

1. 2,000 crops of 64x64 pixels (at half size) from scikit-learn's two sample photos (a temple and a dahlia,
   sklearn.datasets.load_sample_images, shipped with scikit-learn), written as a folder of PNGs;
2. `ddpmkit train images data.path=FOLDER data.image_size=32 network.base_channels=32 train.steps=2000` (the laptop's
   first try the preset's comment gives: ~36 minutes on 2 AVX-512-bf16 cores);
3. 256 samples with DPM-Solver++(2M) in 20 steps against the crops: each colour channel's mean and standard deviation,
   and the mean absolute step between neighbouring pixels (how smooth the pictures are; pure noise clipped to [-1, 1]
   is far rougher), printed; with --figure, 16 crops above 16 samples in one picture.

A check that the recipe learns colour photos on a CPU (channels in the right order and range, coherent structure), not
a measure of quality: two photos are not a dataset.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_sample_images

import ddpmkit
from ddpmkit import viz
from ddpmkit.checkpoint import list_checkpoints, read_config
from ddpmkit.config import load_config
from ddpmkit.data import ImageFolder
from ddpmkit.train import train


def write_crops(folder: Path, n: int, size: int = 64, seed: int = 0) -> None:
    """n random size x size crops of the sample photos at half size, as PNGs (half of them from each photo)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for j, photo in enumerate(load_sample_images().images):
        half = np.asarray(Image.fromarray(photo).resize((photo.shape[1] // 2, photo.shape[0] // 2), Image.BICUBIC))
        for i in range(n // 2):
            y, x = rng.integers(0, half.shape[0] - size), rng.integers(0, half.shape[1] - size)
            Image.fromarray(half[y:y + size, x:x + size]).save(folder / f"{j}_{i:05d}.png")


def roughness(x: torch.Tensor) -> float:
    """The mean absolute difference between neighbouring pixels (down and across)."""
    return float(((x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()) / 2)


def channel_stats(x: torch.Tensor) -> str:
    means, stds = x.mean((0, 2, 3)).tolist(), x.std((0, 2, 3)).tolist()
    return " ".join(f"{c} {m:+.3f}/{s:.3f}" for c, m, s in zip("RGB", means, stds))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="folder for the crops and the run (default: a temporary one); a run there already "
                   "at --steps is sampled again, not trained again")
    p.add_argument("--crops", type=int, default=2000, help="how many crops the folder holds")
    p.add_argument("--steps", type=int, default=2000, help="train.steps (the laptop form's 2000)")
    p.add_argument("--samples", type=int, default=256, help="samples compared with the crops")
    p.add_argument("--figure", default=None, help="write 16 crops above 16 samples to this PNG")
    args = p.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="images-recipe-"))
    write_crops(root / "photos", args.crops)
    cfg = load_config("images", [f"data.path={root / 'photos'}", "data.image_size=32", "network.base_channels=32", f"train.steps={args.steps}",
                                 f"train.run_dir={root / 'run'}", "train.sample_every=0", "train.eval_every=0"])
    done = [c for c in list_checkpoints(root / "run") if read_config(c)[1].step == args.steps]
    if done:  # --out of an earlier run of this script: its figures again, without the training
        print(f"{done[0]} is at step {args.steps} already: not trained again")
    else:
        train(cfg, overwrite=True)
    m = ddpmkit.load(root / "run")
    x = ddpmkit.generate(m, args.samples, sampler="dpmpp_2m", steps=20, seed=0, progress=False).images
    data = ImageFolder(root / "photos", 32).get_batch(torch.arange(args.crops))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    print(f"{args.crops} crops, {args.steps} steps, {args.samples} samples (dpmpp_2m, 20 steps); channel mean/std:")
    print(f"  crops   {channel_stats(data)}   neighbour step {roughness(data):.3f}")
    print(f"  samples {channel_stats(x)}   neighbour step {roughness(x):.3f}   (noise: {roughness(noise):.3f})")
    if args.figure:
        shown = data[torch.randperm(args.crops, generator=torch.Generator().manual_seed(0))[:16]]
        viz.save_png(viz.make_grid(torch.cat([shown, x[:16]]), nrow=8, upscale=2), args.figure)
        print(f"crops (top two rows) and samples (bottom two) -> {args.figure}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
