"""Editing and animation commands: img2img, inpaint, posterior, interpolate, voyage."""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .. import viz
from ..errors import UserError
from ..images import MASK_HALVES, load_image_as, make_mask
from ..models import DiffusionModel
from ..pipelines.edit import (
    check_partway_grid,
    edit_img2img,
    edit_inpaint,
    edit_posterior,
    interpolation_images,
    interpolation_prompts,
    interpolation_seeds,
)
from ..pipelines.voyage import read_keyframes, render_voyage
from ..sampling import SAMPLERS
from .common import (
    IMAGE_HELP,
    RUN_HELP,
    SAMPLER_HELP,
    DefaultSteps,
    add_device_args,
    add_guidance_args,
    add_sampler_args,
    add_solver_args,
    check_seed,
    guidance_request,
    load_model,
    options_from,
    out_help,
)

try:  # optional: MP4 output of the voyage
    import imageio.v2 as imageio
except ImportError:
    imageio = None


def image_model(args: argparse.Namespace) -> DiffusionModel:
    """The run the edit works on, with its --dtype and --lora: one that makes images (a 2-D toy's edits failed in an
    image's reshaping)."""
    m = load_model(args)
    if len(m.image_shape) != 3:
        raise UserError(f"{args.checkpoint} makes {m.image_shape[0]}-D points, not images, and `ddpmkit {args.command}` edits images; "
                        f"ddpmkit sample {args.checkpoint} draws the points")
    return m


def _model_image(args: argparse.Namespace) -> tuple[DiffusionModel, torch.Tensor]:
    m = image_model(args)
    return m, load_image_as(args.image, m.image_shape)


def _strip(rows: list[torch.Tensor], path: Path, nrow: int) -> None:
    viz.save_grid(torch.cat(rows), path, nrow=nrow)
    print(f"wrote {path}")


def cmd_img2img(args: argparse.Namespace) -> None:
    check_partway_grid(args.grid)  # before options_from reads the file and counts its steps against --steps
    m, image = _model_image(args)
    out = edit_img2img(m, image, args.n, args.strength, guidance_request(args), args.sampler, args.steps, args.seed, options_from(args))
    _strip([image, out], Path(args.out) / "img2img.png", args.n + 1)


def cmd_inpaint(args: argparse.Namespace) -> None:
    m, image = _model_image(args)
    mask = make_mask(args.mask, image.shape)
    options = options_from(args)  # first: a grid file sets args.steps
    x = edit_inpaint(m, image, mask, args.n, guidance_request(args), args.steps, args.resample, args.seed, args.sampler, options)
    print(f"filled {1 - mask.mean().item():.0%} of the image (the mask's black part; white keeps)")  # a mask drawn inverted shows here
    _strip([image, image * mask, x], Path(args.out) / "inpaint.png", args.n + 2)


def cmd_posterior(args: argparse.Namespace) -> None:
    m, image = _model_image(args)
    args.t = m.schedule.T // 2 if args.t is None else args.t  # halfway down the model's own schedule: 500 of 1000
    shown_x_t, xs = edit_posterior(m, image, args.t, args.n, guidance_request(args), args.steps, args.seed)
    _strip([image, shown_x_t, xs], Path(args.out) / f"posterior_t{args.t}.png", args.n + 2)


def two(text: str, flag: str, what: str, example: str, parse: Callable[[str], Any] = str) -> list:
    """The two comma-separated items of --seeds (parse=int) or --images, or one line saying what the flag takes."""
    items = [s.strip() for s in text.split(",")]
    try:
        if len(items) == 2 and all(items):
            return [parse(s) for s in items]
    except ValueError:
        pass
    raise UserError(f"{flag} takes two {what} separated by a comma, e.g. {example}; got {text!r}")


