import math

import pytest
import torch
from scipy.stats import norm

from ddpmkit.losses import discretized_gaussian_log_likelihood, gaussian_log_likelihood, snr_weight, training_losses, vlb_term
from ddpmkit.process import q_posterior_mean_variance, q_sample
from ddpmkit.reverse import p_mean_variance
from ddpmkit.schedules import NoiseSchedule


def test_discretized_likelihood_matches_scipy():
    x = torch.tensor([-1.0, -0.2, 0.0039215686, 1.0], dtype=torch.float64)
    mean = torch.tensor([-0.9, -0.25, 0.0, 0.95], dtype=torch.float64)
    log_var = torch.log(torch.tensor([0.01, 0.04, 1e-4, 0.02], dtype=torch.float64))
    got = discretized_gaussian_log_likelihood(x, mean, log_var)
    sd = (0.5 * log_var).exp().numpy()
    h = 1 / 255
    want = [
        math.log(norm.cdf(-1 + h, -0.9, sd[0])),
        math.log(norm.cdf(-0.2 + h, -0.25, sd[1]) - norm.cdf(-0.2 - h, -0.25, sd[1])),
        math.log(norm.cdf(x[2] + h, 0.0, sd[2]) - norm.cdf(x[2] - h, 0.0, sd[2])),
        math.log(norm.sf(1 - h, 0.95, sd[3])),
    ]
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), rtol=1e-8)
    # the bins partition the real line: probabilities of all 256 levels sum to 1
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64)
    total = discretized_gaussian_log_likelihood(levels, torch.full_like(levels, 0.1), torch.full_like(levels, -3.0)).exp().sum()
    assert total.item() == pytest.approx(1.0, abs=1e-9)


def test_continuous_likelihood_is_the_normal_log_density():
    x = torch.tensor([-1.0, -0.2, 0.3, 2.0], dtype=torch.float64)
    mean = torch.tensor([-0.9, -0.25, 0.0, 0.95], dtype=torch.float64)
    log_var = torch.log(torch.tensor([0.01, 0.04, 1.0, 3.0], dtype=torch.float64))
    want = norm.logpdf(x.numpy(), mean.numpy(), (0.5 * log_var).exp().numpy())
    assert torch.allclose(gaussian_log_likelihood(x, mean, log_var), torch.from_numpy(want), rtol=1e-12)


def test_vlb_term_matches_monte_carlo_kl():
    """L_{t-1} = KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) estimated by sampling x_{t-1} from q."""
    s = NoiseSchedule.from_name("linear", 1000)
    t = torch.tensor([3])  # early t: beta_t and beta-tilde_t differ, so the variances mismatch
    x0 = torch.tensor([[0.4, -0.6]], dtype=torch.float64)
    x_t = q_sample(x0, t, s, torch.tensor([[0.3, 1.1]], dtype=torch.float64))
    x0_pred = x0 + 0.3  # an imperfect model
    mean_p, log_var_p = p_mean_variance(x0_pred, x_t, t, s, "beta")
    exact = vlb_term(x0, x_t, t, mean_p, log_var_p, s).item()
    mean_q, var_q, _ = q_posterior_mean_variance(x0, x_t, t, s)
    g = torch.Generator().manual_seed(0)
    z = mean_q + var_q.sqrt() * torch.randn(200000, 2, generator=g, dtype=torch.float64)
    log_q = -0.5 * (z - mean_q) ** 2 / var_q - 0.5 * var_q.log()
    log_p = -0.5 * (z - mean_p) ** 2 / log_var_p.exp() - 0.5 * log_var_p
    mc = (log_q - log_p).mean().item()  # mean over samples and dimensions: nats per dimension
    assert exact == pytest.approx(mc, rel=0.02)
    assert exact > 0.01  # the offset and variance mismatch make the KL far from zero


def test_vlb_term_t0_is_decoder_nll():
    s = NoiseSchedule.from_name("linear", 1000)
    x0 = torch.tensor([[-1.0, 0.5]], dtype=torch.float64)
    t = torch.tensor([0])
    x_t = q_sample(x0, t, s, torch.zeros_like(x0))
    mean, log_var = p_mean_variance(x0, x_t, t, s, "beta_tilde")
    nll = -discretized_gaussian_log_likelihood(x0, mean, log_var).mean()
    assert vlb_term(x0, x_t, t, mean, log_var, s).item() == pytest.approx(nll.item())


def test_min_snr_weights_equal_in_x0_space():
    snr = torch.tensor([0.1, 1.0, 5.0, 50.0])
    w_x0 = snr_weight("x0", snr, 5.0)
    # ||eps err||^2 = snr ||x0 err||^2 and ||v err||^2 = (snr + 1) ||x0 err||^2
    assert torch.allclose(snr_weight("eps", snr, 5.0) * snr, w_x0)
    assert torch.allclose(snr_weight("v", snr, 5.0) * (snr + 1), w_x0)
    assert torch.allclose(w_x0, torch.tensor([0.1, 1.0, 5.0, 5.0]))


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "mu"])
def test_perfect_model_has_zero_simple_loss(prediction):
    """A model returning the exact target of its parameterization has L_simple = 0, and its VLB
    equals the KL between posteriors with the same mean, i.e. 0 for t > 0."""
    s = NoiseSchedule.from_name("linear", 100)
    x0 = torch.randn(5, 3, dtype=torch.float64)
    noise = torch.randn(5, 3, dtype=torch.float64)
    t = torch.tensor([1, 5, 20, 60, 99])
    from ddpmkit.parameterization import target_for

    oracle = lambda x, tt: target_for(prediction, x0, noise, x, tt.long(), s)
    out = training_losses(oracle, x0, t, s, noise, prediction, loss_type="vlb")
    assert torch.allclose(out["mse"], torch.zeros(5, dtype=torch.float64), atol=1e-20)
    assert torch.allclose(out["vlb"], torch.zeros(5, dtype=torch.float64), atol=1e-9)
    out2 = training_losses(lambda x, tt: torch.zeros_like(x), x0, t, s, noise, prediction, "hybrid")
    assert bool((out2["mse"] > 0).all()) and bool((out2["vlb"] > 0).all())


def test_unknown_loss_type():
    s = NoiseSchedule.from_name("linear", 10)
    with pytest.raises(ValueError, match="choose one of"):
        training_losses(lambda x, t: x, torch.zeros(1, 2), torch.tensor([1]), s, loss_type="l1")


def test_hybrid_loss_trains_variance_only_through_vlb():
    """L_hybrid = L_simple + lambda L_vlb with the mean stopped in L_vlb (Nichol & Dhariwal):
    the VLB part sends gradient to the variance channels only."""
    s = NoiseSchedule.from_name("cosine", 100)
    x0 = torch.randn(4, 1, 4, 4)
    t = torch.tensor([1, 10, 50, 99])
    raw = torch.zeros(4, 2, 4, 4, requires_grad=True)  # [eps prediction | variance interpolation v]
    model = lambda x, tt: raw
    out = training_losses(model, x0, t, s, torch.randn_like(x0), "eps", "hybrid", learned_variance=True)
    (g,) = torch.autograd.grad(out["vlb"].sum(), raw)
    assert torch.equal(g[:, :1], torch.zeros_like(g[:, :1])) and g[:, 1:].abs().sum() > 0
    (g_mse,) = torch.autograd.grad(out["mse"].sum(), raw)
    assert g_mse[:, :1].abs().sum() > 0 and torch.equal(g_mse[:, 1:], torch.zeros_like(g_mse[:, 1:]))
