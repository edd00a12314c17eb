"""ODE and SDE samplers driven by exact denoisers: convergence order, agreement, distributions."""
import json
import math
import warnings

import numpy as np
import pytest
import torch

import ddpmkit
from ddpmkit.analytic import GaussianMixture, nearest_component
from ddpmkit.errors import UserError
from ddpmkit.parameterization import v_from_x0_eps, x0_from_eps
from ddpmkit.sampling import SAMPLERS, timestep_grid
from ddpmkit.sampling.grids import integer_grid
from ddpmkit.sampling.noise import NoiseSource
from ddpmkit.sampling.optimize import grid_from_gaps, optimize_grid
from ddpmkit.sampling.options import sampler_options
from ddpmkit.schedules import NoiseSchedule

S = NoiseSchedule.from_name("linear", 1000)
MU, SD = torch.tensor([0.5, -1.0, 0.2], dtype=torch.float64), 0.3
GAUSS = GaussianMixture.gaussian(MU, SD)
X_T = torch.randn(64, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def exact_gaussian_endpoint(x_T: torch.Tensor, schedule: NoiseSchedule = S) -> torch.Tensor:
    """The probability-flow ODE for N(mu, s^2 I) data in closed form: in x_bar = x / sqrt(alpha_bar)
    x_bar(sigma) - mu = sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma_max^2) (x_bar(sigma_max) - mu), from
    t = T-1 to t = 0, then the denoiser's x_0 = mu + s^2 / (s^2 + sigma^2) (x_bar - mu) there."""
    s_max, s_min = schedule.sigma_at(schedule.T - 1).item(), schedule.sigma_at(0).item()
    x_bar = x_T * math.sqrt(1 + s_max**2)
    x_min = MU + math.sqrt(SD**2 + s_min**2) / math.sqrt(SD**2 + s_max**2) * (x_bar - MU)
    return MU + SD**2 / (SD**2 + s_min**2) * (x_min - MU)


REF = exact_gaussian_endpoint(X_T)


def error(sampler: str, steps: int, **options) -> float:
    out = ddpmkit.sample(GAUSS.eps_model(S), X_T.shape, S, sampler=sampler, steps=steps, x_T=X_T, **options)
    return (out.x - REF).norm(dim=1).median().item()


@pytest.mark.parametrize(
    "sampler, options, order",
    [
        ("ddim", {}, 1),
        ("euler", {"grid": "logsnr"}, 1),
        ("heun", {"grid": "logsnr"}, 2),
        ("dpmpp_2m", {}, 2),
        # DPM-Solver++(3M) as published (and in diffusers): half of the quadratic term, so second order (test below);
        # the exact third-order step converges at order 3 or better (about 3.9 on this Gaussian)
        ("dpmpp_3m", {}, 2),
        ("dpmpp_3m", {"third_order": "exact"}, 3),
        ("unipc", {"order": 1}, 2),  # the corrector raises the order by one at no extra NFE
        ("unipc", {"order": 2}, 3),
        ("ipndm", {"order": 2, "grid": "logsnr"}, 2),
    ],
)
def test_deterministic_solvers_converge_at_their_order(sampler, options, order):
    steps = np.array([20, 40, 80, 160])
    errs = np.array([error(sampler, int(n), **options) for n in steps])
    slope = -np.polyfit(np.log(steps), np.log(errs), 1)[0]
    assert errs[-1] < 2e-2
    if options.get("third_order") == "exact":
        assert slope > order - 0.3, f"{sampler}: errors {errs}, fitted order {slope:.2f}"
    else:
        assert slope == pytest.approx(order, abs=0.3), f"{sampler}: errors {errs}, fitted order {slope:.2f}"


@pytest.mark.parametrize("order, third_order", [(2, "published"), (3, "exact"), (3, "published")])
def test_dpmpp_multistep_steps_integrate_a_polynomial_denoiser_exactly(order, third_order):
    """Each step on its own: with D a polynomial in lambda = -log sigma of degree order - 1 (and independent of x), the
    exact step is x_bar_next / sigma_next = x_bar / sigma + int e^lambda D(lambda) dlambda (the probability-flow ODE in
    y = x_bar / sigma). The divided differences of an order-p step reproduce D exactly, so the 2M step (phi_2 weight) and
    the exact third-order step are exact; the published 3M step integrates half of the quadratic term,
    c2 (h^2 - 2h + 2 - 2 e^-h) / 2 short of the exact step, which is why it converges at order 2 (test above)."""
    c = [0.3, -0.7, 0.2][:order]  # D(lambda) = c0 + c1 lambda (+ c2 lambda^2)
    ts = timestep_grid("karras", S, 12)  # steps of unequal length in lambda, so that r0, r1 != 1
    sigmas = S.sigma_at(ts).tolist()
    lam = [-math.log(sg) for sg in sigmas]

    def D(lam_: float) -> float:
        return sum(ck * lam_**k for k, ck in enumerate(c))

    def F(lam_: float) -> float:  # an antiderivative of e^lambda D(lambda)
        return math.exp(lam_) * sum(ck * part for ck, part in zip(c, (1, lam_ - 1, lam_**2 - 2 * lam_ + 2)))

    def model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # x0-prediction at the grid point t is on
        k = int((ts - t[0].double()).abs().argmin())
        return torch.full_like(x_t, D(lam[k]))

    x_T = torch.randn(4, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x_bars = [x_T * math.sqrt(1 + sigmas[0] ** 2)]
    ddpmkit.sample(model, x_T.shape, S, sampler=f"dpmpp_{order}m", grid="karras", steps=12, x_T=x_T, prediction="x0",
                   lower_order_final=False, third_order=third_order,
                   callback=lambda info: x_bars.append(info["x"] * math.sqrt(1 + (sigmas + [0.0])[len(x_bars)] ** 2)))
    for k in range(order - 1, len(ts) - 1):  # the steps with a full history, to the last sigma > 0
        exact = sigmas[k + 1] * (x_bars[k] / sigmas[k] + F(lam[k + 1]) - F(lam[k]))
        if order == 3 and third_order == "published":
            h = lam[k + 1] - lam[k]
            exact = exact - c[2] * (h * h - 2 * h + 2 - 2 * math.exp(-h)) / 2
        assert torch.allclose(x_bars[k + 1], exact, rtol=1e-9, atol=1e-9), (k, (x_bars[k + 1] - exact).abs().max())
    # and the first step, with no history, is first order: not exact for a D that changes
    first = sigmas[1] * (x_bars[0] / sigmas[0] + F(lam[1]) - F(lam[0]))
    assert (x_bars[1] - first).abs().max() > 1e-3


def test_a_clipped_x0_keeps_eps_consistent_so_ddim_and_euler_stay_one_sampler():
    """With clip_x0 a solver clips the predicted x_0 to [-1, 1] and recomputes eps from it (eps = (x_t - sqrt(ab) x_0) /
    sqrt(1 - ab)), so that x_t = sqrt(ab) x_0 + sqrt(1 - ab) eps still holds. Then each DDIM step is eq. 12 with the
    clipped x_0, and Euler in sigma, which clips in its own space, is still the same step. Modes at +-1.5 make the clip
    bite in half the steps."""
    wide = GaussianMixture(torch.tensor([[1.5, -1.2], [-1.4, 0.3]]), torch.tensor([0.3, 0.4]), torch.ones(2))
    model = wide.eps_model(S)
    x_T = torch.randn(256, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    seen: list[dict] = []
    # 28 uniform steps from 999 are whole timesteps (999 = 27 x 37), DDIM's respaced ones, so both visit the same points
    ddim = ddpmkit.sample(model, x_T.shape, S, sampler="ddim", steps=28, grid="uniform", x_T=x_T, clip_x0=True,
                          callback=seen.append).x
    euler = ddpmkit.sample(model, x_T.shape, S, sampler="euler", steps=28, grid="uniform", x_T=x_T, clip_x0=True).x
    assert (euler - ddim).abs().max() < 1e-10
    assert sum(bool((info["x0"].abs() == 1).any()) for info in seen) >= 14  # clipped in half the steps or more (16 of 28)
    assert ddim.abs().max() <= 1  # the last step lands on a clipped x_0
    x_t = x_T
    for j, info in enumerate(seen):
        ab_t = S.alpha_bar[info["t"]]
        ab_s = S.alpha_bar[seen[j + 1]["t"]] if j + 1 < len(seen) else torch.tensor(1.0, dtype=torch.float64)
        eps = (x_t - ab_t.sqrt() * info["x0"]) / (1 - ab_t).sqrt()
        assert torch.allclose(info["x"], ab_s.sqrt() * info["x0"] + (1 - ab_s).sqrt() * eps, atol=1e-10), j
        x_t = info["x"]


def test_dopri5_matches_the_closed_form():
    seen: list[dict] = []
    out = ddpmkit.sample(GAUSS.eps_model(S), X_T.shape, S, sampler="dopri5", x_T=X_T, rtol=1e-9, atol=1e-9, callback=seen.append)
    assert (out.x - REF).abs().max().item() < 1e-6
    assert out.nfe > 10
    # one report, at the end of the solve: no steps left, the grid's last time, x and x_0 the sample
    assert [(info["i"], info["t"]) for info in seen] == [(0, 0)] and torch.equal(seen[0]["x"], out.x) and torch.equal(seen[0]["x0"], out.x)
    # float32 on the cosine schedule: torchdiffeq hands the time back in float32, whose rounding put sigma just past the
    # schedule's sigma_max (2.0e4) and failed the first call; the closed form holds within float32 rounding
    cosine = NoiseSchedule.from_name("cosine", 1000)
    out = ddpmkit.sample(GAUSS.eps_model(cosine), X_T.shape, cosine, sampler="dopri5", x_T=X_T.float(), rtol=1e-6, atol=1e-6)
    assert (out.x.double() - exact_gaussian_endpoint(X_T.float().double(), cosine)).abs().max().item() < 1e-4


MIX = GaussianMixture(torch.tensor([[-1.5, 0.0], [1.5, 0.5], [0.0, -1.5]]), torch.tensor([0.2, 0.3, 0.15]),
                      torch.tensor([0.5, 0.3, 0.2]))


def test_ddim_eta0_and_the_ode_solvers_agree_as_steps_grow():
    x_T = torch.randn(200, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    model = MIX.eps_model(S)
    ref = ddpmkit.sample(model, x_T.shape, S, sampler="dopri5", x_T=x_T, rtol=1e-9, atol=1e-9).x
    errs = [(ddpmkit.sample(model, x_T.shape, S, sampler="ddim", steps=n, x_T=x_T).x - ref).norm(dim=1).median().item()
            for n in (10, 100, 1000)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 2e-3, errs
    unipc = ddpmkit.sample(model, x_T.shape, S, sampler="unipc", steps=50, x_T=x_T).x
    assert (unipc - ref).norm(dim=1).median().item() < 1e-3


def test_ddim_eta1_is_ancestral_ddpm():
    """DDIM's sigma with eta = 1 is sqrt(beta-tilde): the same update as Algorithm 2, draw for draw."""
    model = MIX.eps_model(S)
    a = ddpmkit.sample(model, (16, 2), S, sampler="ddim", steps=1000, eta=1.0, generator=5).x
    b = ddpmkit.sample(model, (16, 2), S, sampler="ddpm", generator=5).x
    assert torch.allclose(a, b, atol=1e-4)
    a = ddpmkit.sample(model, (16, 2), S, sampler="ddim", steps=25, eta=1.0, generator=5).x
    b = ddpmkit.sample(model, (16, 2), S, sampler="ddpm", steps=25, generator=5).x
    assert torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize(
    "sampler, steps, options",
    [
        ("euler_maruyama", 1000, {}),
        ("pc", 250, {}),
        ("dpmpp_2m_sde", 100, {}),
        ("dpmpp_3m_sde", 100, {}),
        ("euler_ancestral", 200, {}),
        ("edm", 50, {}),  # EDM's ImageNet churn
        ("edm", 100, {"churn": 200, "churn_max": 1e9}),  # the most churn, at every noise level
    ],
)
def test_stochastic_samplers_reproduce_the_mixture(sampler, steps, options):
    n = 4000
    out = ddpmkit.sample(MIX.eps_model(S), (n, 2), S, sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(9), **options)
    k = nearest_component(MIX, out.x)
    freq = torch.bincount(k, minlength=3).double() / n
    assert torch.allclose(freq, MIX.weights, atol=4 * (0.25 / n) ** 0.5), freq
    for j in range(3):
        spread = (out.x[k == j].double() - MIX.means[j]).std().item()
        assert spread == pytest.approx(MIX.stds[j].item(), rel=0.1), (j, spread)


def test_pc_corrector_is_score_sdes_langevin_step_draw_for_draw():
    """score_sde's LangevinCorrector for the VP SDE, written out for one sample at a time: grad = score(x, t), step =
    2 (1 - beta_t) (snr |z| / |grad|)^2, x + step grad + sqrt(2 step) z, with |z|^2 and |grad|^2 at their values for
    noise (D and D / (1 - alpha_bar_t)), then the predictor, Euler-Maruyama with the exact beta integral. Each sample
    of a batch matches it draw for draw: the corrector's step size is pinned (the distribution tests cannot see it)."""
    S50, snr, n = NoiseSchedule.from_name("linear", 50), 0.3, 6
    x_T = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    out = ddpmkit.sample(MIX.eps_model(S50), x_T.shape, S50, sampler="pc", steps=50, snr=snr, x_T=x_T, generator=30).x
    log_ab = S50.alpha_bar.log()

    def eps(x, t):
        return MIX.eps_star(x, S50.alpha_bar[t].expand(1))

    for k in range(n):
        x, z = x_T[k:k + 1], NoiseSource(1, [30 + k])
        for t in range(49, 0, -1):
            grad, noise = -eps(x, t) / (1 - S50.alpha_bar[t]).sqrt(), z.randn((2,), torch.float64)
            step = (snr * math.sqrt(2) / math.sqrt(2 / (1 - S50.alpha_bar[t]))) ** 2 * 2 * (1 - S50.betas[t])
            x = x + step * grad + (2 * step).sqrt() * noise
            B = log_ab[t - 1] - log_ab[t]
            x = x + (0.5 * x - eps(x, t) / (1 - S50.alpha_bar[t]).sqrt()) * B + B.sqrt() * z.randn((2,), torch.float64)
        x0 = (x - (1 - S50.alpha_bar[0]).sqrt() * eps(x, 0)) / S50.alpha_bar[0].sqrt()
        assert torch.allclose(out[k], x0[0], atol=1e-9), (k, out[k], x0[0])


@pytest.mark.parametrize("steps, eta", [(25, 1.0), (100, 0.7)])
def test_euler_ancestral_is_ddim_with_the_same_eta_draw_for_draw(steps, eta):
    """On the schedule's own (integer) timesteps, Euler ancestral's sigma_down and sigma_up are DDIM's eq. 12 divided
    by sqrt(alpha_bar_s): the same samples from the same noise."""
    model, grid = MIX.eps_model(S), integer_grid("uniform", S, steps).flip(0)
    a = ddpmkit.sample(model, (16, 2), S, sampler="ddim", steps=steps, eta=eta, generator=5)
    b = ddpmkit.sample(model, (16, 2), S, sampler="euler_ancestral", grid=grid, eta=eta, generator=5)
    assert a.nfe == b.nfe == steps and torch.allclose(a.x, b.x, atol=1e-5), (a.x - b.x).abs().max()
    ode, euler = (calls(model, "euler_ancestral", steps=steps, eta=0.0), calls(model, "euler", steps=steps))
    assert ode == euler  # eta 0: Euler, and the same reports of each step


def calls(model, sampler: str, **options) -> list[tuple]:
    """What a sampler's callback sees at each step (the steps left, t, x_t, the predicted x_0) and its samples."""
    seen: list[tuple] = []
    out = ddpmkit.sample(model, (16, 2), S, sampler=sampler, generator=5,
                         callback=lambda info: seen.append((info["i"], info["t"], info["x"].tolist(), info["x0"].tolist())), **options)
    return [*seen, out.x.tolist()]


def test_edm_is_heun_without_churn_and_churns_only_within_its_range():
    model = MIX.eps_model(S)
    heun = ddpmkit.sample(model, (16, 2), S, sampler="heun", steps=20, generator=5)
    for options in ({"churn": 0.0}, {"churn_min": 1e3, "churn_max": 1e4}):  # no grid sigma of the linear schedule above 157
        edm = ddpmkit.sample(model, (16, 2), S, sampler="edm", steps=20, generator=5, **options)
        assert torch.equal(edm.x, heun.x) and edm.nfe == heun.nfe == 39, options
    assert calls(model, "edm", steps=20, churn=0.0) == calls(model, "heun", steps=20)  # each step's report too
    churned = ddpmkit.sample(model, (16, 2), S, sampler="edm", steps=20, generator=5)
    assert churned.nfe == 39 and not torch.allclose(churned.x, heun.x, atol=1e-3)
    assert torch.equal(churned.x, ddpmkit.sample(model, (16, 2), S, sampler="edm", steps=20, generator=5).x)  # the seed's own noise
    for bad, why in (({"churn": -1.0}, "`churn` must be a finite number >= 0"), ({"churn_max": 0.01}, "`churn_max` must be >= `churn_min`")):
        with pytest.raises(UserError, match=why):
            ddpmkit.sample(model, (4, 2), S, sampler="edm", steps=5, **bad)


PREDICTORS = {
    "x0": lambda eps_fn: lambda x, t: x0_from_eps(x, eps_fn(x, t), S.alpha_bar_at(t.double())),
    "v": lambda eps_fn: lambda x, t: v_from_x0_eps(x0_from_eps(x, eps_fn(x, t), S.alpha_bar_at(t.double())), eps_fn(x, t),
                                                 S.alpha_bar_at(t.double())),
}


@pytest.mark.parametrize("sampler", sorted(set(SAMPLERS) - {"dopri5"}))
@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_every_sampler_drives_every_parameterization(sampler, prediction):
    eps_fn = MIX.eps_model(S)
    model = PREDICTORS[prediction](eps_fn)
    kw = dict(steps=12, generator=3)
    left: list[int] = []
    a = ddpmkit.sample(eps_fn, (8, 2), S, sampler=sampler, callback=lambda info: left.append(info["i"]), **kw)
    b = ddpmkit.sample(model, (8, 2), S, sampler=sampler, prediction=prediction, **kw)
    assert torch.allclose(a.x, b.x, atol=1e-4)
    assert a.nfe == b.nfe
    assert left == list(range(len(left) - 1, -1, -1)) and len(left) >= 11  # the steps left, down to 0 (progress, previews)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_reproducible_and_batch_invariant(sampler):
    model = MIX.eps_model(S)
    kw = dict(sampler=sampler, steps=10, rtol=1e-4, atol=1e-4) if sampler == "dopri5" else dict(sampler=sampler, steps=10)
    big = ddpmkit.sample(model, (6, 2), S, generator=7, **kw)
    again = ddpmkit.sample(model, (6, 2), S, generator=7, **kw)
    assert torch.equal(big.x, again.x)
    small = ddpmkit.sample(model, (2, 2), S, generator=[11, 12], **kw)  # seeds 7+4, 7+5
    if sampler != "dopri5":  # the adaptive step size depends on the whole batch
        assert torch.allclose(big.x[4:6], small.x, atol=1e-5)


def test_nfe_is_counted():
    model = MIX.eps_model(S)
    nfe = lambda sampler, **kw: ddpmkit.sample(model, (4, 2), S, sampler=sampler, steps=10, generator=0, **kw).nfe  # noqa: E731
    assert nfe("euler") == nfe("dpmpp_2m") == nfe("unipc") == nfe("ddim") == nfe("ipndm") == 10
    assert nfe("heun") == 19 and nfe("pc") == 19 and nfe("euler_maruyama") == 10


@pytest.mark.parametrize("grid", ["uniform", "trailing", "leading", "quadratic", "karras", "logsnr"])
def test_grids_are_decreasing_timesteps(grid):
    t = timestep_grid(grid, S, 10)
    assert t.shape == (10,) and bool((t[1:] < t[:-1]).all()) and t.min() >= 0 and t.max() <= 999
    if grid in ("uniform", "quadratic", "karras", "logsnr"):
        assert t[0] == 999 and t[-1] == 0


def test_karras_and_logsnr_grids_follow_their_formulas():
    sig = S.sigma_at(timestep_grid("karras", S, 8))
    root = sig ** (1 / 7)
    assert torch.allclose(root[1:] - root[:-1], (root[1] - root[0]).expand(7), rtol=1e-6)
    lam = S.log_snr_at(timestep_grid("logsnr", S, 8))
    assert torch.allclose(lam[1:] - lam[:-1], (lam[1] - lam[0]).expand(7), rtol=1e-6)


def test_bad_grid_and_sampler_names_list_the_options():
    with pytest.raises(ValueError, match="karras"):
        timestep_grid("karas", S, 10)
    with pytest.raises(ValueError, match="dpmpp_2m"):
        ddpmkit.sample(MIX.eps_model(S), (2, 2), S, sampler="dpm")
    with pytest.raises(ValueError, match=r"shape must be \(batch, \*dims\) of sizes >= 1, got \(0, 2\)"):  # was a reshape error
        ddpmkit.sample(MIX.eps_model(S), (0, 2), S, sampler="ddim", steps=3)
    # NaN (a hand-edited grid file) was "cannot convert float NaN to integer"; timesteps lie in [0, T - 1]
    for bad in ([0.0, 500.0], [999.0, math.nan, 0.0], [999.5, 0.0], [999.0, -0.5]):
        with pytest.raises(ValueError, match="decreasing"):
            timestep_grid(torch.tensor(bad), S, None)
    for sampler, option in (("dpmpp_2m", {"order": 3}), ("dpmpp_3m", {"eta": 1.0}), ("dpmpp_3m_sde", {"order": 2})):  # what the name fixes
        with pytest.raises(ValueError, match=rf"sampler '{sampler}' fixes {next(iter(option))} = "):
            ddpmkit.sample(MIX.eps_model(S), (2, 2), S, sampler=sampler, steps=3, **option)
    # an option given to a sampler that does not take it names the sampler and where the option belongs (it was "for
    # this sampler"), and --variance for another sampler than ddpm is refused (it was ignored)
    with pytest.raises(UserError, match=r"sampler 'euler' takes no option\(s\) \['eta'\]; eta is for ddim, euler_ancestral, dpmpp_2m_sde and "
                                        r"dpmpp_3m_sde$"):
        ddpmkit.sample(MIX.eps_model(S), (2, 2), S, sampler="euler", steps=3, eta=1.0)
    with pytest.raises(UserError, match=r"sampler 'pc' takes no option\(s\) \['clip_x0'\]; clip_x0 is for every sampler but ddim_uniform, "
                                        r"consistency, euler_maruyama and pc$"):
        ddpmkit.sample(MIX.eps_model(S), (2, 2), S, sampler="pc", steps=3, clip_x0=True)
    for sampler in ("euler_ancestral", "ipndm", "edm", "dopri5"):  # the solvers that hand their other options to the grid
        with pytest.raises(UserError, match=rf"sampler '{sampler}' takes no option\(s\) \['variance'\]; variance is for ddpm$"):
            ddpmkit.sample(MIX.eps_model(S), (2, 2), S, sampler=sampler, steps=3, variance="beta")
    with pytest.raises(UserError, match=r"sampler 'heun' takes no option\(s\) \['churn'\]; churn is for edm$"):
        ddpmkit.sample(MIX.eps_model(S), (2, 2), S, sampler="heun", steps=3, **sampler_options("heun", churn=10.0))
    with pytest.raises(UserError, match=r"`variance` beta is sigma_t\^2 of Algorithm 2: only sampler 'ddpm' takes it, not 'ddim'"):
        sampler_options("ddim", variance="beta")
    assert sampler_options("ddpm", variance="beta")["variance"] == "beta" and "variance" not in sampler_options("ddim")
    for sampler in ("ddim", "dpmpp_2m_sde", "dpmpp_3m_sde"):  # eta = inf made every sample NaN without a word
        for eta in (-1.0, math.nan, math.inf):
            with pytest.raises(UserError, match=r"eta must be a finite number >= 0, got "):
                ddpmkit.sample(MIX.eps_model(S), (2, 2), S, sampler=sampler, steps=3, eta=eta)
    for steps in (None, S.T, 10):  # all T steps visit every timestep whatever the grid, but the name is still checked
        with pytest.raises(ValueError, match=r"unknown grid 'nope'; choose one of \["):
            ddpmkit.sample(MIX.eps_model(S), (2, 2), S, sampler="ddpm", steps=steps, grid="nope")


def test_optimised_grid_beats_the_named_grids_on_fresh_trajectories():
    model = MIX.eps_model(S)
    grid = optimize_grid(model, (32, 2), S, sampler="unipc", steps=6, seed=100, max_evals=150, order=2)
    assert grid[0] == 999 and grid[-1] == 0 and bool((grid[1:] < grid[:-1]).all())
    x_T = torch.randn(200, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref = ddpmkit.sample(model, x_T.shape, S, sampler="dopri5", x_T=x_T, rtol=1e-9, atol=1e-9).x

    def err(g):
        return (ddpmkit.sample(model, x_T.shape, S, sampler="unipc", steps=6, grid=g, x_T=x_T, order=2).x - ref).norm(dim=1).median().item()

    assert err(grid) < 0.7 * min(err(g) for g in ("logsnr", "karras", "uniform"))
    # more points than the schedule has steps: one line before the reference solve (the model is never called)
    calls = []
    for steps in (2, S.T + 1, 10**6):
        with pytest.raises(UserError, match=r"fewer than 3 points|steps must lie in \[3, 1000\]"):
            optimize_grid(lambda x, t: calls.append(1) or x, (2, 2), S, steps=steps)
    # and so are the sampler's options and the reference's tolerance (they failed after the reference solve, or inside it)
    with pytest.raises(UserError, match="UniPC order must be 1, 2 or 3, got 9"):
        optimize_grid(lambda x, t: calls.append(1) or x, (2, 2), S, steps=4, order=9)
    # a stochastic sampler's endpoint moves with its fresh noise: no grid brings it to the ODE's (it ran, on noise)
    for sampler, options in (("edm", {}), ("dpmpp_2m_sde", {}), ("ddim", {"eta": 1.0})):
        with pytest.raises(UserError, match=rf"sampler '{sampler}' draws fresh noise as it goes.*tune the grid of an ODE solver"):
            optimize_grid(lambda x, t: calls.append(1) or x, (2, 2), S, sampler=sampler, steps=4, **options)
    assert not calls
    for tol in (0.0, math.nan):  # torchdiffeq's "underflow in dt" assertion inside the solve
        with pytest.raises(UserError, match=r"dopri5's tolerances must lie in \(0, 1\)"):
            optimize_grid(MIX.eps_model(S), (2, 2), S, steps=4, reference_tol=tol)
    # zero gaps parameters are the uniform-in-log-SNR grid
    assert torch.allclose(S.log_snr_at(grid_from_gaps(torch.zeros(5), S)), S.log_snr_at(timestep_grid("logsnr", S, 6)), atol=1e-9)


def test_a_zero_terminal_snr_schedule_samples_a_v_model_from_its_pure_noise():
    """alpha_bar_T = 0 (Lin et al. 2024): sigma is infinite at T-1, so the sigma-space solvers take their first step
    exactly in x (eps = x_T there), the SDE samplers DDPM's ancestral step, dopri5 solves from T-2, and the sigma-spaced
    grids are spaced below T-1; an eps-model has no x_0 at SNR 0. Before, every sampler gave NaN samples or failed on a NaN timestep."""
    ring = GaussianMixture.ring(4, radius=1.0, std=0.1)
    zt = NoiseSchedule.from_name("cosine", 1000, zero_terminal_snr=True)
    assert zt.alpha_bar[-1].item() == 0.0 and zt.zero_terminal_snr and not S.zero_terminal_snr

    def v_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # the exact v = sqrt(ab) eps - sqrt(1 - ab) x0
        ab = zt.alpha_bar_at(t, check=False).to(x.dtype)
        eps, a = ring.eps_star(x, ab), ab[:, None]
        x0 = torch.where(a > 0, (x - (1 - a).sqrt() * eps) / a.sqrt().clamp_min(1e-300), ring.mean().to(x.dtype).expand_as(x))
        return a.sqrt() * eps - (1 - a).sqrt() * x0

    for grid in ("karras", "logsnr"):
        t = timestep_grid(grid, zt, 10)
        assert t[0] == zt.T - 1 and t[-1] == 0 and bool((t[1:] < t[:-1]).all()) and torch.isfinite(zt.sigma_at(t[1:])).all()
    for sampler in ("ddim", "ddpm", "euler", "heun", "dpmpp_2m", "dpmpp_3m_sde", "unipc", "ipndm", "euler_maruyama", "pc",
                    "euler_ancestral", "edm"):
        seen: list[int] = []
        out = ddpmkit.sample(v_model, (512, 2), zt, sampler=sampler, steps=50, generator=0, prediction="v",
                             callback=lambda info, seen=seen: seen.append(info["i"]))
        assert torch.isfinite(out.x).all() and (out.x.norm(dim=1) - 1).abs().mean() < 0.1, sampler  # on the ring (0.08 exactly)
        # heun: 2n - 1 NFE less the one its exact first step does not need
        nfe = {"heun": 98, "edm": 98, "pc": 98}.get(sampler, 50)  # pc: a correction at each level but the first and the last
        assert seen == list(range(49, -1, -1)) and out.nfe == nfe, (sampler, out.nfe)
    # the first steps to the equation: Euler in sigma is DDIM on the same grid (DDIM eq. 14), from the pure noise too; the
    # SDE's first step is DDPM's ancestral step (mean sqrt(ab_1) x0, variance 1 - ab_1), the same noise drawn
    x_T = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for steps in (2, 10):
        euler, ddim = (ddpmkit.sample(v_model, x_T.shape, zt, sampler=s, steps=steps, grid="uniform", x_T=x_T, prediction="v").x
                       for s in ("euler", "ddim"))
        assert (euler - ddim).abs().max() < 1e-12
    firsts = {}
    for sampler in ("ddpm", "euler_maruyama"):
        steps_x: list[torch.Tensor] = []
        ddpmkit.sample(v_model, x_T.shape, zt, sampler=sampler, steps=10, grid="uniform", x_T=x_T, prediction="v", generator=5,
                       callback=lambda info, steps_x=steps_x: steps_x.append(info["x"].clone()))
        firsts[sampler] = steps_x[0]
    assert torch.equal(firsts["ddpm"], firsts["euler_maruyama"])
    x = ddpmkit.sample(v_model, (512, 2), zt, sampler="dopri5", generator=0, prediction="v", rtol=1e-4, atol=1e-4).x
    assert torch.isfinite(x).all() and (x.norm(dim=1) - 1).abs().mean() < 0.1  # the adaptive solve from T-2
    with pytest.raises(ValueError, match="an eps-prediction gives no x_0"):
        ddpmkit.sample(ring.eps_model(zt), (4, 2), zt, sampler="ddim", steps=10)


def test_a_tuned_grid_file_sets_the_steps_and_names_its_sampler(tmp_path):
    """A tune-grid file beside --steps of another count ignored --steps without a word, and one tuned for unipc ran
    under ddim without a word; now the first is refused and the second noted."""
    from ddpmkit.cli import build_parser
    from ddpmkit.cli.common import options_from
    from ddpmkit.errors import Note

    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"sampler": "unipc", "steps": 4, "timesteps": [999.0, 442.5, 44.8, 0.0]}))
    args = lambda *more: build_parser().parse_args(["sample", "RUN", "--grid", str(grid), *more])  # noqa: E731
    with pytest.raises(UserError, match=r"--grid .*grid.json holds 4 steps, --steps says 10: leave --steps out"):
        options_from(args("--sampler", "unipc", "--steps", "10"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # its own sampler, with or without the same --steps: no note
        for more in ((), ("--steps", "4")):
            assert options_from(args("--sampler", "unipc", *more))["grid"].tolist() == [999.0, 442.5, 44.8, 0.0]
    with pytest.warns(Note, match=r"grid.json was tuned for unipc, not ddim: another sampler's best grid may lie elsewhere"):
        options_from(args("--sampler", "ddim"))


def test_a_commands_own_default_steps_yield_to_a_grid_file(tmp_path):
    """inpaint (100 steps), interpolate (50) and voyage (20) have steps of their own: beside a grid file of 4 they
    ended in "--grid F holds 4 steps, --steps says 100" though the user gave no --steps. The grid now sets them; a
    --steps the user gave of another count is still refused, and without a grid file the default stands."""
    from ddpmkit.cli import build_parser
    from ddpmkit.cli.common import options_from

    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"sampler": "ddim", "steps": 4, "timesteps": [999.0, 442.5, 44.8, 0.0]}))
    for argv, default in ((["inpaint", "RUN", "IMG", "--sampler", "ddim"], 100), (["interpolate", "RUN", "--sampler", "ddim"], 50),
                          (["voyage", "KEYS", "--model", "RUN"], 20)):
        args = build_parser().parse_args([*argv, "--grid", str(grid)])
        assert args.steps == default and options_from(args)["grid"].tolist() == [999.0, 442.5, 44.8, 0.0] and args.steps == 4, argv
        args = build_parser().parse_args([*argv, "--grid", "karras"])
        options_from(args)
        assert args.steps == default, argv
        with pytest.raises(UserError, match=rf"grid.json holds 4 steps, --steps says {default}: leave --steps out"):
            options_from(build_parser().parse_args([*argv, "--grid", str(grid), "--steps", str(default)]))
    # sample's all-T default and a distilled run's own steps yield too; both are read after options_from (the reverse
    # process was recorded every T // 50 steps: once in a grid of 4 on a T = 1000 model)
    from ddpmkit.cli.common import own_sampler
    from ddpmkit.models import DiffusionModel

    class Distilled(DiffusionModel):
        own_sampler = ("ddim_uniform", 2)  # a run distilled for 2 steps

    args = build_parser().parse_args(["sample", "RUN", "--grid", str(grid)])
    args.sampler, args.steps = own_sampler(object.__new__(Distilled), args)
    assert (args.sampler, args.steps) == ("ddim_uniform", 2) and options_from(args)["grid"].numel() == 4 and args.steps == 4
    args = build_parser().parse_args(["sample", "RUN", "--grid", str(grid), "--sampler", "ddim"])
    assert args.steps is None and options_from(args)["grid"].numel() == 4 and args.steps == 4