def check_interpolation_flags(args: argparse.Namespace, images: bool) -> None:
    """Each flag belongs to a mode; one given to another mode was taken and ignored."""
    if images:
        given = [flag for flag, value in (("--seeds", args.seeds), ("--prompts", args.prompts)) if value is not None]
        given += [f"--sampler {args.sampler}"] if args.sampler not in (None, "ddpm") else []
        given += [f"--{flag}" for flag in ("grid", "eta", "churn", "order") if getattr(args, flag) is not None]
        given += [flag for flag, value in (("--variance", args.variance != "auto"), ("--no-clip", args.no_clip)) if value]
        if given:
            raise UserError(f"--images mixes two images at x_t and runs Algorithm 2 (ddpm) from there, as DDPM's Fig. 8, with --seed's "
                            f"noise: leave out {' and '.join(given)}")
    else:
        given = [flag for flag, value in (("--seed", args.seed), ("--t", args.t)) if value is not None]
        if given:
            raise UserError(f"{' and '.join(given)} {'belong' if len(given) > 1 else 'belongs'} to --images; --seeds gives the seeds of x_T "
                            f"({'--prompts start from the first' if args.prompts else 'the slerp runs between them'})")


def cmd_interpolate(args: argparse.Namespace) -> None:
    seeds = [check_seed(s, "--seeds") for s in two(args.seeds or "0,1", "--seeds", "seeds", "3,14", int)]  # before the model loads
    images = two(args.images, "--images", "images", "mnist5k:0,mnist5k:1") if args.images else None
    check_interpolation_flags(args, bool(images))
    args.sampler, args.seed = args.sampler or "ddim", args.seed or 0
    request = guidance_request(args)
    m = image_model(args)
    args.t = m.schedule.T // 2 if args.t is None else args.t  # --images' noise level: halfway down the model's schedule
    out = Path(args.out)
    if images:
        a, b = (load_image_as(s, m.image_shape) for s in images)
        x = interpolation_images(m, a, b, args.t, args.n, request, args.steps, args.seed)
        return _strip([x], out / f"interpolate_images_t{args.t}.png", args.n)
    options = options_from(args)  # first: a grid file sets args.steps
    if args.prompts:
        x = interpolation_prompts(m, args.prompts[0], args.prompts[1], args.n, seeds[0], request, args.sampler, args.steps, options)
        return _strip([x], out / "interpolate_prompts.png", args.n)
    x = interpolation_seeds(m, seeds[0], seeds[1], args.n, request, args.sampler, args.steps, options)
    _strip([x], out / f"interpolate_seeds_{seeds[0]}_{seeds[1]}.png", args.n)


