"""The exact models the sampler and guidance tests lean on (ddpmkit.analytic), each checked against an independent
computation: torch.distributions for the noisy mixture's density, autograd of that density for its score (Tweedie's
formula gives E[eps | x_t] from it), and one joint Gaussian conditioning for the super-resolution denoiser. Unequal
weights, widths and alpha_bar per row, so that a wrong constant cannot cancel in a softmax or a ratio."""
import math

import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from ddpmkit.analytic import GaussianMixture, GaussianSuperRes
from ddpmkit.schedules import NoiseSchedule

GM = GaussianMixture(torch.tensor([[-2.0, 0.5], [1.0, 1.5], [0.5, -1.0]]), torch.tensor([0.3, 0.8, 0.5]),
                     torch.tensor([1.0, 3.0, 2.0]))  # weights not normalised: the mixture normalises them
S = NoiseSchedule.from_name("cosine", 1000)


def reference(alpha_bar: torch.Tensor) -> MixtureSameFamily:
    """q(x_t) for each row's alpha_bar (B,): components N(sqrt(a) mu_k, (a s_k^2 + 1 - a) I), weights w_k / sum w."""
    a = alpha_bar.double()[:, None, None]
    loc = a.sqrt() * GM.means[None]  # (B, K, D)
    scale = (a * GM.stds[None, :, None] ** 2 + 1 - a).sqrt().expand_as(loc)
    weights = torch.tensor([1.0, 3.0, 2.0], dtype=torch.float64).expand(len(alpha_bar), 3)
    return MixtureSameFamily(Categorical(probs=weights), Independent(Normal(loc, scale), 1))


