"""Classifier-free guidance and class-conditional networks."""
import pytest
import torch

import ddpmkit
from ddpmkit.analytic import GaussianMixture, nearest_component
from ddpmkit.guidance import ClassifierFreeGuidance
from ddpmkit.nets import MLPDenoiser, UNet
from ddpmkit.schedules import NoiseSchedule

S = NoiseSchedule.from_name("linear", 1000)
MIX = GaussianMixture(torch.tensor([[-1.5, 0.0], [1.5, 0.5], [0.0, -1.5]]), torch.tensor([0.2, 0.3, 0.15]),
                      torch.tensor([0.5, 0.3, 0.2]))
NULL = 3


class Counting:
    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.model(*args, **kwargs)


@pytest.mark.parametrize("sampler", ["ddpm", "unipc", "dpmpp_2m_sde"])
def test_scale_one_is_the_conditional_and_zero_the_unconditional_model(sampler):
    cond = MIX.conditional_eps_model(S)
    y = torch.tensor([0, 1, 2, 1, 0, 2])
    kw = dict(sampler=sampler, steps=15, generator=4)
    for scale, reference in ((1.0, dict(model=cond, model_kwargs={"y": y})),
                             (0.0, dict(model=MIX.eps_model(S), model_kwargs=None))):
        counted = Counting(cond)
        guided = ddpmkit.sample(ClassifierFreeGuidance(counted, scale, NULL), (6, 2), S, model_kwargs={"y": y}, **kw)
        plain = ddpmkit.sample(reference["model"], (6, 2), S, model_kwargs=reference["model_kwargs"], **kw)
        assert torch.allclose(guided.x, plain.x, atol=1e-6)
        assert counted.calls == guided.nfe  # both branches in one batched call


def test_guidance_is_linear_in_the_scale():
    cond = MIX.conditional_eps_model(S)
    x, t, y = torch.randn(5, 2), torch.full((5,), 300.0), torch.tensor([0, 1, 2, 0, 1])
    e_c, e_u = cond(x, t, y), cond(x, t, torch.full((5,), NULL))
    assert torch.allclose(ClassifierFreeGuidance(cond, 3.0, NULL)(x, t, y), e_u + 3.0 * (e_c - e_u), atol=1e-6)


def test_large_scale_concentrates_samples_on_the_requested_class():
    cond = MIX.conditional_eps_model(S)
    y = torch.full((400,), 2)
    out = ddpmkit.sample(ClassifierFreeGuidance(cond, 3.0, NULL), (400, 2), S, sampler="dpmpp_2m_sde", steps=30,
                         generator=torch.Generator().manual_seed(0), model_kwargs={"y": y})
    assert (nearest_component(MIX, out.x) == 2).float().mean() > 0.99


def test_learned_variance_channels_are_not_guided():
    def model(x, t, y):
        return torch.cat([x * (y[:, None].float() + 1), y[:, None].float().expand_as(x)], dim=1)

    x, t, y = torch.randn(4, 2), torch.zeros(4), torch.tensor([0, 1, 2, 1])
    out = ClassifierFreeGuidance(model, 2.0, NULL, learned_variance=True)(x, t, y)
    assert torch.allclose(out[:, 2:], y[:, None].float().expand(4, 2))


@pytest.mark.parametrize("net", [UNet(1, image_size=8, base_channels=8, channel_mult=(1, 2), attention_resolutions=(4,),
                                      num_classes=10, dropout=0.0),
                                 MLPDenoiser(2, hidden=32, num_layers=2, num_classes=10)])
def test_class_conditional_networks(net):
    torch.manual_seed(0)
    for p in net.parameters():  # the UNet's output layer starts at zero; give it weights
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(3, 1, 8, 8) if isinstance(net, UNet) else torch.randn(3, 2)
    t = torch.full((3,), 10.0)
    a, b = net(x, t, y=torch.tensor([1, 1, 1])), net(x, t, y=torch.tensor([2, 2, 2]))
    assert not torch.allclose(a, b)
    assert torch.equal(net(x, t), net(x, t, y=torch.full((3,), 10)))  # None is the null label
    with pytest.raises(ValueError, match="class labels"):
        net(x, t, y=torch.tensor([11, 0, 0]))
