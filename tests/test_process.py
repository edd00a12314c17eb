import pytest
import torch

from ddpmkit.process import (
    normal_kl,
    prior_kl,
    q_mean_variance,
    q_posterior_mean_variance,
    q_sample,
    q_step_sample,
)
from ddpmkit.schedules import NoiseSchedule


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_iterated_steps_match_closed_form(name):
    """Applying q(x_t|x_{t-1}) t+1 times from x_0 gives q(x_t|x_0) in mean and variance."""
    s = NoiseSchedule.from_name(name, 1000)
    g = torch.Generator().manual_seed(0)
    n, t_end = 20000, 300
    x0 = torch.full((n, 1), 0.7, dtype=torch.float64)
    x = x0.clone()
    for t in range(t_end + 1):
        x = q_step_sample(x, torch.full((n,), t), s, torch.randn(n, 1, generator=g, dtype=torch.float64))
    mean, var = q_mean_variance(x0[:1], torch.tensor([t_end]), s)
    se = (var.sqrt() / n**0.5).item()
    assert abs(x.mean().item() - mean.item()) < 4 * se
    assert x.var().item() == pytest.approx(var.item(), rel=4 * (2 / n) ** 0.5)
    # and the exact recursion of the moments (no sampling): m_t = sqrt(alpha_t) m_{t-1}, v_t = alpha_t v_{t-1} + beta_t
    m, v = 0.7, 0.0
    for t in range(t_end + 1):
        m, v = (1 - s.betas[t]).sqrt() * m, (1 - s.betas[t]) * v + s.betas[t]
    assert m.item() == pytest.approx(mean.item(), rel=1e-12) and v.item() == pytest.approx(var.item(), rel=1e-12)


def test_q_sample_formula():
    s = NoiseSchedule.from_name("linear", 1000)
    x0, eps, t = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 10, 500, 999])
    ab = s.alpha_bar[t].float()[:, None]
    assert torch.allclose(q_sample(x0, t, s, eps), ab.sqrt() * x0 + (1 - ab).sqrt() * eps)


@pytest.mark.parametrize("t", [1, 10, 400, 999])
def test_posterior_matches_bruteforce_conditioning(t):
    """q(x_{t-1}|x_t,x_0) from Bayes on the joint Gaussian of (x_{t-1}, x_t) given x_0."""
    s = NoiseSchedule.from_name("cosine", 1000)
    ab_prev, ab, beta = s.alpha_bar[t - 1], s.alpha_bar[t], s.betas[t]
    x0 = torch.tensor([[0.3, -1.2]], dtype=torch.float64)
    x_t = torch.tensor([[0.5, 0.1]], dtype=torch.float64)
    # joint of (x_{t-1}, x_t) | x_0: x_{t-1} ~ N(sqrt(ab_prev) x0, 1-ab_prev), x_t = sqrt(1-beta) x_{t-1} + sqrt(beta) z
    m1, v1 = ab_prev.sqrt() * x0, 1 - ab_prev
    m2, v2, c12 = ab.sqrt() * x0, 1 - ab, (1 - beta).sqrt() * (1 - ab_prev)
    cond_mean = m1 + c12 / v2 * (x_t - m2)
    cond_var = v1 - c12**2 / v2
    mean, var, log_var = q_posterior_mean_variance(x0, x_t, torch.tensor([t]), s)
    assert torch.allclose(mean, cond_mean, rtol=1e-10)
    assert torch.allclose(var, cond_var.expand_as(var), rtol=1e-10)
    assert torch.allclose(log_var, var.log())


def test_posterior_at_t0_is_x0():
    s = NoiseSchedule.from_name("linear", 1000)
    x0, x_t = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    mean, var, log_var = q_posterior_mean_variance(x0, x_t, torch.tensor([0, 0]), s)
    assert torch.allclose(mean, x0) and bool((var == 0).all())
    assert torch.allclose(log_var, s.posterior_variance[1].log().expand_as(log_var).float().double(), rtol=1e-6)


def test_normal_kl_matches_monte_carlo():
    g = torch.Generator().manual_seed(1)
    m1, lv1, m2, lv2 = 0.3, -1.0, -0.2, 0.4
    x = m1 + (0.5 * torch.tensor(lv1)).exp() * torch.randn(400000, generator=g, dtype=torch.float64)
    logp = -0.5 * (x - m1) ** 2 / torch.tensor(lv1).exp() - 0.5 * lv1
    logq = -0.5 * (x - m2) ** 2 / torch.tensor(lv2).exp() - 0.5 * lv2
    mc = (logp - logq).mean().item()
    exact = normal_kl(*(torch.tensor(v, dtype=torch.float64) for v in (m1, lv1, m2, lv2))).item()
    assert exact == pytest.approx(mc, abs=3e-3)


def test_prior_kl():
    s = NoiseSchedule.from_name("linear", 1000)
    x0 = torch.ones(1, 4)
    ab = s.alpha_bar[-1].item()
    # KL(N(sqrt(ab) x, 1-ab) || N(0,1)) = 0.5 (ab x^2 + (1-ab) - 1 - log(1-ab))
    expected = 0.5 * (ab + (1 - ab) - 1 - torch.log1p(torch.tensor(-ab)).item())
    assert prior_kl(x0, s).item() == pytest.approx(expected, rel=1e-3)
