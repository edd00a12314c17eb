import pytest
import torch

from ddpmkit.parameterization import Denoiser, target_for, to_x0_eps
from ddpmkit.process import q_posterior_mean_variance, q_sample
from ddpmkit.schedules import NoiseSchedule


@pytest.fixture
def setup():
    s = NoiseSchedule.from_name("cosine", 1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 2, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(6, 2, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 50, 500, 900, 999])
    return s, x0, eps, t, q_sample(x0, t, s, eps)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "mu"])
def test_every_parameterization_round_trips(setup, prediction):
    """The exact target of each parameterization converts back to the true (x0, eps)."""
    s, x0, eps, t, x_t = setup
    target = target_for(prediction, x0, eps, x_t, t, s)
    x0_hat, eps_hat = to_x0_eps(prediction, target, x_t, t.double(), s)
    assert torch.allclose(x0_hat, x0, atol=1e-6)
    # at t=0 eps is barely identifiable (sqrt(1 - alpha_bar_0) ~ 6e-3), so compare from t=1 on
    assert torch.allclose(eps_hat[1:], eps[1:], atol=1e-6)


def test_v_definition(setup):
    s, x0, eps, t, x_t = setup
    ab = s.alpha_bar[t][:, None, None, None]
    assert torch.allclose(target_for("v", x0, eps, x_t, t, s), ab.sqrt() * eps - (1 - ab).sqrt() * x0)


def test_mu_target_is_posterior_mean_and_eq11(setup):
    """mu-tilde(x_t, x0) = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_t)  (DDPM eq. 11)."""
    s, x0, eps, t, x_t = setup
    mu = target_for("mu", x0, eps, x_t, t, s)
    assert torch.allclose(mu, q_posterior_mean_variance(x0, x_t, t, s)[0])
    b, a, ab = (v[t][:, None, None, None] for v in (s.betas, s.alphas, s.alpha_bar))
    assert torch.allclose(mu, (x_t - b / (1 - ab).sqrt() * eps) / a.sqrt(), atol=1e-10)


def test_denoiser_contract_and_errors():
    s = NoiseSchedule.from_name("linear", 1000)
    d = Denoiser(lambda x, t: torch.zeros_like(x), s, "eps")
    out = d(torch.ones(3, 2), 10)
    assert out.eps.shape == (3, 2) and d.nfe == 1 and out.var_frac is None
    with pytest.raises(ValueError, match="choose one of"):
        Denoiser(lambda x, t: x, s, "score")
    bad = Denoiser(lambda x, t: torch.zeros(3, 5), s, "eps")
    with pytest.raises(ValueError, match="returned shape"):
        bad(torch.ones(3, 2), 10)
    # a learned variance doubles the channels: the prediction and v, whose frac = (v + 1) / 2
    learned = Denoiser(lambda x, t: torch.cat([torch.zeros_like(x), torch.full_like(x, 0.5)], 1), s, "eps", learned_variance=True)
    assert torch.equal(learned(torch.ones(3, 2, 4), 10).var_frac, torch.full((3, 2, 4), 0.75))
    with pytest.raises(ValueError, match="must return 4 channels, got 3"):
        Denoiser(lambda x, t: torch.zeros(3, 3, 4), s, "eps", learned_variance=True)(torch.ones(3, 2, 4), 10)
    with pytest.raises(ValueError, match="integer"):
        Denoiser(lambda x, t: x, s, "mu")(torch.ones(3, 2), 10.5)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_an_edited_x0_or_eps_keeps_x_t_on_the_forward_process(setup, prediction):
    """Wrappers that edit x0 (thresholding, guidance rescale) or eps (classifier guidance) get the other from
    x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, whatever the network predicts: with_x0's eps and with_eps's x0 are the
    true ones of the sample drawn."""
    s, x0, eps, t, x_t = setup
    d = Denoiser(lambda x, tt: target_for(prediction, x0, eps, x, tt.long(), s), s, prediction)
    tt = t.double()
    out = d.with_x0(x_t, tt, x0)
    assert torch.equal(out.x0, x0) and torch.allclose(out.eps[1:], eps[1:], atol=1e-6)
    out = d.with_eps(x_t, tt, eps)
    assert torch.equal(out.eps, eps) and torch.allclose(out.x0, x0, atol=1e-6)
