"""Sample quality per network evaluation: one table of samplers x checkpoints, judged on digits.

    .venv/bin/python bench/quality_per_nfe.py --checkpoints runs/demo [--n 500] \
        [--samplers ddpm:1000 dpmpp_2m_sde:20 ddim:20 unipc:20 dpmpp_2m:20 heun:10 ddim:10 unipc:10] \
        [--posthoc-ema 0.03,0.05,0.08,0.12]

Each sampler is NAME:STEPS or NAME:STEPS:GRID (a grid name or a `ddpmkit tune-grid` JSON file), either with the sampler's
own options after another colon (dpmpp_3m:20:third_order=exact); the
table reports the NFE actually spent (Heun spends two per step but one on the last). For each
checkpoint: n samples with the same seeds, the share the judge reads with confidence >= 0.9 and
the judge-FD (Frechet distance in the judge's feature space to mnist5k's 500 held-out digits;
not comparable with papers' FIDs).

--posthoc-ema: for runs trained with train.posthoc_ema, also the EMA of each relative width,
reconstructed after training (`ddpmkit posthoc-ema`), as extra rows.

--autoguide WEAKER --autoguide-scales 1.5,2: also each sampler with autoguidance by the weaker model
(e.g. an early checkpoint of the same run, RUN/ckpt-0000200) at each weight w, as extra rows (NFE
counts both networks' evaluations).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ddpmkit.evaluate.report import DigitScorer
from ddpmkit.models import load_diffusion
from ddpmkit.pipelines import generate
from ddpmkit.pipelines.guided import GuidanceRequest
from ddpmkit.posthoc_ema import write_checkpoint
from ddpmkit.precision import CHOICES as PRECISIONS
from ddpmkit.sampling.options import sampler_options
from ddpmkit.train.judge import ensure_judge

DEFAULT_SAMPLERS = ["ddpm:1000", "dpmpp_2m_sde:20", "ddim:20", "unipc:20", "dpmpp_2m:20", "heun:10", "ddim:10", "unipc:10", "dpmpp_2m:10"]


def parse_sampler(spec: str) -> tuple[str, int, str | None, dict]:
    """NAME:STEPS[:GRID][:KEY=VALUE,...] -> (name, steps, grid, the sampler's extra options)."""
    parts = spec.split(":")
    extra = parts.pop() if len(parts) > 2 and "=" in parts[-1] else ""
    if len(parts) not in (2, 3) or not parts[1].isdigit():
        raise SystemExit(f"sampler spec {spec!r} must be NAME:STEPS, NAME:STEPS:GRID or either with :KEY=VALUE,... "
                         "(e.g. dpmpp_3m:20:third_order=exact)")
    options = {}
    for item in filter(None, extra.split(",")):
        key, _, value = item.partition("=")
        try:
            options[key] = float(value) if "." in value else int(value)
        except ValueError:
            options[key] = value
    return parts[0], int(parts[1]), parts[2] if len(parts) == 3 else None, options


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", nargs="+", default=["runs/demo"])
    p.add_argument("--samplers", nargs="+", default=DEFAULT_SAMPLERS)
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--posthoc-ema", default="", help="relative widths to reconstruct, e.g. 0.03,0.05,0.08")
    p.add_argument("--autoguide", default=None, help="a weaker model of the same kind for autoguidance rows")
    p.add_argument("--autoguide-scales", default="2", help="autoguidance weights w, e.g. 1.5,2,3")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS, help="the network's (generate's precision)")
    p.add_argument("--out", default="runs/bench/quality_per_nfe.json")
    args = p.parse_args()

    samplers = [parse_sampler(s) for s in args.samplers]
    widths = [float(w) for w in args.posthoc_ema.split(",") if w.strip()]
    targets = []
    for ckpt in args.checkpoints:
        targets.append((ckpt, ckpt))
        for w in widths:
            targets.append((f"{ckpt} (post-hoc EMA {w:g})", str(write_checkpoint(ckpt, w).parent)))
    requests = [("", None)] + [(f" + autoguidance {w:g}", GuidanceRequest(autoguide=args.autoguide, autoguide_scale=w))
                               for w in ([float(w) for w in args.autoguide_scales.split(",")] if args.autoguide else [])]
    ensure_judge()  # trained into the cache on first use
    scorer = DigitScorer()
    rows = []
    print("| model | step | sampler | NFE | judged p >= 0.9 | judge-FD | seconds |\n|---|---|---|---|---|---|---|", flush=True)
    for name, path in targets:
        m = load_diffusion(path)
        for (sampler, steps, grid, extra), (guided, request) in ((s, r) for s in samplers for r in requests):
            t0 = time.time()
            gen = generate(m, args.n, request, sampler=sampler, steps=steps, seed=args.seed,
                           options={**sampler_options(sampler, grid), **extra}, progress=False, precision=args.precision)
            secs = time.time() - t0
            s = scorer(gen.images)
            label = (sampler + (f" ({grid})" if grid else "") + "".join(f", {k}={v}" for k, v in extra.items()) + guided
                     + ("" if args.precision == "fp32" else f", {args.precision}"))
            nfe = gen.nfe * (request.autoguided_networks if request is not None else 1)
            rows.append({"model": name, "step": m.step, "sampler": label, "steps": steps, "nfe": nfe, "n": args.n,
                         "confident": s["confident"], "judge_fd": s["fd"], "seconds": secs})
            print(f"| {name} | {m.step} | {label} | {nfe} | {s['confident']:.1%} | {s['fd']:.2f} | {secs:.0f} |", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
