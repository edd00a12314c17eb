"""Every range a formula or an option takes, at its ends: the end inside is taken (and does what the formula says there),
the end outside is refused with its message. Written from `tests/mutants.py --kinds bounds`, whose `<` <-> `<=` flips
in the schedules and samplers these tests passed before (33 of 60)."""
import math

import numpy as np
import pytest
import torch

import ddpmkit
from ddpmkit.analytic import GaussianMixture
from ddpmkit.config import Config, NetworkConfig, SuperResConfig
from ddpmkit.distillation import consistency_grid, uniform_grid
from ddpmkit.editing import img2img, inpaint
from ddpmkit.errors import UserError
from ddpmkit.evaluate.copies import copies
from ddpmkit.evaluate.likelihood import ode_nll, vlb, vlb_estimate
from ddpmkit.evaluate.metrics import FeatureStats, fid_from_features, kernel_inception_distance
from ddpmkit.guidance import DynamicThresholding
from ddpmkit.images import load_image
from ddpmkit.models import load_diffusion
from ddpmkit.nets import build_super_resolution
from ddpmkit.parameterization import as_denoiser
from ddpmkit.pipelines.edit import check_level
from ddpmkit.pipelines.guided import GuidanceRequest, guided_model
from ddpmkit.sampling import SAMPLERS, STOCHASTIC, timestep_grid
from ddpmkit.sampling.noise import NoiseSource
from ddpmkit.sampling.optimize import optimize_grid
from ddpmkit.schedules import NoiseSchedule, spaced_timesteps
from ddpmkit.superres import downsample

S = NoiseSchedule.from_name("linear", 1000)
MU, SD = torch.tensor([0.5, -0.4, 0.2], dtype=torch.float64), 0.3
GAUSS = GaussianMixture.gaussian(MU, SD)
X_T = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def test_a_schedule_of_one_step_and_betas_in_0_1():
    one = NoiseSchedule(torch.tensor([0.5]))
    assert one.T == 1 and one.alpha_bar.tolist() == [0.5]
    assert NoiseSchedule.from_name("linear", 1).T == 1 and NoiseSchedule(torch.tensor([0.1, 1.0])).alpha_bar[-1] == 0  # beta = 1 taken
    for betas in ([0.0, 0.1], [0.1, -0.2], [0.1, 1.5]):  # beta_t = 0 adds no noise: sigma_0 = 0 and eps is undefined there
        with pytest.raises(UserError, match=r"every beta_t must lie in \(0, 1\]"):
            NoiseSchedule(torch.tensor(betas))
    with pytest.raises(UserError, match="at least one step"):
        NoiseSchedule(torch.tensor([]))
    with pytest.raises(UserError, match="T must be >= 1, got 0"):
        NoiseSchedule.from_name("linear", 0)


def test_respacing_and_spaced_timesteps_take_every_step_up_to_T_minus_1():
    assert S.respace([0, S.T - 1]).timesteps.tolist() == [0, 999]
    with pytest.raises(UserError, match=r"respaced timesteps must lie in \[0, 999\]"):
        S.respace([0, S.T])
    assert torch.equal(spaced_timesteps(S.T, S.T), torch.arange(S.T)) and spaced_timesteps(S.T, 1).tolist() == [999]
    for steps in (0, S.T + 1):
        with pytest.raises(UserError, match=rf"steps must lie in \[1, 1000\], got {steps}"):
            spaced_timesteps(S.T, steps)


def test_explicit_grids_of_one_point_are_taken_and_repeated_timesteps_refused():
    assert timestep_grid(torch.tensor([500.0]), S, None).tolist() == [500.0]
    for grid in ([500.0, 500.0, 0.0], [500.0, 600.0, 0.0]):
        with pytest.raises(UserError, match=r"strictly decreasing timesteps in \[0, 999\]"):
            timestep_grid(torch.tensor(grid), S, None)


