"""Arguments several commands share, and turning them into library requests."""
from __future__ import annotations

import argparse
import errno
import os
import re
from pathlib import Path

import torch

from ..checkpoint import inside_a_run
from ..devices import resolve_device
from ..errors import UserError
from ..models import DiffusionModel, load_diffusion
from ..pipelines.cascade import CascadeError, Stage
from ..pipelines.guided import DEFAULT_SCALE, GuidanceRequest
from ..sampling import GRIDS, SAMPLERS
from ..sampling.options import sampler_options


def add_guidance_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--class", dest="class_", default=None,
                   help="class label(s) for conditional models or classifier guidance, e.g. 7 or 0,1,2 (cycled; default: every class in "
                        "turn); an image folder's classes are its subfolders, by name (--class cat,dog) or numbered in sorted order")
    p.add_argument("--prompt", action="append", default=None, help="prompt for a text-conditional model (repeat for several, cycled)")
    p.add_argument("--guidance", type=float, default=None,
                   help=f"classifier-free guidance scale s (0 = unconditional, 1 = conditional; default {DEFAULT_SCALE:g}, or 0 with --classifier)")
    p.add_argument("--guidance-rescale", type=float, default=0.0,
                   help="guidance rescale phi in [0, 1] (Lin et al.) of classifier-free guidance (0 = off, the default)")
    p.add_argument("--dynamic-threshold", type=float, default=0.0, help="Imagen's dynamic thresholding percentile, e.g. 0.995 (0 = off)")
    p.add_argument("--classifier", default=None, help="a noisy-classifier run (ddpmkit train mnist_classifier): classifier guidance")
    p.add_argument("--classifier-scale", type=float, default=None, help="classifier guidance scale s (default 1)")
    p.add_argument("--clip", default=None, help="a noisy-CLIP run (ddpmkit train clip_noisy): CLIP guidance toward --prompt")
    p.add_argument("--clip-scale", type=float, default=None, help="CLIP guidance scale s (default 100: the score is a cosine)")
    p.add_argument("--autoguide", default=None, metavar="WEAKER",
                   help="autoguidance (Karras et al. 2024) by a weaker model of the same kind, e.g. an early checkpoint RUN/ckpt-0000300")
    p.add_argument("--autoguide-scale", type=float, default=None, help="autoguidance weight w: bad + w (good - bad); 1 = off (default 2)")


def add_device_option(p: argparse.ArgumentParser) -> None:
    """--device, for every command that runs a network: where training would run unless the user says."""
    p.add_argument("--device", default="auto",
                   help="where the network runs: auto (default: CUDA, then MPS, then the CPU, as training), cpu, cuda, cuda:1, mps")


def add_device_args(p: argparse.ArgumentParser) -> None:
    add_device_option(p)
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16", "float32", "bfloat16", "float16"],
                   help="weights of a diffusers pipeline folder (default float32); schedule arithmetic stays float64/float32")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="merge a LoRA into the model at a scale (default 1; repeat for several): a diffusers LoRA file or folder "
                        "on a Stable Diffusion folder, a ddpmkit LoRA run (train.lora_rank) on the run it fine-tuned")


RUN_HELP = "a run folder (its newest checkpoint), a ckpt-XXXXXXX folder, or a diffusers pipeline folder"
IMAGE_HELP = "an image file, or a built-in example such as mnist5k:7"
NO_GIF_HELP = "no reverse-process GIFs (of the first 64 samples, a frame every 1/50 of the steps)"
SAMPLER_HELP = "ddpm = Algorithm 2; see the README"


def out_help(what: str = "output folder") -> str:
    """--out's help: what it names, and its default."""
    return f"{what} (default: %(default)s)"


# every count a command takes: whole numbers >= 1 (argparse checks that they are whole)
COUNTS = ("n", "steps", "batch_size", "n_bpd", "evals", "order", "resample", "frames", "frame_ms", "upscale", "best_of", "prior_steps",
          "size", "T", "concurrency", "max_steps", "max_images")
# the counts whose memory grows with their square (or their length) past what the picture can show: one line, not an OOM kill
CEILINGS = {"size": (1024, "the strip shows each image at 192 pixels; larger only slows the spectrum"),
            "upscale": (32, "each pixel becomes upscale x upscale pixels of every frame"),
            "T": (100_000, "the schedule's steps; DDPM used 1000")}


def check_counts(args: argparse.Namespace) -> None:
    """The counts the user gave (COUNTS) are >= 1 and within their CEILINGS, else one line naming the flag and its value; `main` checks them
    before any command runs, so a mistyped count fails before a model loads. (The run's own steps are spelled by
    leaving --steps out, never by 0.)"""
    for flag in COUNTS:
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            hint = {"steps": " (leave --steps out for the run's own: all T steps for Algorithm 2, or a distilled run's few)",
                    "batch_size": " (leave --batch-size out for chunks sized to the device)"}.get(flag, "")
            raise UserError(f"--{flag.replace('_', '-')} {value}: give a whole number >= 1{hint}")
        ceiling, why = CEILINGS.get(flag, (None, ""))
        if ceiling is not None and value is not None and value > ceiling:
            raise UserError(f"--{flag.replace('_', '-')} {value}: at most {ceiling} ({why})")
    if isinstance(getattr(args, "seed", None), int):
        check_seed(args.seed, "--seed")


