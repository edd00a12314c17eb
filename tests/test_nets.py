import math

import pytest
import torch
import torch.nn.functional as F

from conftest import HostReads
from ddpmkit.config import NetworkConfig
from ddpmkit.nets import MLPDenoiser, UNet, build_network
from ddpmkit.nets.classifier import random_shift
from ddpmkit.nets.layers import ResBlock, timestep_embedding
from ddpmkit.nets.unet import Conditioning


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
    with pytest.raises(ValueError, match=r"divisible by 4 for 3 UNet levels \(network.channel_mult = \[1, 2, 2\]\): resize the data to 28 or 32 "):
        UNet(1, image_size=30, channel_mult=(1, 2, 2))  # the sizes that work, not "resize the data or use fewer levels"
    with pytest.raises(ValueError, match=r"\[16\] \(network.attention_resolutions\) are not resolutions of this UNet on 28x28 inputs; "
                                         r"choose from \[28, 14, 7\]"):
        UNet(1, image_size=28, channel_mult=(1, 2, 2), attention_resolutions=(16,))
    with pytest.raises(ValueError, match="use network.kind='mlp'"):
        build_network(NetworkConfig(kind="unet"), (2,))


def test_learned_variance_doubles_channels():
    net = build_network(NetworkConfig(kind="unet", channel_mult=(1, 2), attention_resolutions=(4,)), (1, 8, 8), learned_variance=True)
    assert net(torch.randn(2, 1, 8, 8), torch.zeros(2)).shape == (2, 2, 8, 8)
    mlp = build_network(NetworkConfig(kind="mlp"), (2,))
    assert isinstance(mlp, MLPDenoiser) and mlp(torch.randn(5, 2), torch.zeros(5)).shape == (5, 2)


def test_timestep_embedding():
    """The Transformer's sinusoids (DDPM's time embedding): cos, then sin, of t / 10000^(i / half), i = 0..half-1."""
    t = torch.tensor([0.0, 10.0, 999.0])
    e = timestep_embedding(t, 8)
    assert e.shape == (3, 8)
    for b, tb in enumerate(t.tolist()):
        for i in range(4):
            arg = tb / 10000 ** (i / 4)
            assert e[b, i].item() == pytest.approx(math.cos(arg), abs=1e-3) and e[b, 4 + i].item() == pytest.approx(math.sin(arg), abs=1e-3)
    assert torch.equal(timestep_embedding(t, 9)[:, :8], e) and not timestep_embedding(t, 9)[:, 8].any()  # an odd width: a zero column


def test_resblock_is_adms_block_written_out():
    """GroupNorm, SiLU, conv; the embedding's scale and shift of the second norm (h (1 + scale) + shift); SiLU, conv;
    plus the skip (a 1x1 conv where the channels change). Every layer is perturbed: the last conv starts at zero."""
    block = ResBlock(8, 16, emb_dim=12).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(p.numel()))
    x, emb = torch.randn(2, 8, 6, 6), torch.randn(2, 12)
    n1, n2, c1, c2, skip = block.norm1, block.norm2, block.conv1, block.conv2, block.skip
    h = F.conv2d(F.silu(F.group_norm(x, n1.num_groups, n1.weight, n1.bias)), c1.weight, c1.bias, padding=1)
    scale, shift = F.linear(F.silu(emb), block.emb.weight, block.emb.bias)[:, :, None, None].chunk(2, dim=1)
    h = F.group_norm(h, n2.num_groups, n2.weight, n2.bias) * (1 + scale) + shift
    h = F.conv2d(F.silu(h), c2.weight, c2.bias, padding=1)
    torch.testing.assert_close(block(x, emb), F.conv2d(x, skip.weight, skip.bias) + h, atol=1e-5, rtol=1e-5)