def gaussian_x0_model(schedule: NoiseSchedule):
    """E[x_0 | x_t] for N(mu, s^2 I) data, finite at alpha_bar = 0 (zero terminal SNR), where an eps-model has no x_0."""
    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = schedule.alpha_bar_at(t, check=False).to(x.dtype)[:, None]
        return MU + ab.sqrt() * SD**2 / (ab * SD**2 + 1 - ab) * (x - ab.sqrt() * MU)
    return model


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_one_step_lands_on_the_x0_prediction_on_a_schedule_of_one_step_and_of_T(sampler):
    """steps = 1 is taken by every sampler and grid: one step from the first grid point (t = 0 on a schedule of T = 1,
    t = T - 1 on T = 1000) to sigma = 0 lands on the denoiser's x_0 there, whatever the solver's order (its higher
    terms need past steps) or its noise (none is added at the last step). dopri5 solves the whole ODE whatever `steps`,
    so only on T = 1."""
    for schedule in (NoiseSchedule.from_name("cosine", 1), S)[:1 if sampler == "dopri5" else 2]:
        model = gaussian_x0_model(schedule)
        x0 = model(X_T, torch.full((len(X_T),), schedule.T - 1.0))
        out = ddpmkit.sample(model, X_T.shape, schedule, sampler=sampler, steps=1, prediction="x0", x_T=X_T, generator=0)
        assert out.nfe == 1 and torch.allclose(out.x, x0, atol=1e-10, rtol=0)
    for grid in ("karras", "logsnr", "uniform"):
        assert timestep_grid(grid, S, 1).tolist() == [999.0]


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_one_clipped_step_lands_on_the_x0_prediction_clipped_at_both_ends(sampler):
    """With clip_x0 the one step lands on the x_0 prediction clamped to [-1, 1] (t = 0 on T = 1): data 3x wider than the
    range, so entries leave it at both ends."""
    schedule = NoiseSchedule.from_name("cosine", 1)
    base = gaussian_x0_model(schedule)

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 3 * base(x, t)
    x0 = model(X_T, torch.zeros(len(X_T)))
    assert (x0 > 1).any() and (x0 < -1).any()
    if sampler in ("ddim_uniform", "consistency", "euler_maruyama", "pc"):  # no clip_x0 (the message: tests/test_samplers.py)
        with pytest.raises(UserError, match="takes no option"):
            ddpmkit.sample(model, X_T.shape, schedule, sampler=sampler, steps=1, prediction="x0", x_T=X_T, clip_x0=True)
        return
    out = ddpmkit.sample(model, X_T.shape, schedule, sampler=sampler, steps=1, prediction="x0", x_T=X_T, generator=0, clip_x0=True)
    assert torch.allclose(out.x, x0.clamp(-1, 1), atol=1e-10, rtol=0)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_samples_the_shortest_zero_terminal_snr_schedules(sampler):
    """T = 2 and 3 with alpha_bar_{T-1} = 0, in 1 and 2 steps: the first step from pure noise is exact (x_0 = the
    prediction at SNR 0, here the data's mean), then the rest; on T = 2 every deterministic sampler's second step lands
    on the x_0 prediction at t = 0 (the stochastic ones draw noise on the way). edm divided its churn by the steps left (0); dopri5
    handed torchdiffeq a span of one point."""
    for T in (2, 3):
        zt = NoiseSchedule.from_name("cosine", T, zero_terminal_snr=True)
        model = gaussian_x0_model(zt)
        for steps in (1, 2):
            out = ddpmkit.sample(model, X_T.shape, zt, sampler=sampler, steps=steps, prediction="x0", x_T=X_T, generator=0).x
            assert bool(out.isfinite().all())
            if T == 2 and steps == 1 and sampler != "dopri5":  # only the exact step from pure noise: the prediction at SNR 0
                assert torch.allclose(out, MU.expand_as(out), atol=1e-10), (T, steps)
            elif T == 2 and (sampler == "dopri5" or sampler not in STOCHASTIC):  # the exact step to t = 0, then one to sigma = 0
                s0 = zt.sigma_at(0).item()
                x_bar = MU + s0 * X_T  # the exact step to sigma_0: x_0 (= MU) + sigma_0 eps, eps = x_T at SNR 0
                assert torch.allclose(out, MU + SD**2 / (SD**2 + s0**2) * (x_bar - MU), atol=1e-10), (T, steps)


