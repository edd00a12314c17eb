"""Command-line editing and animation: img2img, inpaint, posterior, interpolate, voyage."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from . import viz


def _model_and_image(args: argparse.Namespace, n: int):
    """The checkpoint, the model/kwargs for n samples as requested, and the image in model space."""
    from .checkpoint import load_model
    from .cli import guidance_request, load_image
    from .pipeline import guided_model

    m = load_model(args.checkpoint)
    image = load_image(args.image, None)
    shape = m.autoencoder.image_shape if m.autoencoder is not None else m.data_shape
    if tuple(image.shape[1:]) != tuple(shape):
        from .data import load_image_file

        if ":" in args.image:
            raise ValueError(f"the model makes images of shape {tuple(shape)}, the image has {tuple(image.shape[1:])}")
        image = load_image_file(args.image, shape[-1], shape[0])[None]
    model, kwargs, options = guided_model(m, n, guidance_request(args), getattr(args, "sampler", "ddpm"))
    z = m.autoencoder.to_latent(image) if m.autoencoder is not None else image
    return m, image, z, model, kwargs, options


def _strip(rows: list[torch.Tensor], path: Path, nrow: int) -> None:
    viz.save_grid(torch.cat(rows), path, nrow=nrow)
    print(f"wrote {path}")


def cmd_img2img(args: argparse.Namespace) -> None:
    from .editing import img2img

    m, image, z, model, kwargs, options = _model_and_image(args, args.n)
    d = m.config.diffusion
    out = img2img(model, z.expand(args.n, *z.shape[1:]), m.schedule, args.strength, sampler=args.sampler, steps=args.steps,
                  generator=args.seed, prediction=d.prediction, model_kwargs=kwargs, **options)
    _strip([image, m.decode(out.x)], Path(args.out) / "img2img.png", args.n + 1)


def cmd_inpaint(args: argparse.Namespace) -> None:
    from .editing import inpaint

    m, image, z, model, kwargs, _ = _model_and_image(args, args.n)
    if m.autoencoder is not None:
        raise ValueError("inpainting runs on pixel-space models (the mask is in pixels); use a pixel checkpoint")
    mask = make_mask(args.mask, image.shape)
    x = inpaint(model, image.expand(args.n, *image.shape[1:]), mask, m.schedule, steps=args.steps, resample=args.resample,
                generator=args.seed, prediction=m.config.diffusion.prediction, model_kwargs=kwargs)
    _strip([image, image * mask, x], Path(args.out) / "inpaint.png", args.n + 2)


def make_mask(spec: str, shape: torch.Size) -> torch.Tensor:
    """'left', 'right', 'top' or 'bottom' (that half is filled in), or a PNG (white = keep): (1, 1, H, W)."""
    H, W = shape[-2:]
    mask = torch.ones(1, 1, H, W)
    halves = {"left": (slice(None), slice(0, W // 2)), "right": (slice(None), slice(W // 2, None)),
              "top": (slice(0, H // 2), slice(None)), "bottom": (slice(H // 2, None), slice(None))}
    if spec in halves:
        rows, cols = halves[spec]
        mask[0, 0, rows, cols] = 0.0
        return mask
    from .data import load_image_file

    if not Path(spec).is_file():
        raise ValueError(f"--mask must be one of {list(halves)} or a PNG file (white = keep); got {spec!r}")
    return (load_image_file(spec, H, 1)[None] > 0).float()


def cmd_posterior(args: argparse.Namespace) -> None:
    from .editing import posterior_samples

    m, image, z, model, kwargs, _ = _model_and_image(args, args.n)
    x_t, xs = posterior_samples(model, z, args.t, args.n, m.schedule, steps=args.steps, seed=args.seed,
                                prediction=m.config.diffusion.prediction, model_kwargs=kwargs)
    _strip([image, m.decode(x_t.clamp(-1, 1)) if m.autoencoder is None else torch.zeros_like(image), m.decode(xs)],
           Path(args.out) / f"posterior_t{args.t}.png", args.n + 2)


def cmd_interpolate(args: argparse.Namespace) -> None:
    from .checkpoint import load_model
    from .cli import guidance_request
    from .editing import interpolate_images, interpolate_seeds, lerp_condition
    from .pipeline import guided_model

    m = load_model(args.checkpoint)
    d = m.config.diffusion
    out = Path(args.out)
    if args.images:
        from .cli import load_image

        a, b = (load_image(s, None) for s in args.images.split(","))
        if m.autoencoder is not None:
            a, b = m.autoencoder.to_latent(a), m.autoencoder.to_latent(b)
        model, kwargs, _ = guided_model(m, args.n, guidance_request(args), "ddpm")
        x = interpolate_images(model, a, b, args.t, args.n, m.schedule, seed=args.seed, steps=args.steps,
                               prediction=d.prediction, model_kwargs=kwargs)
        return _strip([m.decode(x)], out / f"interpolate_images_t{args.t}.png", args.n)
    seeds = [int(s) for s in (args.seeds or "0,1").split(",")]
    if args.prompts:
        from .guidance import ClassifierFreeGuidance
        from .text import TextEncoder

        net = m.config.network
        if not net.text_encoder:
            raise ValueError("--prompts needs a text-conditional model")
        enc = TextEncoder(net.text_encoder, net.text_max_tokens)
        ca, cb = enc.encode(args.prompts[0]), enc.encode(args.prompts[1])
        conds = [lerp_condition(ca, cb, float(a)) for a in torch.linspace(0, 1, args.n)]
        kwargs = {k: torch.cat([c[k] for c in conds]) for k in ca}
        model = ClassifierFreeGuidance(m.network, args.guidance or 3.0, null=enc.encode([""]))
        from .editing import seed_noise

        x = _sample_from(m, model, seed_noise(seeds[0], m.data_shape).expand(args.n, *m.data_shape), args, kwargs)
        return _strip([m.decode(x)], out / "interpolate_prompts.png", args.n)
    model, kwargs, _ = guided_model(m, args.n, guidance_request(args), args.sampler)
    x = interpolate_seeds(model, seeds[0], seeds[1], args.n, m.data_shape, m.schedule, sampler=args.sampler,
                          steps=args.steps, prediction=d.prediction, model_kwargs=kwargs)
    _strip([m.decode(x)], out / f"interpolate_seeds_{seeds[0]}_{seeds[1]}.png", args.n)


def _sample_from(m, model, x_T: torch.Tensor, args: argparse.Namespace, kwargs: dict) -> torch.Tensor:
    from .sampling import sample

    return sample(model, x_T.shape, m.schedule, sampler=args.sampler, steps=args.steps, prediction=m.config.diffusion.prediction,
                  x_T=x_T, generator=0, model_kwargs=kwargs).x


def cmd_voyage(args: argparse.Namespace) -> None:
    """Render the keyframe file as a GIF (and MP4 when imageio's ffmpeg is installed) plus a keyframe strip."""
    from .checkpoint import load_model
    from .voyage import read_keyframes, render_voyage

    keyframes = read_keyframes(args.file)
    m = load_model(args.model)
    t0 = time.time()
    frames = render_voyage(m, keyframes, frames_between=args.frames, guidance=args.guidance, sampler=args.sampler,
                           steps=args.steps)
    out = Path(args.out)
    images = [viz.make_grid(f[None], nrow=1, pad=0, upscale=args.upscale) for f in frames]
    gif = viz.save_gif(images, out / "voyage.gif", duration_ms=args.frame_ms, hold_last_ms=args.frame_ms * 4)
    viz.save_grid(frames[::args.frames], out / "keyframes.png", nrow=len(keyframes))
    viz.save_grid(frames, out / "frames.png", nrow=args.frames)
    msg = f"{len(frames)} frames in {time.time() - t0:.0f}s -> {gif}, {out / 'keyframes.png'}, {out / 'frames.png'}"
    try:
        import imageio.v2 as imageio

        imageio.mimwrite(out / "voyage.mp4", images, fps=max(1, 1000 // args.frame_ms), macro_block_size=1)
        msg += f", {out / 'voyage.mp4'}"
    except Exception:  # imageio or its ffmpeg plugin is optional
        msg += " (no MP4: pip install imageio imageio-ffmpeg)"
    print(msg)


def add_edit_commands(sub, add_guidance_args) -> None:
    from .sampling import SAMPLERS

    def common(p: argparse.ArgumentParser, sampler: str, steps: int) -> None:
        p.add_argument("checkpoint")
        p.add_argument("--n", type=int, default=8)
        p.add_argument("--sampler", default=sampler, choices=sorted(SAMPLERS))
        p.add_argument("--steps", type=int, default=steps)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--out", default="edits")
        add_guidance_args(p)

    p = sub.add_parser("img2img", help="SDEdit: noise an image to strength * T and denoise it")
    common(p, "ddim", 50)
    p.add_argument("image", help="an image file or mnist5k:INDEX")
    p.add_argument("--strength", type=float, default=0.5, help="0 = keep the image, 1 = ignore it")
    p.set_defaults(func=cmd_img2img)

    p = sub.add_parser("inpaint", help="RePaint: fill the masked part of an image")
    common(p, "ddpm", 100)
    p.add_argument("image")
    p.add_argument("--mask", default="right", help="left, right, top, bottom (the half to fill) or a PNG (white = keep)")
    p.add_argument("--resample", type=int, default=5, help="RePaint passes per step (1 = replace the known part only)")
    p.set_defaults(func=cmd_inpaint)

    p = sub.add_parser("posterior", help="noise an image to x_t once and draw several x_0 ~ p(x_0 | x_t)")
    common(p, "ddpm", 100)
    p.add_argument("image")
    p.add_argument("--t", type=int, default=500)
    p.set_defaults(func=cmd_posterior)

    p = sub.add_parser("interpolate", help="between two seeds (slerp of x_T), two images (through x_t) or two prompts")
    common(p, "ddim", 50)
    p.add_argument("--seeds", default=None, help="two seeds, e.g. 3,14")
    p.add_argument("--images", default=None, help="two images, e.g. mnist5k:0,mnist5k:1 (DDPM Fig. 8)")
    p.add_argument("--t", type=int, default=500, help="noise level for --images")
    p.add_argument("--prompts", nargs=2, default=None, help="two prompts (text models), from the first seed")
    p.set_defaults(func=cmd_interpolate)

    p = sub.add_parser("voyage", help="render (seed, prompt) keyframes as an animation (GIF, MP4)")
    p.add_argument("file", help="keyframes: the lecture's seed_and_prompt_sequence list, or 'SEED PROMPT' lines")
    p.add_argument("--model", required=True, help="a text-conditional checkpoint")
    p.add_argument("--frames", type=int, default=8, help="frames from one keyframe to the next")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--frame-ms", type=int, default=120)
    p.add_argument("--upscale", type=int, default=4)
    p.add_argument("--out", default="voyage")
    p.set_defaults(func=cmd_voyage)
