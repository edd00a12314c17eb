"""A DDPM/ADM-style UNet: residual blocks, self-attention at chosen resolutions, time embedding;
optionally class labels (added to the time embedding), text (cross-attention), and a low-res
image to upsample (a super-resolution stage: concatenated to x_t, its augmentation level
embedded like t)."""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..superres import upsample
from .layers import (
    AttentionBlock,
    Conv2d,
    Downsample,
    LabelEmbedding,
    NoAttention,
    ResBlock,
    Upsample,
    group_norm,
    pooled_context,
    timestep_embedding,
    zero_module,
)


def check_levels(image_size: int, channel_mult: tuple[int, ...], attention_resolutions: tuple[int, ...]) -> list[int]:
    """The resolution of each level; clear errors for sizes the levels cannot halve."""
    factor = 2 ** (len(channel_mult) - 1)
    if image_size % factor:
        near = " or ".join(str(k * factor) for k in (image_size // factor, image_size // factor + 1) if k)
        raise UserError(
            f"image size {image_size} must be divisible by {factor} for {len(channel_mult)} UNet levels "
            f"(network.channel_mult = {list(channel_mult)}): resize the data to {near} (data.image_size for a folder of images, "
            "data.resize otherwise), or give fewer levels"
        )
    resolutions = [image_size // 2**i for i in range(len(channel_mult))]
    unknown = set(attention_resolutions) - set(resolutions)
    if unknown:
        raise UserError(f"attention_resolutions {sorted(unknown)} (network.attention_resolutions) are not resolutions of this UNet on "
                        f"{image_size}x{image_size} inputs; choose from {resolutions}")
    return resolutions


class DownPath(nn.Module):
    """The UNet's encoder: input conv, levels of ResBlocks (+ attention) with downsampling, and the
    middle block. Shared by the UNet and the noisy classifier of classifier guidance (ADM)."""

    def __init__(self, in_channels: int, image_size: int, base_channels: int, channel_mult: tuple[int, ...],
                 num_res_blocks: int, attention_resolutions: tuple[int, ...], num_heads: int, emb_dim: int,
                 dropout: float, context_dim: int = 0):
        super().__init__()
        resolutions = check_levels(image_size, channel_mult, attention_resolutions)

        def attention(ch: int, level: int) -> nn.Module:
            return AttentionBlock(ch, num_heads, context_dim) if resolutions[level] in attention_resolutions else NoAttention()

        self.attention = attention
        self.input_conv = Conv2d(in_channels, base_channels, 3, padding=1)
        self.blocks = nn.ModuleList()
        self.skip_channels = [base_channels]
        ch = base_channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                out = base_channels * mult
                self.blocks.append(nn.ModuleList([ResBlock(ch, out, emb_dim, dropout), attention(out, level)]))
                ch = out
                self.skip_channels.append(ch)
            if level < len(channel_mult) - 1:
                self.blocks.append(Downsample(ch))
                self.skip_channels.append(ch)
        self.mid_block1 = ResBlock(ch, ch, emb_dim, dropout)
        self.mid_attn = AttentionBlock(ch, num_heads, context_dim)
        self.mid_block2 = ResBlock(ch, ch, emb_dim, dropout)
        self.out_channels = ch

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context=None, mask=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x: (B, C, H, W), emb: (B, E) -> (middle features, skips for the up path)."""
        h = self.input_conv(x)
        skips = [h]
        for layer in self.blocks:
            if isinstance(layer, Downsample):
                h = layer(h)
            else:
                block, attn = layer
                h = attn(block(h, emb), context, mask)
            skips.append(h)
        h = self.mid_block2(self.mid_attn(self.mid_block1(h, emb), context, mask), emb)
        return h, skips


class Conditioning(nn.Module):
    """The time embedding plus what the network is conditioned on: a label embedding (class
    conditioning), or the prompt's token embeddings, projected once to the network's width for
    every cross-attention block, whose mean is also added to the time embedding (GLIDE and
    Imagen add such a pooled vector besides cross-attending to the tokens).

    A super-resolution stage also embeds the noise-augmentation level s in [0, 1] of its low-res
    input, sinusoidally on the same 0..1000 scale as t, through its own MLP (CDM, Imagen).

    unCLIP's decoder takes a CLIP image embedding (B, image_embed_dim): projected and added to the
    time embedding, and projected to embed_tokens extra cross-attention tokens (Ramesh et al. 2022,
    section 2.1). The zero vector is its null condition.

    forward -> (emb (B, E), projected context (B, L, E) or None, context mask (B, L) or None)
    """

    def __init__(self, base_channels: int, emb_dim: int, num_classes: int = 0, context_dim: int = 0, aug_level: bool = False,
                 image_embed_dim: int = 0, embed_tokens: int = 4):
        super().__init__()
        self.base_channels = base_channels
        self.time_mlp = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = LabelEmbedding(num_classes, emb_dim) if num_classes > 0 else None
        if context_dim > 0:
            self.context_proj = nn.Sequential(nn.LayerNorm(context_dim), nn.Linear(context_dim, emb_dim))
            self.context_emb = nn.Linear(emb_dim, emb_dim)
        else:
            self.context_proj = self.context_emb = None
        self.aug_mlp = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)) if aug_level else None
        self.image_embed_dim, self.embed_tokens = image_embed_dim, embed_tokens
        if image_embed_dim > 0:
            self.image_emb = nn.Sequential(nn.Linear(image_embed_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
            self.image_tokens = nn.Linear(image_embed_dim, embed_tokens * emb_dim)
        else:
            self.image_emb = self.image_tokens = None

    def forward(self, x: torch.Tensor, t: torch.Tensor, y=None, context=None, mask=None, aug_level: torch.Tensor | None = None,
                image_embed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        emb = self.time_mlp(timestep_embedding(t, self.base_channels).to(self.time_mlp[0].weight.dtype))  # (B, E)
        if self.aug_mlp is not None:
            s = torch.as_tensor(0.0 if aug_level is None else aug_level, device=x.device).float().expand(x.shape[0])
            emb = emb + self.aug_mlp(timestep_embedding(1000 * s, self.base_channels).to(emb.dtype))
        if self.label_emb is not None:
            emb = emb + self.label_emb(y, x.shape[0], x.device)
        elif y is not None:
            raise UserError("this network is not class-conditional (network.num_classes = 0)")
        if self.context_proj is not None:
            if context is None:
                raise UserError("this network is text-conditional: pass context= and context_mask= from TextEncoder.encode "
                                "(the empty prompt '' is the unconditional branch)")
            context = self.context_proj(context)  # (B, L, E): projected once, not in every block
            emb = emb + self.context_emb(pooled_context(context, mask))
        elif context is not None:
            raise UserError("this network is not text-conditional (network.text_encoder is empty)")
        if self.image_emb is not None:
            emb, context, mask = self._add_image_embed(emb, context, mask, image_embed)
        elif image_embed is not None:
            raise UserError("this network is not conditioned on CLIP image embeddings (train.task is not 'decoder')")
        return emb, context, mask

    def _add_image_embed(self, emb: torch.Tensor, context, mask, image_embed) -> tuple:
        B = emb.shape[0]
        if image_embed is None or image_embed.shape != (B, self.image_embed_dim):
            got = None if image_embed is None else tuple(image_embed.shape)
            raise UserError(f"this decoder is conditioned on CLIP image embeddings: pass image_embed= of shape (B={B}, "
                            f"E={self.image_embed_dim}) (zeros = unconditional), got {got}")
        e = image_embed.to(emb.dtype)
        tokens = self.image_tokens(e).view(B, self.embed_tokens, -1)  # (B, k, E)
        token_mask = torch.ones(B, self.embed_tokens, dtype=torch.bool, device=e.device)
        if context is None:
            return emb + self.image_emb(e), tokens, token_mask
        mask = torch.ones(context.shape[:2], dtype=torch.bool, device=e.device) if mask is None else mask.bool()
        return emb + self.image_emb(e), torch.cat([context, tokens.to(context.dtype)], 1), torch.cat([mask, token_mask], 1)


def upgrade_legacy_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the weights of UNets saved before conditioning moved into submodules (ddpmkit 0.1)."""

    if "time_mlp.0.weight" not in state:
        return state
    out = {}
    for key, value in state.items():
        key = re.sub(r"^(time_mlp|label_emb)\.", r"cond.\1.", key)
        key = re.sub(r"^(input_conv|mid_block1|mid_block2)\.", r"down.\1.", key)
        key = re.sub(r"^mid_attn\.", "down.mid_attn.self_attn.", key)
        key = re.sub(r"^down\.(\d+)\.", r"down.blocks.\1.", key)
        key = re.sub(r"^((?:down\.blocks|up)\.\d+\.1)\.", r"\1.self_attn.", key)
        out[key] = value
    return out


class UNet(nn.Module):
    """eps_theta(x_t, t) for images. x: (B, C, H, W), t: (B,) float timesteps -> (B, C_out, H, W).

    Levels i = 0..len(channel_mult)-1 run at resolution image_size / 2^i with
    base_channels * channel_mult[i] channels; each has num_res_blocks ResBlocks going down and
    num_res_blocks + 1 coming up (each taking a skip connection), with self-attention after the
    blocks of levels whose resolution is in attention_resolutions (and cross-attention to the
    prompt's tokens there when context_dim > 0).

    patch_size p > 1 folds each p x p patch of pixels into channels first (pixel unshuffle) and
    unfolds the output the same way, so the levels run at image_size / p: the UNet spends its
    compute on wider channels at lower resolution (as in "simple diffusion", Hoogeboom et al. 2023).
    attention_resolutions then refer to those reduced resolutions.

    narrow_upsampling makes each upsampling convolution output the finer level's width rather than
    the coarser one's (U-Net, Ronneberger et al. 2015): ~21% fewer FLOPs in the demo's 8-32-64 UNet.

    low_res_channels > 0 makes it a super-resolution stage: forward takes low_res (B, C_low, h, w),
    upsamples it to image_size (upsample_mode) and concatenates it to x_t, and embeds aug_level.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int | None = None,
        image_size: int = 28,
        base_channels: int = 64,
        channel_mult: tuple[int, ...] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: tuple[int, ...] = (7,),
        num_heads: int = 4,
        dropout: float = 0.1,
        num_classes: int = 0,
        context_dim: int = 0,
        patch_size: int = 1,
        low_res_channels: int = 0,
        upsample_mode: str = "bicubic",
        image_embed_dim: int = 0,
        embed_tokens: int = 4,
        narrow_upsampling: bool = False,
    ):
        super().__init__()
        if patch_size < 1 or image_size % patch_size:
            raise UserError(f"patch_size {patch_size} must be a positive divisor of the image size {image_size}")
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.patch_size = patch_size
        self.image_size = image_size
        self.low_res_channels, self.upsample_mode = low_res_channels, upsample_mode
        in_channels, image_size = (in_channels + low_res_channels) * patch_size**2, image_size // patch_size
        emb_dim = 4 * base_channels
        self.cond = Conditioning(base_channels, emb_dim, num_classes, context_dim, aug_level=low_res_channels > 0,
                                 image_embed_dim=image_embed_dim, embed_tokens=embed_tokens)
        cross_attention = context_dim > 0 or image_embed_dim > 0
        self.down = DownPath(in_channels, image_size, base_channels, channel_mult, num_res_blocks, attention_resolutions,
                             num_heads, emb_dim, dropout, emb_dim if cross_attention else 0)
        skip_channels = list(self.down.skip_channels)
        ch = self.down.out_channels
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                out = base_channels * mult
                self.up.append(nn.ModuleList([ResBlock(ch + skip_channels.pop(), out, emb_dim, dropout), self.down.attention(out, level)]))
                ch = out
            if level > 0:
                # narrow_upsampling: the convolution after the 2x upsampling already brings the channels down to the
                # finer level's width (as U-Net's up-convolution halves them), instead of carrying the coarse level's
                # width into the finer resolution; in the demo's 8-32-64 UNet those were its largest convolutions
                up_channels = base_channels * channel_mult[level - 1] if narrow_upsampling else ch
                self.up.append(Upsample(ch, up_channels))
                ch = up_channels
        self.out_norm = group_norm(ch)
        self.out_conv = zero_module(Conv2d(ch, self.out_channels * patch_size**2, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None,
                low_res: torch.Tensor | None = None, aug_level: torch.Tensor | None = None,
                image_embed: torch.Tensor | None = None) -> torch.Tensor:
        """y: (B,) class labels for a class-conditional network (None = the null label);
        context: (B, L, D) prompt token embeddings and context_mask: (B, L) for a text-conditional one;
        low_res: (B, C_low, h, w) and aug_level: (B,) in [0, 1] for a super-resolution stage;
        image_embed: (B, E) CLIP image embeddings for unCLIP's decoder."""
        x = torch.cat([x, self._upsampled(low_res, x)], dim=1) if self.low_res_channels else self._no_low_res(low_res, x)
        if self.patch_size > 1:
            x = F.pixel_unshuffle(x, self.patch_size)
        emb, context, context_mask = self.cond(x, t, y, context, context_mask, aug_level, image_embed)
        h, skips = self.down(x, emb, context, context_mask)
        for layer in self.up:
            if isinstance(layer, Upsample):
                h = layer(h)
            else:
                block, attn = layer
                h = attn(block(torch.cat([h, skips.pop()], dim=1), emb), context, context_mask)
        out = self.out_conv(F.silu(self.out_norm(h)))
        return F.pixel_shuffle(out, self.patch_size) if self.patch_size > 1 else out

    def _upsampled(self, low_res: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        if low_res is None:
            raise UserError("this network is a super-resolution stage: pass low_res= (B, C, h, w), the low-resolution "
                            "image, and aug_level= (B,) (ddpmkit.pipelines.super_resolve does both)")
        if low_res.ndim != 4 or low_res.shape[1] != self.low_res_channels or low_res.shape[0] != x.shape[0]:
            raise UserError(f"low_res must have shape (B={x.shape[0]}, C={self.low_res_channels}, h, w), got {tuple(low_res.shape)}")
        return upsample(low_res.to(x.dtype), self.image_size, self.upsample_mode)

    @staticmethod
    def _no_low_res(low_res: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        if low_res is not None:
            raise UserError("this network is not a super-resolution stage; it takes no low_res image")
        return x
