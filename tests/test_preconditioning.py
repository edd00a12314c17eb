"""EDM preconditioning in VP variables, EDM's loss weight and log-normal noise levels, against the formulas."""
import pytest
import torch
from torch import nn

import ddpmkit
from ddpmkit.analytic import GaussianMixture
from ddpmkit.config import ConfigError, DiffusionConfig, load_config
from ddpmkit.losses import edm_weight, training_losses
from ddpmkit.parameterization import Denoiser, v_from_x0_eps
from ddpmkit.preconditioning import EDMPreconditioned, edm_coefficients, edm_target
from ddpmkit.process import q_sample
from ddpmkit.train.denoiser import nearest_timestep, sample_timesteps

S = ddpmkit.NoiseSchedule.from_name("linear", 1000)
T_CHECK = torch.tensor([0, 10, 100, 400, 700, 999])


def test_coefficients_are_edm_table_1_in_vp_variables():
    """EDM's sigma-form coefficients on x = x_t / sqrt(a): c_skip and c_in pick up 1 / sqrt(a), c_out does not."""
    sd = 0.5
    a = S.alpha_bar[T_CHECK]
    sigma = ((1 - a) / a).sqrt()
    c = edm_coefficients(a, sd)
    assert torch.allclose(c.c_skip, sd**2 / (sigma**2 + sd**2) / a.sqrt(), rtol=1e-12)
    assert torch.allclose(c.c_out, sigma * sd / (sigma**2 + sd**2).sqrt(), rtol=1e-12)
    assert torch.allclose(c.c_in, 1 / (sigma**2 + sd**2).sqrt() / a.sqrt(), rtol=1e-12)


def test_input_and_target_have_unit_variance_for_data_of_std_sigma_data():
    sd, n = 0.7, 200_000
    g = torch.Generator().manual_seed(0)
    for t in T_CHECK.tolist():
        a = S.alpha_bar[[t]].expand(n)
        x0 = sd * torch.randn(n, 1, generator=g, dtype=torch.float64)
        x_t = q_sample(x0, torch.full((n,), t), S, torch.randn(n, 1, generator=g, dtype=torch.float64))
        c = edm_coefficients(a, sd)
        assert (c.c_in[:, None] * x_t).var().item() == pytest.approx(1.0, abs=0.02)
        assert edm_target(x0, x_t, a, sd).var().item() == pytest.approx(1.0, abs=0.02)


def test_sigma_data_one_is_v_prediction():
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, 3, generator=g, dtype=torch.float64)
    a = S.alpha_bar[T_CHECK]
    x_t = q_sample(x0, T_CHECK, S, eps)
    assert torch.allclose(edm_target(x0, x_t, a, 1.0), -v_from_x0_eps(x0, eps, a), atol=1e-10)


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return super().forward(x)


class Oracle(nn.Module):
    """An inner network that outputs the exact F* for known (x0, eps): the wrapper must give back x0."""

    def __init__(self, x0: torch.Tensor, sd: float):
        super().__init__()
        self.x0, self.sd, self.inputs = x0, sd, []

    def forward(self, x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = S.alpha_bar_at(t.double())
        x_t = x_in / edm_coefficients(a, self.sd).c_in[:, None]  # the wrapper scaled x_t by c_in
        self.inputs.append(x_in)
        return edm_target(self.x0, x_t, a, self.sd)


@pytest.mark.parametrize("prediction", ["x0", "eps", "v"])
def test_preconditioned_network_round_trips_to_x0_eps_and_v(prediction):
    sd = 0.5
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, 3, generator=g, dtype=torch.float64)
    x_t = q_sample(x0, T_CHECK, S, eps).float()
    wrapped = EDMPreconditioned(Oracle(x0.float(), sd), S, sd)
    out = Denoiser(wrapped, S, "x0")(x_t, T_CHECK.float())
    assert torch.allclose(out.x0.double(), x0, atol=1e-4)
    assert torch.allclose(out.eps.double()[1:], eps[1:], atol=1e-3)  # at t = 0 eps is amplified by 1 / sqrt(1 - a)
    v = v_from_x0_eps(out.x0.double(), out.eps.double(), S.alpha_bar[T_CHECK])
    assert torch.allclose(v[1:], v_from_x0_eps(x0, eps, S.alpha_bar[T_CHECK])[1:], atol=1e-3)


