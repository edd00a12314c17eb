import pytest
import torch

from ddpmkit.config import NetworkConfig
from ddpmkit.nets import MLPDenoiser, UNet, build_network
from ddpmkit.nets.layers import timestep_embedding


@pytest.mark.parametrize("channels,size,mult,attn", [(1, 28, (1, 2, 4), (7,)), (3, 32, (1, 2, 2, 2), (8, 4)), (4, 8, (1, 2), ())])
def test_unet_shapes(channels, size, mult, attn):
    net = UNet(channels, image_size=size, base_channels=16, channel_mult=mult, num_res_blocks=1, attention_resolutions=attn)
    x = torch.randn(2, channels, size, size)
    out = net(x, torch.tensor([3.0, 999.0]))
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(out))  # zero-initialised output layer
    # once the zero-initialised layers are perturbed, the output depends on t
    for p in net.parameters():
        if not p.any():
            torch.nn.init.normal_(p, std=0.1)
    a, b = net(x, torch.tensor([3.0, 3.0])), net(x, torch.tensor([500.0, 500.0]))
    assert not torch.allclose(a, b)


def test_unet_errors():
    with pytest.raises(ValueError, match="divisible by 4"):
        UNet(1, image_size=30, channel_mult=(1, 2, 2))
    with pytest.raises(ValueError, match=r"not UNet resolutions; choose from \[28, 14, 7\]"):
        UNet(1, image_size=28, channel_mult=(1, 2, 2), attention_resolutions=(16,))
    with pytest.raises(ValueError, match="use network.kind='mlp'"):
        build_network(NetworkConfig(kind="unet"), (2,))


def test_learned_variance_doubles_channels():
    net = build_network(NetworkConfig(kind="unet", channel_mult=(1, 2), attention_resolutions=(4,)), (1, 8, 8), learned_variance=True)
    assert net(torch.randn(2, 1, 8, 8), torch.zeros(2)).shape == (2, 2, 8, 8)
    mlp = build_network(NetworkConfig(kind="mlp"), (2,))
    assert isinstance(mlp, MLPDenoiser) and mlp(torch.randn(5, 2), torch.zeros(5)).shape == (5, 2)


def test_timestep_embedding():
    e = timestep_embedding(torch.tensor([0.0, 10.0]), 8)
    assert e.shape == (2, 8)
    assert torch.allclose(e[0], torch.tensor([1.0] * 4 + [0.0] * 4))  # cos(0) = 1, sin(0) = 0
    assert e[1, 0].item() == pytest.approx(torch.cos(torch.tensor(10.0)).item(), abs=1e-6)


def test_patch_size_folds_pixels_into_channels():
    # 28x28 digits in 2x2 patches: the levels run at 14 and 7, so attention at 7 is valid and 28 is not
    net = build_network(NetworkConfig(kind="unet", base_channels=16, channel_mult=(1, 2), attention_resolutions=(7,), patch_size=2),
                        (1, 28, 28), learned_variance=True)
    assert net.out_conv.out_channels == 2 * 4  # (eps, variance) for each of the 4 pixels of a patch
    for p in net.parameters():
        if not p.any():
            torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 1, 28, 28, requires_grad=True)
    out = net(x, torch.tensor([10.0, 900.0]))
    assert out.shape == (2, 2, 28, 28)
    out[0, 0].sum().backward()
    assert (x.grad[0].abs() > 0).all() and not x.grad[1].any()  # every pixel reaches the output; samples stay separate
    with pytest.raises(ValueError, match="patch_size 3 must be a positive divisor of the image size 28"):
        UNet(1, image_size=28, patch_size=3)
    with pytest.raises(ValueError, match=r"choose from \[14, 7\]"):
        UNet(1, image_size=28, channel_mult=(1, 2), attention_resolutions=(28,), patch_size=2)


def test_narrow_upsampling_brings_each_upsampled_map_to_the_finer_levels_width():
    from torch.utils.flop_counter import FlopCounterMode

    from ddpmkit.nets.layers import Upsample

    cfg = dict(kind="unet", base_channels=8, channel_mult=(1, 4, 8), attention_resolutions=(7,))
    wide, narrow = (build_network(NetworkConfig(**cfg, narrow_upsampling=n), (1, 28, 28)) for n in (False, True))
    widths = lambda net: [(m.conv.in_channels, m.conv.out_channels) for m in net.up if isinstance(m, Upsample)]  # noqa: E731
    assert widths(wide) == [(64, 64), (32, 32)] and widths(narrow) == [(64, 32), (32, 8)]
    # the first up block of each finer level then takes the finer width plus its skip (32 + 32 at 14x14, 8 + 8 at 28x28)
    assert [b[0].conv1.in_channels for b in narrow.up if not isinstance(b, Upsample)] == [128, 96, 64, 40, 16, 16]
    for p in narrow.parameters():
        if not p.any():
            torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 1, 28, 28, requires_grad=True)
    with FlopCounterMode(display=False) as flops:
        out = narrow(x, torch.tensor([10.0, 900.0]))
    assert out.shape == x.shape
    out[0].sum().backward()
    assert (x.grad[0].abs() > 0).all() and not x.grad[1].any()
    with FlopCounterMode(display=False) as wide_flops:
        wide(x, torch.tensor([10.0, 900.0]))
    # the two upsampling convolutions shrink 4x and 2x, and the blocks after them read fewer channels: ~21% of the FLOPs
    assert flops.get_total_flops() / wide_flops.get_total_flops() == pytest.approx(95.0 / 120.1, abs=0.01)
