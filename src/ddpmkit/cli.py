"""The command line: `ddpmkit train | train-classifier | train-autoencoder | sample | eval | tune-grid | forward | demo`,
and the editing commands of cli_edit (img2img, inpaint, posterior, interpolate, voyage)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from .checkpoint import CheckpointError
from .config import ConfigError
from .data import DataError
from .train import TrainingError

USER_ERRORS = (ConfigError, DataError, CheckpointError, TrainingError, ValueError, FileNotFoundError)


def cmd_train(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from .config import load_config
    from .train import train

    cfg = load_config(args.config, args.overrides)
    run_dir = train(cfg, resume=args.resume, progress=not args.quiet)
    print(f"run folder: {run_dir}")
    if dist.is_available() and dist.is_initialized():
        # shut the process group down before exiting: a process that exits with gloo's threads
        # still running can abort ("terminate called without an active exception")
        dist.barrier()
        dist.destroy_process_group()


def sample_to_files(ckpt: str, out: Path, n: int, steps: int | None, seed: int, sampler: str = "ddpm",
                    options: dict | None = None, gif: bool = True, gif_frames: int = 50,
                    request: "GuidanceRequest | None" = None) -> Path:
    """Sample a checkpoint and write grid.png, samples/*.png and (images) reverse_process.gif.

    options: sampler options; variance='auto' means the model's own (learned or beta-tilde).
    request: classes, prompts and guidance for conditional models (pipeline.GuidanceRequest)."""
    from . import viz
    from .checkpoint import load_model
    from .pipeline import guided_model
    from .reverse import default_variance
    from .sampling import sample

    m = load_model(ckpt)
    d = m.config.diffusion
    model, model_kwargs, guidance_options = guided_model(m, n, request, sampler)
    options = {**dict(options or {}), **guidance_options}
    if options.get("variance") == "auto":
        options["variance"] = default_variance(d.learned_variance)
    total = steps or m.schedule.T
    record = max(1, total // gif_frames) if gif else 0
    t0 = time.time()
    res = sample(model, (n, *m.data_shape), m.schedule, sampler=sampler, steps=steps, prediction=d.prediction,
                 learned_variance=d.learned_variance, generator=seed, record_every=record, progress=True,
                 model_kwargs=model_kwargs, **options)
    x = m.decode(res.x)  # latent diffusion decodes; pixel models return x as is
    elapsed = time.time() - t0
    out.mkdir(parents=True, exist_ok=True)
    if x.ndim == 4:
        viz.save_grid(x, out / "grid.png")
        (out / "samples").mkdir(exist_ok=True)
        for i, image in enumerate(viz.to_uint8(x)):
            viz.save_png(image, out / "samples" / f"{seed + i:06d}.png")  # named by its seed
        if gif:
            viz.reverse_process_gif([m.decode(f) for f in res.xs], out / "reverse_process.gif")
            viz.reverse_process_gif([m.decode(f) for f in res.x0s], out / "predicted_x0.gif")
    else:
        viz.scatter_2d(x, out / "scatter.png", title=f"{n} samples, {res.nfe} NFE")
    torch.save(x, out / "samples.pt")
    what = f" ({request.describe()})" if request is not None and request.describe() else ""
    print(f"{n} samples from {m.path} (step {m.step}){what} with {sampler} in {elapsed:.1f}s, {res.nfe} network evaluations -> {out}")
    return out


def read_grid(spec: str | None):
    """--grid: a grid name, or a JSON file {"timesteps": [...]} written by `ddpmkit tune-grid`."""
    if spec is None or not spec.endswith(".json"):
        return spec
    import json

    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"grid file not found: {path}")
    try:
        return torch.tensor(json.loads(path.read_text())["timesteps"], dtype=torch.float64)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a grid file with a 'timesteps' list: {e}") from None


def sampler_options(args: argparse.Namespace) -> dict:
    """The options the chosen sampler takes, from the command line."""
    options: dict = {}
    grid = read_grid(args.grid)
    if grid is not None:
        options["grid"] = grid
    if args.sampler == "ddpm":
        options["variance"] = args.variance
    if args.sampler not in ("euler_maruyama", "pc", "dopri5"):
        options["clip_x0"] = not args.no_clip
    if args.eta is not None:
        options["eta"] = args.eta
    if args.order is not None:
        options["order"] = args.order
    return options


def guidance_request(args: argparse.Namespace):
    """--class/--prompt/--guidance/... as a GuidanceRequest."""
    from .pipeline import GuidanceRequest

    try:
        classes = [int(c) for c in args.class_.split(",")] if args.class_ else []
    except ValueError:
        raise ValueError(f"--class takes class numbers, e.g. 7 or 0,1,2; got {args.class_!r}") from None
    return GuidanceRequest(classes=classes, prompts=args.prompt or [], scale=args.guidance, rescale=args.guidance_rescale,
                           threshold=args.dynamic_threshold, classifier=args.classifier, classifier_scale=args.classifier_scale)


def cmd_sample(args: argparse.Namespace) -> None:
    sample_to_files(args.checkpoint, Path(args.out), args.n, args.steps, args.seed, args.sampler, sampler_options(args),
                    not args.no_gif, request=guidance_request(args))


def cmd_train_autoencoder(args: argparse.Namespace) -> None:
    from .autoencoder import train_autoencoder
    from .config import load_config

    out = train_autoencoder(load_config(args.config, args.overrides), progress=not args.quiet)
    print(f"autoencoder: {out}  (latent diffusion: ddpmkit train configs/mnist_latent.toml data.autoencoder={out})")


def cmd_train_classifier(args: argparse.Namespace) -> None:
    from .config import load_config
    from .noisy_classifier import train_noisy_classifier

    cfg = load_config(args.config, args.overrides)
    out = train_noisy_classifier(cfg, progress=not args.quiet)
    print(f"noisy classifier: {out}  (use it with: ddpmkit sample MODEL --classifier {out} --class 3 --classifier-scale 2)")


def cmd_eval(args: argparse.Namespace) -> None:
    from .evaluate.report import evaluate_checkpoint, format_report, parse_metrics

    report = evaluate_checkpoint(args.checkpoint, parse_metrics(args.metrics), sampler=args.sampler, steps=args.steps,
                                 n=args.n, n_bpd=args.n_bpd, seed=args.seed, features=args.features,
                                 sampler_options=sampler_options(args), inception_path=args.inception, out=args.out,
                                 request=guidance_request(args))
    print(format_report(report))
    print(f"report: {args.out}")


def cmd_tune_grid(args: argparse.Namespace) -> None:
    """Optimise a step grid for a checkpoint and a sampler, and write it as JSON for --grid."""
    import json

    from .checkpoint import load_model
    from .sampling.optimize import optimize_grid

    m = load_model(args.checkpoint)
    d = m.config.diffusion
    options = {"order": args.order} if args.order is not None else {}
    t0 = time.time()
    grid = optimize_grid(m.network, (args.n, *m.data_shape), m.schedule, sampler=args.sampler, steps=args.steps,
                         prediction=d.prediction, seed=args.seed, max_evals=args.evals, progress=True,
                         reference_tol=args.reference_tol, **options)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"sampler": args.sampler, "steps": args.steps, "options": options,
                               "checkpoint": str(m.path), "timesteps": [round(t, 6) for t in grid.tolist()]}, indent=1))
    tmp.replace(out)
    print(f"{args.steps}-step grid for {args.sampler} in {time.time() - t0:.0f}s: {[round(t, 1) for t in grid.tolist()]} -> {out}")
    print(f"use it with: ddpmkit sample {args.checkpoint} --sampler {args.sampler} --grid {out}")


def load_image(spec: str, size: int | None) -> torch.Tensor:
    """An image file, or 'mnist5k:INDEX' / 'digits:INDEX' from the built-in data: (1, C, H, W) in [-1, 1]."""
    from PIL import Image

    from .data import load_dataset, load_image_file

    if ":" in spec and not Path(spec).exists():
        name, idx = spec.split(":", 1)
        ds = load_dataset(name, split="all")
        return ds.get_batch(torch.tensor([int(idx)]))
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"image not found: {path} (or use a built-in one such as mnist5k:0)")
    try:
        with Image.open(path) as im:
            grey, side = im.mode in ("L", "1", "I;16"), min(im.size)
    except Exception as e:
        raise DataError(f"cannot read image {path}: {type(e).__name__}: {e}") from None
    return load_image_file(path, size or min(side, 256), 1 if grey else 3)[None]


def cmd_forward(args: argparse.Namespace) -> None:
    """The forward process of one image at chosen t, and the power spectrum of x_t against t."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import viz
    from .process import q_sample
    from .schedules import NoiseSchedule

    x0 = load_image(args.image, args.size)
    schedule = NoiseSchedule.from_name(args.schedule, args.T)
    ts = [int(t) for t in args.t.split(",")]
    bad = [t for t in ts if not 0 <= t < schedule.T]
    if bad:
        raise ValueError(f"timesteps {bad} outside [0, {schedule.T - 1}]")
    g = torch.Generator().manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    eps = torch.randn((1, *x0.shape[1:]), generator=g)
    fig, axes = plt.subplots(1, len(ts) + 1, figsize=(1.6 * (len(ts) + 1), 1.9), dpi=120)
    frames = [("x_0", x0)] + [(f"t={t}", q_sample(x0, torch.tensor([t]), schedule, eps)) for t in ts]
    for ax, (label, x) in zip(axes, frames):
        img = viz.to_uint8(x)[0]
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255)
        ax.set_title(label, fontsize=8)
        ax.axis("off")
    fig.suptitle(f"q(x_t | x_0), {args.schedule} schedule, T={schedule.T}", fontsize=9)
    fig.savefig(out / "forward_strip.png", bbox_inches="tight")
    plt.close(fig)
    # spectra averaged over several noise draws so the curves are smooth
    many = torch.randn((16, *x0.shape[1:]), generator=g)
    spectra = {"x_0": viz.radial_power_spectrum(x0)}
    for t in ts:
        spectra[f"t={t}"] = viz.radial_power_spectrum(q_sample(x0.expand_as(many), torch.full((16,), t), schedule, many))
    viz.plot_spectra(spectra, out / "spectrum.png", "radially averaged power spectrum of x_t")
    print(f"wrote {out / 'forward_strip.png'} and {out / 'spectrum.png'}")


def cmd_demo(args: argparse.Namespace) -> None:
    """Train the digit model within a time budget, then draw 1,000-step ancestral samples."""
    from .config import PRESET_DIR, load_config
    from .train import train

    overrides = [f"train.run_dir={args.run_dir}", f"train.max_minutes={args.minutes}"]
    cfg = load_config(PRESET_DIR / "mnist.toml", overrides)
    print(f"[demo] training a {cfg.network.kind} on {cfg.data.name} for up to {args.minutes} minutes -> {args.run_dir}")
    train(cfg, resume=False)
    out = Path(args.run_dir) / "demo_samples"
    print(f"[demo] sampling {args.n} digits with 1,000-step ancestral sampling (Algorithm 2)")
    sample_to_files(args.run_dir, out, args.n, None, 0, "ddpm", {"variance": "auto", "clip_x0": True})
    print(f"[demo] look at {out / 'grid.png'} and {out / 'reverse_process.gif'}")


def add_guidance_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--class", dest="class_", default=None, help="class label(s) for conditional models or classifier guidance, e.g. 7 or 0,1,2 (cycled)")
    p.add_argument("--prompt", action="append", default=None, help="prompt for a text-conditional model (repeat for several, cycled)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale s (0 = unconditional, 1 = conditional; default 3, or 0 with --classifier)")
    p.add_argument("--guidance-rescale", type=float, default=0.0, help="guidance rescale phi in [0, 1] (Lin et al.)")
    p.add_argument("--dynamic-threshold", type=float, default=0.0, help="Imagen's dynamic thresholding percentile, e.g. 0.995 (0 = off)")
    p.add_argument("--classifier", default=None, help="a noisy classifier from train-classifier: classifier guidance")
    p.add_argument("--classifier-scale", type=float, default=1.0, help="classifier guidance scale s")


def build_parser() -> argparse.ArgumentParser:
    from .sampling import GRIDS, SAMPLERS

    p = argparse.ArgumentParser(prog="ddpmkit", description="Denoising diffusion models: train, sample, look.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model from a config file (presets in configs/)")
    t.add_argument("config", help="a TOML config, e.g. configs/mnist.toml")
    t.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.lr=1e-3")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in train.run_dir")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", help="draw samples from a checkpoint (grid, PNGs, reverse-process GIF)")
    s.add_argument("checkpoint", help="a ckpt-XXXXXXX folder or a run folder (newest checkpoint)")
    s.add_argument("--n", type=int, default=64)
    s.add_argument("--steps", type=int, default=None, help="grid points, one network evaluation each (default: all T)")
    s.add_argument("--sampler", default="ddpm", choices=sorted(SAMPLERS), help="ddpm = Algorithm 2; see the README")
    s.add_argument("--grid", default=None, help=f"step grid: {', '.join(GRIDS)}, or a JSON file from tune-grid")
    s.add_argument("--eta", type=float, default=None, help="noise of ddim and the *_sde samplers (0 = ODE)")
    s.add_argument("--order", type=int, default=None, help="order of unipc / ipndm / dpmpp solvers")
    s.add_argument("--variance", default="auto", choices=["auto", "beta_tilde", "beta", "learned"], help="sigma_t^2 of Algorithm 2")
    s.add_argument("--seed", type=int, default=0, help="sample k uses seed + k")
    s.add_argument("--no-clip", action="store_true", help="do not clip predicted x_0 to [-1, 1]")
    s.add_argument("--no-gif", action="store_true")
    s.add_argument("--out", default="samples")
    add_guidance_args(s)
    s.set_defaults(func=cmd_sample)

    c = sub.add_parser("train-classifier", help="train the noisy classifier p(y | x_t) of classifier guidance")
    c.add_argument("config", help="a TOML config, e.g. configs/mnist_classifier.toml")
    c.add_argument("overrides", nargs="*", help="section.key=value overrides")
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(func=cmd_train_classifier)

    a = sub.add_parser("train-autoencoder", help="train the KL autoencoder of latent diffusion")
    a.add_argument("config", help="a TOML config, e.g. configs/mnist_autoencoder.toml")
    a.add_argument("overrides", nargs="*", help="section.key=value overrides")
    a.add_argument("--quiet", action="store_true")
    a.set_defaults(func=cmd_train_autoencoder)

    e = sub.add_parser("eval", help="bits/dim on held-out data and FD/KID/IS of samples, as a table and JSON")
    e.add_argument("checkpoint")
    e.add_argument("--metrics", default="bpd,fd,kid,is", help="comma-separated: bpd (= bpd_vlb,bpd_ode), fd, kid, is")
    e.add_argument("--features", default="classifier", choices=["classifier", "inception"],
                   help="feature network for fd/kid/is: the project's digit classifier (offline, not comparable with papers) or the FID Inception")
    e.add_argument("--inception", default=None, help=f"path of pt_inception-2015-12-05-6726825d.pth (else $DDPMKIT_INCEPTION / torch hub cache)")
    e.add_argument("--n", type=int, default=1000, help="samples for fd/kid/is")
    e.add_argument("--n-bpd", type=int, default=100, help="held-out examples for bits/dim")
    e.add_argument("--sampler", default="ddpm", choices=sorted(SAMPLERS))
    e.add_argument("--steps", type=int, default=None)
    e.add_argument("--grid", default=None)
    e.add_argument("--eta", type=float, default=None)
    e.add_argument("--order", type=int, default=None)
    e.add_argument("--variance", default="auto", choices=["auto", "beta_tilde", "beta", "learned"])
    e.add_argument("--no-clip", action="store_true")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--out", default="eval_report.json")
    add_guidance_args(e)
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("tune-grid", help="optimise a few-step grid for a checkpoint and sampler (use with sample --grid)")
    g.add_argument("checkpoint")
    g.add_argument("--sampler", default="unipc", choices=sorted(set(SAMPLERS) - {"dopri5"}))
    g.add_argument("--steps", type=int, default=10)
    g.add_argument("--order", type=int, default=None)
    g.add_argument("--n", type=int, default=16, help="training trajectories")
    g.add_argument("--evals", type=int, default=300, help="sampler runs the search may spend")
    g.add_argument("--seed", type=int, default=1000, help="seed of the training trajectories")
    g.add_argument("--reference-tol", type=float, default=1e-5, help="rtol = atol of the dopri5 reference solution")
    g.add_argument("--out", default="grid.json")
    g.set_defaults(func=cmd_tune_grid)

    f = sub.add_parser("forward", help="show the forward process of an image and its Fourier spectrum")
    f.add_argument("image", help="an image file, or mnist5k:INDEX")
    f.add_argument("--t", default="0,50,100,200,400,700,999", help="comma-separated timesteps")
    f.add_argument("--schedule", default="linear")
    f.add_argument("--T", type=int, default=1000)
    f.add_argument("--size", type=int, default=None, help="resize to this square size")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--out", default="forward")
    f.set_defaults(func=cmd_forward)

    from .cli_edit import add_edit_commands

    add_edit_commands(sub, add_guidance_args)

    d = sub.add_parser("demo", help="train on mnist5k for a few minutes, then sample (what `make demo` runs)")
    d.add_argument("--minutes", type=float, default=9.5, help="training time budget")
    d.add_argument("--n", type=int, default=64)
    d.add_argument("--run-dir", default="runs/demo")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except USER_ERRORS as e:
        print(f"ddpmkit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
