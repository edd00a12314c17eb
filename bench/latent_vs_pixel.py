"""Latent against pixel diffusion on mnist5k, in one run: time per image and sample quality.

    .venv/bin/python bench/latent_vs_pixel.py --pixel runs/mnist --latent runs/mnist_latent [--n 500]

Both models draw n samples with the same sampler and NFE (dpmpp_2m_sde, 20 steps, Karras grid,
seed k for sample k); the latent model's time includes decoding. Quality: the judge's
confident share and the Frechet distance in the judge's feature space to the 500 held-out
digits (not comparable with papers' FIDs). Targets: latent >= 3x faster per image, FD within
25% of the pixel model's. Also prints the autoencoder's held-out reconstruction PSNR.
"""
from __future__ import annotations

import argparse
import time

import ddpmkit.threads  # noqa: F401 -- before torch: OpenMP threads wait passively beside other processes

# isort: split
import torch

from ddpmkit import sample, viz
from ddpmkit.data import load_dataset
from ddpmkit.evaluate.metrics import FeatureStats, frechet_distance
from ddpmkit.evaluate.report import FeatureNet
from ddpmkit.models import load_diffusion


def draw(m, n: int, args, batch: int = 250) -> tuple[torch.Tensor, float]:
    xs, seconds = [], 0.0
    for start in range(0, n, batch):
        b = min(batch, n - start)
        t0 = time.perf_counter()
        r = sample(m.denoiser, (b, *m.data_shape), sampler=args.sampler, steps=args.steps, grid=args.grid,
                   generator=list(range(start, start + b)))
        xs.append(m.decode(r.x))
        seconds += time.perf_counter() - t0
    return torch.cat(xs), seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pixel", default="runs/mnist")
    p.add_argument("--latent", default="runs/mnist_latent")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--sampler", default="dpmpp_2m_sde")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--grid", default="karras")
    p.add_argument("--out", default="runs/bench/latent_vs_pixel")
    args = p.parse_args()

    features = FeatureNet("classifier", "mnist5k")
    real = FeatureStats.of(features(load_dataset("mnist5k", split="test").x)[0])
    rows = {}
    for name, path in (("pixel", args.pixel), ("latent", args.latent)):
        m = load_diffusion(path)
        draw(m, 8, args)  # warm-up
        x, seconds = draw(m, args.n, args)
        f, prob = features(x)
        fake = FeatureStats.of(f)
        rows[name] = {"ms_per_image": 1000 * seconds / args.n, "fd": frechet_distance(fake.mu, fake.sigma, real.mu, real.sigma),
                      "confident": (prob.max(1).values >= 0.9).float().mean().item(),
                      "params": sum(q.numel() for q in m.network.parameters()), "shape": m.data_shape}
        viz.save_grid(x[:100], f"{args.out}/{name}.png", nrow=10)
        if m.autoencoder is not None:
            from ddpmkit.models import load_autoencoder

            rows[name]["psnr_db"] = load_autoencoder(m.config.data.autoencoder).metrics.get("psnr_db")
        r = rows[name]
        print(f"{name:<7} {str(tuple(r['shape'])):<12} {r['params'] / 1e6:5.2f}M params  {r['ms_per_image']:7.2f} ms/image  "
              f"FD {r['fd']:6.3f}  confident {r['confident']:6.1%}" + (f"  AE PSNR {r['psnr_db']:.2f} dB" if "psnr_db" in r else ""))
    speed = rows["pixel"]["ms_per_image"] / rows["latent"]["ms_per_image"]
    fd_ratio = rows["latent"]["fd"] / rows["pixel"]["fd"]
    print(f"latent speed-up per image x{speed:.2f} (target >= 3: {'PASS' if speed >= 3 else 'FAIL'}); "
          f"FD latent / pixel {fd_ratio:.2f} (target <= 1.25: {'PASS' if fd_ratio <= 1.25 else 'FAIL'}); "
          f"{args.n} samples, {args.sampler} {args.steps} steps, {torch.get_num_threads()} threads")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
