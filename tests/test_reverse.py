import pytest
import torch

from ddpmkit.reverse import p_log_variance, p_mean_variance
from ddpmkit.schedules import NoiseSchedule


def test_variance_choices():
    s = NoiseSchedule.from_name("linear", 1000)
    x = torch.zeros(3, 2, dtype=torch.float64)
    i = torch.tensor([1, 10, 999])
    small = p_log_variance("beta_tilde", i, x, s)
    large = p_log_variance("beta", i, x, s)
    assert torch.allclose(small[:, 0], s.posterior_variance[i].log())
    assert torch.allclose(large[:, 0], s.betas[i].log())
    assert bool((small < large).all())  # beta-tilde_t < beta_t for t > 0
    # the learned variance interpolates between the two in log space (Nichol & Dhariwal eq. 15)
    half = p_log_variance("learned", i, x, s, var_frac=torch.full_like(x, 0.25))
    assert torch.allclose(half, 0.25 * large + 0.75 * small)
    assert torch.allclose(p_log_variance("learned", i, x, s, torch.zeros_like(x)), small)
    with pytest.raises(ValueError, match="choose one of"):
        p_log_variance("fixed", i, x, s)
    with pytest.raises(ValueError, match="learned variance"):
        p_log_variance("learned", i, x, s)


def test_the_large_variance_at_t_0_is_the_posteriors_at_t_1_on_every_schedule_length():
    """improved-diffusion's "fixedlarge": beta_t for t >= 1 and, at t = 0 (where beta_0 is tiny), beta-tilde_1; on a
    schedule of one step there is no t = 1, and beta_0 is taken."""
    x = torch.zeros(1, 2, dtype=torch.float64)
    for T in (2, 3, 1000):
        s = NoiseSchedule.from_name("linear", T)
        large = torch.cat([p_log_variance("beta", torch.tensor([t]), x, s)[:, 0] for t in range(min(T, 3))])
        assert torch.allclose(large, torch.cat([s.posterior_variance[1:2], s.betas[1:3]]).log(), rtol=1e-12, atol=0), T
    one = NoiseSchedule.from_name("cosine", 1)
    assert torch.allclose(p_log_variance("beta", torch.tensor([0]), x, one)[:, 0], one.betas.log())


def test_p_mean_is_algorithm2_update():
    """mu_theta = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha_bar_t) eps)  (Algorithm 2, line 4)."""
    s = NoiseSchedule.from_name("cosine", 1000)
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(4, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 3, generator=g, dtype=torch.float64)
    i = torch.tensor([1, 5, 500, 998])
    ab, a, b = (v[i][:, None] for v in (s.alpha_bar, s.alphas, s.betas))
    x0 = (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()
    mean, _ = p_mean_variance(x0, x_t, i, s)
    assert torch.allclose(mean, (x_t - b / (1 - ab).sqrt() * eps) / a.sqrt(), atol=1e-10)
