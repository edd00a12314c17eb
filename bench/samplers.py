"""Quality per network evaluation: ddpmkit's samplers against diffusers' schedulers.

Both drive the exact E[eps | x_t] of a Gaussian mixture (2-D ring and 64-D, narrow components)
under DDPM's linear schedule, from the same x_T. The score is the median L2 distance of the
endpoints from the exact probability-flow ODE solution (dopri5 at rtol = atol = 1e-10, from
t = T-1 to t = 0, then the denoiser's x_0 there -- the limit every sampler converges to).

    .venv/bin/python bench/samplers.py [--n 400] [--nfe 5,10,20,50] [--plot runs/bench/samplers.png]

Prints, per problem and NFE, the best configuration of each family and the ratio of ddpmkit's
best to diffusers' best (< 0.5 is the target at NFE 5, 10 and 20). Every named grid is tried for
both sides; ddpmkit also optimises the grid of UniPC and iPNDM for the model at hand
(``ddpmkit.sampling.optimize.optimize_grid``) on 100 trajectories from a different seed than the
400 it is scored on. About 10 minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import time
import warnings
from pathlib import Path

import ddpmkit.threads  # noqa: F401 -- before torch: OpenMP threads wait passively beside other processes

# isort: split
import numpy as np
import torch

import ddpmkit
from ddpmkit.analytic import GaussianMixture
from ddpmkit.sampling.optimize import optimize_grid
from ddpmkit.schedules import NoiseSchedule

warnings.filterwarnings("ignore")


def problems() -> dict[str, GaussianMixture]:
    g = torch.Generator().manual_seed(0)
    ring = GaussianMixture.ring(8, radius=1.0, std=0.05)
    K, D = 10, 64
    means = torch.rand(K, D, generator=g, dtype=torch.float64) * 2 - 1  # like pixels in [-1, 1]
    wide = GaussianMixture(means, torch.full((K,), 0.05), torch.ones(K))
    return {"2-D ring (8 x std 0.05)": ring, "64-D mixture (10 x std 0.05)": wide}


# ---- ddpmkit ----------------------------------------------------------------------------------
DDPMKIT = {  # sampler -> (grids to try, NFE -> steps)
    "ddim": (["uniform", "quadratic"], lambda n: n),
    "euler": (["karras", "logsnr"], lambda n: n),
    "heun": (["karras", "logsnr"], lambda n: (n + 1) // 2),
    "dpmpp_2m": (["karras", "logsnr"], lambda n: n),
    "dpmpp_3m": (["karras", "logsnr"], lambda n: n),
    "unipc": (["karras", "logsnr"], lambda n: n),
    "ipndm": (["karras", "logsnr", "quadratic"], lambda n: n),
}
# extra rows: (label, sampler, its options)
VARIANTS = [("dpmpp_3m, third_order=exact", "dpmpp_3m", {"third_order": "exact"})]
# samplers whose grid is also optimised (sampling/optimize.py) on 100 other trajectories, for NFE <= 20
OPTIMISED = {"unipc": {"order": 2}, "ipndm": {"order": 3}}


def run_ddpmkit(gm, schedule, x_T, sampler, grid, nfe, **options):
    steps = DDPMKIT[sampler][1](nfe)
    res = ddpmkit.sample(gm.eps_model(schedule), x_T.shape, schedule, sampler=sampler, steps=steps, grid=grid, x_T=x_T, **options)
    return res.x, res.nfe


# ---- diffusers --------------------------------------------------------------------------------
def diffusers_configs():
    """(family, label, scheduler class, kwargs, NFE -> steps) for each configuration tried."""
    from diffusers import (
        DDIMScheduler,
        DEISMultistepScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        HeunDiscreteScheduler,
        UniPCMultistepScheduler,
    )

    spacings = ["linspace", "leading", "trailing"]
    sigma_kinds = [{}, {"use_karras_sigmas": True}, {"use_exponential_sigmas": True}, {"use_beta_sigmas": True}]
    same = lambda n: n  # noqa: E731
    out = []
    for sp in spacings:
        out.append(("DDIM", f"{sp}", DDIMScheduler, {"timestep_spacing": sp, "set_alpha_to_one": True}, same))
    for sp, sk in itertools.product(spacings, sigma_kinds):
        tag = sp + "".join(f"+{k[4:-7]}" for k in sk)
        out.append(("Euler", tag, EulerDiscreteScheduler, {"timestep_spacing": sp, **sk}, same))
        out.append(("Heun", tag, HeunDiscreteScheduler, {"timestep_spacing": sp, **sk}, lambda n: (n + 1) // 2))
    for order, sp, sk in itertools.product([2, 3], spacings, sigma_kinds + [{"use_lu_lambdas": True}]):
        tag = sp + "".join(f"+{k[4:-7] if 'sigmas' in k else k[4:]}" for k in sk)
        out.append((f"DPM-Solver++ {order}M", tag, DPMSolverMultistepScheduler,
                    {"solver_order": order, "algorithm_type": "dpmsolver++", "timestep_spacing": sp, **sk}, same))
    for order, sp, sk in itertools.product([2, 3], spacings, sigma_kinds):
        tag = f"order {order}, " + sp + "".join(f"+{k[4:-7]}" for k in sk)
        out.append(("UniPC", tag, UniPCMultistepScheduler, {"solver_order": order, "timestep_spacing": sp, **sk}, same))
        out.append(("DEIS", tag, DEISMultistepScheduler, {"solver_order": order, "timestep_spacing": sp, **sk}, same))
    return out


def run_diffusers(gm, x_T, cls, kwargs, steps):
    sched = cls(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                prediction_type="epsilon", **kwargs)
    sched.set_timesteps(steps)
    log_sigmas = np.log(((1 - sched.alphas_cumprod) / sched.alphas_cumprod).numpy().astype(np.float64) ** 0.5)
    x = x_T * sched.init_noise_sigma
    nfe = 0
    for t in sched.timesteps:
        x_in = sched.scale_model_input(x, t)
        # the exact eps at the noise level the scheduler means by t (diffusers interpolates log sigma in t)
        sigma = math.exp(np.interp(float(t), np.arange(len(log_sigmas)), log_sigmas))
        ab = torch.full((x.shape[0],), 1 / (1 + sigma**2), dtype=torch.float64)
        eps = gm.eps_star(x_in, ab)
        nfe += 1
        x = sched.step(eps, t, x).prev_sample
    return x.to(torch.float64), nfe


def median_error(x, ref) -> float:
    return (x.to(torch.float64) - ref).norm(dim=1).median().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=400, help="trajectories per problem")
    p.add_argument("--nfe", default="5,10,20,50")
    p.add_argument("--plot", default="runs/bench/samplers.png")
    args = p.parse_args()
    nfes = [int(n) for n in args.nfe.split(",")]
    schedule = NoiseSchedule.from_name("linear", 1000)
    configs = diffusers_configs()
    curves: dict[str, dict[str, list[float]]] = {}
    for pname, gm in problems().items():
        x_T = torch.randn(args.n, gm.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        t0 = time.time()
        ref = ddpmkit.sample(gm.eps_model(schedule), x_T.shape, schedule, sampler="dopri5", x_T=x_T, rtol=1e-10, atol=1e-10)
        print(f"\n== {pname}: {args.n} trajectories; reference dopri5 {ref.nfe} NFE in {time.time() - t0:.1f}s")
        rows: dict[str, dict[int, tuple[float, str]]] = {}
        for label, sampler, options in [(s, s, {}) for s in DDPMKIT] + VARIANTS:
            for nfe in nfes:
                for grid in DDPMKIT[sampler][0]:
                    x, used = run_ddpmkit(gm, schedule, x_T, sampler, grid, nfe, **options)
                    err = median_error(x, ref.x)
                    best = rows.setdefault(f"ddpmkit {label}", {}).get(nfe)
                    if best is None or err < best[0]:
                        rows[f"ddpmkit {label}"][nfe] = (err, f"{grid}, {used} NFE")
        for sampler, options in OPTIMISED.items():
            for nfe in [n for n in nfes if n <= 20]:
                t1 = time.time()
                grid = optimize_grid(gm.eps_model(schedule), (100, gm.dim), schedule, sampler=sampler, steps=nfe, seed=100,
                                     max_evals=1500, **options)
                x, used = run_ddpmkit(gm, schedule, x_T, sampler, grid, nfe, **options)
                label = f"ddpmkit {sampler} + optimised grid"
                rows.setdefault(label, {})[nfe] = (median_error(x, ref.x), f"{used} NFE, optimised in {time.time() - t1:.0f}s")
        for family, label, cls, kwargs, to_steps in configs:
            for nfe in nfes:
                try:
                    x, used = run_diffusers(gm, x_T, cls, kwargs, to_steps(nfe))
                except Exception:  # noqa: BLE001 -- a configuration diffusers does not support
                    continue
                err = median_error(x, ref.x)
                if not math.isfinite(err):
                    continue
                best = rows.setdefault(f"diffusers {family}", {}).get(nfe)
                if best is None or err < best[0]:
                    rows[f"diffusers {family}"][nfe] = (err, f"{label}, {used} NFE")
        width = max(len(r) for r in rows)
        print(f"{'median endpoint error':<{width}} " + " ".join(f"{'NFE ' + str(n):>10}" for n in nfes))
        for name, by_nfe in rows.items():
            print(f"{name:<{width}} " + " ".join(f"{by_nfe[n][0]:>10.2e}" if n in by_nfe else f"{'-':>10}" for n in nfes))
        for side in ("ddpmkit", "diffusers"):
            for n in nfes:
                cands = [(v[n][0], k, v[n][1]) for k, v in rows.items() if k.startswith(side) and n in v]
                e, k, how = min(cands)
                print(f"  best {side:<9} NFE {n:>3}: {e:.2e}  {k[len(side) + 1:]} ({how})")
        print("ratio ddpmkit best / diffusers best (target <= 0.5 at NFE 5, 10, 20):")
        ratios = []
        for n in nfes:
            ours = min(v[n][0] for k, v in rows.items() if k.startswith("ddpmkit") and n in v)
            theirs = min(v[n][0] for k, v in rows.items() if k.startswith("diffusers") and n in v)
            ratios.append(ours / theirs)
            verdict = "" if n > 20 else ("PASS" if ours / theirs <= 0.5 else "FAIL")
            print(f"  NFE {n:>3}: {ours / theirs:.3f} {verdict}")
        curves[pname] = {k: [v.get(n, (float('nan'),))[0] for n in nfes] for k, v in rows.items()}
    if args.plot:
        plot(curves, nfes, args.plot)
        Path(args.plot).with_suffix(".json").write_text(json.dumps({"nfe": nfes, "median_error": curves}, indent=1))
        print(f"\nwrote {args.plot} and {Path(args.plot).with_suffix('.json')}")


def plot(curves, nfes, path) -> None:
    import matplotlib

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves) + 2.5, 4.5), dpi=90)
    colors = plt.get_cmap("tab20").colors
    for ax, (pname, rows) in zip(np.atleast_1d(axes), curves.items()):
        for i, (name, errs) in enumerate(rows.items()):
            ours = name.startswith("ddpmkit")
            ax.loglog(nfes, errs, marker="o" if ours else "s", ls="-" if ours else "--", color=colors[i % 20],
                      lw=2.2 if "optimised" in name else 1.2, label=name)
        ax.set_title(pname)
        ax.set_xlabel("network evaluations (NFE)")
        ax.set_ylabel("median endpoint error")
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = np.atleast_1d(axes)[-1].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="center right")
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
