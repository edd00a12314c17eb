"""Time to quality: how good are the digits after 5, 9.5 (the demo's budget), 20 and 30 minutes of training, per sampler?

    .venv/bin/python bench/time_to_quality.py --recipes mnist_eps mnist --minutes 5 10 20 30
    .venv/bin/python bench/time_to_quality.py --plot-only          # redraw the figure from the results so far

For each recipe (a preset) and budget M minutes, one training run whose learning-rate schedule
ends at M minutes: train.steps is the preset's steps scaled by M / its train.max_minutes, and
train.max_minutes = M stops it there on a slower machine. --steps-per-minute R sets train.steps = R * M
instead, for presets calibrated on another machine (mnist_eps: 2,200 steps in 9.5 minutes on a
faster one). Each run's final checkpoint is sampled with every sampler (NAME:STEPS[:GRID]; n
samples, the same seeds) and judged: the share read with
confidence >= 0.9 and the judge-FD (Frechet distance in the judge's feature space to mnist5k's
held-out digits). Results accumulate in OUT/results.json (a run or row already there is not
redone: the bench can be run in pieces) and are drawn into OUT/time_to_quality.png.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from ddpmkit.checkpoint import list_checkpoints, read_config
from ddpmkit.config import load_config
from ddpmkit.evaluate.report import DigitScorer
from ddpmkit.models import load_diffusion
from ddpmkit.pipelines import generate
from ddpmkit.sampling.options import sampler_options
from ddpmkit.train.judge import ensure_judge

SAMPLERS = ["ddpm:1000", "dpmpp_2m_sde:20", "ddim:10", "ddim:20", "unipc:10", "unipc:20"]


def train_run(recipe: str, minutes: float, run_dir: Path, steps_per_minute: float | None = None) -> Path:
    """Train (or reuse) the recipe's run for this budget; returns its final checkpoint. steps_per_minute:
    this machine's training rate (default: the preset's, train.steps / train.max_minutes)."""
    log = run_dir / "train_log.jsonl"
    if log.is_file() and any(json.loads(line).get("done") for line in log.read_text().splitlines()):
        return list_checkpoints(run_dir)[-1]  # a finished run (the end of train.steps, or of the time budget)
    cfg = load_config(recipe)
    if not (steps_per_minute or cfg.train.max_minutes):
        sys.exit(f"{recipe} trains a fixed number of steps (no train.max_minutes): give this machine's --steps-per-minute "
                 "(bench/train_throughput.py prints the images/s; steps per minute = 60 * images/s / batch size)")
    steps = max(50, round((steps_per_minute or cfg.train.steps / cfg.train.max_minutes) * minutes))
    cmd = [sys.executable, "-m", "ddpmkit.cli", "train", recipe, f"train.run_dir={run_dir}", f"train.steps={steps}",
           f"train.max_minutes={minutes}", "train.sample_every=0", "--quiet"]
    print(f"training {recipe} for {minutes:g} minutes ({steps} steps): {' '.join(cmd[2:])}", flush=True)
    subprocess.run(cmd, check=True)
    return list_checkpoints(run_dir)[-1]


def plot(rows: list[dict], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.2))
    keys = sorted({(r["recipe"], r["sampler"]) for r in rows})
    recipes = sorted({r["recipe"] for r in rows})
    styles = ["-", "--", ":", "-."]
    samplers = sorted({r["sampler"] for r in rows})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for recipe, sampler in keys:
        pts = sorted((r["minutes"], r["judge_fd"], r["confident"]) for r in rows if r["recipe"] == recipe and r["sampler"] == sampler)
        style = {"linestyle": styles[recipes.index(recipe) % 4], "color": colors[samplers.index(sampler) % len(colors)], "marker": "o"}
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], label=f"{recipe}: {sampler}", **style)
        axes[1].plot([p[0] for p in pts], [100 * p[2] for p in pts], **style)
    axes[0].set(xlabel="training minutes (2 CPU cores)", ylabel="judge-FD (lower is better)", yscale="log")
    axes[1].set(xlabel="training minutes (2 CPU cores)", ylabel="% judged p >= 0.9")
    axes[1].axhline(80, color="grey", linewidth=0.8)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=len(recipes) * 2 + 1, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    print(f"figure: {path}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", default=["mnist_eps", "mnist"], help="presets (or config files) to compare")
    p.add_argument("--minutes", nargs="+", type=float, default=[5, 9.5, 20, 30])
    p.add_argument("--samplers", nargs="+", default=SAMPLERS)
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--out", default="runs/bench/time_to_quality")
    p.add_argument("--plot-only", action="store_true")
    p.add_argument("--steps-per-minute", type=float, default=None,
                   help="this machine's training steps per minute (default: each preset's steps / max_minutes)")
    p.add_argument("--compile", action="store_true", help="sample with the compiled network (DiffusionModel.compile)")
    args = p.parse_args()
    if args.steps_per_minute is not None and args.steps_per_minute <= 0:
        p.error(f"--steps-per-minute must be > 0, got {args.steps_per_minute:g}")

    out = Path(args.out)
    results = out / "results.json"
    rows: list[dict] = json.loads(results.read_text()) if results.is_file() else []
    if not args.plot_only:
        ensure_judge()  # trained into the cache on first use
        scorer = DigitScorer()
        for recipe in args.recipes:
            for minutes in args.minutes:
                ckpt = train_run(recipe, minutes, out / f"{Path(recipe).stem}-{minutes:g}min", args.steps_per_minute)
                _, info = read_config(ckpt)
                m = load_diffusion(ckpt.parent)
                if args.compile:
                    m.compile()
                for spec in args.samplers:
                    if any(r["recipe"] == Path(recipe).stem and r["minutes"] == minutes and r["sampler"] == spec for r in rows):
                        continue
                    name, steps, *grid = spec.split(":")
                    t0 = time.time()
                    gen = generate(m, args.n, sampler=name, steps=int(steps), options=sampler_options(name, grid[0] if grid else None),
                                   progress=False)
                    s = scorer(gen.images)
                    rows.append({"recipe": Path(recipe).stem, "minutes": minutes, "step": info.step, "sampler": spec, "nfe": gen.nfe,
                                 "n": args.n, "confident": s["confident"], "judge_fd": s["fd"], "sample_seconds": time.time() - t0})
                    results.write_text(json.dumps(rows, indent=2))
                    print(f"{Path(recipe).stem:>10} {minutes:>4g} min (step {info.step}) {spec:>16}: judged p >= 0.9 "
                          f"{s['confident']:.1%}, judge-FD {s['fd']:.2f}", flush=True)
    print("| recipe | minutes | step | sampler | NFE | judged p >= 0.9 | judge-FD |\n|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["recipe"], r["minutes"], r["sampler"])):
        print(f"| {r['recipe']} | {r['minutes']:g} | {r['step']} | {r['sampler']} | {r['nfe']} | {r['confident']:.1%} | {r['judge_fd']:.2f} |")
    if rows:
        plot(rows, out / "time_to_quality.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
