import math

import pytest
import torch

from ddpmkit.schedules import NoiseSchedule, spaced_timesteps


def test_linear_is_ddpm():
    s = NoiseSchedule.from_name("linear", 1000)
    assert s.T == 1000 and s.betas.dtype == torch.float64
    assert s.betas[0].item() == pytest.approx(1e-4) and s.betas[-1].item() == pytest.approx(0.02)
    # alpha_bar is the running product of alpha_t = 1 - beta_t
    assert torch.allclose(s.alpha_bar[10], torch.prod(1 - s.betas[:11]))
    assert s.alpha_bar[-1] < 1e-4  # x_T is nearly pure noise


def test_cosine_matches_closed_form():
    s = NoiseSchedule.from_name("cosine", 1000)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    for t in [0, 100, 500, 900]:
        # 0-indexed: alpha_bar[t] = f((t+1)/T) / f(0), unaffected by the 0.999 clip away from the end
        assert s.alpha_bar[t].item() == pytest.approx(f((t + 1) / 1000) / f(0), rel=1e-9)
    assert s.betas.max().item() <= 0.999


@pytest.mark.parametrize("name", ["linear", "cosine", "scaled_linear", "sigmoid"])
def test_schedules_are_monotone(name):
    s = NoiseSchedule.from_name(name, 200)
    assert bool((s.alpha_bar[1:] < s.alpha_bar[:-1]).all())
    assert bool((s.log_snr[1:] < s.log_snr[:-1]).all())


def test_unknown_schedule_lists_options():
    with pytest.raises(ValueError, match=r"unknown noise schedule 'cosin'.*cosine"):
        NoiseSchedule.from_name("cosin")


def test_zero_terminal_snr():
    base = NoiseSchedule.from_name("scaled_linear", 1000)
    s = NoiseSchedule.from_name("scaled_linear", 1000, zero_terminal_snr=True)
    assert s.alpha_bar[-1].item() == 0.0
    assert s.alpha_bar[0].item() == pytest.approx(base.alpha_bar[0].item(), rel=1e-12)
    # sqrt(alpha_bar) is an affine map of the original one
    a, b = base.alpha_bar.sqrt(), s.alpha_bar.sqrt()
    slope = (b[0] - b[500]) / (a[0] - a[500])
    assert torch.allclose(b, (a - a[-1]) * slope, atol=1e-12)


@pytest.mark.parametrize("zt", [False, True])
def test_continuous_alpha_bar_equals_table(zt):
    s = NoiseSchedule.from_name("cosine", 100, zero_terminal_snr=zt)
    t = torch.arange(100, dtype=torch.float64)
    assert torch.allclose(s.alpha_bar_at(t), s.alpha_bar, rtol=1e-12, atol=0)
    assert s.alpha_bar_at(-1.0).item() == 1.0
    mid = s.alpha_bar_at(torch.tensor([10.5]))
    assert s.alpha_bar[11] < mid < s.alpha_bar[10]
    # geometric mean: log alpha_bar is linear inside a step
    assert mid.item() == pytest.approx((s.alpha_bar[10] * s.alpha_bar[11]).sqrt().item(), rel=1e-12)
    if not zt:
        assert torch.allclose(s.log_snr_at(t), s.log_snr)
    with pytest.raises(ValueError):
        s.alpha_bar_at(100.0)
    # the unchecked form (networks' wrappers: t from a sampler or the trainer) is the same function, float32 t too
    t32 = torch.tensor([-1.0, 0.0, 10.5, 99.0])
    assert torch.equal(s.alpha_bar_at(t32, check=False), s.alpha_bar_at(t32.double()))