def test_two_sigma_spaced_steps_on_a_zero_terminal_snr_schedule_are_T_minus_1_then_0():
    zt = NoiseSchedule.from_name("cosine", 1000, zero_terminal_snr=True)
    for grid in ("karras", "logsnr"):
        assert timestep_grid(grid, zt, 2).tolist() == [999.0, 0.0]


def test_the_churn_window_includes_both_its_ends():
    """EDM's Algorithm 2 churns where S_tmin <= sigma_k <= S_tmax: a window that is one sigma of the grid, [s_k, s_k],
    churns that step alone, as a window just around it does; one just beside it churns none (Heun)."""
    s = S.sigma_at(timestep_grid("karras", S, 6)).tolist()

    def edm(lo: float, hi: float) -> torch.Tensor:
        return ddpmkit.sample(GAUSS.eps_model(S), X_T.shape, S, sampler="edm", steps=6, x_T=X_T, generator=3, churn_min=lo, churn_max=hi).x

    exact, around, beside = edm(s[2], s[2]), edm(s[2] * (1 - 1e-9), s[2] * (1 + 1e-9)), edm(s[2] * (1 + 1e-9), s[2] * (1 + 2e-9))
    heun = ddpmkit.sample(GAUSS.eps_model(S), X_T.shape, S, sampler="heun", steps=6, x_T=X_T).x
    assert torch.equal(exact, around) and torch.equal(beside, heun) and not torch.allclose(exact, heun, atol=1e-3)
    with pytest.raises(UserError, match=r"`churn_max` must be >= `churn_min` \(0.5\), got 0.4"):
        edm(0.5, 0.4)


@pytest.mark.parametrize("sampler, options, message", [
    ("euler_ancestral", {"eta": math.inf}, "`eta` must be a finite number >= 0, got inf"),
    ("edm", {"churn": math.inf}, "`churn` must be a finite number >= 0, got inf"),
    ("edm", {"s_noise": math.inf}, "`s_noise` must be a finite number >= 0, got inf"),
    ("pc", {"snr": 0.0}, "corrector_steps must be >= 0 and snr > 0"),
    ("dopri5", {"rtol": 0.0}, r"dopri5's tolerances must lie in \(0, 1\), got rtol = 0.0"),
    ("dopri5", {"rtol": 1.0}, r"dopri5's tolerances must lie in \(0, 1\), got rtol = 1.0"),
    ("dopri5", {"atol": 0.0}, r"dopri5's tolerances must lie in \(0, 1\), got rtol = 1e-05, atol = 0.0"),
    ("dopri5", {"atol": 1.0}, r"dopri5's tolerances must lie in \(0, 1\), got rtol = 1e-05, atol = 1.0"),
])
def test_a_samplers_option_at_its_open_end_is_refused(sampler, options, message):
    with pytest.raises(UserError, match=message):
        ddpmkit.sample(GAUSS.eps_model(S), X_T.shape, S, sampler=sampler, steps=4, x_T=X_T, **options)


def test_dynamic_thresholding_takes_percentile_1_static_clipping_and_refuses_0():
    """percentile 1: s = max(1, max |x0_hat|), so every sample is divided into [-1, 1] by its own largest value."""
    far = as_denoiser(lambda x, t: -4 * x, S)  # x_0 = (x + 4 sqrt(1 - ab) x) / sqrt(ab): far outside [-1, 1]
    x, t = X_T.float(), torch.full((8,), 500.0)
    raw, held = far(x, t).x0, DynamicThresholding(far, 1.0)(x, t).x0
    assert torch.allclose(held, raw / raw.abs().amax(1, keepdim=True).clamp(min=1), atol=1e-6)
    with pytest.raises(UserError, match=r"percentile must lie in \(0, 1\], got 0.0"):
        DynamicThresholding(far, 0.0)


