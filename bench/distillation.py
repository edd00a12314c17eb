"""Few-step generation by distillation: judged quality and judge-FD against network evaluations (1, 2, 4, 8) for
the distilled students, beside their teacher with its best solver at the same NFE and with 1,000 ancestral steps,
and each distillation's training time against the teacher's.

    .venv/bin/python bench/distillation.py --teacher runs/demo --consistency runs/mnist_consistency \
        --progressive runs/mnist_progressive runs/mnist_progressive_4 ... [--n 500] [--ancestral REPORT.json]

It also draws the first 8 samples of each row (of the teacher's, its best solver at each NFE), from the same seeds, as
one labelled figure (--figure).
The teacher's ancestral row costs ~17 minutes for 500 digits on 2 AVX2 cores: --ancestral takes the report
`bench/digits_quality.py --checkpoint TEACHER --n 500` wrote instead (same seeds, same judge), or --skip-ancestral.
A progressive run counts at the NFE of its student_steps. The teacher's solvers at each NFE: DDIM, DPM-Solver++(2M)
and UniPC; its best is the one with the lowest judge-FD (the judged share alone rewards the blobs 1-2 steps draw).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ddpmkit import viz
from ddpmkit.evaluate.report import DigitScorer
from ddpmkit.models import load_diffusion
from ddpmkit.pipelines import generate
from ddpmkit.sampling.options import sampler_options
from ddpmkit.train.judge import ensure_judge

TEACHER_SOLVERS = ("ddim", "dpmpp_2m", "unipc")


def training_seconds(run: str) -> float:
    """Wall seconds of a run's training, from its log's last line."""
    lines = [json.loads(line) for line in (Path(run) / "train_log.jsonl").read_text().splitlines() if line.strip()]
    return float(lines[-1]["elapsed_s"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="runs/demo")
    p.add_argument("--consistency", nargs="*", default=[])
    p.add_argument("--progressive", nargs="*", default=[], help="progressive runs, one per round")
    p.add_argument("--nfe", default="1,2,4,8")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ancestral", default=None, help="a digits_quality.py report.json of the teacher (1,000 ancestral steps)")
    p.add_argument("--skip-ancestral", action="store_true")
    p.add_argument("--out", default="runs/bench/distillation.json")
    p.add_argument("--figure", default="runs/bench/distillation.png", help="the first 8 samples of each row, same seeds")
    args = p.parse_args()
    nfes = [int(k) for k in args.nfe.split(",")]
    ensure_judge()
    scorer = DigitScorer()
    rows: list[dict] = []
    pictures: list[tuple[str, object, dict]] = []

    def row(model: str, path: str, sampler: str, steps: int | None, kind: str) -> dict:
        m = load_diffusion(path)
        t0 = time.time()
        gen = generate(m, args.n, None, sampler, steps, args.seed, sampler_options(sampler, None), progress=False)
        s = scorer(gen.images)
        r = {"model": model, "kind": kind, "sampler": sampler, "nfe": gen.nfe, "confident": s["confident"], "judge_fd": s["fd"],
             "sample_seconds": time.time() - t0}
        rows.append(r)
        pictures.append((f"{kind.split(',')[0]}\n{sampler}, {gen.nfe} NFE", gen.images[:8], r))
        print(f"| {model} | {kind} | {sampler} | {gen.nfe} | {s['confident']:.1%} | {s['fd']:.2f} |", flush=True)
        return r

    print("| model | what | sampler | NFE | judged p >= 0.9 | judge-FD |\n|---|---|---|---|---|---|", flush=True)
    if args.ancestral:
        report = json.loads(Path(args.ancestral).read_text())
        rows.append({"model": args.teacher, "kind": "teacher, ancestral (report)", "sampler": "ddpm", "nfe": 1000,
                     "confident": report["confident_fraction"], "judge_fd": report["judge_fd"]})
        print(f"| {args.teacher} | teacher, ancestral (report) | ddpm | 1000 | {report['confident_fraction']:.1%} | {report['judge_fd']:.2f} |")
    elif not args.skip_ancestral:
        row(args.teacher, args.teacher, "ddpm", None, "teacher, ancestral")
    best = {}
    for k in nfes:
        tried = [row(args.teacher, args.teacher, s, k, "teacher") for s in TEACHER_SOLVERS]
        best[k] = min(tried, key=lambda r: r["judge_fd"])
    for run in args.consistency:
        for k in nfes:
            row(run, run, "consistency", k, "consistency")
    for run in args.progressive:
        steps = load_diffusion(run).metrics.get("student_steps")
        row(run, run, "ddim_uniform", steps, f"progressive round {load_diffusion(run).metrics.get('round')}")
    teacher_s = training_seconds(args.teacher)
    times = {run: training_seconds(run) for run in [*args.consistency, *args.progressive]}
    print(f"\ntraining wall time: teacher {teacher_s / 60:.1f} min; " + "; ".join(f"{r} {s / 60:.1f} min ({s / teacher_s:.2f}x)"
                                                                           for r, s in times.items()))
    print("best teacher solver per NFE (lowest judge-FD): " + ", ".join(f"{k}: {b['sampler']} {b['confident']:.1%} / {b['judge_fd']:.2f}"
                                                                       for k, b in best.items()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    shown = [(label, x) for label, x, r in pictures if r["kind"] != "teacher" or any(r is b for b in best.values())]
    viz.labelled_rows(shown, args.figure, n=8, title="the same 8 seeds: the teacher's best solver at each NFE and the students")
    out.write_text(json.dumps({"rows": rows, "teacher_training_s": teacher_s, "training_s": times}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
