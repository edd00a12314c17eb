"""Building blocks shared by the networks: time embedding, residual block, self-attention."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of float timesteps t: (B,) -> (B, dim)  (Transformer / DDPM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([args.cos(), args.sin()], dim=-1)
    return F.pad(emb, (0, dim % 2))


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same parameters, state dict and result up to rounding) which under CUDA's bf16 autocast normalizes
    the bf16 activations as they are and hands back bf16. The kernel accumulates its statistics in fp32 either way; CUDA
    autocast would cast each activation to fp32 first and hand back fp32, so every norm cost a cast, fp32 traffic through
    the SiLU after it and another cast before the next convolution, forward and backward. CPU autocast already keeps
    bf16 in and out: there, and outside autocast, it is nn.GroupNorm itself (bench/gpu.py times both on a GPU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cuda" or not torch.is_autocast_enabled("cuda") or torch.get_autocast_dtype("cuda") != torch.bfloat16:
            return super().forward(x)
        with torch.autocast("cuda", enabled=False):
            return group_norm_in(self, x, torch.bfloat16)


def group_norm_in(norm: nn.GroupNorm, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """norm(x) computed on x, weight and bias in `dtype`, its output in `dtype` (statistics in fp32 inside the kernel)."""
    weight = None if norm.weight is None else norm.weight.to(dtype)
    bias = None if norm.bias is None else norm.bias.to(dtype)
    return F.group_norm(x.to(dtype), norm.num_groups, weight, bias, norm.eps)


def group_norm(channels: int) -> GroupNorm:
    """GroupNorm with up to 32 groups that divide the channel count."""
    return GroupNorm(math.gcd(32, channels), channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters so the block it closes starts as the identity (ADM)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def cpu_autocast_dtype() -> torch.dtype | None:
    """The dtype CPU autocast computes convolutions and matrix products in, or None outside CPU autocast."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None