def test_the_conditioning_embeddings_add_up_as_written_out():
    """The time embedding (MLP of the sinusoids of t), plus the noise-augmentation level's (of 1000 s), the label's, the
    pooled projected prompt tokens' and the CLIP image embedding's; the image embedding also gives k extra tokens after
    the prompt's, unmasked."""
    E, B, L, k = 32, 3, 5, 4
    cond = Conditioning(16, E, num_classes=4, context_dim=6, aug_level=True, image_embed_dim=7, embed_tokens=k)
    x, t, s, y = torch.zeros(B, 1, 4, 4), torch.tensor([3.0, 500.0, 999.0]), torch.tensor([0.0, 0.3, 1.0]), torch.tensor([0, 3, 2])
    context, mask, image = torch.randn(B, L, 6), torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]).bool(), torch.randn(B, 7)
    emb, tokens, token_mask = cond(x, t, y=y, context=context, mask=mask, aug_level=s, image_embed=image)
    first, last = cond.time_mlp[0], cond.time_mlp[2]  # the time MLP: Linear, SiLU, Linear (ADM's time_embed)
    sinusoids = timestep_embedding(t, 16)
    torch.testing.assert_close(cond.time_mlp(sinusoids), F.linear(F.silu(F.linear(sinusoids, first.weight, first.bias)), last.weight, last.bias))
    projected = cond.context_proj(context)
    pooled = torch.stack([projected[b, mask[b]].mean(0) for b in range(B)])
    expected = (cond.time_mlp(timestep_embedding(t, 16)) + cond.aug_mlp(timestep_embedding(1000 * s, 16)) + cond.label_emb.table(y)
                + cond.context_emb(pooled) + cond.image_emb(image))
    torch.testing.assert_close(emb, expected)
    torch.testing.assert_close(tokens, torch.cat([projected, cond.image_tokens(image).view(B, k, E)], 1))
    assert torch.equal(token_mask, torch.cat([mask, torch.ones(B, k, dtype=torch.bool)], 1))
    decoder = Conditioning(16, E, image_embed_dim=7, embed_tokens=k)  # unCLIP's decoder without a prompt: its k tokens alone
    emb, tokens, token_mask = decoder(x, t, image_embed=image)
    torch.testing.assert_close(emb, decoder.time_mlp(timestep_embedding(t, 16)) + decoder.image_emb(image))
    torch.testing.assert_close(tokens, decoder.image_tokens(image).view(B, k, E))
    assert token_mask.shape == (B, k) and token_mask.all()


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
    # the two upsampling convolutions shrink 4x and 2x, and the blocks after them read fewer channels: 88.1 against
    # 105.3 MFLOP per image (the upsampling convolutions counted as the 2x2 phase convolutions ddpmkit computes)
    assert flops.get_total_flops() / wide_flops.get_total_flops() == pytest.approx(88.1 / 105.3, abs=0.01)


def test_upsampling_conv_at_the_coarse_resolution_is_nearest_2x_then_the_conv():
    """The sub-pixel form (kernel rows/columns summed per output phase) is the same function, with the same gradients."""
    import torch.nn.functional as F

    from ddpmkit.nets.layers import Upsample

    torch.manual_seed(0)
    up = Upsample(3, 5)
    x = torch.randn(2, 3, 5, 4, requires_grad=True)
    fast = up(x)
    grads_fast = torch.autograd.grad(fast.square().sum(), [x, up.conv.weight, up.conv.bias])
    ref = up.conv(F.interpolate(x, scale_factor=2, mode="nearest"))
    grads_ref = torch.autograd.grad(ref.square().sum(), [x, up.conv.weight, up.conv.bias])
    assert fast.shape == (2, 5, 10, 8)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads_fast, grads_ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
    # a LoRA on the conv (peft wraps the layer) must take part: that layer runs at the fine resolution as it is
    from peft import LoraConfig, inject_adapter_in_model

    up = inject_adapter_in_model(LoraConfig(r=2, target_modules=["conv"], init_lora_weights=False), up)
    torch.testing.assert_close(up(x), up.conv(F.interpolate(x, scale_factor=2, mode="nearest")))
    assert (up(x) - ref).abs().max() > 1e-3


def test_pointwise_convolutions_are_their_conv_layers_and_take_loras():
    from peft import LoraConfig, inject_adapter_in_model
    from torch import nn

    from ddpmkit.nets.layers import PointwiseConv1d, PointwiseConv2d

    torch.manual_seed(0)
    for fast, ref, x in [(PointwiseConv2d(6, 4), nn.Conv2d(6, 4, 1), torch.randn(3, 6, 5, 7)),
                         (PointwiseConv1d(6, 4), nn.Conv1d(6, 4, 1), torch.randn(3, 6, 9))]:
        ref.load_state_dict(fast.state_dict())  # the same parameters under the same names
        torch.testing.assert_close(fast(x), ref(x), rtol=1e-5, atol=1e-6)
        # peft builds the LoRA factors by calling the layer's type; the adapted layer adds B A x
        holder = inject_adapter_in_model(LoraConfig(r=2, target_modules=["layer"], init_lora_weights=False),
                                         nn.ModuleDict({"layer": fast}))
        a, b = holder.layer.lora_A["default"].weight.flatten(1), holder.layer.lora_B["default"].weight.flatten(1)
        scale = holder.layer.scaling["default"]
        delta = torch.einsum("oi,bi...->bo...", b @ a, x) * scale
        torch.testing.assert_close(holder.layer(x), ref(x) + delta, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="kernel size 1"):
        PointwiseConv2d(2, 2, 3)


