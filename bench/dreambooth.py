"""DreamBooth on the digits text model: does the instance prompt draw the new subject, and does the class prompt
still draw ordinary digits (prior preservation)?

    .venv/bin/python bench/dreambooth.py --base runs/mnist_text [--images 20] [--steps 300] [--lr 5e-4] [--n 500]

The new subject is bench/lora_style.py's: thick-stroke digits, 20 mnist5k training digits dilated by a 3x3 maximum.
A DreamBooth run of the one engine (the [dreambooth] section: instance prompt "a sks digit", 200 class images the
base draws for "a handwritten digit", prior_loss_weight 1) learns them from the base's config and weights. Then the
base and the tuned model draw n digits per prompt from the same seeds (DPM-Solver++(2M), 20 steps, guidance 3), and
the bench reports the thick share (ink over the 95th percentile of held-out digits), the share the judge reads with
confidence >= 0.9, the judge-FD, the classes' range and the share that copies one of the instance images (nearest /
second-nearest instance image < 1/3, ddpmkit.evaluate.copies: learnt the style, or the 20 pictures?), with the
same-seed grid.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import ddpmkit.threads  # noqa: F401 -- before torch: OpenMP threads wait passively beside other processes

# isort: split
import torch

from ddpmkit import viz
from ddpmkit.config import load_config
from ddpmkit.data import load_dataset
from ddpmkit.evaluate.copies import copies
from ddpmkit.evaluate.report import DigitScorer
from ddpmkit.models import load_diffusion
from ddpmkit.pipelines import generate
from ddpmkit.pipelines.guided import GuidanceRequest
from ddpmkit.train import train
from ddpmkit.train.judge import ensure_judge
from lora_style import ink, style_set  # bench/: the style and its measure

INSTANCE, CLASS = "a sks digit", "a handwritten digit"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="runs/mnist_text")
    p.add_argument("--images", type=int, default=20)
    p.add_argument("--class-images", type=int, default=200)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--cond-drop-prob", type=float, default=None,
                   help="share of examples trained on the empty prompt (default: the base's; 0 as in diffusers' script)")
    p.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"])
    p.add_argument("--class-guidance", type=float, default=3.0, help="the guidance scale the base draws the class images with")
    p.add_argument("--lora-rank", type=int, default=0, help="> 0: LoRA adapters of this rank instead of every weight")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--out", default="runs/bench/dreambooth")
    args = p.parse_args()
    out = Path(args.out)
    style, threshold = style_set(out, args.images)
    cfg = load_config(str(Path(args.base) / "config.json"), [
        f"train.init_from={args.base}", "data.name=folder", f"data.path={style}", "data.image_size=28", "data.channels=1",
        f"dreambooth.instance_prompt={INSTANCE}", f"dreambooth.class_prompt={CLASS}", f"dreambooth.class_images={args.class_images}",
        f"dreambooth.class_guidance={args.class_guidance}",
        f"train.lora_rank={args.lora_rank}", *([f"train.cond_drop_prob={args.cond_drop_prob}"] if args.cond_drop_prob is not None else []),
        f"train.steps={args.steps}", f"train.lr={args.lr}", f"train.lr_schedule={args.lr_schedule}", "train.warmup_steps=0", "train.ema_decay=0",
        "train.batch_size=32", "train.sample_every=0", "train.eval_every=0", "train.keep_steps=", "train.checkpoint_every=0",
        f"train.run_dir={out / 'run'}"])
    t0 = time.time()
    run = train(cfg, progress=True)
    seconds = time.time() - t0
    ensure_judge()
    scorer = DigitScorer()
    instances = load_dataset("folder", str(style), 28, 1)
    rows, pictures = [], []
    print(f"\nDreamBooth: {args.steps} steps in {seconds / 60:.1f} min (with drawing {args.class_images} class images); thick: ink > "
          f"{threshold:.3f}\n| model | prompt | thick | judged p >= 0.9 | judge-FD | classes | copies of an instance image |"
          f"\n|---|---|---|---|---|---|---|")
    for name, path in (("base", args.base), ("DreamBooth", str(run))):
        m = load_diffusion(path)
        for prompt in (INSTANCE, CLASS):
            x = generate(m, args.n, GuidanceRequest(prompts=[prompt], scale=3.0), "dpmpp_2m", 20, seed=0, progress=False).images
            s = scorer(x)
            shares = torch.bincount(scorer.features(x)[1].argmax(1), minlength=10).float() / len(x)
            row = {"model": name, "prompt": prompt, "thick": (ink(x) > threshold).float().mean().item(), "confident": s["confident"],
                   "judge_fd": s["fd"], "classes": [round(v, 3) for v in shares.tolist()], "copies": copies(x, instances).fraction}
            rows.append(row)
            pictures.append((f"{name}\n{prompt!r}", x[:10]))
            print(f"| {name} | {prompt} | {row['thick']:.1%} | {row['confident']:.1%} | {row['judge_fd']:.2f} | "
                  f"{shares.min():.1%}-{shares.max():.1%} | {row['copies']:.1%} |", flush=True)
    viz.labelled_rows(pictures, out / "grid.png", n=10, title="the same seeds, before and after DreamBooth")
    (out / "report.json").write_text(json.dumps({"threshold": threshold, "train_seconds": seconds, "rows": rows}, indent=2))
    print(f"-> {out / 'grid.png'}, {out / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