def test_a_table_is_copied_to_a_device_once_and_forgotten_with_it():
    import gc

    from ddpmkit.utils import _ON_DEVICE, on_device

    s = NoiseSchedule.from_name("linear", 50)
    assert on_device(s.alpha_bar, "cpu") is s.alpha_bar  # already there: no copy
    first = on_device(s.alpha_bar, "meta")  # "meta" stands in for a GPU here: another device, no data
    assert first.device.type == "meta" and first.shape == s.alpha_bar.shape
    assert on_device(s.alpha_bar, "meta") is first and on_device(s.betas, "meta") is not first  # one copy per table
    respaced = s.respace([0, 10, 49])
    on_device(respaced.alpha_bar, "meta")
    entries = len(_ON_DEVICE)
    del respaced
    gc.collect()
    assert len(_ON_DEVICE) == entries - 1  # a table's copies go with it


def test_respace_keeps_marginals():
    s = NoiseSchedule.from_name("linear", 1000)
    keep = spaced_timesteps(1000, 50)
    r = s.respace(keep)
    assert r.T == 50 and keep[0] == 0 and keep[-1] == 999
    assert torch.equal(r.timesteps, keep)
    assert torch.allclose(r.alpha_bar, s.alpha_bar[keep], rtol=1e-12)
    # respacing to every step is the identity
    assert torch.allclose(s.respace(torch.arange(1000)).betas, s.betas, rtol=1e-10)


def test_scaled_linear_and_sigmoid_values():
    s = NoiseSchedule.from_name("scaled_linear", 11)
    # linear in sqrt(beta): the middle value is the mean of the end points' square roots, squared
    assert s.betas[0].item() == pytest.approx(0.00085) and s.betas[-1].item() == pytest.approx(0.012)
    assert s.betas[5].item() == pytest.approx(((0.00085**0.5 + 0.012**0.5) / 2) ** 2, rel=1e-12)
    g = NoiseSchedule.from_name("sigmoid", 11)
    # sigmoid(linspace(-6, 6)) scaled to [1e-4, 0.02]: the midpoint sits at sigmoid(0) = 1/2
    assert g.betas[5].item() == pytest.approx(1e-4 + 0.5 * (0.02 - 1e-4), rel=1e-12)
    assert g.betas[0].item() == pytest.approx(1e-4 + (0.02 - 1e-4) / (1 + math.exp(6)), rel=1e-12)


def test_sigma_at_and_its_inverse():
    s = NoiseSchedule.from_name("cosine", 1000)
    t = torch.tensor([0.0, 3.0, 250.0, 998.0], dtype=torch.float64)
    ab = s.alpha_bar[t.long()]
    assert torch.allclose(s.sigma_at(t), ((1 - ab) / ab).sqrt(), rtol=1e-12)
    frac = torch.tensor([-0.75, 0.3, 17.6, 640.25, 999.0], dtype=torch.float64)
    assert torch.allclose(s.t_at_sigma(s.sigma_at(frac)), frac, atol=1e-9)
    assert s.t_at_sigma(0.0).item() == -1.0
    with pytest.raises(ValueError, match="sigma must lie"):
        s.t_at_sigma(1e9)


def test_the_linear_schedule_scales_its_end_points_for_other_lengths_and_spacing_keeps_both_ends():
    """improved-diffusion's scaling: for T steps the linear betas run from 1e-4 * 1000/T to 0.02 * 1000/T, so alpha_bar
    at the end stays about the same; spaced timesteps always include T - 1 and 0, and one step is T - 1 alone."""
    for T in (250, 1000, 4000):
        betas = NoiseSchedule.from_name("linear", T).betas
        assert betas[0].item() == pytest.approx(1e-4 * 1000 / T) and betas[-1].item() == pytest.approx(0.02 * 1000 / T)
    ends = [NoiseSchedule.from_name("linear", T).alpha_bar[-1].item() for T in (250, 1000, 4000)]
    assert max(ends) / min(ends) < 1.5  # 3.3e-5, 4.0e-5, 4.2e-5; unscaled 0.08 at T = 250 and 2.7e-18 at 4000
    assert spaced_timesteps(1000, 1).tolist() == [999]
    assert spaced_timesteps(1000, 4).tolist() == [0, 333, 666, 999]