def test_self_attention_is_softmax_of_scaled_dot_products_per_head():
    from ddpmkit.nets.layers import SelfAttention

    torch.manual_seed(0)
    B, C, H, W, nh = 2, 8, 3, 4, 2
    attn = SelfAttention(C, nh)
    torch.nn.init.normal_(attn.proj.weight)  # zero-initialised: the block would be the identity
    x = torch.randn(B, C, H, W)
    h = attn.norm(x).reshape(B, C, H * W)
    qkv = torch.einsum("oi,bil->bol", attn.qkv.weight[:, :, 0], h) + attn.qkv.bias[:, None]  # channel s*C + head*hs + d
    q, k, v = qkv.reshape(B, 3, nh, C // nh, H * W).unbind(1)  # (B, nh, hs, L)
    a = torch.softmax(torch.einsum("bhdl,bhdm->bhlm", q, k) / (C // nh) ** 0.5, dim=-1)
    out = torch.einsum("bhlm,bhdm->bhdl", a, v).reshape(B, C, H * W)
    ref = x + (torch.einsum("oi,bil->bol", attn.proj.weight[:, :, 0], out) + attn.proj.bias[:, None]).reshape(B, C, H, W)
    torch.testing.assert_close(attn(x), ref, rtol=1e-5, atol=1e-5)


def test_cross_attention_is_softmax_of_scaled_dot_products_per_head_over_the_real_tokens():
    """Image positions (queries) attend to the layer-normed context's tokens (keys and values), each head on its own
    channels, masked tokens left out; a zero-initialised output projection would hide all of it, so it is drawn."""
    from ddpmkit.nets.layers import CrossAttention

    torch.manual_seed(0)
    B, C, H, W, nh, D, L = 2, 8, 3, 4, 2, 5, 6
    attn = CrossAttention(C, D, nh)
    torch.nn.init.normal_(attn.proj.weight)
    x, context = torch.randn(B, C, H, W), torch.randn(B, L, D)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]]).bool()
    hs = C // nh
    q = torch.einsum("oi,bil->bol", attn.q.weight[:, :, 0], attn.norm(x).reshape(B, C, H * W)) + attn.q.bias[:, None]
    q = q.reshape(B, nh, hs, H * W)  # channel head * hs + d
    k, v = (attn.kv(attn.context_norm(context)).reshape(B, L, 2, nh, hs)).unbind(2)  # (B, L, nh, hs)
    logits = torch.einsum("bhdl,bmhd->bhlm", q, k) / hs**0.5
    a = torch.softmax(logits.masked_fill(~mask[:, None, None, :], float("-inf")), dim=-1)
    out = torch.einsum("bhlm,bmhd->bhdl", a, v).reshape(B, C, H * W)
    ref = x + (torch.einsum("oi,bil->bol", attn.proj.weight[:, :, 0], out) + attn.proj.bias[:, None]).reshape(B, C, H, W)
    torch.testing.assert_close(attn(x, context, mask), ref, rtol=1e-5, atol=1e-5)
    # the masked tokens are left out: changing them changes nothing
    other = torch.where(mask[:, :, None], context, torch.randn(B, L, D))
    torch.testing.assert_close(attn(x, other, mask), attn(x, context, mask), rtol=0, atol=0)


@pytest.mark.parametrize("cin, cout, stride", [(8, 8, 1), (40, 8, 1), (1, 8, 1), (8, 1, 1), (8, 8, 2), (32, 32, 1)])
def test_the_conv_layer_is_nn_conv2d_in_every_precision_and_layout(cin, cout, stride):
    """ddpmkit's Conv2d computes a narrow convolution in channels-last under CPU bf16 autocast: the same function (values
    and gradients, up to bf16 rounding), the same NCHW output layout, and exactly nn.Conv2d in fp32."""
    import torch.nn.functional as F

    from ddpmkit.nets.layers import Conv2d

    torch.manual_seed(0)
    conv = Conv2d(cin, cout, 3, stride=stride, padding=1)
    x = torch.randn(3, cin, 12, 10, requires_grad=True)
    assert torch.equal(conv(x), F.conv2d(x, conv.weight, conv.bias, stride=stride, padding=1))  # fp32: nn.Conv2d itself
    grads = {}
    for name, fn in (("ddpmkit", conv), ("plain", lambda x: F.conv2d(x, conv.weight, conv.bias, stride=stride, padding=1))):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(x)
        assert out.dtype == torch.bfloat16 and out.is_contiguous()  # NCHW for the layers after it
        out.float().square().sum().backward()
        grads[name] = (out.float(), x.grad.clone(), conv.weight.grad.clone())
        x.grad = conv.weight.grad = conv.bias.grad = None
    for a, b in zip(grads["ddpmkit"], grads["plain"]):
        assert (a - b).abs().max() <= 0.02 * b.abs().max(), (a - b).abs().max()
    assert x.grad is None and grads["ddpmkit"][1].is_contiguous()  # the gradient comes back in NCHW too


