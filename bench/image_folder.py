"""Loading a folder of large photos for training: a batch as ddpmkit's ImageFolder reads it (each JPEG decoded at its
DCT scale, then kept in memory) against the plain way it read them before (every image fully decoded, cropped and
resized at every step), in this process, on the same files, alternating rounds, medians.

    .venv/bin/python bench/image_folder.py [--images 16] [--width 4000] [--height 3000] [--size 64] [--rounds 3]

The photos are made here (smooth colour gradients with some noise, JPEG quality 90) in a temporary folder, removed
when the bench ends. Printed: ms per image for the plain full decode, for ImageFolder's first pass (its decode) and
for a later pass (from memory), and the mean difference of the two ways' pixels.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import ddpmkit.threads  # noqa: F401 -- before torch: OpenMP threads wait passively beside other processes

# isort: split
import numpy as np
import torch
from PIL import Image

from ddpmkit.data import ImageFolder
from ddpmkit.devices import describe_cpu


def make_photos(folder: Path, n: int, width: int, height: int) -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for k in range(n):
        base = np.stack([xx / width * 255, yy / height * 255, (xx + yy + 40 * k) % 256], -1)
        noisy = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / f"photo{k:03d}.jpg", quality=90)


def plain_batch(files: list[Path], size: int) -> torch.Tensor:
    """The way before: each file fully decoded, centre-cropped and resized, at every step."""
    out = []
    for path in files:
        with Image.open(path) as im:
            im = im.convert("RGB")
            side = min(im.size)
            left, top = (im.width - side) // 2, (im.height - side) // 2
            im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
            out.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1))
    return torch.stack(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--width", type=int, default=4000)
    p.add_argument("--height", type=int, default=3000)
    p.add_argument("--size", type=int, default=64, help="data.image_size")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="image-folder-bench-"))
    try:
        make_photos(folder, args.images, args.width, args.height)
        print(f"{describe_cpu()}; {args.images} JPEGs of {args.width}x{args.height} -> {args.size}x{args.size}", flush=True)
        indices = torch.arange(args.images)
        plain_ms, first_ms, later_ms, diffs = [], [], [], []
        for r in range(args.rounds):
            t = time.perf_counter()
            plain = plain_batch(sorted(folder.glob("*.jpg")), args.size)
            plain_ms.append((time.perf_counter() - t) * 1000 / args.images)
            folder_ds = ImageFolder(folder, args.size)  # a fresh one: its first pass decodes
            t = time.perf_counter()
            first = folder_ds.get_batch(indices)
            first_ms.append((time.perf_counter() - t) * 1000 / args.images)
            t = time.perf_counter()
            folder_ds.get_batch(indices)
            later_ms.append((time.perf_counter() - t) * 1000 / args.images)
            diffs.append((first - plain).abs().mean().item())
            print(f"  round {r}: plain {plain_ms[-1]:.2f} ms/image, ImageFolder first pass {first_ms[-1]:.2f}, "
                  f"later {later_ms[-1]:.4f}", flush=True)
        plain, first, later = (statistics.median(v) for v in (plain_ms, first_ms, later_ms))
        print(f"medians: plain full decode {plain:.2f} ms/image; ImageFolder first pass {first:.2f} (x{plain / first:.2f}), "
              f"later passes {later:.4f} (x{plain / later:.0f}); mean |difference| of the pixels {statistics.median(diffs):.4f} "
              "in [-1, 1]")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