def test_a_tuned_grid_takes_3_points_up_to_T():
    s4 = NoiseSchedule.from_name("linear", 4)
    model = GAUSS.eps_model(s4)
    for steps in (3, 4):  # real timesteps from T - 1 down to 0
        grid = optimize_grid(model, (4, 3), s4, sampler="ddim", steps=steps, max_evals=4)
        assert len(grid) == steps and grid[0] == 3 and grid[-1] == 0 and bool((grid[1:] < grid[:-1]).all())
    for steps in (2, 5):
        with pytest.raises(UserError, match=r"fewer than 3 points|steps must lie in \[3, 4\]"):
            optimize_grid(model, (4, 3), s4, sampler="ddim", steps=steps)


def test_repaint_on_a_schedule_of_one_step_keeps_the_known_pixels_and_fills_in_the_x0_prediction():
    """On T = 1 RePaint takes one step at t = 0, where the posterior mean is the x_0 prediction and no noise is added:
    the unknown pixels are the denoiser's x_0 of the first draw, the known ones the input."""
    one = NoiseSchedule.from_name("cosine", 1)
    model = gaussian_x0_model(one)
    mask = torch.tensor([1.0, 0.0, 1.0])
    for resample in (1, 3):  # a resampling loop stops at t = 0: nothing to noise back to
        out = inpaint(model, X_T, mask, one, steps=1, resample=resample, generator=4, prediction="x0", clip_x0=False)
        x_T = NoiseSource(len(X_T), 4).randn(X_T.shape[1:], X_T.dtype)
        assert torch.allclose(out, mask * X_T + (1 - mask) * model(x_T, torch.zeros(len(X_T))), atol=1e-12)
    for strength in (0.0, 1.5):
        with pytest.raises(UserError, match=rf"strength must lie in \(0, 1\], got {strength}"):
            img2img(model, X_T, one, strength=strength, prediction="x0")


