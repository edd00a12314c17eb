"""unCLIP from the command line: `ddpmkit unclip` (text to image), `variations`, `unclip-interpolate`
and `text-diff`. Parsing and printing only; the work is in pipelines/unclip.py."""
from __future__ import annotations

import argparse
import time

import torch

from .. import viz
from ..errors import UserError
from ..images import load_image, load_image_as
from ..models import DiffusionModel, load_diffusion
from ..pipelines import unclip
from ..pipelines.generate import save_generated
from ..utils import side
from .common import NO_GIF_HELP, DefaultSteps, add_device_option, add_sampler_args, capped, options_from, out_help, parse_stage


def _decode_kwargs(args: argparse.Namespace, decoder: DiffusionModel) -> dict:
    options = options_from(args)  # before args.steps is read: a grid file sets them
    steps = args.steps or decoder.schedule.T  # None: all of the decoder's T
    gif = not getattr(args, "no_gif", True)  # the commands that draw one picture record no trajectory
    return dict(scale=args.guidance, sampler=args.sampler, steps=args.steps, options=options, batch_size=args.batch_size,
                record_every=max(1, steps // 50) if gif else 0)


def _images(decoder, specs: list[str], fit: bool) -> torch.Tensor:
    """The images as the decoder's CLIP embeds them; --fit resizes files to its size."""
    shape = decoder.clip.network.image_shape
    if fit:
        return torch.cat([load_image_as(s, shape) for s in specs])
    loaded = [load_image(s) for s in specs]
    for spec, image in zip(specs, loaded):
        if tuple(image.shape[1:]) != shape:
            raise UserError(f"{spec} is a {image.shape[1]}-channel {side(image.shape)} image; the decoder's CLIP embeds "
                            f"{shape[0]}-channel {side(shape)} images (add --fit to resize it)")
    return torch.cat(loaded)


def cmd_unclip(args: argparse.Namespace) -> None:
    prior, decoder = load_diffusion(args.prior, device=args.device), load_diffusion(args.decoder, device=args.device)
    unclip.check_pair(prior, decoder)
    args.prior_steps = capped(args.prior_steps, prior.schedule.T)  # its own 64 steps fit a prior of fewer
    if args.prior_steps > prior.schedule.T:  # else the sampler's "steps must lie in [1, 1000]", which names no flag
        raise UserError(f"--prior-steps {args.prior_steps}: the prior has T = {prior.schedule.T} steps")
    t0 = time.time()
    result = unclip.text_to_image(prior, decoder, args.prompt, args.n, args.prior_guidance, args.best_of, args.prior_steps,
                                  seed=args.seed, then=[parse_stage(s, decoder.device) for s in args.then], **_decode_kwargs(args, decoder))
    folder = save_generated(result.stages[-1], args.out, args.seed, gif=not args.no_gif)
    torch.save(result.embeds, folder / "image_embeds.pt")
    prompts = [args.prompt[i % len(args.prompt)] for i in range(args.n)]
    per_prompt = [(p, result.images[[i for i, q in enumerate(prompts) if q == p]]) for p in dict.fromkeys(prompts)]
    viz.labelled_rows([(p[:24], x) for p, x in per_prompt], folder / "unclip.png", n=min(8, max(len(x) for _, x in per_prompt)),
                      title=f"unCLIP: prior guidance {args.prior_guidance:g}, best of {args.best_of}, decoder guidance {args.guidance:g}")
    print(f"{args.n} samples: prompt -> prior ({args.prior}) -> decoder ({args.decoder})"
          + "".join(f" -> {s}" for s in args.then) + f" in {time.time() - t0:.1f}s -> {folder} (unclip.png: a row per prompt)")


def cmd_variations(args: argparse.Namespace) -> None:
    decoder = load_diffusion(args.decoder, device=args.device)
    images = _images(decoder, args.images, args.fit)
    t0 = time.time()
    out = unclip.variations(decoder, images, args.n, seed=args.seed, **_decode_kwargs(args, decoder))
    folder = save_generated(out, args.out, args.seed, gif=not args.no_gif)
    per_image = out.images.reshape(len(images), args.n, *out.images.shape[1:])
    rows = [("source", images)] + [(f"variation {k + 1}", per_image[:, k]) for k in range(args.n)]
    viz.labelled_rows(rows, folder / "variations.png", n=len(images), title="unCLIP variations: the same CLIP image embedding, new noise")
    print(f"{args.n} variation(s) of {len(images)} image(s) in {time.time() - t0:.1f}s -> {folder} (variations.png: sources, then variations)")


def cmd_interpolate(args: argparse.Namespace) -> None:
    decoder = load_diffusion(args.decoder, device=args.device)
    a, b = _images(decoder, [args.a], args.fit), _images(decoder, [args.b], args.fit)
    out = unclip.interpolate(decoder, a, b, args.frames, seed=args.seed, **_decode_kwargs(args, decoder))
    folder = save_generated(out, args.out, args.seed, gif=False)
    viz.labelled_rows([("A", a), ("slerp", out.images), ("B", b)], folder / "interpolation.png", n=args.frames,
                      title="unCLIP: slerp between two images' CLIP embeddings, same noise")
    print(f"{args.frames} frames between {args.a} and {args.b} -> {folder} (interpolation.png)")


def cmd_text_diff(args: argparse.Namespace) -> None:
    try:  # before the decoder loads; nan or 5 drew NaN or past-the-text images
        amounts = [float(a) for a in args.amounts.split(",")]
        if not all(0 <= a <= 1 for a in amounts):
            raise ValueError
    except ValueError:
        raise UserError(f"--amounts takes numbers in [0, 1] separated by commas; got {args.amounts!r}") from None
    decoder = load_diffusion(args.decoder, device=args.device)
    image = _images(decoder, [args.image], args.fit)
    out = unclip.text_diff(decoder, image, args.source, args.target, amounts, seed=args.seed, **_decode_kwargs(args, decoder))
    folder = save_generated(out, args.out, args.seed, gif=False)
    viz.labelled_rows([("source", image), ("theta " + ", ".join(f"{a:g}" for a in amounts), out.images)], folder / "text_diff.png",
                      n=len(amounts), title=f"text diff: {args.source!r} -> {args.target!r}")
    print(f"{args.image} moved from {args.source!r} toward {args.target!r} at theta {amounts} -> {folder} (text_diff.png)")


DECODER_HELP = "a decoder run (ddpmkit train unclip_decoder)"


def _decoder_args(p: argparse.ArgumentParser, out: str, gif: bool = True) -> None:
    """The decoder's sampling flags; gif=False for the commands that write one picture and no reverse-process GIF
    (their --no-gif was taken and changed nothing)."""
    add_sampler_args(p)
    p.add_argument("--guidance", type=float, default=unclip.DEFAULT_DECODER_SCALE, help="the decoder's classifier-free guidance scale")
    p.add_argument("--batch-size", type=int, default=None, help="samples drawn at once (default: cache-sized chunks; results do not depend on it)")
    if gif:
        p.add_argument("--no-gif", action="store_true", help=NO_GIF_HELP)
    p.add_argument("--out", default=out, help=out_help())
    add_device_option(p)


def _fit_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fit", action="store_true", help="resize image files to the size the CLIP embeds")


def add_commands(sub) -> None:
    u = sub.add_parser("unclip", help="unCLIP text to image: prompt -> diffusion prior -> CLIP image embedding -> decoder")
    u.add_argument("prior", help="a prior run (ddpmkit train unclip_prior)")
    u.add_argument("decoder", help="a decoder run (ddpmkit train unclip_decoder) on the same CLIP")
    u.add_argument("--prompt", action="append", required=True, help="a caption (repeat for several, cycled over the samples)")
    u.add_argument("--n", type=int, default=16, help="samples (default: %(default)s)")
    u.add_argument("--prior-guidance", type=float, default=unclip.DEFAULT_PRIOR_SCALE, help="the prior's classifier-free guidance scale")
    u.add_argument("--best-of", type=int, default=1, help="prior samples per image; the one closest to the caption in CLIP space is kept")
    u.add_argument("--prior-steps", type=int, default=DefaultSteps(64), help="deterministic DDIM steps of the prior (default: 64, "
                                                                                 "or the prior's T if fewer)")
    u.add_argument("--then", action="append", default=[], metavar="STAGE", help="a super-resolution stage after the decoder (as in sample --then)")
    _decoder_args(u, "unclip")
    u.set_defaults(func=cmd_unclip)

    v = sub.add_parser("variations", help="unCLIP image variations: decode an image's CLIP embedding with new noise")
    v.add_argument("decoder", help=DECODER_HELP)
    v.add_argument("images", nargs="+", help="image files, or built-in examples such as mnist5k:7")
    v.add_argument("--n", type=int, default=4, help="variations per image")
    _fit_arg(v)
    _decoder_args(v, "variations")
    v.set_defaults(func=cmd_variations)

    i = sub.add_parser("unclip-interpolate", help="decode the slerp between two images' CLIP embeddings (same noise)")
    i.add_argument("decoder", help=DECODER_HELP)
    i.add_argument("a", help="first image (file or e.g. mnist5k:3)")
    i.add_argument("b", help="second image")
    i.add_argument("--frames", type=int, default=8, help="frames, both ends included (default: %(default)s)")
    _fit_arg(i)
    _decoder_args(i, "unclip_interpolation", gif=False)
    i.set_defaults(func=cmd_interpolate)

    d = sub.add_parser("text-diff", help="move an image's CLIP embedding toward a caption (DALL-E 2's text diffs)")
    d.add_argument("decoder", help=DECODER_HELP)
    d.add_argument("image", help="the image to move (file or e.g. mnist5k:3)")
    d.add_argument("--from", dest="source", required=True, help="a caption of the image as it is, e.g. 'a handwritten three'")
    d.add_argument("--to", dest="target", required=True, help="the caption to move toward, e.g. 'a handwritten eight'")
    d.add_argument("--amounts", default="0,0.2,0.4,0.6,0.8", help="slerp weights theta toward the text direction")
    _fit_arg(d)
    _decoder_args(d, "text_diff", gif=False)
    d.set_defaults(func=cmd_text_diff)