class _Layout(torch.autograd.Function):
    """x in memory format `forward_format`, its gradient handed back in `backward_format`: a layout change whose
    gradient does not leave the other layout behind (elementwise backward kernels of mixed layouts are slow)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, forward_format: torch.memory_format, backward_format: torch.memory_format) -> torch.Tensor:
        ctx.backward_format = backward_format
        return x.contiguous(memory_format=forward_format)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad.contiguous(memory_format=ctx.backward_format), None, None


# oneDNN's bf16 convolutions block channels by 16: with fewer, its NCHW kernels are slow (the demo UNet's 8-channel
# 28x28 level took half of a bf16 training step on AVX-512-bf16), while its channels-last ones are not
NARROW_CHANNELS = 16


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same weights, state dict, LoRA wrapping), which on a CPU under bf16 autocast computes a narrow
    convolution (fewer than 16 channels in or out) in channels-last and hands back the usual NCHW layout.
    In fp32, and on other devices, it is nn.Conv2d itself (bench/train_throughput.py --layers times both)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = cpu_autocast_dtype() if x.device.type == "cpu" else None
        if dtype != torch.bfloat16 or min(self.in_channels, self.out_channels) >= NARROW_CHANNELS or x.ndim != 4:
            return super().forward(x)
        cl, nchw = torch.channels_last, torch.contiguous_format
        out = super().forward(_Layout.apply(x.to(dtype), cl, nchw))
        return _Layout.apply(out, nchw, cl)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, time embedding as scale and shift of the second norm, dropout, conv; plus a skip.

    x: (B, C_in, H, W), emb: (B, E) -> (B, C_out, H, W). emb_dim = 0: no embedding (the autoencoder).
    """

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch) if emb_dim > 0 else None
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Identity() if in_ch == out_ch else PointwiseConv2d(in_ch, out_ch)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm2(self.conv1(F.silu(self.norm1(x))))
        if self.emb is not None:
            scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
            h = h * (1 + scale) + shift  # ADM's scale-shift norm
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class PointwiseConv1d(nn.Conv1d):
    """A Conv1d of kernel size 1 (its weights, state dict and (B, C_in, L) -> (B, C_out, L) contract), computed as
    a matrix product over the channels: oneDNN runs these convolutions at a fifth of the matmul rate on a CPU.
    The output is a transposed view of a (B, L, C_out) tensor, the layout attention wants its q, k and v in."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int] = 1, *args, **kwargs):
        # Conv1d's signature, because peft builds its LoRA factors for this layer by calling its type
        if kernel_size not in (1, (1,)):
            raise ValueError(f"PointwiseConv1d has kernel size 1, got {kernel_size}")
        super().__init__(in_channels, out_channels, kernel_size, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.transpose(1, 2), self.weight[:, :, 0], self.bias).transpose(1, 2)


class PointwiseConv2d(nn.Conv2d):
    """A Conv2d of kernel size 1 (the residual blocks' skip), computed as one batched matrix product per image:
    W (C_out, C_in) @ x (C_in, H*W). For the demo UNet's skips this is 1.1-3.8x faster than oneDNN's convolution,
    forward and backward, on 2 AVX2 cores (bench/train_throughput.py --layers)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int] = 1, *args, **kwargs):
        if kernel_size not in (1, (1, 1)):
            raise ValueError(f"PointwiseConv2d has kernel size 1, got {kernel_size}")
        super().__init__(in_channels, out_channels, kernel_size, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        weight = self.weight[:, :, 0, 0].expand(B, -1, -1)
        if self.bias is None:
            return torch.bmm(weight, x.reshape(B, C, H * W)).reshape(B, -1, H, W)
        return torch.baddbmm(self.bias[None, :, None], weight, x.reshape(B, C, H * W)).reshape(B, -1, H, W)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(hs)) v: q (B, nh, L, hs), k and v (B, nh, S, hs), mask (True = attend) broadcastable to
    (B, nh, L, S). On a CPU under bf16 autocast it is written out as two bf16 matrix products around torch's bf16
    softmax: torch's fused CPU attention kernel, in bf16 or fp32, was ~5x slower forward and backward at the demo UNet's
    49 positions on AVX-512-bf16 (bench/train_throughput.py --layers). The softmax kernel computes in fp32 inside and
    rounds its output to bf16, as the product after it would; the scale goes on q (exact for a power-of-two head size),
    so no pass over the (L, S) logits is spent on casts or the scale, forward or backward."""
    dtype = cpu_autocast_dtype() if q.device.type == "cpu" else None
    if dtype is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with torch.autocast("cpu", enabled=False):
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)  # (B, nh, L, S)
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        return logits.softmax(-1) @ v


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions, residual. x: (B, C, H, W) -> same."""

    def __init__(self, channels: int, num_heads: int = 4):
        super().__init__()
        if channels % num_heads:
            raise UserError(f"attention channels {channels} are not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.qkv = PointwiseConv1d(channels, 3 * channels)
        self.proj = zero_module(PointwiseConv1d(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        L, nh = H * W, self.num_heads
        qkv = self.qkv(self.norm(x).reshape(B, C, L)).transpose(1, 2)  # (B, L, 3C)
        # q, k and v with their head dimension contiguous: torch's fused CPU attention kernel takes them as they are
        # (the transposed layout fell back to the unfused one; with the projections as matrix products the block is
        # 1.3x faster forward and backward: bench/train_throughput.py --layers)
        q, k, v = qkv.reshape(B, L, 3, nh, C // nh).permute(2, 0, 3, 1, 4).unbind(0)  # (B, nh, L, hs)
        h = attention(q, k, v).transpose(1, 2).reshape(B, L, C)
        return x + self.proj(h.transpose(1, 2)).reshape(B, C, H, W)


class CrossAttention(nn.Module):
    """Image positions attend to text tokens (Stable Diffusion, Imagen), residual.

    x: (B, C, H, W), context: (B, L, D), mask: (B, L) True at real tokens -> (B, C, H, W)
    """

    def __init__(self, channels: int, context_dim: int, num_heads: int = 4):
        super().__init__()
        if channels % num_heads:
            raise UserError(f"attention channels {channels} are not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.context_norm = nn.LayerNorm(context_dim)
        self.q = PointwiseConv1d(channels, channels)
        self.kv = nn.Linear(context_dim, 2 * channels)
        self.proj = zero_module(PointwiseConv1d(channels, channels))

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, C, H, W = x.shape
        nh, hs = self.num_heads, C // self.num_heads
        q = self.q(self.norm(x).reshape(B, C, H * W)).transpose(1, 2).reshape(B, H * W, nh, hs).transpose(1, 2)  # (B, nh, HW, hs)
        k, v = self.kv(self.context_norm(context)).reshape(B, -1, 2, nh, hs).permute(2, 0, 3, 1, 4)  # (B, nh, L, hs) each
        attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, L)
        h = attention(q, k, v, attn_mask).transpose(1, 2).reshape(B, H * W, C)
        return x + self.proj(h.transpose(1, 2)).reshape(B, C, H, W)


class AttentionBlock(nn.Module):
    """Self-attention, then cross-attention to the context when the network is text-conditional."""

    def __init__(self, channels: int, num_heads: int, context_dim: int = 0):
        super().__init__()
        self.self_attn = SelfAttention(channels, num_heads)
        self.cross_attn = CrossAttention(channels, context_dim, num_heads) if context_dim > 0 else None

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.self_attn(x)
        return x if self.cross_attn is None else self.cross_attn(x, context, mask)


class NoAttention(nn.Module):
    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        return x


def pooled_context(context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of the real tokens: (B, L, D), (B, L) -> (B, D)."""
    if mask is None:
        return context.mean(1)
    w = mask.to(context.dtype)[..., None]
    return (context * w).sum(1) / w.sum(1).clamp(min=1)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


# Nearest 2x upsampling then a 3x3 convolution, computed at the coarse resolution ("sub-pixel convolution"): output
# pixel 2p + a reads only coarse rows p - 1 + a and p + a, because the kernel rows that land on the same coarse row add
# up. So each of the four output phases (a, b) is a 2x2 convolution of the coarse input: 4 taps per output pixel
# instead of 9. Row r of _PHASE_ROWS[a] says which of the kernel's rows feed coarse row p - 1 + a + r.
_PHASE_ROWS = torch.tensor([[[1.0, 0, 0], [0, 1, 1]],   # a = 0: row p - 1 <- kernel row 0; row p <- rows 1 and 2
                            [[1.0, 1, 0], [0, 0, 1]]])  # a = 1: row p <- kernel rows 0 and 1; row p + 1 <- row 2


class _InterleavePhases(torch.autograd.Function):
    """(B, C, 2, 2, H + 1, W + 1) phase grids -> (B, C, 2H, 2W): output pixel (2p + a, 2q + b) is phase (a, b) at grid
    position (p + a, q + b). Written out because autograd's backward of four slice copies zero-fills four full grids."""

    @staticmethod
    def forward(ctx, grids: torch.Tensor) -> torch.Tensor:
        B, C, _, _, H, W = grids.shape
        H, W = H - 1, W - 1
        out = grids.new_empty(B, C, H, 2, W, 2)
        for a in (0, 1):
            for b in (0, 1):
                out[:, :, :, a, :, b] = grids[:, :, a, b, a:a + H, b:b + W]
        return out.view(B, C, 2 * H, 2 * W)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        B, C, H2, W2 = grad.shape
        H, W = H2 // 2, W2 // 2
        grad = grad.view(B, C, H, 2, W, 2)
        out = grad.new_zeros(B, C, 2, 2, H + 1, W + 1)
        for a in (0, 1):
            for b in (0, 1):
                out[:, :, a, b, a:a + H, b:b + W] = grad[:, :, :, a, :, b]
        return out


def upsample_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: torch.Tensor | None = None) -> torch.Tensor:
    """conv2d(interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1), computed at x's resolution:
    one 2x2 convolution to the four phases' 4 * C_out channels over x padded by 1, interleaved. 4/9 of the FLOPs, less
    the one extra row and column of the (H + 1) x (W + 1) grid (bench/train_throughput.py --layers times it).
    rows: _PHASE_ROWS already on weight's device (Upsample's buffer): copying it from the host at every call would make
    a GPU's host wait there."""
    rows = (_PHASE_ROWS if rows is None else rows).to(weight)
    phases = torch.einsum("aru,oiuv,bsv->oabirs", rows, weight, rows)  # (C_out, 2, 2, C_in, 2, 2)
    phases = phases.reshape(4 * weight.shape[0], weight.shape[1], 2, 2)  # channel 4o + 2a + b
    grids = F.conv2d(F.pad(x, (1, 1, 1, 1)), phases, None if bias is None else bias.repeat_interleave(4))
    B, _, H, W = grids.shape
    return _InterleavePhases.apply(grids.view(B, weight.shape[0], 2, 2, H, W))


class Upsample(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 convolution to out_channels (default: as many as come in)."""

    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)
        self.register_buffer("phase_rows", _PHASE_ROWS.clone(), persistent=False)  # moves with the module; not in checkpoints

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if type(self.conv) is nn.Conv2d:
            return upsample_conv3x3(x, self.conv.weight, self.conv.bias, self.phase_rows)
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))  # a layer peft wrapped (LoRA) runs as it is


class LabelEmbedding(nn.Module):
    """Class labels 0..num_classes-1 plus a learned null label (index num_classes, also used for
    y=None): the unconditional branch of classifier-free guidance. Added to the time embedding."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)

    def forward(self, y: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        if y is None:
            y = torch.full((batch,), self.num_classes, device=device, dtype=torch.long)
        y = torch.as_tensor(y, device=device).long()
        # a clear error for labels on the CPU or where a user's labels come in (sampling); a GPU's training labels come from
        # the dataset, and the check's read of y would make its host wait at every step
        if (y.device.type == "cpu" or not self.training) and bool(((y < 0) | (y > self.num_classes)).any()):
            raise UserError(f"class labels must lie in [0, {self.num_classes - 1}] (or {self.num_classes} = null)")
        return self.table(y)
