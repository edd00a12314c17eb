"""unCLIP and CLIP guidance on mnist5k: every figure of the unCLIP issue, from trained runs.

    .venv/bin/python bench/unclip.py --sections clip,prior,text2image,variations,clipguide \
        [--clip runs/clip] [--noisy runs/clip_noisy] [--prior runs/unclip_prior] [--decoder runs/unclip_decoder] [--demo runs/demo]

  clip        zero-shot accuracy on the 500 held-out digits with the ten captions "a handwritten zero" ..
              "nine" (the noisy CLIP: on x_t at several t)
  prior       mean cosine similarity between the prior's sampled image embedding and the true one of
              held-out digits, captioned with the training templates; baseline: the text embedding itself
  text2image  prompt -> prior -> decoder, judged: the share read as the requested digit, per decoder scale
  variations  one variation of each held-out digit: the share the judge reads as the source's class, and
              the pixel distance to the source, against img2img at strength 0.2 on the demo model
  clipguide   CLIP guidance of the unconditional demo model toward "a handwritten {digit}", per scale

Judge: the held-out digit classifier of bench/digits_quality.py; FD in its feature space. Writes
runs/bench/unclip_<sections>.json and sample grids under runs/bench/unclip/.
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
from ddpmkit.captions import NUMBER_WORDS, PARAPHRASES, TRAIN_TEMPLATES, digit_caption
from ddpmkit.data import load_dataset
from ddpmkit.editing import img2img
from ddpmkit.evaluate.metrics import FeatureStats
from ddpmkit.evaluate.report import FeatureNet
from ddpmkit.models import load, load_diffusion
from ddpmkit.pipelines import unclip
from ddpmkit.pipelines.generate import generate
from ddpmkit.pipelines.guided import GuidanceRequest
from ddpmkit.process import q_sample
from ddpmkit.sampling.options import sampler_options
from ddpmkit.train.clip import ZERO_SHOT_TIMESTEPS, digit_class_texts, zero_shot_logits
from guidance import score  # bench/guidance.py: the judge's accuracy, confidence and FD of samples


def captions(labels: torch.Tensor, templates: tuple[str, ...]) -> list[str]:
    """Sample k's caption: template (k // 10) of the list for its digit, as bench/guidance.py does."""
    return [digit_caption(templates[(k // 10) % len(templates)], int(y)) for k, y in enumerate(labels)]


def section_clip(args, held_out, rows: list) -> None:
    x, labels = held_out.x, held_out.labels
    for path in (args.clip, args.noisy):
        if not path or not Path(path).exists():
            continue
        run = load(path, kind="clip")
        texts = digit_class_texts(run.network, run.text_encoder)
        g = torch.Generator().manual_seed(0)
        for t in ZERO_SHOT_TIMESTEPS if run.network.noisy else (0,):
            tt = torch.full((len(x),), t)
            xt = q_sample(x, tt, run.schedule, torch.randn(x.shape, generator=g)) if t else x
            acc = (zero_shot_logits(run.network, xt, texts, tt.float()).argmax(1) == labels).float().mean().item()
            rows.append({"section": "clip", "run": path, "t": t, "zero_shot": acc})
            print(f"zero-shot {path:<22} t={t:<4} {acc:6.1%}  (500 held-out digits, 10 captions 'a handwritten <digit>')", flush=True)


def section_prior(args, held_out, rows: list) -> None:
    prior = load_diffusion(args.prior)
    clip = prior.clip
    z_img = clip.network.embed_images(held_out.x)  # (500, E) the truth
    for note, templates in (("templates", TRAIN_TEMPLATES), ("paraphrases", PARAPHRASES), ("a handwritten <digit>", ("a handwritten {word}",))):
        prompts = captions(held_out.labels, templates)
        z_txt = clip.embed_texts(prompts)
        base = (z_txt * z_img).sum(-1).mean().item()
        rows.append({"section": "prior", "captions": note, "what": "text embedding", "cosine": base})
        print(f"prior [{note}]  text embedding itself: cosine to the image embedding {base:.3f}", flush=True)
        for scale in args.prior_scales:
            for best in (1, 4):
                t0 = time.time()
                z = unclip.text_to_embedding(prior, prompts, len(prompts), scale, best, steps=args.prior_steps, seed=0)
                cos = (z * z_img).sum(-1).mean().item()
                # the same digit's images: how close a sample lands to its class, not to one image
                pairs = held_out.labels[:, None] == held_out.labels[None]
                same = ((z @ z_img.T) * pairs).sum(1) / pairs.sum(1)
                rows.append({"section": "prior", "captions": note, "what": "prior", "scale": scale, "best_of": best, "cosine": cos,
                             "cosine_to_class": same.mean().item()})
                print(f"prior [{note}]  scale {scale:g} best of {best}: cosine {cos:.3f} (to the digit's images on average "
                      f"{same.mean().item():.3f})  {time.time() - t0:.0f}s", flush=True)


def section_text2image(args, held_out, rows: list, features, real) -> None:
    prior, decoder = load_diffusion(args.prior), load_diffusion(args.decoder)
    labels = torch.arange(args.n) % 10
    options = sampler_options(args.sampler, args.grid)
    for note, templates in (("templates", TRAIN_TEMPLATES), ("paraphrases", PARAPHRASES)):
        for scale in args.decoder_scales if note == "templates" else args.decoder_scales[-1:]:
            t0 = time.time()
            out = unclip.text_to_image(prior, decoder, captions(labels, templates), args.n, args.prior_scale, args.best_of, args.prior_steps,
                                       scale=scale, sampler=args.sampler, steps=args.steps, options=options, progress=False)
            row = {"section": "text2image", "captions": note, "scale": scale, "seconds": time.time() - t0,
                   **score(features, real, out.images, labels)}
            rows.append(row)
            print(f"unCLIP text->image [{note}] decoder scale {scale:g}: requested digit {row['accuracy']:6.1%}, confident "
                  f"{row['confident']:6.1%}, FD {row['fd']:.3f}  ({row['seconds']:.0f}s)", flush=True)
            viz.save_grid(out.images[:100], Path(args.out) / "unclip" / f"text2image_{note}_{scale:g}.png", nrow=10)


def section_variations(args, held_out, rows: list, features, real) -> None:
    decoder = load_diffusion(args.decoder)
    x, labels = held_out.x[:args.n], held_out.labels[:args.n]
    options = sampler_options(args.sampler, args.grid)
    judge_real = score(features, real, x, labels)
    print(f"the judge reads {judge_real['accuracy']:.1%} of the {len(x)} held-out sources right", flush=True)
    for scale in args.variation_scales:
        t0 = time.time()
        v = unclip.variations(decoder, x, 1, scale=scale, sampler=args.sampler, steps=args.steps, options=options, progress=False).images
        dist = (v - x).flatten(1).norm(dim=1).mean().item()
        row = {"section": "variations", "scale": scale, "pixel_distance": dist, "seconds": time.time() - t0, **score(features, real, v, labels)}
        rows.append(row)
        print(f"variations decoder scale {scale:g}: source class {row['accuracy']:6.1%}, confident {row['confident']:6.1%}, FD {row['fd']:.3f}, "
              f"L2 distance to the source {dist:.2f}  ({row['seconds']:.0f}s)", flush=True)
        viz.save_grid(torch.cat([x[:10], v[:10], x[10:20], v[10:20]]), Path(args.out) / "unclip" / f"variations_{scale:g}.png", nrow=10)
    if args.demo and Path(args.demo).exists():
        m = load_diffusion(args.demo)
        edited = img2img(m.denoiser, x, strength=0.2, sampler="ddim", steps=50, generator=list(range(len(x)))).x.clamp(-1, 1)
        dist = (edited - x).flatten(1).norm(dim=1).mean().item()
        rows.append({"section": "variations", "what": "img2img 0.2 (demo model)", "pixel_distance": dist, **score(features, real, edited, labels)})
        print(f"img2img strength 0.2 on {args.demo}: L2 distance to the source {dist:.2f}", flush=True)


def section_clipguide(args, held_out, rows: list, features, real) -> None:
    m = load_diffusion(args.demo)
    labels = torch.arange(args.n) % 10
    prompts = [f"a handwritten {NUMBER_WORDS[int(y)]}" for y in labels]
    for sampler, steps in args.guide_samplers:
        options = sampler_options(sampler, None if sampler == "ddpm" else args.grid)
        for scale in args.clip_scales:
            t0 = time.time()
            request = GuidanceRequest(prompts=prompts, clip=args.noisy, clip_scale=scale) if scale > 0 else GuidanceRequest()
            x = generate(m, args.n, request, sampler, steps, 0, options, progress=False).images
            row = {"section": "clipguide", "sampler": sampler, "steps": steps, "scale": scale, "seconds": time.time() - t0,
                   **score(features, real, x, labels)}
            rows.append(row)
            print(f"CLIP guidance {sampler} {steps} steps scale {scale:g}: requested digit {row['accuracy']:6.1%}, confident "
                  f"{row['confident']:6.1%}, FD {row['fd']:.3f}  ({row['seconds']:.0f}s)", flush=True)
            viz.save_grid(x[:100], Path(args.out) / "unclip" / f"clipguide_{sampler}_{scale:g}.png", nrow=10)


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default="clip,prior,text2image,variations,clipguide")
    p.add_argument("--clip", default="runs/clip")
    p.add_argument("--noisy", default="runs/clip_noisy")
    p.add_argument("--prior", default="runs/unclip_prior")
    p.add_argument("--decoder", default="runs/unclip_decoder")
    p.add_argument("--demo", default="runs/demo")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--sampler", default="dpmpp_2m_sde", help="the decoder's sampler")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--grid", default="karras")
    p.add_argument("--prior-scales", type=floats, default=[1.0, 2.0])
    p.add_argument("--prior-scale", type=float, default=unclip.DEFAULT_PRIOR_SCALE)
    p.add_argument("--prior-steps", type=int, default=64)
    p.add_argument("--best-of", type=int, default=1)
    p.add_argument("--decoder-scales", type=floats, default=[1.0, 3.0, 5.0])
    p.add_argument("--variation-scales", type=floats, default=[1.0, 3.0])
    p.add_argument("--clip-scales", type=floats, default=[0.0, 50.0, 100.0, 200.0, 400.0])
    p.add_argument("--guide-samplers", default="ddpm:100", help="SAMPLER:STEPS,... for the CLIP-guidance sweep")
    p.add_argument("--out", default="runs/bench")
    args = p.parse_args()
    args.guide_samplers = [(s.split(":")[0], int(s.split(":")[1])) for s in args.guide_samplers.split(",")]
    held_out = load_dataset("mnist5k", split="test")
    features = FeatureNet("classifier", "mnist5k")
    real = FeatureStats.of(features(held_out.x)[0])
    rows: list[dict] = []
    sections = args.sections.split(",")
    if "clip" in sections:
        section_clip(args, held_out, rows)
    if "prior" in sections:
        section_prior(args, held_out, rows)
    if "text2image" in sections:
        section_text2image(args, held_out, rows, features, real)
    if "variations" in sections:
        section_variations(args, held_out, rows, features, real)
    if "clipguide" in sections:
        section_clipguide(args, held_out, rows, features, real)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"unclip_{'_'.join(sections)}.json"
    path.write_text(json.dumps({"args": {k: v for k, v in vars(args).items()}, "rows": rows}, indent=2, default=str))
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
