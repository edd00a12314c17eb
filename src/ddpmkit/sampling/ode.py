"""Probability-flow ODE solvers: Euler, Heun, DPM-Solver++ (2M, 3M, and their SDE variants),
UniPC, and torchdiffeq's adaptive dopri5 as the reference.

All work on x_bar = x_t / sqrt(alpha_bar) against sigma (see continuous.py), evaluate the network
once per grid point (Heun twice, except at the last step) and end with x_0 = D(x_bar; sigma_min).
"""
from __future__ import annotations

import math

import torch

from ..errors import UserError
from ..parameterization import Denoiser
from .continuous import Trajectory
from .noise import NoiseSource


def euler(denoiser: Denoiser, x: torch.Tensor, noise: NoiseSource, steps: int | None = None, grid="karras",
          callback=None, model_kwargs=None, progress=False, **options) -> torch.Tensor:
    """Euler's method in sigma: x_bar <- x_bar + (sigma_next - sigma) eps. First order; on the
    same grid it is DDIM with eta = 0 (Song et al. 2021; Karras et al. 2022, Table 1)."""
    tr = Trajectory(denoiser, x, steps, grid, model_kwargs, callback, progress, "euler", options)
    x_bar, s = tr.x_bar, tr.sigmas
    for k in tr.steps():
        out = tr.D(x_bar, s[k])
        x_bar = x_bar + (s[k + 1] - s[k]) * out.eps
        tr.report(k, x_bar, out.x0)
    return x_bar


def heun(denoiser: Denoiser, x: torch.Tensor, noise: NoiseSource, steps: int | None = None, grid="karras",
         callback=None, model_kwargs=None, progress=False, **options) -> torch.Tensor:
    """Heun's second-order method (EDM, Algorithm 1 without churn): an Euler step, then the
    average of the slopes at both ends; the last step (to sigma = 0) stays Euler. 2n - 1 NFE."""
    tr = Trajectory(denoiser, x, steps, grid, model_kwargs, callback, progress, "heun", options)
    x_bar, s = tr.x_bar, tr.sigmas
    for k in tr.steps():
        x_bar, out = tr.heun_step(x_bar, s[k], s[k + 1])
        tr.report(k, x_bar, out.x0)
    return x_bar


# Adams-Bashforth weights for equal steps, newest slope first (order 1..4)
AB_WEIGHTS = ([1.0], [3 / 2, -1 / 2], [23 / 12, -16 / 12, 5 / 12], [55 / 24, -59 / 24, 37 / 24, -9 / 24])


def ipndm(denoiser: Denoiser, x: torch.Tensor, noise: NoiseSource, steps: int | None = None, grid="karras",
          order: int = 4, callback=None, model_kwargs=None, progress=False, **options) -> torch.Tensor:
    """Improved PNDM (Zhang & Chen 2023; Zhou et al. 2024): Adams-Bashforth in sigma on the
    slopes eps = dx_bar/dsigma, with the fixed equal-step weights and the order growing from 1 to
    `order` as past slopes become available. Strong at 5-10 NFE."""
    if order not in (1, 2, 3, 4):
        raise UserError(f"iPNDM order must be 1..4, got {order}")
    tr = Trajectory(denoiser, x, steps, grid, model_kwargs, callback, progress, "ipndm", options)
    x_bar, s = tr.x_bar, tr.sigmas
    slopes: list[torch.Tensor] = []  # newest first
    for k in tr.steps():
        out = tr.D(x_bar, s[k])
        slopes = [out.eps] + slopes[: order - 1]
        weights = AB_WEIGHTS[len(slopes) - 1]
        x_bar = x_bar + (s[k + 1] - s[k]) * sum(w * d for w, d in zip(weights, slopes))
        tr.report(k, x_bar, out.x0)
    return x_bar


# the weight of phi_3 d2 in DPM-Solver++'s third-order step (dpmpp's `third_order`)
THIRD_ORDER_WEIGHTS = {"published": 1.0, "exact": 2.0}


