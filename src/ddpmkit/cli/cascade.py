"""`ddpmkit sample BASE --then SR [--then SR2]` (a cascade) and `ddpmkit upscale SR IMAGE...`."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from .. import viz
from ..images import load_image
from ..models import load_diffusion
from ..pipelines.cascade import Stage, cascade, check_low_res, super_resolve
from ..pipelines.generate import save_generated
from ..superres import downsample, upsample
from ..utils import side
from .common import (
    NO_GIF_HELP,
    add_device_option,
    add_guidance_args,
    add_sampler_args,
    guidance_request,
    load_model,
    options_from,
    out_help,
    own_sampler,
    parse_stage,
)


def run_cascade(args: argparse.Namespace) -> None:
    """The base model from the usual flags, then each --then stage; writes every stage's grid, the
    stages side by side (cascade.png), and the last stage's samples and reverse process."""
    request = guidance_request(args)
    m = load_model(args)
    args.sampler, args.steps = own_sampler(m, args)  # a distilled base samples in its few steps by default
    options = options_from(args)  # before args.steps is read: a grid file sets them
    base = Stage(m, args.sampler, args.steps, request.scale, request.threshold, None, options)
    stages = [base] + [parse_stage(spec, m.device) for spec in args.then]
    if args.compile:  # every stage's network, as --precision below (both were taken and ignored here)
        for stage in stages:
            stage.model.compile(None if args.compile == "default" else args.compile)
    t0 = time.time()
    record = 0 if args.no_gif else max(1, (stages[-1].steps or stages[-1].model.schedule.T) // 50)
    outs = cascade(stages, args.n, request, args.seed, args.batch_size, record_every=record, precision=args.precision)
    elapsed = time.time() - t0
    folder = save_generated(outs[-1], args.out, args.seed, gif=not args.no_gif)
    rows = []
    for i, (stage, out) in enumerate(zip(stages, outs)):
        viz.save_grid(out.images, folder / f"stage{i}_{side(out.images.shape)}.png")
        rows.append((f"stage {i}\n{side(out.images.shape)}", out.images))
        print(f"  stage {i}: {stage.describe()}")
    viz.labelled_rows(rows, folder / "cascade.png", n=min(args.n, 8), title=request.describe())
    print(f"{args.n} samples through {len(stages)} stages in {elapsed:.1f}s ({elapsed / args.n:.2f}s per image) -> {folder} "
          "(cascade.png: every stage; reverse_process.gif: the last stage)")


def cmd_upscale(args: argparse.Namespace) -> None:
    sr = load_diffusion(args.checkpoint, device=args.device)
    images = []
    for spec in args.images:
        image = load_image(spec, channels=sr.low_res_shape[0])
        if args.fit and tuple(image.shape[1:]) != sr.low_res_shape:
            size = sr.low_res_shape[-1]
            image = downsample(image, size) if image.shape[-1] >= size else upsample(image, size, "bicubic").clamp(-1, 1)
        check_low_res(sr, image, f"{spec}")
        images.append(image)
    inputs = torch.cat(images)
    low = inputs.repeat_interleave(args.n, dim=0)  # n samples of each input, side by side
    request = guidance_request(args)
    t0, options = time.time(), options_from(args)  # options before args.steps is read: a grid file sets them
    steps = args.steps or sr.schedule.T
    out = super_resolve(sr, low, request, args.aug, args.sampler, args.steps, args.seed, options, args.batch_size,
                        record_every=0 if args.no_gif else max(1, steps // 50))
    folder = save_generated(out, args.out, args.seed, gif=not args.no_gif)
    per_input = out.images.reshape(len(inputs), args.n, *out.images.shape[1:])
    rows = [(f"input {side(sr.low_res_shape)}", inputs), ("bicubic", upsample(inputs, sr.data_shape[-1], "bicubic").clamp(-1, 1))]
    rows += [(f"sample {k + 1}", per_input[:, k]) for k in range(min(args.n, 4))]
    level = sr.config.superres.aug_level if args.aug is None else args.aug
    viz.labelled_rows(rows, folder / "upscale.png", n=len(inputs), title=f"super-resolution, aug level {level:g}")
    print(f"{len(images)} image(s) x {args.n} upscaled {side(sr.low_res_shape)} -> {side(sr.data_shape)} with {args.sampler} in "
          f"{time.time() - t0:.1f}s -> {Path(folder)} (upscale.png: input, bicubic, samples)")


def add_commands(sub) -> None:
    u = sub.add_parser("upscale", help="super-resolve low-res images with a super-resolution stage (train.task = 'superres')")
    u.add_argument("checkpoint", help="a super-resolution run (e.g. ddpmkit train imagen_sr)")
    u.add_argument("images", nargs="+", help="image files, or built-in examples such as mnist5k:7")
    u.add_argument("--fit", action="store_true", help="resize the images to the stage's low-res size first (area downsampling)")
    u.add_argument("--n", type=int, default=1, help="samples per image")
    u.add_argument("--aug", type=float, default=None, help="noise-augmentation level of the low-res input in [0, 1] (default: the stage's)")
    add_sampler_args(u)
    u.add_argument("--batch-size", type=int, default=None, help="samples drawn at once (default: cache-sized chunks)")
    u.add_argument("--no-gif", action="store_true", help=NO_GIF_HELP)
    u.add_argument("--out", default="upscaled", help=out_help())
    add_guidance_args(u)
    add_device_option(u)
    u.set_defaults(func=cmd_upscale)
