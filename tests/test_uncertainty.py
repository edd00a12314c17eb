"""EDM2's learned per-level uncertainty weighting: the loss formula, its optimum u = ln E[L], and a run that uses it."""
import pytest
import torch
from torch import nn

import ddpmkit
from ddpmkit.config import ConfigError, DiffusionConfig, load_config
from ddpmkit.losses import training_losses
from ddpmkit.models import load_diffusion
from ddpmkit.train import train
from ddpmkit.uncertainty import LevelUncertainty, UncertaintyWeighted

S = ddpmkit.NoiseSchedule.from_name("linear", 1000)


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return super().forward(x)


@pytest.mark.parametrize("gamma", [None, 5.0])
def test_loss_is_weighted_loss_over_exp_u_plus_u(gamma):
    torch.manual_seed(0)
    inner = Linear(3, 3)
    net = UncertaintyWeighted(inner, S)
    with torch.no_grad():
        net.log_variance.linear.bias.fill_(0.7)  # u = 0.7 at every level
    x0, noise, t = torch.randn(8, 3), torch.randn(8, 3), torch.randint(0, 1000, (8,))
    plain = training_losses(inner, x0, t, S, noise, "x0", min_snr_gamma=gamma)["loss"]
    weighted = training_losses(net, x0, t, S, noise, "x0", min_snr_gamma=gamma, uncertainty=True)
    assert torch.allclose(weighted["loss"], plain * torch.exp(torch.tensor(-0.7)) + 0.7, atol=1e-6)
    assert torch.allclose(weighted["log_variance"], torch.full((8,), 0.7))
    assert torch.equal(net(x0, t.float()), inner(x0, t.float()))  # samplers see the plain network


def test_fresh_head_is_zero_so_training_starts_from_the_plain_loss():
    u = LevelUncertainty(S)(torch.arange(0, 1000, 37).float())
    assert torch.equal(u, torch.zeros_like(u))


def test_the_heads_features_are_fourier_features_of_log_snr_over_8():
    """u's features, written out from the docstring's parts: sqrt(2) cos(2 pi (f c + phi)) of c = log-SNR(t) / 8, each read
    through a one-hot linear layer (the features' frequencies, scale and phases are the head's own buffers)."""
    head = LevelUncertainty(S, features=4)
    t = torch.tensor([0.0, 99.5, 500.0, 999.0])
    ab = S.alpha_bar_at(t).double()
    c = (ab / (1 - ab)).log() / 8
    for k in range(4):
        with torch.no_grad():
            head.linear.weight.zero_()
            head.linear.weight[0, k] = 1.0
        f, phi = head.freqs[k].double(), head.phases[k].double()
        expected = 2**0.5 * torch.cos(2 * torch.pi * (f * c + phi))
        torch.testing.assert_close(head(t).double(), expected, atol=2e-5, rtol=0)


def test_learned_u_is_the_log_of_the_expected_loss_at_each_level():
    """min_u E[L] exp(-u) + u is at u = ln E[L]: the head, trained on losses whose mean at level t is
    known (a factor of 40 across the chain), must learn that curve."""
    torch.manual_seed(0)
    head = LevelUncertainty(S)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    mean_loss = lambda t: 0.05 + 2.0 * (t / 1000) ** 2  # E[L(t)], from 0.05 to 2.05
    g = torch.Generator().manual_seed(1)
    for _ in range(1500):
        t = torch.randint(0, 1000, (256,), generator=g).float()
        u = head(t)
        (mean_loss(t) * torch.exp(-u) + u).mean().backward()  # the expected loss: its gradient in u is E[L] exp(-u) - 1
        opt.step()
        opt.zero_grad()
    t = torch.arange(50, 1000, 50).float()
    with torch.no_grad():
        assert torch.allclose(head(t), mean_loss(t).log(), atol=0.02)


def test_config_needs_the_simple_loss():
    with pytest.raises(ConfigError, match="uncertainty_weighting.*simple"):
        DiffusionConfig(uncertainty_weighting=True, loss="hybrid", learned_variance=True)


def test_a_run_trains_the_head_and_loads_and_samples(tmp_path):
    run = tmp_path / "run"
    train(load_config("toy2d", [f"train.run_dir={run}", "train.steps=30", "train.sample_every=0", "train.mixed_precision=no",
                                "train.lr=0.01", "diffusion.precondition=edm", "diffusion.prediction=x0",
                                "diffusion.loss_weighting=edm", "diffusion.uncertainty_weighting=true"]), progress=False)
    m = load_diffusion(run)
    assert isinstance(m.network, UncertaintyWeighted)
    assert m.network.log_variance.linear.weight.abs().sum() > 0  # the head trained
    x = ddpmkit.sample(m.network, (16, 2), m.schedule, sampler="ddim", steps=5, prediction="x0", generator=0).x
    assert x.shape == (16, 2) and torch.isfinite(x).all()
