"""Guidance sweeps on mnist5k: class accuracy against sample quality as the guidance scale grows.

    .venv/bin/python bench/guidance.py --class-model runs/mnist_class \
        [--classifier runs/mnist_classifier] [--text-model runs/mnist_text] [--n 500]

For each scale, n samples (requested digits 0..9 in turn, seed k for sample k) at 20 NFE
(dpmpp_2m_sde on the Karras grid by default) are judged by the project's held-out classifier
(the judge of bench/digits_quality.py):
  accuracy    share classified as the requested digit (targets: CFG scale 3 >= 98%,
              classifier guidance >= 95% at its best scale, text >= 95% / paraphrases >= 85%)
  confident   share with judge probability >= 0.9
  FD          Frechet distance of the judge's features to the 500 held-out real digits
              (classifier features: not comparable with papers' FIDs)
Writes a table, runs/bench/guidance.json and runs/bench/guidance.png (FD against accuracy).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import ddpmkit.threads  # noqa: F401 -- before torch: OpenMP threads wait passively beside other processes

# isort: split
import torch

from ddpmkit import sample, viz
from ddpmkit.captions import PARAPHRASES, TRAIN_TEMPLATES, digit_caption
from ddpmkit.data import load_dataset
from ddpmkit.evaluate.metrics import FeatureStats, frechet_distance
from ddpmkit.evaluate.report import FeatureNet
from ddpmkit.models import load_diffusion
from ddpmkit.pipelines.guided import GuidanceRequest, guided_model


def run(m, request: GuidanceRequest, n: int, args, batch: int = 250) -> tuple[torch.Tensor, int, float]:
    """n samples of the requested kind; per-sample seeds, so batching does not change them."""
    d = m.config.diffusion
    xs, nfe, t0 = [], 0, time.time()
    for start in range(0, n, batch):
        b = min(batch, n - start)
        part = request.slice(start, b, m.config.network.num_classes)
        model, kwargs, options = guided_model(m, b, part, args.sampler)
        grid = {"grid": args.grid} if args.grid else {}
        r = sample(model, (b, *m.data_shape), m.schedule, sampler=args.sampler, steps=args.steps, prediction=d.prediction,
                   generator=list(range(start, start + b)), model_kwargs=kwargs, **grid, **options)
        xs.append(m.decode(r.x))  # latent models: judge decoded images
        nfe = r.nfe
    return torch.cat(xs), nfe, time.time() - t0


def score(features: FeatureNet, real: FeatureStats, x: torch.Tensor, labels: torch.Tensor) -> dict:
    f, p = features(x)
    conf, pred = p.max(1)
    fake = FeatureStats.of(f)
    return {"accuracy": (pred == labels).float().mean().item(), "confident": (conf >= 0.9).float().mean().item(),
            "fd": frechet_distance(fake.mu, fake.sigma, real.mu, real.sigma)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--class-model", default="runs/mnist_class")
    p.add_argument("--classifier", default=None, help="a train-classifier folder: sweep classifier guidance too")
    p.add_argument("--classifier-base", default=None,
                   help="the unconditional model classifier guidance steers (default: --class-model's null-label branch)")
    p.add_argument("--text-model", default=None, help="a text-conditional run: templates and paraphrases")
    p.add_argument("--scales", default="0,1,2,3,5,8")
    p.add_argument("--classifier-scales", default="1,2,4,8,16")
    p.add_argument("--text-scales", default="1,3,5")
    p.add_argument("--rescale", type=float, default=0.0, help="guidance rescale phi for every classifier-free row")
    p.add_argument("--threshold", type=float, default=0.0, help="dynamic thresholding percentile for every classifier-free row")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--sampler", default="dpmpp_2m_sde")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--grid", default="karras")
    p.add_argument("--out", default="runs/bench")
    args = p.parse_args()

    features = FeatureNet("classifier", "mnist5k")
    real = FeatureStats.of(features(load_dataset("mnist5k", split="test").x)[0])
    labels = torch.arange(args.n) % 10
    rows: list[dict] = []
    out = Path(args.out)

    def record(kind: str, scale: float, m, request: GuidanceRequest, note: str = "") -> None:
        x, nfe, seconds = run(m, request, args.n, args)
        row = {"kind": kind, "scale": scale, "note": note, "nfe": nfe, "seconds": seconds, **score(features, real, x, labels)}
        rows.append(row)
        print(f"{kind:<22} {note:<12} scale {scale:>5g}  accuracy {row['accuracy']:6.1%}  confident {row['confident']:6.1%}  "
              f"FD {row['fd']:7.3f}  ({nfe} NFE, {seconds:.0f}s)", flush=True)
        viz.save_grid(x[:100], out / "guidance" / f"{kind}_{note or 'all'}_{scale:g}.png", nrow=10)

    print(f"{args.n} samples per row, {args.sampler} {args.steps} steps ({args.grid} grid); judge: held-out classifier")
    m = load_diffusion(args.class_model)
    for s in [float(v) for v in args.scales.split(",") if v]:
        record("classifier-free", s, m, GuidanceRequest(scale=s, rescale=args.rescale, threshold=args.threshold),
               note=("rescale" if args.rescale else "") + ("threshold" if args.threshold else ""))
    if args.classifier:
        base = load_diffusion(args.classifier_base) if args.classifier_base else m
        note = "null branch" if base is m else Path(args.classifier_base).name
        for s in [float(v) for v in args.classifier_scales.split(",")]:
            record("classifier", s, base, GuidanceRequest(scale=0.0, classifier=args.classifier, classifier_scale=s), note=note)
    if args.text_model:
        mt = load_diffusion(args.text_model)
        for s in [float(v) for v in args.text_scales.split(",")]:
            for note, templates in (("templates", TRAIN_TEMPLATES), ("paraphrases", PARAPHRASES)):
                prompts = [digit_caption(templates[(i // 10) % len(templates)], int(labels[i])) for i in range(args.n)]
                record("text", s, mt, GuidanceRequest(prompts=prompts, scale=s, rescale=args.rescale, threshold=args.threshold), note=note)

    out.mkdir(parents=True, exist_ok=True)
    (out / "guidance.json").write_text(json.dumps({"sampler": args.sampler, "steps": args.steps, "grid": args.grid,
                                                   "n": args.n, "rows": rows}, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for (kind, note), marker in zip(dict.fromkeys((r["kind"], r["note"]) for r in rows), "osD^v"):
        sel = [r for r in rows if (r["kind"], r["note"]) == (kind, note)]
        ax.plot([100 * r["accuracy"] for r in sel], [r["fd"] for r in sel], marker=marker, label=f"{kind} {note}".strip())
        for r in sel:
            ax.annotate(f"{r['scale']:g}", (100 * r["accuracy"], r["fd"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("requested digit (% of samples, held-out judge)")
    ax.set_ylabel("FD to held-out digits (judge features)")
    ax.set_yscale("log")
    ax.set_title(f"guidance scale sweep, mnist5k, {rows[0]['nfe']} NFE")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "guidance.png", dpi=110)
    print(f"-> {out / 'guidance.json'}, {out / 'guidance.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