def points(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return 2 * torch.randn(n, 2, generator=g, dtype=torch.float64), torch.rand(n, generator=g, dtype=torch.float64) * 0.98 + 0.01


def test_the_ring_puts_n_equal_gaussians_at_equal_angles_from_0():
    """The "8 Gaussians" toy (data 8gaussians): component k at radius (cos 2 pi k / n, sin 2 pi k / n)."""
    ring = GaussianMixture.ring(4, radius=2.0, std=0.3)
    expected = torch.tensor([[2.0, 0.0], [0.0, 2.0], [-2.0, 0.0], [0.0, -2.0]], dtype=torch.float64)
    assert torch.allclose(ring.means, expected, atol=1e-12) and ring.stds.tolist() == [0.3] * 4
    assert torch.allclose(ring.weights / ring.weights.sum(), torch.full((4,), 0.25, dtype=ring.weights.dtype))


def test_the_noisy_mixtures_density_and_responsibilities_are_torch_distributions():
    x, ab = points()
    q = reference(ab)
    assert torch.allclose(GM.log_prob_noisy(x, ab), q.log_prob(x), atol=1e-10)
    assert torch.allclose(GM.log_prob(x), reference(torch.ones(len(x))).log_prob(x), atol=1e-10)
    per_k = q.component_distribution.log_prob(x[:, None]) + q.mixture_distribution.logits  # log w_k N_k(x), (B, K)
    assert torch.allclose(GM.responsibilities(x, ab), per_k.softmax(1), atol=1e-10)
    # the exact noisy classifier's log-softmax is log q(k | x_t), at the timesteps' alpha_bar
    t = torch.arange(len(x)) * 15.0
    logits = GM.noisy_classifier(S)(x, t)
    assert torch.allclose(logits.log_softmax(1), GM.responsibilities(x, S.alpha_bar_at(t).double()).log(), atol=1e-10)


def test_the_optimal_noise_prediction_is_tweedies_formula_on_the_reference_density():
    """E[eps | x_t] = -sqrt(1 - a) grad log q(x_t), with the gradient taken by autograd of torch.distributions."""
    x, ab = points()
    x.requires_grad_(True)
    score, = torch.autograd.grad(reference(ab).log_prob(x).sum(), x)
    expected = -(1 - ab).sqrt()[:, None] * score
    assert torch.allclose(GM.eps_star(x.detach(), ab), expected, atol=1e-10)
    # through the model door: (B, 1, 2) inputs and timesteps
    t = torch.tensor([10.0, 400.0, 990.0]).repeat(22)[:64]
    x_img = x.detach()[:, None]
    assert torch.allclose(GM.eps_model(S)(x_img, t)[:, 0], GM.eps_star(x.detach(), S.alpha_bar_at(t).double()), atol=1e-12)


def test_the_class_conditional_model_is_each_components_own_denoiser_and_the_null_label_the_mixtures():
    x, ab = points(6)
    t = torch.tensor([50.0, 200.0, 400.0, 600.0, 800.0, 950.0])
    a = S.alpha_bar_at(t).double()
    y = torch.tensor([0, 1, 2, 3, 0, 3])  # 3 = K: the null label
    out = GM.conditional_eps_model(S)(x, t, y)
    for row, k in enumerate(y.tolist()):
        if k == 3:
            expected = GM.eps_star(x[row:row + 1], a[row:row + 1])[0]
        else:  # one Gaussian N(sqrt(a) mu_k, v I): E[eps | x_t, k] = sqrt(1 - a) (x_t - sqrt(a) mu_k) / v
            v = a[row] * GM.stds[k] ** 2 + 1 - a[row]
            expected = (1 - a[row]).sqrt() * (x[row] - a[row].sqrt() * GM.means[k]) / v
        assert torch.allclose(out[row], expected, atol=1e-10), row


def test_the_mixtures_mean_and_covariance_are_its_samples():
    mean, cov = GM.mean(), GM.covariance()
    x, k = GM.sample(200_000, torch.Generator().manual_seed(0))
    assert torch.allclose(torch.bincount(k, minlength=3) / len(k), torch.tensor([1 / 6, 1 / 2, 1 / 3]), atol=0.005)
    assert torch.allclose(x.mean(0), mean, atol=0.01)  # standard error ~0.003
    assert torch.allclose(torch.cov(x.T), cov, atol=0.02)
    assert torch.allclose(mean, torch.tensor([1 / 6 * -2 + 1 / 2 * 1 + 1 / 3 * 0.5, 1 / 6 * 0.5 + 1 / 2 * 1.5 + 1 / 3 * -1], dtype=torch.float64))


def joint_conditional_mean(mean: torch.Tensor, cov: torch.Tensor, A: torch.Tensor, c: float, a: float,
                           x_t: torch.Tensor, z_s: torch.Tensor) -> torch.Tensor:
    """E[x0 | x_t, z_s] by conditioning the joint Gaussian of (x0, x_t, z_s) in one step, with
    x_t = c x0 + sqrt(1 - c^2) eps and z_s = a A x0 + sqrt(1 - a^2) xi."""
    D, d = len(mean), len(A)
    L = torch.cat([c * torch.eye(D, dtype=torch.float64), a * A])  # (D + d, D): the observations' gain on x0
    noise = torch.diag(torch.cat([torch.full((D,), 1 - c * c), torch.full((d,), 1 - a * a)])).double()
    obs_cov = L @ cov @ L.T + noise
    obs = torch.cat([x_t, z_s], 1)
    return mean + (obs - mean @ L.T) @ torch.linalg.solve(obs_cov, L @ cov)  # Sigma_x,obs Sigma_obs^-1 (obs - E obs)


def test_the_super_resolution_denoiser_is_the_joint_gaussians_conditional_mean():
    g = torch.Generator().manual_seed(1)
    D, d = 4, 2
    root = torch.randn(D, D, generator=g, dtype=torch.float64)
    mean, cov = torch.randn(D, generator=g, dtype=torch.float64), root @ root.T / D + 0.1 * torch.eye(D, dtype=torch.float64)
    A = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]], dtype=torch.float64)
    gsr = GaussianSuperRes(mean, cov, A, (1, 2, 2))
    model = gsr.eps_model(S)
    for level in (0.0, 0.3):
        a = 1.0 if level == 0 else math.sqrt(float(S.alpha_bar_at(torch.tensor([level * (S.T - 1)]))[0]))
        x_t, z_s = torch.randn(3, D, generator=g, dtype=torch.float64), torch.randn(3, d, generator=g, dtype=torch.float64)
        t = torch.tensor([100.0, 500.0, 900.0])
        eps = model(x_t.reshape(3, 1, 2, 2), t, low_res=z_s.reshape(3, 1, 1, 2), aug_level=torch.full((3,), level)).reshape(3, D)
        for row in range(3):
            c = math.sqrt(float(S.alpha_bar_at(t[row:row + 1])[0]))
            x0 = joint_conditional_mean(mean, cov, A, c, a, x_t[row:row + 1], z_s[row:row + 1])[0]
            assert torch.allclose(eps[row], (x_t[row] - c * x0) / math.sqrt(1 - c * c), atol=1e-8), (level, row)