def dpmpp(denoiser: Denoiser, x: torch.Tensor, noise: NoiseSource, steps: int | None = None, grid="logsnr",
          order: int = 2, eta: float = 0.0, lower_order_final: bool = True, solver_type: str = "heun", third_order: str = "published",
          callback=None, model_kwargs=None, progress=False, **options) -> torch.Tensor:
    """DPM-Solver++ multistep (Lu et al. 2022) in data prediction, of order 1, 2 or 3.

    With h = lambda_next - lambda and the exponential integrator for the linear part,
        x_bar_next = e^{-h(1+eta)} x_bar + (1 - e^{-h(1+eta)}) D + phi_2 d1 - phi_3 d2
                     [+ sigma_next sqrt(1 - e^{-2 eta h}) z]
    where d1, d2 are the divided differences of past D's (Adams-Bashforth in lambda). eta = 0 is
    the ODE solver (2M, 3M), eta = 1 the SDE variant (Lu et al. 2022, sec. 5; k-diffusion).
    The first steps have fewer past D's and use a lower order; lower_order_final limits the order
    near sigma = 0 as diffusers does (it helps with few steps).

    solver_type: how order 2 weighs the divided difference d1 = (D - D_prev) / r. "heun" is the
    paper's phi_2 = (e^{-h} - 1) / h + 1 (diffusers' solver_type="heun"); "midpoint" is
    (1 - e^{-h}) / 2, k-diffusion's 2M and diffusers' default. Both are second order.

    third_order: the weight of d2 in a third-order step. "published" is phi_3 d2, DPM-Solver++(3M) as its authors,
    diffusers and k-diffusion compute it; d2 there is h^2 D''/2, so the step integrates only half of D's quadratic term
    and the solver converges at order 2. "exact" is 2 phi_3 d2: the exponential Adams-Bashforth step, exact for a D
    quadratic in lambda, of order 3 (tests/test_samplers.py checks both; bench/samplers.py compares them).
    """
    if solver_type not in ("heun", "midpoint"):
        raise UserError(f"solver_type must be 'heun' or 'midpoint', got {solver_type!r}")
    if third_order not in THIRD_ORDER_WEIGHTS:
        raise UserError(f"third_order must be one of {sorted(THIRD_ORDER_WEIGHTS)}, got {third_order!r}")
    if order not in (1, 2, 3):
        raise UserError(f"DPM-Solver++ order must be 1, 2 or 3, got {order}")
    if not 0.0 <= eta < math.inf:
        raise UserError(f"eta must be a finite number >= 0, got {eta}")
    name = f"dpmpp_{order}m" + ("_sde" if eta else "")
    tr = Trajectory(denoiser, x, steps, grid, model_kwargs, callback, progress, name, options)
    x_bar, s, lam = tr.x_bar, tr.sigmas, tr.lambdas()
    past: list[tuple[torch.Tensor, float]] = []  # (D, h) of earlier steps, newest first
    for k in tr.steps():
        D = tr.D(x_bar, s[k]).x0
        if s[k + 1] == 0:
            x_bar = D  # the last step: sigma_next = 0, e^{-h} = 0
        else:
            h = lam[k + 1] - lam[k]
            h_eta = h * (1 + eta)
            p = min(order, len(past) + 1)
            if lower_order_final:
                p = min(p, tr.n - k)
            x_bar = math.exp(-h_eta) * x_bar - math.expm1(-h_eta) * D
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            if p == 2:
                D1, h1 = past[0]
                weight = -0.5 * math.expm1(-h_eta) if solver_type == "midpoint" else phi_2
                x_bar = x_bar + weight * (D - D1) / (h1 / h)
            elif p == 3:
                (D1, h1), (D2, h2) = past[0], past[1]
                r0, r1 = h1 / h, h2 / h
                d1_0, d1_1 = (D - D1) / r0, (D1 - D2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5
                x_bar = x_bar + phi_2 * d1 - THIRD_ORDER_WEIGHTS[third_order] * phi_3 * d2
            if eta > 0:
                x_bar = x_bar + s[k + 1] * math.sqrt(-math.expm1(-2 * eta * h)) * noise.randn(x_bar.shape[1:], x_bar.dtype)
            past = [(D, h)] + past[:1]
        tr.report(k, x_bar, D)
    return x_bar


def _named(name: str, fixed: dict, kw: dict) -> dict:
    """The options of a named DPM-Solver++ variant: the ones its name fixes are refused by name (not a TypeError)."""
    if clash := sorted(set(kw) & set(fixed)):
        raise UserError(f"sampler {name!r} fixes {', '.join(f'{k} = {fixed[k]:g}' for k in clash)}: choose among dpmpp_2m, dpmpp_3m "
                        "(ODE, order 2 or 3) and dpmpp_2m_sde, dpmpp_3m_sde (eta 1 unless given)")
    return {**fixed, **kw}


def dpmpp_2m(denoiser, x, noise, **kw):
    return dpmpp(denoiser, x, noise, **_named("dpmpp_2m", {"order": 2, "eta": 0.0}, kw))


def dpmpp_3m(denoiser, x, noise, **kw):
    return dpmpp(denoiser, x, noise, **_named("dpmpp_3m", {"order": 3, "eta": 0.0}, kw))


def dpmpp_2m_sde(denoiser, x, noise, **kw):
    return dpmpp(denoiser, x, noise, **_named("dpmpp_2m_sde", {"order": 2}, {"eta": 1.0, **kw}))


def dpmpp_3m_sde(denoiser, x, noise, **kw):
    return dpmpp(denoiser, x, noise, **_named("dpmpp_3m_sde", {"order": 3}, {"eta": 1.0, **kw}))


def _unipc_coefficients(rks: list[float], h: float, variant: str) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """The linear system R rho = b of UniPC (Zhao et al. 2023, Algorithm 2 / diffusers), for data
    prediction. rks: ratios (lambda_i - lambda_0) / h of the points used, the last being 1."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    B_h = math.expm1(hh) if variant == "bh2" else hh
    h_phi_k, factorial = h_phi_1 / hh - 1, 1
    rows, b = [], []
    for i in range(1, len(rks) + 1):
        rows.append([r ** (i - 1) for r in rks])
        b.append(h_phi_k * factorial / B_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return torch.tensor(rows, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), h_phi_1, B_h


def unipc(denoiser: Denoiser, x: torch.Tensor, noise: NoiseSource, steps: int | None = None, grid="logsnr",
          order: int = 2, corrector: bool = True, variant: str = "bh2", lower_order_final: bool = True,
          callback=None, model_kwargs=None, progress=False, **options) -> torch.Tensor:
    """UniPC (Zhao et al. 2023): a multistep predictor (UniP) plus a corrector (UniC) that reuses
    the network evaluation at the new point, so correcting costs no extra NFE and raises the order
    by one. Data prediction, B(h) = e^h - 1 ('bh2') or h ('bh1')."""
    if order not in (1, 2, 3):
        raise UserError(f"UniPC order must be 1, 2 or 3, got {order}")
    if variant not in ("bh1", "bh2"):
        raise UserError(f"unknown UniPC variant {variant!r}; choose 'bh1' or 'bh2'")
    tr = Trajectory(denoiser, x, steps, grid, model_kwargs, callback, progress, "unipc", options)
    x_bar, s, lam = tr.x_bar, tr.sigmas, tr.lambdas()
    Ds: list[torch.Tensor] = []  # D at grid points 0..k
    x_before, p_last = None, 0  # x_bar before the last predictor step, and that step's order
    for k in tr.steps():
        D = tr.D(x_bar, s[k]).x0
        if corrector and x_before is not None:
            # UniC for the step sigma_{k-1} -> sigma_k, with D_k evaluated at the predicted point
            h = lam[k] - lam[k - 1]
            rks = [(lam[k - 1 - i] - lam[k - 1]) / h for i in range(1, p_last)] + [1.0]
            R, b, h_phi_1, B_h = _unipc_coefficients(rks, h, variant)
            rhos = torch.tensor([0.5], dtype=torch.float64) if p_last == 1 else torch.linalg.solve(R, b)
            m0 = Ds[-1]
            res = rhos[-1].item() * (D - m0)
            for i in range(1, p_last):
                res = res + rhos[i - 1].item() * (Ds[-1 - i] - m0) / rks[i - 1]
            x_bar = (s[k] / s[k - 1]) * x_before - h_phi_1 * m0 - B_h * res
        Ds.append(D)
        if s[k + 1] == 0:
            x_bar = D
        else:
            p = min(order, len(Ds))
            if lower_order_final:
                p = min(p, tr.n - k)
            h = lam[k + 1] - lam[k]
            rks = [(lam[k - i] - lam[k]) / h for i in range(1, p)] + [1.0]
            R, b, h_phi_1, B_h = _unipc_coefficients(rks, h, variant)
            x_before = x_bar
            x_bar = (s[k + 1] / s[k]) * x_bar - h_phi_1 * D
            if p >= 2:
                rhos = torch.tensor([0.5], dtype=torch.float64) if p == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1])
                for i in range(1, p):
                    x_bar = x_bar - B_h * rhos[i - 1].item() * (Ds[-1 - i] - D) / rks[i - 1]
            p_last = p
        tr.report(k, x_bar, D)
    return x_bar


def dopri5(denoiser: Denoiser, x: torch.Tensor, noise: NoiseSource, steps: int | None = None, grid="karras",
           rtol: float = 1e-5, atol: float = 1e-5, callback=None, model_kwargs=None, progress=False,
           **options) -> torch.Tensor:
    """Adaptive Dormand-Prince 5(4) from torchdiffeq, in u = log sigma (dx_bar/du = x_bar - D) from
    the first to the last grid point, then x_0 = D(x_bar; sigma_min). The reference solution:
    NFE depends on the tolerances, not on `steps`."""
    if not (0 < rtol < 1 and 0 < atol < 1):  # torchdiffeq's "underflow in dt" assertion at 0 or NaN
        raise UserError(f"dopri5's tolerances must lie in (0, 1), got rtol = {rtol}, atol = {atol}")
    T = denoiser.schedule.T
    if denoiser.schedule.zero_terminal_snr and T > 2:  # zero terminal SNR: the exact first step goes to T-2
        grid, points = torch.tensor([T - 1.0, T - 2.0, 0.0], dtype=torch.float64), 3  # (finite sigma), the solve from there
    else:
        points = min(2, T)  # T = 1: one grid point, nothing to solve
    tr = Trajectory(denoiser, x, points, grid, model_kwargs, callback, progress, "dopri5", options)
    s_max, s_min = tr.sigmas[0], tr.sigmas[-2]

    def f(u: torch.Tensor, x_bar: torch.Tensor) -> torch.Tensor:
        # torchdiffeq hands u back in x_bar's dtype: float32 rounding can put exp(u) just past sigma_max (the cosine schedule)
        return x_bar - tr.D(x_bar, min(max(math.exp(u.item()), s_min), s_max)).x0

    span = torch.tensor([math.log(s_max), math.log(s_min)], dtype=torch.float64)
    from torchdiffeq import odeint  # slow to import (scipy): only for the adaptive reference solve

    # a span of one point (T = 1, or T = 2 with zero terminal SNR, whose exact first step lands on t = 0): no solve
    x_bar = odeint(f, tr.x_bar, span, rtol=rtol, atol=atol, method="dopri5")[-1] if s_max > s_min else tr.x_bar
    out = tr.D(x_bar, s_min)
    tr.report(tr.n - 1, out.x0, out.x0)
    return out.x0
