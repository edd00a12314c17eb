"""`ddpmkit sample`, `eval` and `tune-grid`: parse, call the library, print."""
from __future__ import annotations

import argparse
import json
import time

import torch

from ..checkpoint import atomic_write_text
from ..data import DataError, dataset_for
from ..devices import resolve_device
from ..evaluate.report import check_feature_weights, evaluate_checkpoint, format_report, parse_metrics
from ..models import SAMPLING_COMPILE_MODES, load_diffusion
from ..pipelines.generate import generate, save_generated
from ..pipelines.guided import guided_model
from ..precision import CHOICES as PRECISIONS
from ..sampling import SAMPLERS, STOCHASTIC
from ..sampling.optimize import optimize_grid
from ..train.judge import ensure_judge
from .cascade import run_cascade
from .common import (
    NO_GIF_HELP,
    RUN_HELP,
    DefaultSteps,
    add_device_args,
    add_device_option,
    add_guidance_args,
    add_sampler_args,
    guidance_request,
    load_model,
    options_from,
    out_help,
    own_sampler,
)


def cmd_sample(args: argparse.Namespace) -> None:
    if args.then:
        return run_cascade(args)
    request = guidance_request(args)  # first: a bad scale fails before the model loads
    m = load_model(args)
    args.sampler, args.steps = own_sampler(m, args)  # a distilled run's few-step sampler by default
    if args.compile:
        m.compile(None if args.compile == "default" else args.compile)
    options = options_from(args)  # before args.steps is read: a grid file sets them
    total = args.steps or m.schedule.T
    t0 = time.time()
    gen = generate(m, args.n, request, args.sampler, args.steps, args.seed, options, args.batch_size,
                   record_every=0 if args.no_gif else max(1, total // 50), device=args.device, precision=args.precision)
    elapsed = time.time() - t0
    out = save_generated(gen, args.out, args.seed, gif=not args.no_gif, reference=training_points(m))
    what = f" ({request.describe()})" if request.describe() else ""
    print(f"{args.n} samples from {m.path} (step {m.step}){what} with {args.sampler} in {elapsed:.1f}s, "
          f"{gen.nfe} network evaluations -> {out}")
    if len(m.data_shape) == 1 and m.data_shape[0] != 2:  # no picture of them: say what they are and what uses them
        use = m.model_kind.next_step.format(run=args.checkpoint)
        print(f"they are {m.data_shape[0]}-D vectors, in {out / 'samples.pt'} (torch.load)" + (f"; {use}" if use else ""))


def training_points(m) -> torch.Tensor | None:
    """Up to 5,000 of the 2-D points a toy run trained on, to draw its samples over (as the trainer's previews are); None
    for other runs, or where the data cannot be read from here (an .npz moved since: the samples are drawn alone)."""
    if m.data_shape != (2,):
        return None
    try:
        data = dataset_for(m.config.data, "train")
    except (DataError, OSError):
        return None
    return data.get_batch(torch.arange(min(len(data), 5000)))


def cmd_eval(args: argparse.Namespace) -> None:
    metrics, request = parse_metrics(args.metrics), guidance_request(args)
    check_feature_weights(metrics, args.features, args.inception)  # before the model loads
    m = load_diffusion(args.checkpoint, device=resolve_device(args.device))
    args.sampler, args.steps = own_sampler(m, args)  # a distilled run is measured in its own few steps
    options = options_from(args)  # before args.steps is read: a grid file sets them
    report = evaluate_checkpoint(m, metrics, sampler=args.sampler, steps=args.steps, n=args.n, n_bpd=args.n_bpd, seed=args.seed,
                                 features=args.features, sampler_options=options, inception_path=args.inception, out=args.out,
                                 request=request, reference=args.reference,
                                 prepare_judge=ensure_judge)  # evaluation reads the cached judge; this trains it on first use
    print(format_report(report))
    print(f"report: {args.out}")


def cmd_tune_grid(args: argparse.Namespace) -> None:
    """Optimise a step grid for a checkpoint and a sampler, and write it as JSON for --grid."""
    m = load_model(args)
    options = {"order": args.order} if args.order is not None else {}
    model, kwargs, extra = guided_model(m, args.n, guidance_request(args), args.sampler, args.device)  # the grid of the guided ODE
    t0 = time.time()
    grid = optimize_grid(model, (args.n, *m.data_shape), sampler=args.sampler, steps=args.steps, seed=args.seed, max_evals=args.evals,
                         progress=True, model_kwargs=kwargs, reference_tol=args.reference_tol, **options, **extra)
    out = atomic_write_text(args.out, json.dumps({"sampler": args.sampler, "steps": args.steps, "options": options, "checkpoint": str(m.path),
                                                  "timesteps": [round(t, 6) for t in grid.tolist()]}, indent=1))
    print(f"{args.steps}-step grid for {args.sampler} in {time.time() - t0:.0f}s: {[round(t, 1) for t in grid.tolist()]} -> {out}")
    print(f"use it with: ddpmkit sample {args.checkpoint} --sampler {args.sampler} --grid {out}"
          + (f" --steps {args.steps}" if args.steps else ""))


def add_commands(sub) -> None:
    s = sub.add_parser("sample", help="draw samples from a run (grid, PNGs, reverse-process GIF)")
    s.add_argument("checkpoint", help=RUN_HELP)
    s.add_argument("--n", type=int, default=64, help="samples (default: %(default)s)")
    add_sampler_args(s, sampler=None)  # None: the run's own (ddim_uniform / consistency for distilled runs), else ddpm
    s.add_argument("--batch-size", type=int, default=None,
                   help="samples drawn at once (default: cache-sized chunks, 128 28x28 digits on a CPU; results do not depend on it)")
    s.add_argument("--no-gif", action="store_true", help=NO_GIF_HELP)
    s.add_argument("--compile", nargs="?", const="default", default=None, choices=SAMPLING_COMPILE_MODES,
                   help="torch.compile the network first (each stage's with --then; about a minute on a CPU; pays off for long runs); "
                        "reduce-overhead also captures CUDA graphs on a GPU; cuda-graph captures them without compiling (a GPU only, seconds)")
    s.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="the network's arithmetic (bf16/fp16 autocast; each stage's with --then; the sampler's stays float32); auto = bf16 where the "
                        "device computes it natively (GPUs with bf16, CPUs with AVX-512 BF16 / AMX)")
    add_device_args(s)
    s.add_argument("--out", default="samples", help=out_help())
    s.add_argument("--then", action="append", default=[], metavar="STAGE",
                   help="a super-resolution stage after the model (repeat for more): RUN[,sampler=..,steps=..,guidance=..,aug=..,"
                        "threshold=..]; the prompts or classes go to every conditional stage")
    add_guidance_args(s)
    s.set_defaults(func=cmd_sample)

    e = sub.add_parser("eval", help="bits/dim on held-out data and FD/KID/IS of samples, as a table and JSON")
    e.add_argument("checkpoint", help=RUN_HELP)
    e.add_argument("--metrics", default=None,
                   help="comma-separated: bpd (= bpd_vlb,bpd_ode), fd, kid, is, copies (the share of samples that copy a training image); "
                        "default: all that apply (no bpd for latent models, only bpd for 2-D points)")
    e.add_argument("--features", default="classifier", choices=["classifier", "inception"],
                   help="feature network for fd/kid/is: the judge (a digit classifier kept in $DDPMKIT_CACHE; offline, "
                        "not comparable with papers) or the FID Inception")
    e.add_argument("--inception", default=None, help="path of pt_inception-2015-12-05-6726825d.pth (else $DDPMKIT_INCEPTION / torch hub cache)")
    e.add_argument("--n", type=int, default=None, help="samples for fd/kid/is/copies (default: 1000)")
    e.add_argument("--reference", default=None, help="a folder of real images to compare with (default: the run's held-out data; "
                                                     "needed for diffusers pipeline folders)")
    e.add_argument("--n-bpd", type=int, default=None, help="held-out examples for bits/dim (default: 100)")
    add_sampler_args(e, sampler=None)  # None: the run's own (a distilled run's few-step sampler), else ddpm
    e.add_argument("--out", default="eval_report.json", help=out_help("the JSON report"))
    add_guidance_args(e)
    add_device_option(e)
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("tune-grid", help="optimise a few-step grid for a run and sampler (use with sample --grid)")
    g.add_argument("checkpoint", help=RUN_HELP)
    g.add_argument("--sampler", default="unipc", choices=sorted(set(SAMPLERS) - {"dopri5"} - STOCHASTIC),
                   help="the ODE solver the grid is for (default: %(default)s)")
    g.add_argument("--steps", type=int, default=DefaultSteps(10), help="grid points, one network evaluation each (default: %(default)s)")
    g.add_argument("--order", type=int, default=None, help="order of unipc / ipndm / dpmpp solvers")
    g.add_argument("--n", type=int, default=16, help="training trajectories")
    g.add_argument("--evals", type=int, default=300, help="sampler runs the search may spend")
    g.add_argument("--seed", type=int, default=1000, help="seed of the training trajectories")
    g.add_argument("--reference-tol", type=float, default=1e-5, help="rtol = atol of the dopri5 reference solution")
    g.add_argument("--out", default="grid.json", help=out_help("the grid's JSON file, for sample --grid"))
    add_guidance_args(g)
    add_device_args(g)
    g.set_defaults(func=cmd_tune_grid)