def test_the_bound_and_the_likelihood_at_their_ends():
    """The bound's estimate on T = 1 is the bound (L_T + L_0: no t to draw); the ODE likelihood refuses t_start = -1
    (sigma = 0), and 'auto' takes the exact divergence up to 32 dimensions, Hutchinson's from 33."""
    one = NoiseSchedule.from_name("linear", 1)
    x = (X_T.clamp(-1, 1) * 127.5).round() / 127.5
    same = lambda: torch.Generator().manual_seed(5)  # noqa: E731 -- L_0 is taken at one draw of x_0's noisy copy
    assert torch.equal(vlb_estimate(GAUSS.eps_model(one), x, one, generator=same()), vlb(GAUSS.eps_model(one), x, one, generator=same()).total)
    with pytest.raises(UserError, match=r"t_start must be > -1 \(sigma = 0 is the data itself\)"):
        ode_nll(GAUSS.eps_model(S), X_T, S, t_start=-1.0)
    for dim, kind in ((32, "exact"), (33, "hutchinson")):
        g = GaussianMixture.gaussian(torch.zeros(dim, dtype=torch.float64), 0.5)
        x = torch.randn(2, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        auto, chosen = (ode_nll(g.eps_model(S), x, S, divergence=d, rtol=1e-3, atol=1e-3, generator=torch.Generator().manual_seed(1)).nll
                        for d in ("auto", kind))
        assert torch.equal(auto, chosen), dim


def test_the_metrics_and_the_copy_test_take_their_smallest_sets():
    """FD and KID from 2 samples (a covariance needs 2), the copy test against 2 training images (a nearest and a second)."""
    f = np.array([[0.0, 1.0], [2.0, 3.0]])
    stats = FeatureStats.of(f)
    assert stats.n == 2 and np.allclose(stats.sigma, [[2.0, 2.0], [2.0, 2.0]]) and fid_from_features(f, f) == pytest.approx(0, abs=1e-6)
    k = lambda a, b: (a @ b / 2 + 1) ** 3  # noqa: E731 -- KID's kernel in d = 2
    # unbiased MMD^2 of a set of two with itself: the off-diagonal k(a, b) twice, less twice the mean over all four pairs
    mmd = 2 * k(f[0], f[1]) - 2 * (k(f[0], f[0]) + k(f[1], f[1]) + 2 * k(f[0], f[1])) / 4
    assert kernel_inception_distance(f, f, subsets=2) == (pytest.approx(mmd, rel=1e-12), 0.0) and mmd == -197.0
    for few in (f[:1], np.zeros((0, 2))):
        with pytest.raises(UserError, match=r"n >= 2"):
            FeatureStats.of(few)
    with pytest.raises(UserError, match="KID needs at least 2 samples in each set"):
        kernel_inception_distance(f[:1], f)
    train = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    found = copies(torch.tensor([[0.1, 0.0], [5.0, 0.0]]), train)
    assert found.nearest.tolist() == [0, 0] and found.fraction == 0.5  # the first is 0.1 from one and 9.9 from the other
    with pytest.raises(UserError, match="at least 2 training images, got 1"):
        copies(train[:1], train[:1])


def test_distillation_grids_take_every_step_and_two_points():
    assert torch.equal(uniform_grid(S, S.T), torch.arange(S.T - 1, -2, -1, dtype=torch.float64))  # T steps: every t, then -1
    assert consistency_grid(S, 2).tolist() == [0.0, 999.0] and torch.equal(consistency_grid(S, S.T), torch.arange(S.T, dtype=torch.float64))
    for points in (1, S.T + 1):
        with pytest.raises(UserError, match=rf"the consistency grid needs 2..1000 points, got {points}"):
            consistency_grid(S, points)


def test_a_models_classes_levels_and_images_at_their_ends(web_runs):
    """The class-conditional run's classes 0..9 (10 is the null label, not a class), an edit's level t in 1..T - 1,
    the built-in digits' indices 0..4999, an image downsampled to its own size, and autoguidance's weight 0."""
    m = load_diffusion(str(web_runs / "class"))
    for classes in ([0, 9], [10], [-1]):
        if classes == [0, 9]:
            assert guided_model(m, 2, GuidanceRequest(classes=classes, scale=2.0), "ddim")[1]["y"].tolist() == [0, 9]
            continue
        with pytest.raises(UserError, match=r"`classes` must lie in 0..9"):
            guided_model(m, 2, GuidanceRequest(classes=classes, scale=2.0), "ddim")
    for t in (1, m.schedule.T - 1):
        check_level(m, t)
    for t in (0, m.schedule.T):
        with pytest.raises(UserError, match=rf"t must lie in 1..{m.schedule.T - 1}, got {t}"):  # the class run's T = 100
            check_level(m, t)
    assert load_image("mnist5k:4999").shape == (1, 1, 28, 28)
    with pytest.raises(UserError, match=r"mnist5k:5000: the index must be a number in 0..4999"):
        load_image("mnist5k:5000")
    with pytest.raises(UserError, match=r"mnist5k:1:2: the index must be a number in 0..4999"):  # one colon is the name's
        load_image("mnist5k:1:2")
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(downsample(x, 8), x) and downsample(x, 1).shape == (2, 3, 1, 1)
    for size in (0, 9):
        with pytest.raises(UserError, match=rf"cannot downsample \(8, 8\) images to {size}x{size}"):
            downsample(x, size)
    assert GuidanceRequest(autoguide_scale=0.0).autoguide_scale == 0.0  # w = 0: the weaker model alone
    with pytest.raises(UserError, match="the autoguidance weight w must be a finite number >= 0"):
        GuidanceRequest(autoguide_scale=-0.5)


def test_a_super_resolution_stage_takes_a_low_res_side_up_to_one_less_than_the_images():
    net = NetworkConfig(base_channels=8, channel_mult=(1, 2), attention_resolutions=())
    assert build_super_resolution(Config(network=net, superres=SuperResConfig(low_res=7)), (1, 8, 8)).low_res_channels == 1
    with pytest.raises(UserError, match="superres.low_res = 8 must be smaller than the images' side 8"):
        build_super_resolution(Config(network=net, superres=SuperResConfig(low_res=8)), (1, 8, 8))
