"""Are the demo's digits recognisable? A judge classifier trained on real digits says.

    .venv/bin/python bench/digits_quality.py --checkpoint runs/demo [--n 500 --steps 1000]

1. Train (or load the cached) judge CNN on mnist5k's 4,500 training digits; report its accuracy
   on the 500 held-out digits (target >= 97%).
2. Draw n samples from the checkpoint, by default with 1,000-step ancestral sampling
   (Algorithm 2); --sampler/--steps/--grid/--order/--eta pick any other sampler, e.g.
   --sampler unipc --steps 20 --grid logsnr, or a grid from `ddpmkit tune-grid`.
   --autoguide RUN/ckpt-... --autoguide-scale w guides every step by a weaker model (the demo keeps
   its step-250 checkpoint for this); the NFE then counts both networks.
3. Report the share judged with confidence >= 0.9 (target >= 80%), each class's share of the
   samples (target 5-15% each), the judge-FD (Frechet distance in the judge's feature space to
   the 500 held-out digits) and the share of samples that copy a training digit (nearest /
   second-nearest training digit < 1/3, beside the held-out real digits' share: a network that
   learnt its 4,500 digits by heart would be judged well), and save the grid and a picture of the
   10 samples most like a training digit above that digit.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ddpmkit import viz
from ddpmkit.data import load_dataset
from ddpmkit.evaluate.cached_judge import load_judge
from ddpmkit.evaluate.copies import copies
from ddpmkit.evaluate.judge import judge
from ddpmkit.evaluate.report import DigitScorer
from ddpmkit.models import load_diffusion
from ddpmkit.pipelines import generate
from ddpmkit.pipelines.guided import GuidanceRequest
from ddpmkit.sampling.options import sampler_options
from ddpmkit.train.judge import ensure_judge


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="runs/demo")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--steps", type=int, default=None, help="default: all T steps")
    p.add_argument("--sampler", default="ddpm")
    p.add_argument("--variance", default="auto", choices=["auto", "beta_tilde", "beta", "learned"],
                   help="sigma_t^2 for ddpm (auto: the model's learned one, else beta_tilde)")
    p.add_argument("--grid", default=None, help="a grid name or a JSON file from `ddpmkit tune-grid`")
    p.add_argument("--eta", type=float, default=None)
    p.add_argument("--order", type=int, default=None)
    p.add_argument("--no-clip", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the network first (the time includes compiling)")
    p.add_argument("--batch", type=int, default=None, help="samples at once (default: generate's cache-sized chunks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="where the network samples: auto (CUDA, then MPS, then the CPU), cpu, cuda, mps")
    p.add_argument("--autoguide", default=None, help="a weaker model of the same kind to guide by (autoguidance)")
    p.add_argument("--autoguide-scale", type=float, default=2.0, help="the autoguidance weight w (1 = unguided)")
    p.add_argument("--weights", default="ema", choices=["ema", "model"], help="EMA or raw weights of the checkpoint")
    p.add_argument("--out", default="runs/bench/digits_quality")
    args = p.parse_args()

    t0 = time.time()
    ensure_judge()  # trained into the cache on first use
    classifier, acc = load_judge()
    print(f"judge accuracy on 500 held-out real digits: {acc:.2%}  (target >= 97%)  [{time.time() - t0:.0f}s]")
    held_out, train = load_dataset("mnist5k", split="test").x, load_dataset("mnist5k", split="train").x
    real = judge(classifier, held_out)
    real_copies = copies(held_out, train)
    print(f"reference, real held-out digits: confident (p >= 0.9) {real.confident_fraction:.1%}, mean confidence {real.mean_confidence:.3f}, "
          f"copies of a training digit {real_copies.fraction:.1%}")

    m = load_diffusion(args.checkpoint, weights=args.weights, device=args.device)
    if args.compile:
        m.compile()
    t0 = time.time()
    options = sampler_options(args.sampler, args.grid, args.variance, not args.no_clip, args.eta, args.order)
    request = GuidanceRequest(autoguide=args.autoguide, autoguide_scale=args.autoguide_scale) if args.autoguide else None
    gen = generate(m, args.n, request, sampler=args.sampler, steps=args.steps, seed=args.seed, options=options, batch_size=args.batch)
    x, nfe = gen.images, gen.nfe * (request.autoguided_networks if request is not None else 1)
    elapsed = time.time() - t0
    verdict = judge(classifier, x)
    out = Path(args.out)
    tag = f"{args.sampler}_{nfe}nfe" + (f"_{args.variance}" if args.sampler == "ddpm" else "") + (f"_{Path(args.grid).stem}" if args.grid else "") \
        + (f"_autoguide{args.autoguide_scale:g}" if request is not None else "")
    viz.save_grid(x[:100], out / f"grid_{tag}.png", nrow=10)
    print(f"sampled {args.n} digits from {m.path} (step {m.step}) with {args.sampler}, {nfe} NFE, in {elapsed:.0f}s")
    print(verdict.table())
    fd = DigitScorer()(x)["fd"]
    print(f"judge-FD to the 500 held-out digits: {fd:.2f}")
    copied = copies(x, train)
    closest = copied.ratio.argsort()[:10]  # the samples most like one training digit, whether copies or not
    ratios = ", ".join(f"{r:.2f}" for r in copied.ratio[closest].tolist())
    viz.labelled_rows([("samples", x[closest].cpu()), ("nearest\ntraining digit", train[copied.nearest[closest]])],
                      out / f"nearest_{tag}.png", n=10,
                      title=f"the samples most like a training digit; nearest / second-nearest distance {ratios} (< 0.33: a copy)")
    print(f"copies of a training digit (nearest / second-nearest < 1/3): {copied.fraction:.1%}, median ratio {copied.ratio.median():.2f} "
          f"(real held-out digits: {real_copies.fraction:.1%}, {real_copies.ratio.median():.2f})")
    ok_conf = verdict.confident_fraction >= 0.80
    ok_cover = all(0.05 <= s <= 0.15 for s in verdict.class_shares)
    print(f"targets: confident >= 80%: {'PASS' if ok_conf else 'FAIL'};  every class 5-15%: {'PASS' if ok_cover else 'FAIL'};"
          f"  judge >= 97%: {'PASS' if acc >= 0.97 else 'FAIL'}")
    report = {"checkpoint": str(m.path), "step": m.step, "sampler": args.sampler,
              "options": {k: v for k, v in vars(args).items() if k in ("variance", "grid", "eta", "order", "autoguide", "autoguide_scale")},
              "nfe": nfe, "n": args.n,
              "judge_test_accuracy": acc, "real_confident_fraction": real.confident_fraction, "confident_fraction": verdict.confident_fraction,
              "class_shares": verdict.class_shares, "judge_fd": fd, "mean_confidence": verdict.mean_confidence, "seconds": elapsed,
              "classes_even": ok_cover, "copied_fraction": copied.fraction, "real_copied_fraction": real_copies.fraction,
              "median_copy_ratio": copied.ratio.median().item(), "real_median_copy_ratio": real_copies.ratio.median().item()}
    (out / f"report_{tag}.json").write_text(json.dumps(report, indent=2))
    return 0 if ok_conf and ok_cover and acc >= 0.97 else 1


if __name__ == "__main__":
    sys.exit(main())