def cmd_voyage(args: argparse.Namespace) -> None:
    """Render the keyframe file as a GIF (and MP4 when imageio's ffmpeg is installed) plus a keyframe strip."""
    keyframes = read_keyframes(args.file)
    m = load_model(args)
    options, t0 = options_from(args), time.time()  # options first: a grid file sets args.steps
    frames = render_voyage(m, keyframes, frames_between=args.frames, guidance=args.guidance, sampler=args.sampler, steps=args.steps,
                           device=args.device, options=options)
    out = Path(args.out)
    images = [viz.make_grid(f[None], nrow=1, pad=0, upscale=args.upscale) for f in frames]
    gif = viz.save_gif(images, out / "voyage.gif", duration_ms=args.frame_ms, hold_last_ms=args.frame_ms * 4)
    viz.save_grid(frames[::args.frames], out / "keyframes.png", nrow=len(keyframes))
    viz.save_grid(frames, out / "frames.png", nrow=args.frames)
    msg = f"{len(frames)} frames in {time.time() - t0:.0f}s -> {gif}, {out / 'keyframes.png'}, {out / 'frames.png'}"
    try:
        imageio.mimwrite(out / "voyage.mp4", images, fps=max(1, 1000 // args.frame_ms), macro_block_size=1)
        msg += f", {out / 'voyage.mp4'}"
    except Exception:  # noqa: BLE001 -- imageio (None here) or its ffmpeg plugin is optional
        msg += " (no MP4: pip install imageio imageio-ffmpeg)"
    print(msg)


def add_commands(sub) -> None:
    def common(p: argparse.ArgumentParser, sampler: str | None, steps: int, n: str, sampler_help: str = SAMPLER_HELP,
               solver: bool = False, grid_files: bool = True) -> None:
        p.add_argument("checkpoint", help=RUN_HELP)
        p.add_argument("--n", type=int, default=8, help=f"{n} (default: %(default)s)")
        add_sampler_args(p, sampler, steps, full=False, sampler_help=sampler_help)
        if solver:  # the sampler's own options, where the command's sampler is the user's choice
            add_solver_args(p, grid_files)
        p.add_argument("--out", default="edits", help=out_help())
        add_guidance_args(p)
        add_device_args(p)

    p = sub.add_parser("img2img", help="SDEdit: noise an image to strength * T and denoise it")
    common(p, "ddim", 50, "edited images", solver=True, grid_files=False)  # its grid starts partway, at strength * T
    p.add_argument("image", help=IMAGE_HELP)
    p.add_argument("--strength", type=float, default=0.5, help="0 = keep the image, 1 = ignore it")
    p.set_defaults(func=cmd_img2img)

    p = sub.add_parser("inpaint", help="fill the masked part of an image: RePaint, or a 9-channel inpainting UNet (Stable Diffusion inpainting)")
    common(p, "ddpm", 100, "fillings", solver=True)  # the solver's options: a 9-channel inpainting UNet's sampler (RePaint: --no-clip)
    p.add_argument("image", help=IMAGE_HELP)
    p.add_argument("--mask", default="right", help=f"{', '.join(MASK_HALVES)} (the half to fill) or a PNG (white = keep)")
    p.add_argument("--resample", type=int, default=None,
                   help="RePaint passes per step (default 5; 1 = replace the known part only); not for a 9-channel inpainting UNet")
    p.set_defaults(func=cmd_inpaint)

    p = sub.add_parser("posterior", help="noise an image to x_t once and draw several x_0 ~ p(x_0 | x_t)")
    common(p, None, 100, "draws of x_0, each by Algorithm 2 from the same x_t", sampler_help="")
    p.add_argument("image", help=IMAGE_HELP)
    p.add_argument("--t", type=int, default=None, help="the timestep x_t is drawn at, in 1..T-1 (default: T/2, 500 of 1000)")
    p.set_defaults(func=cmd_posterior)

    p = sub.add_parser("interpolate", help="between two seeds (slerp of x_T), two images (through x_t) or two prompts")
    common(p, None, 50, "frames, both ends included",
           sampler_help="default: ddim for --seeds and --prompts; --images runs Algorithm 2 (ddpm) from x_t, as DDPM's Fig. 8", solver=True)
    p.add_argument("--seeds", default=None, help="two seeds, e.g. 3,14 (default: 0,1): the slerp between their x_T")
    p.add_argument("--images", default=None, help="two images, e.g. mnist5k:0,mnist5k:1 (DDPM Fig. 8), mixed at x_t")
    p.add_argument("--t", type=int, default=None, help="noise level for --images, in 1..T-1 (default: T/2, 500 of 1000)")
    p.add_argument("--prompts", nargs=2, default=None, help="two prompts (text models), from the first of --seeds")
    p.set_defaults(func=cmd_interpolate, seed=None)  # --seed is --images' noise; --seeds gives the other modes theirs

    p = sub.add_parser("voyage", help="render (seed, prompt) keyframes as an animation (GIF, MP4)")
    p.add_argument("file", help="keyframes: the lecture's seed_and_prompt_sequence list, or 'SEED PROMPT' lines")
    p.add_argument("--model", required=True, help="a text-conditional run")
    p.add_argument("--frames", type=int, default=8, help="frames from one keyframe to the next")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (default: %(default)s)")
    p.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS), help="each frame's sampler (default: %(default)s)")
    p.add_argument("--steps", type=int, default=DefaultSteps(20),
                   help="each frame's steps, one network evaluation each (default: %(default)s; a --grid file's own count)")
    add_solver_args(p)
    p.add_argument("--frame-ms", type=int, default=120, help="milliseconds each frame shows (default: %(default)s)")
    p.add_argument("--upscale", type=int, default=4, help="each pixel shown as upscale x upscale pixels (default: %(default)s)")
    p.add_argument("--out", default="voyage", help=out_help())
    add_device_args(p)
    p.set_defaults(func=cmd_voyage)