def check_seed(seed: int, flag: str) -> int:
    """A seed a generator takes (64 bits; past them torch's "Overflow when unpacking long long"), else one line."""
    if not -(2**63) <= seed < 2**63:
        raise UserError(f"{flag} {seed}: give a whole number in -2**63 .. 2**63-1")
    return seed


# the commands that train: a batch too large for the device is train.batch_size there, --batch-size elsewhere
TRAINING_COMMANDS = ("train", "train-autoencoder", "train-classifier", "train-clip", "demo")


def no_memory(e: RuntimeError, command: str) -> str:
    """One line for a device that had no memory for a tensor (devices.out_of_memory(e)): its size where torch names
    it, and what to make smaller."""
    size = re.search(r"[Tt]ried to allocate ([0-9.]+ [KMGT]iB|[0-9]+ bytes)", str(e))
    what = size and size.group(1)
    if what and what.endswith("bytes"):
        what = f"{int(what.split()[0]) / 2**30:.1f} GiB"
    fix = "train.batch_size=N (a smaller batch), or a smaller network" if command in TRAINING_COMMANDS else \
        "a smaller --batch-size (or leave it out: generation then sizes its chunks to the device, halving them where they do not fit)"
    return f"the device had no memory{f' for a tensor of {what}' if what else ''}; give {fix}"


# the commands whose --out names a file (a JSON report or grid), with their default; every other --out names a folder
OUT_FILES = {"eval": "eval_report.json", "tune-grid": "grid.json"}


