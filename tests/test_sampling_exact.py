"""Ancestral sampling driven by the exact E[eps | x_t] reproduces the data distribution."""
import pytest
import torch

import ddpmkit
from ddpmkit.analytic import GaussianMixture, nearest_component
from ddpmkit.schedules import NoiseSchedule

N = 4000


def gen(seed: int) -> torch.Generator:
    # one generator for the whole batch: per-sample seeds cost a randn call per sample and step
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
@pytest.mark.parametrize("variance", ["beta_tilde", "beta"])
def test_gaussian_data_mean_and_covariance(schedule_name, variance):
    s = NoiseSchedule.from_name(schedule_name, 1000)
    gm = GaussianMixture.gaussian(torch.tensor([0.8, -0.5, 0.2]), 0.3)
    out = ddpmkit.sample(gm.eps_model(s), (N, 3), s, sampler="ddpm", generator=gen(0), variance=variance)
    x = out.x.double()
    assert out.nfe == 1000
    se_mean = 0.3 / N**0.5
    assert torch.allclose(x.mean(0), gm.mean(), atol=4 * se_mean)
    cov = torch.cov(x.T)
    # sample variance of s^2 has standard error s^2 sqrt(2/N); off-diagonals s^2 / sqrt(N)
    assert torch.allclose(cov, gm.covariance(), atol=4 * 0.09 * (2 / N) ** 0.5)


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
@pytest.mark.parametrize("variance", ["beta_tilde", "beta"])
def test_mixture_weights_and_spreads(schedule_name, variance):
    s = NoiseSchedule.from_name(schedule_name, 1000)
    weights = torch.tensor([0.5, 0.3, 0.2])
    gm = GaussianMixture(torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]]), torch.tensor([0.3, 0.5, 0.2]), weights)
    out = ddpmkit.sample(gm.eps_model(s), (N, 2), s, generator=gen(123), variance=variance)
    k = nearest_component(gm, out.x)
    freq = torch.bincount(k, minlength=3).double() / N
    assert torch.allclose(freq, weights.double(), atol=4 * (0.25 / N) ** 0.5)
    for j in range(3):
        spread = (out.x[k == j].double() - gm.means[j]).std().item()
        assert spread == pytest.approx(gm.stds[j].item(), rel=0.08)


def test_batch_size_does_not_change_a_sample():
    s = NoiseSchedule.from_name("linear", 50)
    gm = GaussianMixture.ring(8)
    big = ddpmkit.sample(gm.eps_model(s), (6, 2), s, generator=7).x
    small = ddpmkit.sample(gm.eps_model(s), (2, 2), s, generator=[11, 12]).x  # seeds 7+4, 7+5
    assert torch.allclose(big[4:6], small, atol=1e-6)
    again = ddpmkit.sample(gm.eps_model(s), (6, 2), s, generator=7).x
    assert torch.equal(big, again)


def test_strided_sampling_brackets_and_converges():
    """ "Every k-th step" on the respaced schedule. With few steps sigma^2 = beta-tilde (the lower
    bound) gives too little variance and sigma^2 = beta (the upper bound) too much; the true
    variance lies between and both converge to it as the steps grow; the mean is right throughout."""
    s = NoiseSchedule.from_name("linear", 1000)
    gm = GaussianMixture.gaussian(torch.tensor([1.0, -1.0]), 0.5)
    n = 20000
    errors = {}
    for variance in ["beta_tilde", "beta"]:
        for steps in [25, 100]:
            out = ddpmkit.sample(gm.eps_model(s), (n, 2), s, steps=steps, generator=gen(steps), variance=variance)
            assert out.nfe == steps
            x = out.x.double()
            assert torch.allclose(x.mean(0), gm.mean(), atol=4 * 0.5 / n**0.5)
            errors[variance, steps] = x.var(0).mean().item() - 0.25
    assert errors["beta_tilde", 25] < errors["beta_tilde", 100] < 0 < errors["beta", 100] < errors["beta", 25]


def test_trajectory_is_recorded_coarse_to_fine():
    s = NoiseSchedule.from_name("linear", 100)
    gm = GaussianMixture.gaussian(torch.zeros(2), 0.1)
    out = ddpmkit.sample(gm.eps_model(s), (500, 2), s, generator=0, record_every=10)
    assert out.timesteps[0] == 90 and out.timesteps[-1] == 0 and len(out.xs) == 10
    spread = [x.std().item() for x in out.xs]
    assert spread[0] > 0.5 and spread[-1] < 0.15  # noise shrinks towards the data's 0.1


def test_unknown_sampler_lists_options():
    s = NoiseSchedule.from_name("linear", 10)
    with pytest.raises(ValueError, match=r"unknown sampler 'ddmp'.*ddpm"):
        ddpmkit.sample(lambda x, t: x, (2, 2), s, sampler="ddmp")


def test_ddim_eta1_is_ddpm_with_beta_tilde():
    """With the same noise, DDIM(eta=1) on every step reproduces ancestral DDPM (sigma^2 = beta-tilde) exactly."""
    s = NoiseSchedule.from_name("cosine", 200)
    gm = GaussianMixture.ring(4, radius=1.0, std=0.2)
    a = ddpmkit.sample(gm.eps_model(s), (64, 2), s, sampler="ddpm", generator=5, variance="beta_tilde").x
    b = ddpmkit.sample(gm.eps_model(s), (64, 2), s, sampler="ddim", generator=5, eta=1.0).x
    assert torch.allclose(a, b, atol=1e-4)
    c = ddpmkit.sample(gm.eps_model(s), (64, 2), s, sampler="ddpm", generator=5, variance="beta").x
    assert not torch.allclose(a, c, atol=1e-2)


def test_ddim_eta0_follows_the_exact_ode_for_gaussian_data():
    """For N(mu, s^2 I) data the probability-flow ODE keeps z = (x_t - sqrt(a) mu) / sqrt(a s^2 + 1 - a)
    fixed, so x_0 = mu + s z(x_T). DDIM(eta=0) converges to that map at first order in the step size."""
    import math

    s = NoiseSchedule.from_name("linear", 1000)
    mu, std = torch.tensor([0.5, -1.0]), 0.3
    gm = GaussianMixture.gaussian(mu, std)
    x_T = torch.randn(256, 2, generator=gen(0))
    a_T = s.alpha_bar[-1].item()
    exact = mu + std * (x_T - a_T**0.5 * mu) / (a_T * std**2 + 1 - a_T) ** 0.5
    errors = []
    for steps in [10, 40, 160]:
        x0 = ddpmkit.sample(gm.eps_model(s), (256, 2), s, sampler="ddim", steps=steps, x_T=x_T).x
        errors.append((x0 - exact).abs().max().item())
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.05, errors
    order = math.log(errors[1] / errors[2]) / math.log(4)
    assert 0.8 < order < 1.3, (order, errors)
