"""Cascaded diffusion on digits, judged: super-resolution quality, the noise-conditioning-
augmentation ablation, a cascade against a single-stage model of equal training time, and the
Imagen pipeline (prompt -> 14x14 base -> 28x28 super-resolution) with and without dynamic
thresholding.

    ddpmkit train mnist train.run_dir=runs/demo                       # the single-stage model
    ddpmkit train imagen_base                                         # 14x14 text-conditional base
    ddpmkit train imagen_sr                                           # 14 -> 28, with augmentation
    ddpmkit train imagen_sr train.run_dir=runs/imagen_sr_noaug superres.aug_max=0
    .venv/bin/python bench/cascade.py [--sections quality,ablation,compare,imagen] [--n 500]

Quality is judged by the project's digit classifier (the judge, trained on mnist5k's training
split): its accuracy against the true class, the share it reads with p >= 0.9, and the Frechet
distance in its feature space to the 500 held-out digits (judge-FD; not comparable with papers).

- quality: the 500 held-out digits, area-downsampled to 14x14, super-resolved by the stage
  (its unconditional branch: the low-res image is all it gets) and by bicubic upsampling.
  PSNR against the originals, for one sample and for the mean of --mean-of samples (the
  posterior-mean estimate, the fair comparison for a PSNR). Targets: judge accuracy >= 97%;
  PSNR and judge-FD better than bicubic.
- ablation: n unconditional samples of the base model, super-resolved by the stages trained
  with and without noise conditioning augmentation, at sampling levels 0, 0.1, 0.2, 0.3.
- compare: those cascade samples (at the stage's default level) against n samples of the
  single-stage model, with the same sampler; time per image for both.
- x0error: why the stages predict v: the error of the predicted x0 (and of its mean, the
  brightness the low-res image pins down) on held-out digits at each t, for the stages named
  by --x0-runs (e.g. one trained with diffusion.prediction = "eps", one with "v").
- imagen: n prompted digits ("a handwritten seven", ... in turn) through the cascade at several
  guidance scales; the share the judge reads as the requested digit; dynamic thresholding on and
  off at the large scales.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import ddpmkit.threads  # noqa: F401 -- before torch: OpenMP threads wait passively beside other processes

# isort: split
import torch

from ddpmkit import viz
from ddpmkit.captions import NUMBER_WORDS
from ddpmkit.data import load_dataset
from ddpmkit.evaluate.metrics import psnr
from ddpmkit.evaluate.report import DigitScorer
from ddpmkit.models import load_diffusion
from ddpmkit.parameterization import to_x0_eps
from ddpmkit.pipelines import GuidanceRequest, Stage, cascade, generate, super_resolve
from ddpmkit.process import q_sample
from ddpmkit.sampling.options import sampler_options
from ddpmkit.superres import downsample, upsample
from ddpmkit.train.judge import ensure_judge


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def row(cells: list) -> str:
    """A markdown table row: shares as Share (percent), other floats with two decimals, the rest as text."""
    return "| " + " | ".join(f"{c:.1%}" if isinstance(c, Share) else f"{c:.2f}" if isinstance(c, float) else str(c) for c in cells) + " |"


class Share(float):
    """A fraction printed as a percentage."""


def quality(args, scorer: DigitScorer, report: dict) -> None:
    sr = load_diffusion(args.sr)
    held = load_dataset("mnist5k", split="test")
    x, labels = held.x[:args.n], held.labels[:args.n]
    low = downsample(x, sr.low_res_shape[-1])
    bicubic = upsample(low, x.shape[-1], "bicubic").clamp(-1, 1)
    shown = torch.stack([torch.nonzero(labels == d)[0, 0] for d in labels.unique()])  # one of each digit in the picture
    rows = [("14x14 input", low[shown]), ("bicubic", bicubic[shown])]
    print(f"\n## Super-resolution of {len(x)} held-out digits, 14x14 -> 28x28 ({args.sr_sampler}, {args.sr_steps} steps, "
          f"unconditional branch: the low-res image is all the stage gets)\n")
    print("| method | aug level | judge accuracy | judged p >= 0.9 | PSNR (dB) | judge-FD | ms per image |\n|---|---|---|---|---|---|---|")
    s = scorer(bicubic, labels)
    s["psnr"] = psnr(bicubic, x).mean().item()
    report.setdefault("quality", []).append({"method": "bicubic", **s})
    print(row(["bicubic", "", Share(s["accuracy"]), Share(s["confident"]), s["psnr"], s["fd"], ""]))
    for level in args.quality_levels:
        draws, secs = [], 0.0
        for k in range(args.mean_of):
            out, dt = timed(super_resolve, sr, low, GuidanceRequest(scale=0.0), level, args.sr_sampler, args.sr_steps,
                            seed=k * len(low), options=sampler_options(args.sr_sampler), progress=False)
            draws.append(out.images.clamp(-1, 1))
            secs += dt
        for name, images in [("super-resolution, one sample", draws[0]), (f"super-resolution, mean of {args.mean_of}", torch.stack(draws).mean(0))]:
            s = scorer(images, labels)
            s["psnr"] = psnr(images, x).mean().item()
            report["quality"].append({"method": name, "level": level, **s})
            ms = f"{secs / args.mean_of / len(x) * 1000:.0f}"
            print(row([name, f"{level:g}", Share(s["accuracy"]), Share(s["confident"]), s["psnr"], s["fd"], ms]), flush=True)
        rows += [(f"SR, s={level:g}", draws[0][shown]), (f"mean of {args.mean_of}", torch.stack(draws).mean(0)[shown])]
    s = scorer(x, labels)
    print(row(["(the originals)", "", Share(s["accuracy"]), Share(s["confident"]), "", s["fd"], ""]))
    viz.labelled_rows(rows + [("original", x[shown])], Path(args.out) / "superres_quality.png", n=10)


def base_samples(args, report: dict) -> tuple[torch.Tensor, float]:
    base = load_diffusion(args.base)
    out, secs = timed(generate, base, args.n, GuidanceRequest(scale=0.0), args.sampler, args.steps, seed=0,
                      options=sampler_options(args.sampler), progress=False)
    report["base_seconds"] = secs
    return out.images.clamp(-1, 1), secs


def ablation(args, scorer: DigitScorer, report: dict, low: torch.Tensor) -> None:
    print(f"\n## Noise conditioning augmentation: {len(low)} unconditional 14x14 base samples, super-resolved "
          f"({args.sr_sampler}, {args.sr_steps} steps, unconditional branch)\n")
    print("| stage | sampling aug level | judge-FD | judged p >= 0.9 |\n|---|---|---|---|")
    rows = []
    for name, run in [("trained with augmentation", args.sr), ("trained without", args.sr_noaug)]:
        sr = load_diffusion(run)
        for level in args.levels:
            out = super_resolve(sr, low, GuidanceRequest(scale=0.0), level, args.sr_sampler, args.sr_steps, seed=0,
                                options=sampler_options(args.sr_sampler), progress=False)
            s = scorer(out.images)
            report.setdefault("ablation", []).append({"stage": name, "level": level, **s})
            print(row([f"{name} (aug_max {sr.config.superres.aug_max:g}, {sr.step} steps)", f"{level:g}", s["fd"],
                      Share(s["confident"])]), flush=True)
            rows.append((f"{'aug' if 'with ' in name else 'no aug'}\ns={level:g}", out.images))
    viz.labelled_rows([("base 14x14", low)] + rows, Path(args.out) / "augmentation_ablation.png", n=10)


def compare(args, scorer: DigitScorer, report: dict, low: torch.Tensor, base_secs: float) -> None:
    sr, demo = load_diffusion(args.sr), load_diffusion(args.demo)
    up, sr_secs = timed(super_resolve, sr, low, GuidanceRequest(scale=0.0), None, args.sr_sampler, args.sr_steps, seed=0,
                        options=sampler_options(args.sr_sampler), progress=False)
    single, single_secs = timed(generate, demo, args.n, None, args.sampler, args.steps, seed=0, options=sampler_options(args.sampler),
                                progress=False)
    minutes = {name: _train_minutes(run) for name, run in [("base", args.base), ("sr", args.sr), ("demo", args.demo)]}
    print(f"\n## Cascade against a single stage: {args.n} unconditional samples each\n")
    print("| model | training minutes | sampling | judge-FD | judged p >= 0.9 | seconds per image |\n|---|---|---|---|---|---|")
    for name, images, train_min, how, secs in [
        ("single stage 28x28 (mnist preset)", single.images, minutes["demo"], f"{args.sampler} {args.steps or 1000}", single_secs),
        ("cascade 14x14 base + 14->28 super-resolution", up.images, minutes["base"] + minutes["sr"],
         f"{args.sampler} {args.steps or 1000} + {args.sr_sampler} {args.sr_steps}", base_secs + sr_secs)]:
        s = scorer(images)
        report.setdefault("compare", {})[name] = {**s, "train_minutes": train_min, "seconds_per_image": secs / args.n}
        print(row([name, f"{train_min:.1f}", how, s["fd"], Share(s["confident"]), f"{secs / args.n:.3f}"]))
    viz.labelled_rows([("single stage", single.images), ("cascade: base", low), ("cascade: SR", up.images)],
                      Path(args.out) / "cascade_vs_single.png", n=10)


def _train_minutes(run: str) -> float:
    """Wall-clock minutes of training, from the run's log (its last run's "done" record)."""
    lines = [json.loads(line) for line in (Path(run) / "train_log.jsonl").read_text().splitlines()]
    return next((line["elapsed_s"] / 60 for line in reversed(lines) if "elapsed_s" in line), float("nan"))


def x0_error(args, report: dict) -> None:
    held = load_dataset("mnist5k", split="test")
    x0 = held.x[::5][:100]
    print(f"\n## Predicted x0 of super-resolution stages on {len(x0)} held-out digits (true low-res input, level 0)\n")
    print("| stage | prediction | " + " | ".join(f"t={t}" for t in X0_TIMESTEPS) + " |\n|---|---|" + "---|" * len(X0_TIMESTEPS))
    for run in args.x0_runs:
        m = load_diffusion(run)
        kwargs = {**m.null_condition(len(x0)), "low_res": downsample(x0, m.low_res_shape[-1]), "aug_level": torch.zeros(len(x0))}
        g = torch.Generator().manual_seed(0)
        cells = []
        for t in X0_TIMESTEPS:
            tt = torch.full((len(x0),), t)
            x_t = q_sample(x0, tt, m.schedule, torch.randn(x0.shape, generator=g))
            x0_hat = to_x0_eps(m.prediction, m.network(x_t, tt.float(), **kwargs), x_t, tt, m.schedule)[0].clamp(-1, 1)
            mse, dc = ((x0_hat - x0) ** 2).mean().item(), (x0_hat - x0).mean((1, 2, 3)).abs().mean().item()
            report.setdefault("x0error", []).append({"run": run, "t": t, "mse": mse, "brightness_error": dc})
            cells.append(f"{mse:.3f} ({dc:.2f})")
        print(f"| {run} | {m.prediction} | " + " | ".join(cells) + " |")
    print("\n(mean squared error of x0_hat per pixel; in brackets the mean |error of its average brightness|)")


X0_TIMESTEPS = (999, 900, 700, 500, 200, 50)


def imagen(args, scorer: DigitScorer, report: dict) -> None:
    base, sr = load_diffusion(args.base), load_diffusion(args.sr)
    labels = torch.arange(args.n_imagen) % 10
    request = GuidanceRequest(prompts=[f"a handwritten {NUMBER_WORDS[d]}" for d in range(10)])
    print(f"\n## Imagen pipeline: {args.n_imagen} prompted digits (\"a handwritten zero\" ... \"nine\" in turn); base {args.sampler} "
          f"{args.steps or 1000} steps, super-resolution {args.sr_sampler} {args.sr_steps} steps with the prompt (guidance 1)\n")
    print("| base guidance | dynamic thresholding | requested digit | judged p >= 0.9 | judge-FD |\n|---|---|---|---|---|")
    rows = []
    for scale, threshold in [(s, 0.995) for s in args.scales] + [(s, 0.0) for s in args.scales if s >= 5]:
        stages = [Stage(base, args.sampler, args.steps, scale, threshold, options=sampler_options(args.sampler)),
                  Stage(sr, args.sr_sampler, args.sr_steps, 1.0, options=sampler_options(args.sr_sampler))]
        outs = cascade(stages, args.n_imagen, request, seed=0, progress=False)
        s = scorer(outs[-1].images, labels)
        report.setdefault("imagen", []).append({"scale": scale, "threshold": threshold, **s})
        print(row([f"{scale:g}", "on (0.995)" if threshold else "off", Share(s["accuracy"]), Share(s["confident"]), s["fd"]]), flush=True)
        rows.append((f"s={scale:g}\n{'thr.' if threshold else 'no thr.'}", outs[-1].images))
        if scale == max(args.scales) and threshold:
            viz.labelled_rows([("base 14x14", outs[0].images), ("super-res. 28x28", outs[1].images)], Path(args.out) / "imagen_stages.png", n=10,
                              title=f"prompt -> 14x14 base (guidance {scale:g}, thresholding) -> 28x28")
    viz.labelled_rows(rows, Path(args.out) / "imagen_guidance.png", n=10)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default="quality,ablation,compare,imagen")
    p.add_argument("--base", default="runs/imagen_base")
    p.add_argument("--sr", default="runs/imagen_sr")
    p.add_argument("--sr-noaug", default="runs/imagen_sr_noaug")
    p.add_argument("--demo", default="runs/demo")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--n-imagen", type=int, default=200)
    p.add_argument("--sampler", default="ddpm", help="base and single-stage sampler")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--sr-sampler", default="ddpm")
    p.add_argument("--sr-steps", type=int, default=100)
    p.add_argument("--mean-of", type=int, default=4, help="samples averaged for the posterior-mean PSNR")
    p.add_argument("--levels", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3], help="ablation: sampling aug levels")
    p.add_argument("--quality-levels", type=float, nargs="+", default=[0.0, 0.1], help="quality: sampling aug levels")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 3.0, 5.0, 8.0])
    p.add_argument("--x0-runs", nargs="+", default=["runs/eps/imagen_sr", "runs/imagen_sr"])
    p.add_argument("--out", default="runs/bench/cascade")
    args = p.parse_args()
    sections = set(args.sections.split(","))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    ensure_judge()  # trained into the cache on first use
    scorer, report = DigitScorer(), {"args": vars(args)}
    torch.set_grad_enabled(False)
    if "quality" in sections:
        quality(args, scorer, report)
    if sections & {"ablation", "compare"}:
        low, base_secs = base_samples(args, report)
        if "ablation" in sections:
            ablation(args, scorer, report, low)
        if "compare" in sections:
            compare(args, scorer, report, low, base_secs)
    if "x0error" in sections:
        x0_error(args, report)
    if "imagen" in sections:
        imagen(args, scorer, report)
    (Path(args.out) / "report.json").write_text(json.dumps(report, indent=1))
    print(f"\npictures and report.json in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