def test_edm_weighted_x0_loss_is_the_unit_loss_on_the_inner_network():
    sd = 0.5
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    inner = Linear(4, 4)  # any network: the identity must hold for its errors
    out = training_losses(EDMPreconditioned(inner, S, sd), x0, T_CHECK, S, eps, "x0", edm_sigma_data=sd)
    x_t = q_sample(x0, T_CHECK, S, eps)
    a = S.alpha_bar[T_CHECK]
    c_in = edm_coefficients(a, sd).c_in.float()[:, None]
    direct = ((inner(c_in * x_t, T_CHECK) - edm_target(x0, x_t, a, sd)) ** 2).mean(1)
    assert torch.allclose(out["loss"], direct, rtol=1e-4)
    # the weight itself: 1 / c_out^2 on the x0 error, converted for the other targets
    snr = S.log_snr[T_CHECK].exp()
    assert torch.allclose(edm_weight("x0", snr, sd), 1 / edm_coefficients(a, sd).c_out ** 2, rtol=1e-9)
    assert torch.allclose(edm_weight("eps", snr, sd) * snr, edm_weight("x0", snr, sd))
    assert torch.allclose(edm_weight("v", snr, sd) * (snr + 1), edm_weight("x0", snr, sd))
    # clipped: min(SNR, gamma) + 1 / sd^2 on the x0 error
    assert torch.allclose(edm_weight("x0", snr, sd, 20.0), torch.minimum(snr, torch.tensor(20.0, dtype=snr.dtype)) + 4.0)
    clipped = training_losses(EDMPreconditioned(inner, S, sd), x0, T_CHECK, S, eps, "x0", min_snr_gamma=20.0, edm_sigma_data=sd)
    assert torch.allclose(clipped["loss"], direct * edm_weight("x0", snr, sd, 20.0).float() / edm_weight("x0", snr, sd).float(), rtol=1e-4)


def test_exact_denoiser_through_the_wrapper_samples_the_gaussian():
    """The optimal F for Gaussian data, wrapped, is the optimal denoiser: DDIM draws the same samples
    as with the exact eps model, whose mean is the data's."""
    sd = 0.5
    gm = GaussianMixture.gaussian(torch.tensor([0.8, -0.5]), 0.3)
    eps_star = gm.eps_model(S)

    def optimal_F(x_in, t):
        a = S.alpha_bar_at(t.double())
        x_t = x_in / edm_coefficients(a, sd).c_in[:, None].to(x_in.dtype)
        x0 = (x_t - (1 - a).sqrt()[:, None] * eps_star(x_t, t)) / a.sqrt()[:, None]
        return edm_target(x0, x_t, a, sd)

    wrapped = EDMPreconditioned(optimal_F, S, sd)  # type: ignore[arg-type]
    out = ddpmkit.sample(wrapped, (4000, 2), S, sampler="ddim", steps=50, prediction="x0", generator=torch.Generator().manual_seed(0))
    exact = ddpmkit.sample(eps_star, (4000, 2), S, sampler="ddim", steps=50, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out.x, exact.x, atol=1e-4)
    assert torch.allclose(out.x.double().mean(0), gm.mean(), atol=4 * 0.3 / 4000**0.5)


def test_log_normal_timesteps_follow_edm_sigma_distribution():
    dc = DiffusionConfig(timestep_sampling="log_normal", log_normal_mean=-1.2, log_normal_std=1.2)
    t = sample_timesteps(dc, S, 50_000, torch.Generator().manual_seed(0))
    log_sigma = -0.5 * S.log_snr[t]
    assert log_sigma.mean().item() == pytest.approx(-1.2, abs=0.03)
    assert log_sigma.std().item() == pytest.approx(1.2, abs=0.03)
    # the table's own log-SNRs map to their timesteps; values beyond the ends clamp
    assert torch.equal(nearest_timestep(S, S.log_snr), torch.arange(1000))
    assert nearest_timestep(S, torch.tensor([50.0, -50.0], dtype=torch.float64)).tolist() == [0, 999]


def test_config_checks_the_combinations():
    with pytest.raises(ConfigError, match="prediction = 'x0'"):
        DiffusionConfig(precondition="edm", prediction="eps")
    with pytest.raises(ConfigError, match="set loss = 'simple'"):
        DiffusionConfig(loss_weighting="edm", loss="hybrid")
    with pytest.raises(ConfigError, match="sigma_data"):
        DiffusionConfig(sigma_data=0.0)
    cfg = load_config("toy2d", ["diffusion.precondition=edm", "diffusion.prediction=x0"])
    assert cfg.diffusion.precondition == "edm"