def check_out(args: argparse.Namespace) -> None:
    """--out can be written, checked before any work (samples computed for minutes, then lost to a path that cannot
    take them): a folder's path is not a file, a file's is not a folder, and the nearest folder that exists above it can
    be written to. Nothing is created here."""
    out = getattr(args, "out", None)
    if out is None:
        return
    path, is_file = Path(out), args.command in OUT_FILES
    if path.exists() and path.is_dir() == is_file:
        raise UserError(f"--out {out} is a {'folder' if is_file else 'file'}; give a {'file' if is_file else 'folder'} path "
                        f"({'e.g. ' + OUT_FILES[args.command] if is_file else 'a new name makes one'})")
    above = path.parent if is_file else path
    while not above.exists():
        above = above.parent
    if not above.is_dir() or not os.access(above, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: cannot write under {above} ({'a file' if not above.is_dir() else 'permission denied'})")
    if why := inside_a_run(path):  # the report or the samples would replace or sit among a run's own files
        raise UserError(f"--out {out} {why}")


def path_error(e: OSError) -> str:
    """One line for a path the machine refused: which path, and why in words a user can act on."""
    why = {errno.EEXIST: "a file is in the way of a folder of that name", errno.ENOTDIR: "a file is in the way of a folder on that path",
           errno.ENOSPC: "no space left on the device", errno.EACCES: "permission denied", errno.EROFS: "a read-only file system"}
    return f"{e.filename}: {why.get(e.errno, e.strerror)}"


class DefaultSteps(int):
    """A command's own --steps, which the user did not give: a grid file's count takes its place (options_from), and a
    model of fewer timesteps than the default its T (load_model)."""


def capped(steps: int | None, T: int) -> int | None:
    """A command's own default steps, T at most (a model of fewer timesteps); steps the user gave are left to be checked."""
    return DefaultSteps(T) if isinstance(steps, DefaultSteps) and steps > T else steps


def own_sampler(m: DiffusionModel, args: argparse.Namespace) -> tuple[str, int | None]:
    """--sampler and --steps, or where the user gave none the run's own (a distilled run's few-step sampler); its own
    steps are a default, which a grid file's count replaces (options_from)."""
    sampler, steps = m.sampler_or_own(args.sampler, args.steps)
    return sampler, DefaultSteps(steps) if args.steps is None and steps is not None else steps


def load_model(args: argparse.Namespace):
    """The model a command samples (args.checkpoint, or args.model), with its device, dtype and LoRAs."""
    path = getattr(args, "checkpoint", None) or args.model
    args.device = resolve_device(args.device)  # "auto": where training would run; the rest of the command follows the model
    m = load_diffusion(path, device=args.device, dtype=args.dtype, loras=args.lora)
    if hasattr(args, "steps"):
        args.steps = capped(args.steps, m.schedule.T)
    return m


def add_sampler_args(p: argparse.ArgumentParser, sampler: str | None = "ddpm", steps: int | None = None, full: bool = True,
                     sampler_help: str = SAMPLER_HELP) -> None:
    """--sampler/--steps/--seed, and with full=True the solver options too; sampler_help="" leaves --sampler out (a
    command whose sampler is its definition's)."""
    if sampler_help:
        p.add_argument("--sampler", default=sampler, choices=sorted(SAMPLERS), help=sampler_help)
    p.add_argument("--steps", type=int, default=None if steps is None else DefaultSteps(steps),
                   help=f"grid points, one network evaluation each (default: {'all T' if steps is None else steps}; a --grid file's own count)")
    p.add_argument("--seed", type=int, default=0, help="sample k uses seed + k")
    if full:
        add_solver_args(p)


def add_solver_args(p: argparse.ArgumentParser, grid_files: bool = True) -> None:
    """The sampler's own options (--grid, --eta, --churn, --order, --variance, --no-clip), which options_from reads;
    grid_files=False where the trajectory starts partway (img2img), so a tuned full grid cannot apply."""
    p.add_argument("--grid", default=None, help=f"step grid: {', '.join(GRIDS)}{', or a JSON file from tune-grid' if grid_files else ''}")
    p.add_argument("--eta", type=float, default=None, help="noise of ddim, euler_ancestral and the *_sde samplers (0 = ODE)")
    p.add_argument("--churn", type=float, default=None,
                   help="EDM's S_churn for the edm sampler: noise added and removed each step (default 40, EDM's ImageNet setting; 0 = heun)")
    p.add_argument("--order", type=int, default=None, help="order of unipc / ipndm / dpmpp solvers")
    p.add_argument("--variance", default="auto", choices=["auto", "beta_tilde", "beta", "learned"], help="sigma_t^2 of Algorithm 2")
    p.add_argument("--no-clip", action="store_true", help="do not clip predicted x_0 to [-1, 1]")


def options_from(args: argparse.Namespace) -> dict:
    """The sampler options the command line asked for; a grid file fixes the steps: it sets args.steps where the user
    gave none (None, all T, or a command's own default), and refuses a --steps of another count. Call it before
    reading args.steps."""
    options = sampler_options(args.sampler, getattr(args, "grid", None), getattr(args, "variance", "auto"),
                              not getattr(args, "no_clip", False), getattr(args, "eta", None), getattr(args, "order", None),
                              getattr(args, "churn", None))
    points, steps = len(options["grid"]) if isinstance(options.get("grid"), torch.Tensor) else None, getattr(args, "steps", None)
    if points is not None and (steps is None or isinstance(steps, DefaultSteps)):  # the user gave no count: the grid's
        args.steps = points
    elif points is not None and steps != points:
        raise UserError(f"--grid {args.grid} holds {points} steps, --steps says {args.steps}: leave --steps out (the grid sets them)")
    return options


def guidance_request(args: argparse.Namespace) -> GuidanceRequest:
    """--class/--prompt/--guidance/... as a GuidanceRequest."""
    classes = args.class_.split(",") if args.class_ else []  # numbers or names: read against the model (guided.class_numbers)
    scales = {}  # a guide's weight without the guide was taken and ignored
    for guide, weight in (("classifier", "classifier_scale"), ("clip", "clip_scale"), ("autoguide", "autoguide_scale")):
        if getattr(args, weight) is not None:
            if getattr(args, guide) is None:
                raise UserError(f"--{weight.replace('_', '-')} weighs --{guide} guidance: give --{guide} RUN too, or leave it out")
            scales[weight] = getattr(args, weight)
    return GuidanceRequest(classes=classes, prompts=args.prompt or [], scale=args.guidance, rescale=args.guidance_rescale,
                           threshold=args.dynamic_threshold, classifier=args.classifier, clip=args.clip, autoguide=args.autoguide, **scales)


# what a stage spec may set: "runs/imagen_sr,sampler=unipc,steps=20,aug=0.2"
STAGE_KEYS = {"sampler": str, "steps": int, "guidance": float, "aug": float, "threshold": float, "grid": str, "eta": float,
              "order": int, "variance": str, "churn": float}


def parse_stage(spec: str, device: str | torch.device | None = None) -> Stage:
    """A stage from 'RUN[,key=value,...]' (keys: sampler, steps, guidance, aug, threshold, grid,
    eta, order, variance, churn), loading the run."""
    run, *pairs = [p.strip() for p in spec.split(",")]
    values: dict = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or key not in STAGE_KEYS:
            raise CascadeError(f"stage option {pair!r} must be key=value with key one of {sorted(STAGE_KEYS)} "
                               "(e.g. runs/imagen_sr,sampler=ddpm,steps=100,aug=0.1)")
        try:
            values[key] = STAGE_KEYS[key](raw)
        except ValueError:
            raise CascadeError(f"stage option {key}={raw!r} must be a {STAGE_KEYS[key].__name__}") from None
    sampler = values.get("sampler", "ddpm")
    if sampler not in SAMPLERS:
        raise CascadeError(f"unknown sampler {sampler!r} in stage {spec!r}; choose one of {sorted(SAMPLERS)}")
    options = sampler_options(sampler, values.get("grid"), values.get("variance", "auto"), eta=values.get("eta"), order=values.get("order"),
                              churn=values.get("churn"))
    return Stage(load_diffusion(run, device=device), sampler, values.get("steps"), values.get("guidance"), values.get("threshold", 0.0),
                 values.get("aug"), options)