def test_attention_under_cpu_bf16_autocast_is_the_softmax_formula():
    import torch.nn.functional as F

    from ddpmkit.nets.layers import attention

    q, k, v = (torch.randn(2, 4, 49, 16) for _ in range(3))
    mask = torch.rand(2, 1, 1, 49) > 0.2
    mask[..., 0] = True  # every query attends to something
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = attention(q, k, v, mask)
    assert got.dtype == torch.bfloat16 and (got.float() - want).abs().max() < 0.03 * want.abs().max()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # and its gradient
        attention(*(t.requires_grad_() for t in (q, k, v))).float().square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    F.scaled_dot_product_attention(q, k, v).square().sum().backward()
    for g, t in zip(grads, (q, k, v)):
        assert (g - t.grad).abs().max() < 0.05 * t.grad.abs().max()
    assert torch.equal(attention(q, k, v), F.scaled_dot_product_attention(q, k, v))  # fp32: torch's kernel itself


def test_group_norm_in_bf16_is_the_fp32_norm_rounded_and_its_gradients_reach_the_fp32_parameters():
    """The form CUDA bf16 autocast runs (layers.GroupNorm): x, weight and bias in bf16, statistics in fp32 inside the
    kernel. It is the fp32 norm of the bf16-rounded input with the weight and bias rounded, rounded: within a bf16 step
    or two of it; the gradients reaching the fp32 parameters within 2% of the fp32 norm's."""
    from ddpmkit.nets.layers import group_norm, group_norm_in

    torch.manual_seed(0)
    norm = group_norm(64)  # 32 groups of 2 channels
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    x = torch.randn(4, 64, 8, 8) * 3 + 1
    reference = norm(x)
    y = group_norm_in(norm, x, torch.bfloat16)
    assert y.dtype == torch.bfloat16 and reference.dtype == torch.float32
    rounded_input = norm(x.bfloat16().float())
    bound = 2**-7 * (rounded_input.abs() + norm.bias.abs()[None, :, None, None]) + 1e-5  # (the bias can cancel)
    assert ((y.float() - rounded_input).abs() <= bound).all()
    g = torch.randn_like(reference)
    grads = torch.autograd.grad((reference * g).sum(), (norm.weight, norm.bias))
    grads_bf16 = torch.autograd.grad((y.float() * g).sum(), (norm.weight, norm.bias))
    for a, b in zip(grads, grads_bf16):
        assert b.dtype == torch.float32 and ((a - b).abs() <= 0.02 * a.abs().max()).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_norm_layer_is_nn_group_norm_itself_off_cuda(dtype):
    """Only CUDA's autocast casts a norm's input to fp32; on the CPU (autocast or not) the layer is nn.GroupNorm."""
    from ddpmkit.nets.layers import GroupNorm

    norm = GroupNorm(4, 16)
    x = torch.randn(2, 16, 5, 5).to(dtype)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            assert torch.equal(norm(x), torch.nn.GroupNorm.forward(norm, x))
    assert list(norm.state_dict()) == ["weight", "bias"] and isinstance(norm, torch.nn.GroupNorm)


@pytest.mark.parametrize("preset", ["mnist", "mnist_gpu"])
def test_the_presets_networks_trace_as_one_graph_for_torch_compile(preset, tmp_path):
    """No graph break, first call included (functools.cached_property's lock broke it in three on Python 3.11): a
    compiled or reduce-overhead step is one graph, not three with eager code between."""
    import torch._dynamo

    from ddpmkit.config import load_config
    from ddpmkit.train import TASKS

    cfg = load_config(preset, [f"train.run_dir={tmp_path}", "network.base_channels=8"])
    net = TASKS[cfg.train.task](cfg).build_model()
    explained = torch._dynamo.explain(net)(torch.randn(2, 1, 28, 28), torch.tensor([3.0, 700.0]))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), [b.reason for b in explained.break_reasons]


def test_random_shift_translates_each_image_by_its_own_draw_and_reads_nothing_back():
    """The classifier's and CLIP's augmentation: image i is the padded image's window at (dy_i, dx_i), the draws of the
    generator; one gather (a slice per image read its four bounds back: 64 waits a step on a GPU for a batch of 16)."""
    x, m = torch.randn(24, 3, 9, 7), 2
    with HostReads() as reads:
        out = random_shift(x, m, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    dx, dy = (torch.randint(0, 2 * m + 1, (24,), generator=g) for _ in range(2))
    padded = torch.nn.functional.pad(x, (m,) * 4, value=-1.0)
    for i in range(24):
        assert torch.equal(out[i], padded[i, :, dy[i]:dy[i] + 9, dx[i]:dx[i] + 7]), i
    assert reads.count == 0 and len({(a, b) for a, b in zip(dx.tolist(), dy.tolist())}) > 10  # many shifts, none read
